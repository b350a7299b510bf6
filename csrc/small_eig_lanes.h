// Batched small eigenvalue solver, four matrices at a time in the four double-precision lanes of AVX2.
//
// Used by lowrank.cpp's CPU eigvals for k <= 128 when the CPU has AVX2 and FMA (checked at run time; the
// functions below are compiled for AVX2 only, inside the GCC target pragma, and never called otherwise).
// The algorithm is the scalar path's -- EISPACK elmhes + hqr, eigenvalues only, in double precision -- run
// in lock step on kLanes matrices whose entries are interleaved (entry (i, j) of all lanes is one vector):
//
// * elmhes: each lane picks its own pivot and swaps its own rows/columns (O(n) scalar work per column);
//   the elimination and its inverse on the right are the same vector operations for every lane.
// * hqr: deflation checks and shifts are per lane (scalar, O(n) per iteration); the bulge chase -- almost
//   all of the flops -- runs over the union of the lanes' active ranges, each lane applying its own
//   reflector at each step (the identity where it has none). Updating a lane outside its own active
//   window only touches blocks coupling it to already deflated or not yet active parts, which do not
//   change its remaining eigenvalues (it is what the Schur-form variant of the algorithm does anyway).
//
// Lanes converge at similar rates, so the union ranges cost ~5% more than the lanes would alone; the
// vector code does four matrices for about the price of one. Differences from the scalar path: none in
// exact arithmetic; results agree to rounding (FMA contraction, summation order).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HOOKLENS_HAVE_LANE_SOLVER 1

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace hooklens {
namespace lanes {

constexpr int kLanes = 4;

typedef double vd __attribute__((vector_size(8 * kLanes)));
typedef long long vm __attribute__((vector_size(8 * kLanes)));  // lane masks: all ones (true) or zero

static inline vd splat(double x) {  // (not vd{} + x: +0.0 + -0.0 is +0.0)
  vd r;
  for (int q = 0; q < kLanes; ++q) r[q] = x;
  return r;
}
static inline vd vabs(vd x) { return (vd)((vm)x & ~(vm)splat(-0.0)); }
static inline vd blend(vm mask, vd a, vd b) { return (vd)(((vm)a & mask) | ((vm)b & ~mask)); }  // mask ? a : b
static inline vd vcopysign(vd magnitude, vd sign) {
  const vm sign_bit = (vm)splat(-0.0);
  return (vd)(((vm)magnitude & ~sign_bit) | ((vm)sign & sign_bit));
}
static inline vd vsqrt(vd x) { return (vd)_mm256_sqrt_pd((__m256d)x); }

// Zero-initialised storage for n vectors, 32-byte aligned (std::vector<vd> is not: the allocator it ends up
// with in a torch extension does not honour the vector type's alignment).
class VecBuffer {
 public:
  explicit VecBuffer(size_t n) {
    const size_t bytes = std::max<size_t>(1, n) * sizeof(vd);
    data_ = static_cast<vd*>(std::aligned_alloc(alignof(vd), (bytes + alignof(vd) - 1) / alignof(vd) * alignof(vd)));
    if (data_ == nullptr) throw std::bad_alloc();
    for (size_t i = 0; i < n; ++i) data_[i] = splat(0.0);
  }
  ~VecBuffer() { std::free(data_); }
  VecBuffer(const VecBuffer&) = delete;
  VecBuffer& operator=(const VecBuffer&) = delete;
  vd& operator[](size_t i) { return data_[i]; }

 private:
  vd* data_;
};

// Interleaved storage: entry (i, j) of lane q is H[(i * ld + j)][q], ld = n + 1, rows 0..n (row n and
// column n are zero padding so a 3-row / 3-column reflector at the bottom edge stays in bounds).
struct Batch {
  int n, ld;
  VecBuffer H;
  explicit Batch(int n_) : n(n_), ld(n_ + 1), H(static_cast<size_t>(n_ + 1) * (n_ + 1)) {}
  vd& operator()(int i, int j) { return H[static_cast<size_t>(i) * ld + j]; }
  double& at(int i, int j, int q) { return H[static_cast<size_t>(i) * ld + j][q]; }
};

// Reduction to upper Hessenberg form by stabilised elementary similarity transforms (EISPACK elmhes), all
// lanes at once: the pivot search and the row/column swap are per lane (O(n) each), the elimination and
// its inverse on the right are vectorised over the lanes. Half the flops of the Householder reduction.
static __attribute__((noinline)) void hessenberg_elim(Batch& b, int lanes_used) {
  const int n = b.n;
  VecBuffer y(n);
  for (int m = 1; m + 1 < n; ++m) {
    for (int q = 0; q < lanes_used; ++q) {
      double best = 0.0;
      int piv = m;
      for (int j = m; j < n; ++j) {
        const double v = std::fabs(b.at(j, m - 1, q));
        if (v > best) {
          best = v;
          piv = j;
        }
      }
      if (piv != m) {
        for (int j = m - 1; j < n; ++j) std::swap(b.at(piv, j, q), b.at(m, j, q));
        for (int j = 0; j < n; ++j) std::swap(b.at(j, piv, q), b.at(j, m, q));
      }
    }
    const vd x = b(m, m - 1);
    const vm nonzero = x != splat(0.0);
    const vd xs = blend(nonzero, x, splat(1.0));
    const vd* rowm = &b(m, 0);
    for (int i = m + 1; i < n; ++i) {
      vd* rowi = &b(i, 0);
      const vd yi = blend(nonzero, rowi[m - 1] / xs, splat(0.0));
      y[i] = yi;
      rowi[m - 1] = splat(0.0);
      for (int j = m; j < n; ++j) rowi[j] -= yi * rowm[j];
    }
    for (int j = 0; j < n; ++j) {
      vd* rowj = &b(j, 0);
      vd acc = splat(0.0);
      for (int i = m + 1; i < n; ++i) acc += y[i] * rowj[i];
      rowj[m] += acc;
    }
  }
}

// Francis double-shift QR on all lanes in lock step (EISPACK hqr per lane for deflation and shifts; the
// bulge chase runs vectorized over the union of the lanes' active ranges, each lane applying its own
// reflector -- the identity where it has none at that step). Updates outside a lane's active block only
// touch its coupling blocks or its deflated part, which do not change its remaining eigenvalues.
// wr/wi: [n][kLanes]. failed[q] set if lane q did not converge in max_its iterations per eigenvalue.
static __attribute__((noinline)) void hqr(Batch& b, int lanes_used, double* wr, double* wi, bool* failed, int max_its) {
  const int n = b.n;
  int nn[kLanes], its[kLanes], l_[kLanes], m_[kLanes];
  double t[kLanes], anorm[kLanes], p0[kLanes], q0[kLanes], r0[kLanes];
  for (int q = 0; q < kLanes; ++q) {
    nn[q] = q < lanes_used ? n - 1 : -1;
    its[q] = 0;
    t[q] = 0.0;
    failed[q] = false;
    double a = 0.0;
    for (int i = 0; i < n; ++i)
      for (int j = std::max(i - 1, 0); j < n; ++j) a += std::fabs(b.at(i, j, q));
    anorm[q] = a;
  }
  for (;;) {
    bool any = false;
    vm first_ok{}, in_play{};
    for (int q = 0; q < kLanes; ++q) {
      auto A = [&](int i, int j) -> double& { return b.at(i, j, q); };
      // Deflate as far as possible.
      int l = 0;
      while (nn[q] >= 0) {
        const int N = nn[q];
        for (l = N; l >= 1; --l) {
          double s = std::fabs(A(l - 1, l - 1)) + std::fabs(A(l, l));
          if (s == 0.0) s = anorm[q];
          if (std::fabs(A(l, l - 1)) + s == s) {
            A(l, l - 1) = 0.0;
            break;
          }
        }
        const double x = A(N, N);
        if (l == N) {
          wr[N * kLanes + q] = x + t[q];
          wi[N * kLanes + q] = 0.0;
          nn[q] -= 1;
          its[q] = 0;
          continue;
        }
        if (l == N - 1) {
          const double y = A(N - 1, N - 1), w = A(N, N - 1) * A(N - 1, N);
          const double p = 0.5 * (y - x), qq = p * p + w;
          double z = std::sqrt(std::fabs(qq));
          const double xt = x + t[q];
          if (qq >= 0.0) {
            z = p + std::copysign(z, p);
            wr[(N - 1) * kLanes + q] = wr[N * kLanes + q] = xt + z;
            if (z != 0.0) wr[N * kLanes + q] = xt - w / z;
            wi[(N - 1) * kLanes + q] = wi[N * kLanes + q] = 0.0;
          } else {
            wr[(N - 1) * kLanes + q] = wr[N * kLanes + q] = xt + p;
            wi[(N - 1) * kLanes + q] = z;
            wi[N * kLanes + q] = -z;
          }
          nn[q] -= 2;
          its[q] = 0;
          continue;
        }
        break;
      }
      if (nn[q] < 0) continue;
      if (its[q] == max_its) {
        failed[q] = true;
        nn[q] = -1;
        continue;
      }
      const int N = nn[q];
      double x = A(N, N), y = A(N - 1, N - 1), w = A(N, N - 1) * A(N - 1, N);
      if (its[q] > 0 && its[q] % 10 == 0) {  // exceptional shift
        t[q] += x;
        for (int i = 0; i <= N; ++i) A(i, i) -= x;
        const double s = std::fabs(A(N, N - 1)) + std::fabs(A(N - 1, N - 2));
        y = x = 0.75 * s;
        w = -0.4375 * s * s;
      }
      ++its[q];
      int m;
      double p = 0.0, qq = 0.0, r = 0.0;
      for (m = N - 2; m >= l; --m) {
        const double z = A(m, m);
        r = x - z;
        double s = y - z;
        p = (r * s - w) / A(m + 1, m) + A(m, m + 1);
        qq = A(m + 1, m + 1) - z - r - s;
        r = A(m + 2, m + 1);
        s = std::fabs(p) + std::fabs(qq) + std::fabs(r);
        p /= s;
        qq /= s;
        r /= s;
        if (m == l) break;
        const double u = std::fabs(A(m, m - 1)) * (std::fabs(qq) + std::fabs(r));
        const double v = std::fabs(p) * (std::fabs(A(m - 1, m - 1)) + std::fabs(z) + std::fabs(A(m + 1, m + 1)));
        if (u + v == v) break;
      }
      for (int i = m + 2; i <= N; ++i) {
        A(i, i - 2) = 0.0;
        if (i != m + 2) A(i, i - 3) = 0.0;
      }
      l_[q] = l;
      m_[q] = m;
      p0[q] = p;
      q0[q] = qq;
      r0[q] = r;
      in_play[q] = -1;
      first_ok[q] = l != m ? -1 : 0;  // at k == m: negate A(k, k-1) (if l != m)
      any = true;
    }
    if (!any) break;
    int kmin = n, kmax = -1, lmin = n, nmax = -1;
    for (int q = 0; q < kLanes; ++q) {
      if (!in_play[q]) continue;
      kmin = std::min(kmin, m_[q]);
      kmax = std::max(kmax, nn[q] - 1);
      lmin = std::min(lmin, l_[q]);
      nmax = std::max(nmax, nn[q]);
    }
    vd P0, Q0, R0;
    for (int q = 0; q < kLanes; ++q) {
      P0[q] = in_play[q] ? p0[q] : 0.0;
      Q0[q] = in_play[q] ? q0[q] : 0.0;
      R0[q] = in_play[q] ? r0[q] : 0.0;
    }
    const vd zero = splat(0.0);
    for (int k = kmin; k <= kmax; ++k) {
      vm in_range, first, last;
      for (int q = 0; q < kLanes; ++q) {
        const bool ir = in_play[q] && k >= m_[q] && k <= nn[q] - 1;
        in_range[q] = ir ? -1 : 0;
        first[q] = ir && k == m_[q] ? -1 : 0;
        last[q] = ir && k == nn[q] - 1 ? -1 : 0;
      }
      vd p, qv, r, x = zero;
      if (k > 0) {
        vd pk = b(k, k - 1), qk = b(k + 1, k - 1), rk = blend(last, zero, b(k + 2, k - 1));
        x = vabs(pk) + vabs(qk) + vabs(rk);
        const vm nz = x != zero;
        const vd xs = blend(nz, x, splat(1.0));
        pk /= xs;
        qk /= xs;
        rk /= xs;
        p = blend(first, P0, pk);
        qv = blend(first, Q0, qk);
        r = blend(first, R0, rk);
      } else {
        p = P0;
        qv = Q0;
        r = R0;
      }
      r = blend(last, zero, r);
      const vd s = vcopysign(vsqrt(p * p + qv * qv + r * r), p);
      const vm act = in_range & (s != zero);
      if (k > 0) {
        vd& sub = b(k, k - 1);
        const vd updated = blend(first, -sub, -s * x);
        sub = blend(act & (~first | first_ok), updated, sub);
      }
      p += s;
      const vd safe_s = blend(act, s, splat(1.0)), safe_p = blend(act, p, splat(1.0));
      const vd X = blend(act, p / safe_s, zero), Y = blend(act, qv / safe_s, zero), Z = blend(act, r / safe_s, zero);
      const vd Q = blend(act, qv / safe_p, zero), R = blend(act, r / safe_p, zero);
      // Rows k, k+1, k+2 over columns k..nmax.
      vd* rk = &b(k, 0);
      vd* rk1 = &b(k + 1, 0);
      vd* rk2 = &b(k + 2, 0);
      for (int j = k; j <= nmax; ++j) {
        const vd pp = rk[j] + Q * rk1[j] + R * rk2[j];
        rk2[j] -= pp * Z;
        rk1[j] -= pp * Y;
        rk[j] -= pp * X;
      }
      // Columns k, k+1, k+2 over rows lmin..min(nmax, k+3).
      const int imax = std::min(nmax, k + 3);
      for (int i = lmin; i <= imax; ++i) {
        vd* ri = &b(i, 0);
        const vd pp = X * ri[k] + Y * ri[k + 1] + Z * ri[k + 2];
        ri[k + 2] -= pp * R;
        ri[k + 1] -= pp * Q;
        ri[k] -= pp;
      }
    }
  }
}


// The entry point: eigenvalues of `used` (<= kLanes) balanced n x n row-major matrices mats[q]. Writes
// wr[i * kLanes + q] + i wi[i * kLanes + q] (unordered), and failed[q] if lane q's QR iteration did not
// converge within max_its iterations per eigenvalue. Call only when available().
static __attribute__((noinline)) void solve_group(const double* const* mats, int used, int n, double* wr,
                                                  double* wi, bool* failed, int max_its) {
  Batch b(n);
  for (int q = 0; q < used; ++q)
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) b.at(i, j, q) = mats[q][i * n + j];
  hessenberg_elim(b, used);
  hqr(b, used, wr, wi, failed, max_its);
}

}  // namespace lanes
}  // namespace hooklens

#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace hooklens {
namespace lanes {
// Whether this CPU can run the solver above (AVX2 and FMA).
inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
}  // namespace lanes
}  // namespace hooklens

#endif
