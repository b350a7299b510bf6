// Low-rank linear algebra on factored matrices M = A @ B, A: [..., m, k], B: [..., k, n], without forming M.
//
// The operators live in the `hooklens` namespace of the PyTorch dispatcher (torch.ops.hooklens.*). Python
// wrappers, fake (meta) kernels and autograd registrations are in hooklens/ops/lowrank.py.
//
//   lowrank_eigvals(A, B)  -> complex [..., k]   eigenvalues of B @ A (the nonzero ones of A @ B), |.| descending
//   lowrank_svd(A, B)      -> U [..., m, r], S [..., r], Vh [..., r, n]   thin SVD of A @ B, r = min(m, k, n)
//   lowrank_fro_norm(A, B) -> [...]                  ||A @ B||_F
//   lowrank_trace(A, B)    -> [...]                  trace(A @ B)
//   small_eigvals(C, solver="auto") -> complex [..., k]   eigenvalues of square C [..., k, k], same ordering;
//                             solver: "auto" | "lanes" | "scalar" | "lapack" (which host solver; for tests)
//   lowrank_max(A, B)      -> values [..., m], indices [..., m] (int64)   max of each row of A @ B and the
//                             first column attaining it (torch.max(A @ B, dim=-1) semantics, NaN wins)
//   _lowrank_max_chunked(A, B, chunk_bytes) -> lowrank_max's CUDA kernel, registered for every device (tests)
//
// Leading (batch) dimensions broadcast like torch.matmul. float32 and float64 are supported. A matrix with a
// NaN or inf entry gets all-NaN eigenvalues.
//
// Eigenvalues: lowrank_eigvals and small_eigvals have their own host solver for k <= 128 (balancing + Hessenberg
// reduction by stabilised elementary similarity transforms + Francis double-shift QR, eigenvalues only: EISPACK
// balanc/elmhes/hqr), run in double precision and in parallel over the batch; with AVX2 + FMA four matrices at a
// time, one per SIMD lane (small_eig_lanes.h). Device policy: the same kernel serves CPU and CUDA, and CUDA
// matrices take one round trip to that host solver (eigvals_host_route says why). k > 128 and a matrix on which
// the QR iteration does not converge go to LAPACK on the host; solver "lapack" to torch.linalg on C's device.
// lowrank_svd runs ATen's QR/SVD chain, on CPU in parallel over the batch. lowrank_fro_norm and lowrank_trace are
// ATen expressions, the same kernel on every device.
//
// lowrank_max never holds more than a cache-sized tile of A @ B: on CPU it multiplies row blocks of A by
// column blocks of B (BLAS through ATen) and folds each tile into running row maxima while it is still in
// cache; on CUDA it takes row chunks of at most ~256 MiB of A @ B.
//
// The ops are forward-only in C++; hooklens/ops/lowrank.py registers their backward formulas: closed forms
// for lowrank_trace, lowrank_fro_norm and lowrank_max (and _lowrank_max_chunked), a torch.linalg recomputation
// for the eigenvalue and SVD ops. It also registers the fake (meta) kernels, which make the same device and dtype
// checks as check_factors below: a CPU tensor mixed with a meta one dispatches to the fake kernel, not to these.

#include <Python.h>

#include <ATen/Parallel.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <complex>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "small_eig_lanes.h"

extern "C" {
/* `import hooklens._C` loads this shared library, which runs the TORCH_LIBRARY static initialisers below.
   The module itself is empty; it only uses the stable (limited) Python API. */
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                            /* name of module */
      "hooklens C++ operators (torch.ops.hooklens)", /* module documentation */
      -1,                                              /* size of per-interpreter state */
      NULL,                                            /* methods */
  };
  return PyModule_Create(&module_def);
}
}

namespace hooklens {

using at::Tensor;

namespace {

constexpr int64_t kSmallEigK = 128;  // largest k handled by the hand-written eigenvalue solver
constexpr int kMaxQRIterations = 60;  // per eigenvalue, before falling back to LAPACK for that matrix

// ----------------------------------------------------------------------------------------------------
// Input validation
// ----------------------------------------------------------------------------------------------------

// Checks A: [..., m, k] and B: [..., k, n] and returns the broadcast batch shape.
std::vector<int64_t> check_factors(const char* op, const Tensor& A, const Tensor& B, bool square) {
  TORCH_CHECK(A.defined() && B.defined(), op, ": A and B must be defined tensors");
  TORCH_CHECK(A.dim() >= 2, op, ": A must have shape [..., m, k] (at least 2 dimensions), got shape ",
              A.sizes());
  TORCH_CHECK(B.dim() >= 2, op, ": B must have shape [..., k, n] (at least 2 dimensions), got shape ",
              B.sizes());
  TORCH_CHECK(A.device() == B.device(), op, ": A and B must be on the same device, got A on ", A.device(),
              " and B on ", B.device(), "; move one with B.to(A.device)");
  TORCH_CHECK(A.scalar_type() == B.scalar_type(), op, ": A and B must have the same dtype, got A ",
              A.scalar_type(), " and B ", B.scalar_type(), "; convert one with B.to(A.dtype)");
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble, op,
              ": only float32 and float64 are supported, got ", A.scalar_type());
  TORCH_CHECK(A.layout() == at::kStrided && B.layout() == at::kStrided, op,
              ": only dense (strided) tensors are supported");
  TORCH_CHECK(A.size(-1) == B.size(-2), op, ": inner dimensions must match: A is [..., m, k] with shape ",
              A.sizes(), " and B is [..., k, n] with shape ", B.sizes(), " (k = ", A.size(-1), " vs ",
              B.size(-2), ")");
  if (square) {
    TORCH_CHECK(A.size(-2) == B.size(-1), op, ": A @ B must be square (m == n): A has shape ", A.sizes(),
                " and B has shape ", B.sizes(), " (m = ", A.size(-2), ", n = ", B.size(-1), ")");
  }
  // Broadcast the batch dimensions like torch.matmul, with an error that names the operands.
  const int64_t da = A.dim() - 2, db = B.dim() - 2, nd = std::max(da, db);
  std::vector<int64_t> batch(nd);
  for (int64_t i = 0; i < nd; ++i) {
    const int64_t ia = i - (nd - da), ib = i - (nd - db);
    const int64_t sa = ia >= 0 ? A.size(ia) : 1, sb = ib >= 0 ? B.size(ib) : 1;
    TORCH_CHECK(sa == sb || sa == 1 || sb == 1, op,
                ": the batch (leading) dimensions of A and B do not broadcast: A has shape ", A.sizes(),
                " and B has shape ", B.sizes());
    batch[i] = sa == 1 ? sb : sa;
  }
  return batch;
}

// ----------------------------------------------------------------------------------------------------
// Small dense real eigenvalue solver (double precision, row-major n x n matrix, destroyed on output)
// ----------------------------------------------------------------------------------------------------

// Diagonal similarity scaling by powers of 2 so that rows and columns have comparable norms (EISPACK
// balanc without the permutation step). Exact in floating point; improves the accuracy of what follows.
void balance(double* a, int n) {
  constexpr double radix = 2.0, sqrdx = radix * radix;
  bool done = false;
  for (int sweep = 0; !done && sweep < 100; ++sweep) {
    done = true;
    for (int i = 0; i < n; ++i) {
      double r = 0.0, c = 0.0;
      for (int j = 0; j < n; ++j) {
        if (j != i) {
          c += std::fabs(a[j * n + i]);
          r += std::fabs(a[i * n + j]);
        }
      }
      if (c == 0.0 || r == 0.0) continue;
      double g = r / radix, f = 1.0;
      const double s = c + r;
      while (c < g) {
        f *= radix;
        c *= sqrdx;
      }
      g = r * radix;
      while (c > g) {
        f /= radix;
        c /= sqrdx;
      }
      if ((c + r) / f < 0.95 * s) {
        done = false;
        const double ginv = 1.0 / f;
        for (int j = 0; j < n; ++j) a[i * n + j] *= ginv;
        for (int j = 0; j < n; ++j) a[j * n + i] *= f;
      }
    }
  }
}

// Reduction to upper Hessenberg form by Gaussian elimination with partial pivoting (EISPACK elmhes):
// half the flops of the Householder reduction, and adequate for eigenvalues. `y` is scratch of size n.
// Entries below the subdiagonal are set to zero.
void hessenberg(double* a, int n, double* y) {
  for (int m = 1; m < n - 1; ++m) {
    // Pivot: the largest entry of column m-1 at or below row m.
    double x = 0.0;
    int piv = m;
    for (int j = m; j < n; ++j) {
      if (std::fabs(a[j * n + m - 1]) > std::fabs(x)) {
        x = a[j * n + m - 1];
        piv = j;
      }
    }
    if (piv != m) {  // similarity permutation: swap rows and columns piv and m
      for (int j = m - 1; j < n; ++j) std::swap(a[piv * n + j], a[m * n + j]);
      for (int j = 0; j < n; ++j) std::swap(a[j * n + piv], a[j * n + m]);
    }
    if (x == 0.0) continue;
    // Row operations: row_i -= y_i * row_m for i > m (eliminates column m-1 below the subdiagonal)...
    bool any = false;
    const double* rowm = a + m * n;
    for (int i = m + 1; i < n; ++i) {
      double* rowi = a + i * n;
      const double yi = rowi[m - 1] / x;
      y[i] = yi;
      rowi[m - 1] = 0.0;
      if (yi != 0.0) {
        any = true;
        for (int j = m; j < n; ++j) rowi[j] -= yi * rowm[j];
      }
    }
    if (!any) continue;
    // ...then the inverse transform on the right: col_m += sum_i y_i * col_i, as a dot product per row.
    for (int j = 0; j < n; ++j) {
      const double* rowj = a + j * n;
      double acc0 = 0.0, acc1 = 0.0, acc2 = 0.0, acc3 = 0.0;  // 4 chains: no -ffast-math needed to pipeline
      int i = m + 1;
      for (; i + 3 < n; i += 4) {
        acc0 += y[i] * rowj[i];
        acc1 += y[i + 1] * rowj[i + 1];
        acc2 += y[i + 2] * rowj[i + 2];
        acc3 += y[i + 3] * rowj[i + 3];
      }
      for (; i < n; ++i) acc0 += y[i] * rowj[i];
      a[j * n + m] += (acc0 + acc1) + (acc2 + acc3);
    }
  }
}

// Eigenvalues of an upper Hessenberg matrix by the Francis double-shift QR algorithm (EISPACK hqr, which
// only updates the active block since no Schur vectors are wanted). Returns false if it did not converge.
bool hqr(double* a, int n, double* wr, double* wi) {
  auto A = [a, n](int i, int j) -> double& { return a[i * n + j]; };
  double anorm = 0.0;
  for (int i = 0; i < n; ++i)
    for (int j = std::max(i - 1, 0); j < n; ++j) anorm += std::fabs(A(i, j));

  int nn = n - 1;
  int its = 0;
  double t = 0.0;  // accumulated exceptional shifts
  while (nn >= 0) {
    // Look for a single small subdiagonal element.
    int l;
    for (l = nn; l >= 1; --l) {
      double s = std::fabs(A(l - 1, l - 1)) + std::fabs(A(l, l));
      if (s == 0.0) s = anorm;
      if (std::fabs(A(l, l - 1)) + s == s) {
        A(l, l - 1) = 0.0;
        break;
      }
    }
    double x = A(nn, nn);
    if (l == nn) {  // one real root
      wr[nn] = x + t;
      wi[nn] = 0.0;
      --nn;
      its = 0;
      continue;
    }
    double y = A(nn - 1, nn - 1);
    double w = A(nn, nn - 1) * A(nn - 1, nn);
    if (l == nn - 1) {  // a 2x2 block: two roots
      const double p = 0.5 * (y - x);
      const double q = p * p + w;
      double z = std::sqrt(std::fabs(q));
      x += t;
      if (q >= 0.0) {  // real pair
        z = p + std::copysign(z, p);
        wr[nn - 1] = wr[nn] = x + z;
        if (z != 0.0) wr[nn] = x - w / z;
        wi[nn - 1] = wi[nn] = 0.0;
      } else {  // complex conjugate pair
        wr[nn - 1] = wr[nn] = x + p;
        wi[nn - 1] = z;
        wi[nn] = -z;
      }
      nn -= 2;
      its = 0;
      continue;
    }
    if (its == kMaxQRIterations) return false;
    if (its > 0 && its % 10 == 0) {  // exceptional shift
      t += x;
      for (int i = 0; i <= nn; ++i) A(i, i) -= x;
      const double s = std::fabs(A(nn, nn - 1)) + std::fabs(A(nn - 1, nn - 2));
      y = x = 0.75 * s;
      w = -0.4375 * s * s;
    }
    ++its;
    // Form the shift and look for two consecutive small subdiagonal elements.
    int m;
    double p = 0.0, q = 0.0, r = 0.0, z = 0.0;
    for (m = nn - 2; m >= l; --m) {
      z = A(m, m);
      r = x - z;
      double s = y - z;
      p = (r * s - w) / A(m + 1, m) + A(m, m + 1);
      q = A(m + 1, m + 1) - z - r - s;
      r = A(m + 2, m + 1);
      s = std::fabs(p) + std::fabs(q) + std::fabs(r);
      p /= s;
      q /= s;
      r /= s;
      if (m == l) break;
      const double u = std::fabs(A(m, m - 1)) * (std::fabs(q) + std::fabs(r));
      const double v = std::fabs(p) * (std::fabs(A(m - 1, m - 1)) + std::fabs(z) + std::fabs(A(m + 1, m + 1)));
      if (u + v == v) break;
    }
    for (int i = m + 2; i <= nn; ++i) {
      A(i, i - 2) = 0.0;
      if (i != m + 2) A(i, i - 3) = 0.0;
    }
    // Double-shift QR step on rows l..nn and columns m..nn (chasing the bulge with 3x3 reflectors).
    for (int k = m; k <= nn - 1; ++k) {
      if (k != m) {
        p = A(k, k - 1);
        q = A(k + 1, k - 1);
        r = (k != nn - 1) ? A(k + 2, k - 1) : 0.0;
        x = std::fabs(p) + std::fabs(q) + std::fabs(r);
        if (x != 0.0) {
          p /= x;
          q /= x;
          r /= x;
        }
      }
      const double s = std::copysign(std::sqrt(p * p + q * q + r * r), p);
      if (s == 0.0) continue;
      if (k == m) {
        if (l != m) A(k, k - 1) = -A(k, k - 1);
      } else {
        A(k, k - 1) = -s * x;
      }
      p += s;
      x = p / s;
      y = q / s;
      z = r / s;
      q /= p;
      r /= p;
      double* rk = a + k * n;
      double* rk1 = rk + n;
      if (k != nn - 1) {
        double* rk2 = rk1 + n;
        for (int j = k; j <= nn; ++j) {
          const double pp = rk[j] + q * rk1[j] + r * rk2[j];
          rk2[j] -= pp * z;
          rk1[j] -= pp * y;
          rk[j] -= pp * x;
        }
      } else {
        for (int j = k; j <= nn; ++j) {
          const double pp = rk[j] + q * rk1[j];
          rk1[j] -= pp * y;
          rk[j] -= pp * x;
        }
      }
      const int mmin = std::min(nn, k + 3);
      for (int i = l; i <= mmin; ++i) {
        double* ri = a + i * n;
        double pp = x * ri[k] + y * ri[k + 1];
        if (k != nn - 1) {
          pp += z * ri[k + 2];
          ri[k + 2] -= pp * r;
        }
        ri[k + 1] -= pp * q;
        ri[k] -= pp;
      }
    }
  }
  return true;
}

// The ordering used by every eigvals path: |lambda| descending, ties (e.g. conjugate pairs) by the
// imaginary part descending.
Tensor sort_eigvals_desc(const Tensor& ev) {
  if (ev.size(-1) <= 1) return ev;
  const Tensor by_imag = std::get<1>(at::sort(at::imag(ev), /*stable=*/true, /*dim=*/-1, /*descending=*/true));
  const Tensor ev1 = ev.gather(-1, by_imag);
  const Tensor by_abs = std::get<1>(at::sort(at::abs(ev1), /*stable=*/true, /*dim=*/-1, /*descending=*/true));
  return ev1.gather(-1, by_abs);
}

at::ScalarType complex_dtype_for(at::ScalarType real) {
  return real == at::kFloat ? at::kComplexFloat : at::kComplexDouble;
}

// B @ A in double precision (the k x k matrix whose eigenvalues are wanted).
Tensor core_matrix_double(const Tensor& A, const Tensor& B) {
  return at::matmul(B.to(at::kDouble), A.to(at::kDouble));
}

// Eigenvalues through torch.linalg's solver (LAPACK/MAGMA/cuSOLVER). A matrix with a NaN or inf entry gets
// all-NaN eigenvalues (LAPACK's result for it is unspecified), like the CPU fast path.
Tensor eigvals_via_aten(const Tensor& C, at::ScalarType out_dtype) {
  const Tensor finite = at::isfinite(C).all(-1).all(-1);  // [...]
  const Tensor ev = at::linalg_eigvals(at::where(finite.unsqueeze(-1).unsqueeze(-1), C, at::zeros({}, C.options())));
  const Tensor nan = at::full({}, c10::complex<double>(NAN, NAN), ev.options());
  return sort_eigvals_desc(at::where(finite.unsqueeze(-1), ev, nan)).to(out_dtype).contiguous();
}

// Writes the n eigenvalues wr[i * stride] + i wi[i * stride] to o, sorted like sort_eigvals_desc.
template <typename scalar_t>
void write_sorted_eigvals(const double* wr, const double* wi, int stride, int n, c10::complex<scalar_t>* o) {
  std::vector<double> mag(n);
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) mag[i] = std::abs(std::complex<double>(wr[i * stride], wi[i * stride]));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int i, int j) {
    if (mag[i] != mag[j]) return mag[i] > mag[j];
    return wi[i * stride] > wi[j * stride];
  });
  for (int i = 0; i < n; ++i) {
    o[i] = c10::complex<scalar_t>(static_cast<scalar_t>(wr[order[i] * stride]),
                                  static_cast<scalar_t>(wi[order[i] * stride]));
  }
}

// Eigenvalues of C[b] (k x k, k <= kSmallEigK) for every b, in parallel over the batch. With AVX2 + FMA,
// groups of four matrices go through the lane solver (small_eig_lanes.h); otherwise one at a time through
// balance + hessenberg + hqr above. Either way: balancing first, double precision, eigenvalues only.
// `lane_solver`: "auto" uses the lanes when the CPU has them, "scalar" never (tests compare the two).
template <typename scalar_t>
void eigvals_small_cpu(const Tensor& C, Tensor& out, std::vector<char>& failed, bool allow_lanes) {
  // C: [batch, k, k] contiguous double. out: [batch, k] contiguous complex<scalar_t>.
  const int64_t batch = C.size(0);
  const int k = static_cast<int>(C.size(1));
  const double* cdata = C.const_data_ptr<double>();
  auto* odata = out.mutable_data_ptr<c10::complex<scalar_t>>();
#ifdef HOOKLENS_HAVE_LANE_SOLVER
  const bool use_lanes = allow_lanes && k >= 3 && lanes::available();
  constexpr int kGroup = lanes::kLanes;
#else
  const bool use_lanes = false;
  constexpr int kGroup = 4;
#endif

  // Work is handed out dynamically (an atomic counter) rather than in static halves: the cost per matrix
  // varies with its QR iteration count, and on a shared machine one thread may get less CPU than another.
  const int64_t cost = 10 * static_cast<int64_t>(k) * k * k + 1;  // ~flops per matrix
  const int64_t chunk = use_lanes ? kGroup : std::max<int64_t>(1, (int64_t{1} << 16) / cost);
  const int64_t nitems = (batch + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t /*begin*/, int64_t /*end*/) {
    std::vector<double> a(static_cast<size_t>(k) * k * kGroup), wr(k * kGroup), wi(k * kGroup), scratch(k);
    for (;;) {
      const int64_t item = next.fetch_add(1, std::memory_order_relaxed);
      if (item >= nitems) break;
      const int64_t b0 = item * chunk, b1 = std::min(batch, (item + 1) * chunk);
      // Balance each finite matrix; a matrix with a NaN or inf entry gets all-NaN eigenvalues.
      std::vector<int64_t> todo;
      for (int64_t b = b0; b < b1; ++b) {
        double* m = a.data() + (todo.size() % kGroup) * k * k;
        std::copy(cdata + b * k * k, cdata + (b + 1) * k * k, m);
        bool finite = true;
        for (int64_t i = 0; i < static_cast<int64_t>(k) * k; ++i) finite = finite && std::isfinite(m[i]);
        if (!finite) {
          std::fill(odata + b * k, odata + (b + 1) * k, c10::complex<scalar_t>(NAN, NAN));
          continue;
        }
        balance(m, k);
        if (!use_lanes) {
          hessenberg(m, k, scratch.data());
          if (!hqr(m, k, wr.data(), wi.data())) {
            failed[b] = 1;
            continue;
          }
          write_sorted_eigvals<scalar_t>(wr.data(), wi.data(), 1, k, odata + b * k);
          continue;
        }
        todo.push_back(b);
      }
#ifdef HOOKLENS_HAVE_LANE_SOLVER
      if (use_lanes && !todo.empty()) {
        const int used = static_cast<int>(todo.size());
        const double* mats[kGroup];
        bool lane_failed[kGroup];
        for (int q = 0; q < used; ++q) mats[q] = a.data() + q * k * k;
        lanes::solve_group(mats, used, k, wr.data(), wi.data(), lane_failed, kMaxQRIterations);
        for (int q = 0; q < used; ++q) {
          if (lane_failed[q]) {
            failed[todo[q]] = 1;
          } else {
            write_sorted_eigvals<scalar_t>(wr.data() + q, wi.data() + q, kGroup, k, odata + todo[q] * k);
          }
        }
      }
#endif
    }
  };
  const int64_t workers = cost * batch < (int64_t{1} << 18) ? 1 : std::min<int64_t>(at::get_num_threads(), nitems);
  if (workers <= 1 || at::in_parallel_region()) {
    work(0, 1);
  } else {
    at::parallel_for(0, workers, 1, work);  // one call of `work` per thread
  }
}

// ----------------------------------------------------------------------------------------------------
// Operators
// ----------------------------------------------------------------------------------------------------

// Checks C: [..., k, k] for the square-matrix eigenvalue operator.
void check_square(const char* op, const Tensor& C) {
  TORCH_CHECK(C.defined(), op, ": C must be a defined tensor");
  TORCH_CHECK(C.dim() >= 2 && C.size(-1) == C.size(-2), op,
              ": C must be a batch of square matrices [..., k, k], got shape ", C.sizes());
  TORCH_CHECK(C.scalar_type() == at::kFloat || C.scalar_type() == at::kDouble, op,
              ": only float32 and float64 are supported, got ", C.scalar_type());
  TORCH_CHECK(C.layout() == at::kStrided, op, ": only dense (strided) tensors are supported");
}

enum class EigSolver { kAuto, kLanes, kScalar, kLapack };

EigSolver parse_solver(c10::string_view solver) {
  if (solver == "auto") return EigSolver::kAuto;
  if (solver == "lanes") return EigSolver::kLanes;
  if (solver == "scalar") return EigSolver::kScalar;
  if (solver == "lapack") return EigSolver::kLapack;
  TORCH_CHECK(false, "hooklens::small_eigvals: solver must be 'auto', 'lanes', 'scalar' or 'lapack', got '",
              std::string(solver), "'");
}

bool lane_solver_available() {
#ifdef HOOKLENS_HAVE_LANE_SOLVER
  return lanes::available();
#else
  return false;
#endif
}

// Eigenvalues of the double-precision [..., k, k] matrices C on CPU, as `out_dtype`, sorted.
Tensor eigvals_cpu(const Tensor& C, at::ScalarType out_dtype, EigSolver solver) {
  const int64_t k = C.size(-1);
  if (k > kSmallEigK || solver == EigSolver::kLapack) return eigvals_via_aten(C, out_dtype);
  TORCH_CHECK(solver != EigSolver::kLanes || lane_solver_available(), "hooklens::small_eigvals: solver='lanes' "
              "needs an x86-64 CPU with AVX2 and FMA and a GCC build of the extension; use 'auto'");
  Tensor out = at::empty(C.sizes().slice(0, C.dim() - 1), C.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  const Tensor C3 = C.reshape({-1, k, k}).contiguous();
  Tensor out2 = out.view({-1, k});
  std::vector<char> failed(static_cast<size_t>(C3.size(0)), 0);
  const bool allow_lanes = solver != EigSolver::kScalar;
  if (out_dtype == at::kComplexFloat) {
    eigvals_small_cpu<float>(C3, out2, failed, allow_lanes);
  } else {
    eigvals_small_cpu<double>(C3, out2, failed, allow_lanes);
  }
  for (int64_t b = 0; b < C3.size(0); ++b) {  // rare: the QR iteration did not converge
    if (failed[b]) out2[b].copy_(eigvals_via_aten(C3[b], out_dtype));
  }
  return out;
}

// The device policy of both eigenvalue operators, decided here once for every device: eigenvalues come from the
// batched host solver above wherever the matrices live. torch.linalg.eigvals on CUDA hands each matrix to a hybrid
// MAGMA solver, one matrix at a time with a synchronization each; a batch of small matrices instead makes one
// transfer to the host and k eigenvalues per matrix come back. `solver == kLapack` asks for torch.linalg's solver on
// the matrices' own device. Because the route is chosen in the kernel, torch.ops.hooklens.* and the Python
// wrappers in hooklens/ops/lowrank.py (which call these operators) always agree.
Tensor eigvals_host_route(const Tensor& C, at::ScalarType out_dtype, EigSolver solver) {
  // C: [..., k, k] float64 on any device -> [..., k] out_dtype on C's device.
  if (solver == EigSolver::kLapack) return eigvals_via_aten(C, out_dtype);
  if (C.device().is_cpu()) return eigvals_cpu(C, out_dtype, solver);
  const Tensor on_host = eigvals_cpu(C.to(at::Device(at::kCPU), at::kDouble), out_dtype, solver);
  return on_host.to(C.device(), out_dtype);
}

Tensor lowrank_eigvals_kernel(const Tensor& A, const Tensor& B) {
  check_factors("hooklens::lowrank_eigvals", A, B, /*square=*/true);
  return eigvals_host_route(core_matrix_double(A, B), complex_dtype_for(A.scalar_type()), EigSolver::kAuto);
}

Tensor small_eigvals_kernel(const Tensor& C, c10::string_view solver) {
  check_square("hooklens::small_eigvals", C);
  return eigvals_host_route(C.to(at::kDouble), complex_dtype_for(C.scalar_type()), parse_solver(solver));
}

std::tuple<Tensor, Tensor, Tensor> lowrank_svd_impl(const Tensor& A, const Tensor& B) {
  const auto batch_shape = check_factors("hooklens::lowrank_svd", A, B, /*square=*/false);
  // A = Qa Ra, B^T = Qb Rb  =>  A @ B = Qa (Ra Rb^T) Qb^T = (Qa Uc) S (Qb Vc)^T.
  auto [Qa, Ra] = at::linalg_qr(A, "reduced");       // [.., m, p], [.., p, k], p = min(m, k)
  auto [Qb, Rb] = at::linalg_qr(B.mT(), "reduced");  // [.., n, q], [.., q, k], q = min(n, k)
  const Tensor core = at::matmul(Ra, Rb.mT());        // [.., p, q]
  auto [Uc, S, Vch] = at::linalg_svd(core, /*full_matrices=*/false);  // r = min(p, q) = min(m, k, n)
  Tensor U = at::matmul(Qa, Uc);
  Tensor Vh = at::matmul(Vch, Qb.mT());
  // (The matmuls already broadcast to the full batch shape; expand is a no-op kept for clarity.)
  std::vector<int64_t> su(batch_shape), ss(batch_shape), sv(batch_shape);
  su.insert(su.end(), {U.size(-2), U.size(-1)});
  ss.push_back(S.size(-1));
  sv.insert(sv.end(), {Vh.size(-2), Vh.size(-1)});
  return {U.expand(su).contiguous(), S.expand(ss).contiguous(), Vh.expand(sv).contiguous()};
}

// CPU: the same factorisations, in parallel over the batch. ATen's batched QR/SVD call LAPACK on one matrix
// after another, and LAPACK's own threading does nothing for 768 x 64 matrices; here each thread runs
// lowrank_svd_impl on its own slice of the batch (single-threaded inside the parallel region).
std::tuple<Tensor, Tensor, Tensor> lowrank_svd_cpu(const Tensor& A, const Tensor& B) {
  const auto batch_shape = check_factors("hooklens::lowrank_svd", A, B, /*square=*/false);
  const int64_t batch = c10::multiply_integers(batch_shape);
  if (batch < 2 || at::get_num_threads() < 2 || at::in_parallel_region()) return lowrank_svd_impl(A, B);
  const int64_t m = A.size(-2), k = A.size(-1), n = B.size(-1), r = std::min({m, k, n});
  std::vector<int64_t> a_shape(batch_shape), b_shape(batch_shape);
  a_shape.insert(a_shape.end(), {m, k});
  b_shape.insert(b_shape.end(), {k, n});
  const Tensor A3 = A.expand(a_shape).reshape({batch, m, k});  // a view unless A is broadcast
  const Tensor B3 = B.expand(b_shape).reshape({batch, k, n});
  Tensor U = at::empty({batch, m, r}, A.options());
  Tensor S = at::empty({batch, r}, A.options());
  Tensor Vh = at::empty({batch, r, n}, A.options());
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    auto [u, s, vh] = lowrank_svd_impl(A3.narrow(0, begin, end - begin), B3.narrow(0, begin, end - begin));
    U.narrow(0, begin, end - begin).copy_(u);
    S.narrow(0, begin, end - begin).copy_(s);
    Vh.narrow(0, begin, end - begin).copy_(vh);
  });
  std::vector<int64_t> su(batch_shape), ss(batch_shape), sv(batch_shape);
  su.insert(su.end(), {m, r});
  ss.push_back(r);
  sv.insert(sv.end(), {r, n});
  return {U.view(su), S.view(ss), Vh.view(sv)};
}

Tensor lowrank_fro_norm_impl(const Tensor& A, const Tensor& B) {
  const auto batch_shape = check_factors("hooklens::lowrank_fro_norm", A, B, /*square=*/false);
  const int64_t m = A.size(-2), k = A.size(-1), n = B.size(-1);
  Tensor out;
  if (m * n <= k * (m + n)) {
    // Forming A @ B is cheaper than the two k x k Gram matrices (k is not small): do that, it is also
    // more accurate.
    out = at::linalg_vector_norm(at::matmul(A, B), 2, at::IntArrayRef{-2, -1});
  } else {
    // ||A B||_F^2 = trace(B^T A^T A B) = sum((A^T A) o (B B^T)).
    const Tensor G = at::matmul(A.mT(), A);  // [.., k, k]
    const Tensor H = at::matmul(B, B.mT());  // [.., k, k]
    out = at::sqrt(at::clamp_min(at::sum(at::mul(G, H), at::IntArrayRef{-2, -1}), 0));
  }
  return out.expand(batch_shape).contiguous();
}

Tensor lowrank_trace_impl(const Tensor& A, const Tensor& B) {
  check_factors("hooklens::lowrank_trace", A, B, /*square=*/true);
  // trace(A B) = sum_ij A_ij B_ji.
  return at::sum(at::mul(A, B.mT()), at::IntArrayRef{-2, -1}).contiguous();
}

// ----------------------------------------------------------------------------------------------------
// Row maxima of A @ B without forming it
// ----------------------------------------------------------------------------------------------------

// The batch entry `flat` of a tensor whose leading dims broadcast to `batch`: [rows, cols] view.
Tensor batch_entry(const Tensor& t, const std::vector<int64_t>& batch, int64_t flat) {
  Tensor out = t;
  const int64_t nd = static_cast<int64_t>(batch.size()), dt = t.dim() - 2;
  std::vector<int64_t> index(nd);
  for (int64_t i = nd - 1; i >= 0; --i) {
    index[i] = flat % batch[i];
    flat /= batch[i];
  }
  for (int64_t i = 0; i < dt; ++i) {  // dim i of t is batch dim i + (nd - dt)
    const int64_t bi = i + (nd - dt);
    out = out.select(0, t.size(i) == 1 ? 0 : index[bi]);
  }
  return out;
}

#if defined(__SSE2__)
// The SSE2 operations scan_max needs, per element type (4 floats or 2 doubles per register).
template <typename scalar_t>
struct Sse2;

template <>
struct Sse2<float> {
  using V = __m128;
  static constexpr int kWidth = 4;
  static V set1(float x) { return _mm_set1_ps(x); }
  static V zero() { return _mm_setzero_ps(); }
  static V load(const float* p) { return _mm_loadu_ps(p); }
  static V max(V a, V b) { return _mm_max_ps(a, b); }
  static V unordered(V a) { return _mm_cmpunord_ps(a, a); }  // all ones where a is NaN
  static V bit_or(V a, V b) { return _mm_or_ps(a, b); }
  static bool any(V a) { return _mm_movemask_ps(a) != 0; }
  static void store(float* p, V a) { _mm_storeu_ps(p, a); }
};

template <>
struct Sse2<double> {
  using V = __m128d;
  static constexpr int kWidth = 2;
  static V set1(double x) { return _mm_set1_pd(x); }
  static V zero() { return _mm_setzero_pd(); }
  static V load(const double* p) { return _mm_loadu_pd(p); }
  static V max(V a, V b) { return _mm_max_pd(a, b); }
  static V unordered(V a) { return _mm_cmpunord_pd(a, a); }
  static V bit_or(V a, V b) { return _mm_or_pd(a, b); }
  static bool any(V a) { return _mm_movemask_pd(a) != 0; }
  static void store(double* p, V a) { _mm_storeu_pd(p, a); }
};
#endif

// Maximum of x[0, w) and whether any entry is NaN, in one pass. With SSE2 (baseline on x86-64) four registers
// per iteration (16 floats or 8 doubles); maxps alone drops NaNs, so they are tracked by an unordered compare.
template <typename scalar_t>
scalar_t scan_max(const scalar_t* x, int64_t w, bool* any_nan) {
  scalar_t m = -std::numeric_limits<scalar_t>::infinity();
  bool nan = false;
  int64_t j = 0;
#if defined(__SSE2__)
  using S = Sse2<scalar_t>;
  constexpr int kW = S::kWidth;
  typename S::V a0 = S::set1(m), a1 = a0, a2 = a0, a3 = a0, n0 = S::zero(), n1 = n0;
  for (; j + 4 * kW <= w; j += 4 * kW) {
    const auto v0 = S::load(x + j), v1 = S::load(x + j + kW), v2 = S::load(x + j + 2 * kW),
               v3 = S::load(x + j + 3 * kW);
    a0 = S::max(a0, v0);
    a1 = S::max(a1, v1);
    a2 = S::max(a2, v2);
    a3 = S::max(a3, v3);
    n0 = S::bit_or(n0, S::bit_or(S::unordered(v0), S::unordered(v1)));
    n1 = S::bit_or(n1, S::bit_or(S::unordered(v2), S::unordered(v3)));
  }
  scalar_t lanes[kW];
  S::store(lanes, S::max(S::max(a0, a1), S::max(a2, a3)));
  for (scalar_t v : lanes) m = v > m ? v : m;
  nan = S::any(S::bit_or(n0, n1));
#endif
  for (; j < w; ++j) {
    m = x[j] > m ? x[j] : m;
    nan |= x[j] != x[j];
  }
  *any_nan = nan;
  return m;
}

// Folds the tile [rows, width] (row stride ld) of A @ B, whose first column is column `col0`, into the
// running maxima. Strict `>` keeps the first column attaining the maximum; a NaN wins and stays.
template <typename scalar_t>
void fold_tile_max(const scalar_t* tile, int64_t rows, int64_t width, int64_t ld, int64_t col0,
                   scalar_t* best, int64_t* best_index) {
  for (int64_t r = 0; r < rows; ++r) {
    if (std::isnan(best[r])) continue;
    const scalar_t* x = tile + r * ld;
    bool any_nan = false;
    const scalar_t m = scan_max(x, width, &any_nan);
    if (any_nan) {
      int64_t c = 0;
      while (!std::isnan(x[c])) ++c;
      best[r] = x[c];
      best_index[r] = col0 + c;
    } else if (m > best[r] || best_index[r] < 0) {  // < 0: nothing seen yet (the row may be all -inf)
      int64_t c = 0;  // a new maximum (a few times per row): find its first column
      while (x[c] != m) ++c;
      best[r] = m;
      best_index[r] = col0 + c;
    }
  }
}

// Checks lowrank_max's inputs; returns the broadcast leading dims and the (uninitialised) outputs
// values [..., m] (A's dtype) and indices [..., m] (int64).
std::tuple<std::vector<int64_t>, Tensor, Tensor> max_outputs(const Tensor& A, const Tensor& B) {
  const auto batch_shape = check_factors("hooklens::lowrank_max", A, B, /*square=*/false);
  const int64_t m = A.size(-2), n = B.size(-1);
  TORCH_CHECK(n > 0 || m == 0, "hooklens::lowrank_max: the maximum of an empty row (A @ B has 0 columns) "
              "is not defined; shapes were A ", A.sizes(), ", B ", B.sizes());
  std::vector<int64_t> out_shape(batch_shape);
  out_shape.push_back(m);
  return {batch_shape, at::empty(out_shape, A.options()), at::empty(out_shape, A.options().dtype(at::kLong))};
}

std::tuple<Tensor, Tensor> lowrank_max_cpu(const Tensor& A, const Tensor& B) {
  std::vector<int64_t> batch_shape;
  Tensor values, indices;
  std::tie(batch_shape, values, indices) = max_outputs(A, B);
  const int64_t batch = c10::multiply_integers(batch_shape);
  const int64_t m = A.size(-2), k = A.size(-1), n = B.size(-1);
  if (values.numel() == 0) return {values, indices};
  if (k == 0) {  // A @ B is all zeros
    values.zero_();
    indices.zero_();
    return {values, indices};
  }
  Tensor values2 = values.view({batch, m}), indices2 = indices.view({batch, m});
  // Tiles of kRows x kCols (1 MiB in float32) stay in L2 between the GEMM that writes them and the scan;
  // tall enough that BLAS's packing of each B block is amortised over many rows.
  constexpr int64_t kRows = 512, kCols = 512;
  const int64_t row_blocks = (m + kRows - 1) / kRows;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "hooklens::lowrank_max", [&] {
    auto* vals = values2.mutable_data_ptr<scalar_t>();
    auto* idxs = indices2.mutable_data_ptr<int64_t>();
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 22) / (kRows * std::max<int64_t>(n * k, 1)));
    at::parallel_for(0, batch * row_blocks, grain, [&](int64_t begin, int64_t end) {
      Tensor tile = at::empty({kRows, kCols}, A.options());
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / row_blocks, r0 = (task % row_blocks) * kRows, rows = std::min(kRows, m - r0);
        const Tensor a = batch_entry(A, batch_shape, b).narrow(0, r0, rows);  // [rows, k]
        const Tensor bb = batch_entry(B, batch_shape, b);                      // [k, n]
        scalar_t* best = vals + b * m + r0;
        int64_t* best_index = idxs + b * m + r0;
        std::fill(best, best + rows, -std::numeric_limits<scalar_t>::infinity());
        std::fill(best_index, best_index + rows, int64_t{-1});
        for (int64_t c0 = 0; c0 < n; c0 += kCols) {
          const int64_t width = std::min(kCols, n - c0);
          Tensor t = tile.narrow(0, 0, rows).narrow(1, 0, width);  // [rows, width], row stride kCols
          at::mm_out(t, a, bb.narrow(1, c0, width));
          fold_tile_max<scalar_t>(t.const_data_ptr<scalar_t>(), rows, width, t.stride(0), c0, best, best_index);
        }
      }
    });
  });
  return {values, indices};
}

// Any device: row chunks of A @ B of at most `chunk_bytes` (default 256 MiB), reduced with at::max.
std::tuple<Tensor, Tensor> lowrank_max_chunked(const Tensor& A, const Tensor& B, int64_t chunk_bytes) {
  TORCH_CHECK(chunk_bytes > 0, "hooklens::_lowrank_max_chunked: chunk_bytes must be positive, got ", chunk_bytes);
  auto [batch_shape, values, indices] = max_outputs(A, B);
  const int64_t batch = c10::multiply_integers(batch_shape);
  const int64_t m = A.size(-2), n = B.size(-1);
  if (values.numel() == 0) return {values, indices};
  const int64_t rows = std::max<int64_t>(1, chunk_bytes / (A.element_size() * n * batch));
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t len = std::min(rows, m - r0);
    auto [v, i] = at::max(at::matmul(A.narrow(-2, r0, len), B), -1);
    values.narrow(-1, r0, len).copy_(v);
    indices.narrow(-1, r0, len).copy_(i);
  }
  return {values, indices};
}

std::tuple<Tensor, Tensor> lowrank_max_generic(const Tensor& A, const Tensor& B) {
  return lowrank_max_chunked(A, B, int64_t{256} << 20);
}

}  // namespace

TORCH_LIBRARY(hooklens, m) {
  // Fake (meta) kernels for torch.compile are registered from this Python module.
  m.set_python_module("hooklens.ops.lowrank");
  m.def("lowrank_eigvals(Tensor A, Tensor B) -> Tensor");
  m.def("lowrank_svd(Tensor A, Tensor B) -> (Tensor U, Tensor S, Tensor Vh)");
  m.def("lowrank_fro_norm(Tensor A, Tensor B) -> Tensor");
  m.def("lowrank_trace(Tensor A, Tensor B) -> Tensor");
  m.def("lowrank_max(Tensor A, Tensor B) -> (Tensor values, Tensor indices)");
  m.def("small_eigvals(Tensor C, str solver=\"auto\") -> Tensor");
  // The CUDA kernel of lowrank_max (row chunks + at::max) on any device, so CPU tests cover its logic.
  m.def("_lowrank_max_chunked(Tensor A, Tensor B, int chunk_bytes=268435456) -> (Tensor values, Tensor indices)");
}

TORCH_LIBRARY_IMPL(hooklens, CompositeExplicitAutograd, m) {
  m.impl("_lowrank_max_chunked", &lowrank_max_chunked);
}

TORCH_LIBRARY_IMPL(hooklens, CPU, m) {
  m.impl("lowrank_eigvals", &lowrank_eigvals_kernel);
  m.impl("lowrank_svd", &lowrank_svd_cpu);
  m.impl("lowrank_fro_norm", &lowrank_fro_norm_impl);
  m.impl("lowrank_trace", &lowrank_trace_impl);
  m.impl("lowrank_max", &lowrank_max_cpu);
  m.impl("small_eigvals", &small_eigvals_kernel);
}

// CUDA: the ATen-only kernels, and the eigenvalue kernels' host route (eigvals_host_route). Registering for the CUDA
// key needs no CUDA headers, so this compiles on CPU-only machines too.
TORCH_LIBRARY_IMPL(hooklens, CUDA, m) {
  m.impl("lowrank_eigvals", &lowrank_eigvals_kernel);
  m.impl("lowrank_svd", &lowrank_svd_impl);
  m.impl("lowrank_fro_norm", &lowrank_fro_norm_impl);
  m.impl("lowrank_trace", &lowrank_trace_impl);
  m.impl("lowrank_max", &lowrank_max_generic);
  m.impl("small_eigvals", &small_eigvals_kernel);
}

}  // namespace hooklens
