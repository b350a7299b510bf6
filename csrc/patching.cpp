// The patch op of the batched patching engine (Python side: hooklens/ops/patching.py).
//
// The engine stacks n patch variants of a batch of b prompts on the batch dimension, variant-major: variant v owns
// rows v*b .. v*b+b-1 of an activation act [n*b, *S]; clean [b, *S] is the clean run's activation.
//
// index_patch_(Tensor(a!) act, Tensor clean, Tensor index, int[] axes) -> ()
//   In place: act[v*b + j][S coords with S[axes[i]] = index[v, i], every other axis whole] = clean[j][same coords].
//   index is int64 [n, len(axes)], axes distinct dims of S. Writes only the patched elements and reads only their
//   clean values: a where(mask, clean, act) reads and rewrites all of act and needs an [n, *S] mask. CPU kernel here
//   (OpenMP over (row, patched slice), any strides, every dtype: it copies bytes); the CUDA kernel is a Triton
//   kernel registered from Python, and so is the fake kernel (hooklens.ops.patching, see set_python_module below).
//   Mutating and without autograd: the engine runs without grad.
//
// There is no C++ masked_patch (any [n, *S] mask): it was one at::where and measured no faster than torch.where
// (benchmarks/ops_patching.py); hooklens.ops.patching.masked_patch is that torch.where.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace hooklens {
namespace {

// ------------------------------------------------------------------------------------------------------------------
// index_patch_
// ------------------------------------------------------------------------------------------------------------------

// Validates everything but the index values (the Python fake kernel, check_index_patch, makes the same checks).
void check_index_patch(const at::Tensor& act, const at::Tensor& clean, const at::Tensor& index, at::IntArrayRef axes) {
  TORCH_CHECK(act.defined() && clean.defined() && index.defined(),
              "index_patch_: act, clean and index must be defined tensors");
  TORCH_CHECK(clean.device() == act.device() && index.device() == act.device(),
              "index_patch_: act, clean and index must be on one device, got act on ", act.device(), ", clean on ",
              clean.device(), " and index on ", index.device(), "; move them with .to(act.device)");
  TORCH_CHECK_TYPE(act.scalar_type() == clean.scalar_type(),
                   "index_patch_: act and clean must have one dtype (act is patched in place), got act ",
                   act.scalar_type(), " and clean ", clean.scalar_type(), "; convert clean with clean.to(act.dtype)");
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "index_patch_: index must be int64, got ", index.scalar_type(),
                   "; convert it with index.long()");
  TORCH_CHECK(act.layout() == at::kStrided && clean.layout() == at::kStrided && index.layout() == at::kStrided,
              "index_patch_: only dense (strided) tensors are supported");
  TORCH_CHECK_VALUE(act.dim() >= 1 && act.dim() == clean.dim(),
                    "index_patch_: act [n*b, *S] and clean [b, *S] need the same number of dims (>= 1), got ",
                    act.sizes(), " and ", clean.sizes());
  TORCH_CHECK_VALUE(act.sizes().slice(1) == clean.sizes().slice(1),
                    "index_patch_: act [n*b, *S] and clean [b, *S] must agree on S, got ", act.sizes(), " and ",
                    clean.sizes());
  const int64_t ndim = act.dim() - 1;
  std::vector<bool> seen(ndim, false);
  for (const int64_t a : axes) {
    TORCH_CHECK_VALUE(a >= 0 && a < ndim && !seen[a], "index_patch_: axes must be distinct dims of S (0 .. ",
                      ndim - 1, ", without the batch dim), got ", axes, " for act ", act.sizes());
    seen[a] = true;
  }
  const int64_t k = static_cast<int64_t>(axes.size());
  TORCH_CHECK_VALUE(index.dim() == 2 && index.size(1) == k, "index_patch_: index must be [n, len(axes)] = [n, ", k,
                    "], got ", index.sizes());
  const int64_t n = index.size(0), b = clean.size(0);
  TORCH_CHECK_VALUE(act.size(0) == n * b, "index_patch_: act has ", act.size(0), " rows, expected n*b = ", n, "*", b,
                    " = ", n * b, " (n variants from index ", index.sizes(), ", b prompts from clean ", clean.sizes(),
                    ")");
}

// One element of `bytes` bytes: the kernel copies, so only the element size matters (every dtype works).
template <int kBytes>
struct Elem {
  unsigned char b[kBytes];
};

// Copies the patched slices of every (variant, prompt) row. Work item w = (row, outer slice); each item copies one
// run of `len` elements along the innermost kept dim.
template <typename T>
void copy_slices(char* act_base, const char* clean_base, int64_t rows, int64_t b, int64_t act_row_stride,
                 int64_t clean_row_stride, const std::vector<int64_t>& act_variant_off,
                 const std::vector<int64_t>& clean_variant_off, const std::vector<int64_t>& outer_sizes,
                 const std::vector<int64_t>& outer_act_strides, const std::vector<int64_t>& outer_clean_strides,
                 int64_t outer_count, int64_t len, int64_t inner_act_stride, int64_t inner_clean_stride) {
  T* act_ptr = reinterpret_cast<T*>(act_base);
  const T* clean_ptr = reinterpret_cast<const T*>(clean_base);
  const bool contiguous_run = inner_act_stride == 1 && inner_clean_stride == 1;
  // ~32K elements per task: one position of d_model is 768, so a task spans many rows of a resid patch.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(len, 1));
  const int64_t outer_dims = static_cast<int64_t>(outer_sizes.size());
  at::parallel_for(0, rows * outer_count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t row = w / outer_count;
      int64_t o = w - row * outer_count;
      const int64_t v = row / b, j = row - v * b;
      int64_t a_off = row * act_row_stride + act_variant_off[v];
      int64_t c_off = j * clean_row_stride + clean_variant_off[v];
      for (int64_t d = outer_dims - 1; d >= 0; --d) {  // o -> coordinates of the outer kept dims (innermost last)
        const int64_t coord = o % outer_sizes[d];
        o /= outer_sizes[d];
        a_off += coord * outer_act_strides[d];
        c_off += coord * outer_clean_strides[d];
      }
      T* dst = act_ptr + a_off;
      const T* src = clean_ptr + c_off;
      if (contiguous_run) {
        std::memcpy(dst, src, static_cast<size_t>(len) * sizeof(T));
      } else {
        for (int64_t i = 0; i < len; ++i) dst[i * inner_act_stride] = src[i * inner_clean_stride];
      }
    }
  });
}

void index_patch_cpu(const at::Tensor& act, const at::Tensor& clean, const at::Tensor& index, at::IntArrayRef axes) {
  check_index_patch(act, clean, index, axes);
  // Writing through a self-overlapping act (e.g. expanded with stride 0) or one that shares memory with clean would
  // make the result depend on the order of the copies.
  TORCH_CHECK(at::has_internal_overlap(act) != at::MemOverlap::Yes,
              "index_patch_: act has overlapping elements (e.g. an expanded tensor); patch a .clone() of it");
  // TooHard (a non-contiguous one on the same storage) passes: the engine's clean and act never share storage.
  const at::MemOverlapStatus overlap = at::get_overlap_status(act, clean);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial,
              "index_patch_: act and clean share memory; pass clean.clone()");
  const int64_t n = index.size(0), b = clean.size(0), k = index.size(1), ndim = act.dim() - 1;
  const at::Tensor idx = index.contiguous();
  const int64_t* idx_ptr = idx.data_ptr<int64_t>();
  // Per-variant offsets of the patched coordinates; the bounds check costs nothing extra: the values are read here.
  std::vector<int64_t> act_variant_off(n, 0), clean_variant_off(n, 0);
  for (int64_t v = 0; v < n; ++v) {
    for (int64_t i = 0; i < k; ++i) {
      const int64_t a = axes[i], coord = idx_ptr[v * k + i], size = act.size(a + 1);
      TORCH_CHECK_INDEX(coord >= 0 && coord < size, "index_patch_: index[", v, ", ", i, "] = ", coord,
                        " is out of range for axis ", a, " of S (size ", size, "; act ", act.sizes(),
                        "); coordinates must be in 0 .. ", size - 1);
      act_variant_off[v] += coord * act.stride(a + 1);
      clean_variant_off[v] += coord * clean.stride(a + 1);
    }
  }
  if (act.numel() == 0) return;
  // The kept (whole) dims of S, size-1 dims dropped, adjacent dims merged where both tensors allow; the last one
  // is the run each work item copies.
  std::vector<bool> patched(ndim, false);
  for (const int64_t a : axes) patched[a] = true;
  std::vector<int64_t> sizes, act_strides, clean_strides;  // outermost first
  for (int64_t d = 0; d < ndim; ++d) {
    if (patched[d] || act.size(d + 1) == 1) continue;
    const int64_t size = act.size(d + 1), as = act.stride(d + 1), cs = clean.stride(d + 1);
    if (!sizes.empty() && act_strides.back() == as * size && clean_strides.back() == cs * size) {
      sizes.back() *= size;  // [.., m, size] with m's strides = size * inner strides: one dim of m * size
      act_strides.back() = as;
      clean_strides.back() = cs;
    } else {
      sizes.push_back(size);
      act_strides.push_back(as);
      clean_strides.push_back(cs);
    }
  }
  int64_t len = 1, inner_as = 1, inner_cs = 1;
  if (!sizes.empty()) {
    len = sizes.back();
    inner_as = act_strides.back();
    inner_cs = clean_strides.back();
    sizes.pop_back();
    act_strides.pop_back();
    clean_strides.pop_back();
  }
  int64_t outer_count = 1;
  for (const int64_t s : sizes) outer_count *= s;
  char* act_base = static_cast<char*>(act.data_ptr());
  const char* clean_base = static_cast<const char*>(clean.const_data_ptr());
  const int64_t rows = n * b;
  auto run = [&](auto elem) {
    using T = decltype(elem);
    copy_slices<T>(act_base, clean_base, rows, b, act.stride(0), clean.stride(0), act_variant_off, clean_variant_off,
                   sizes, act_strides, clean_strides, outer_count, len, inner_as, inner_cs);
  };
  switch (act.element_size()) {
    case 1: run(Elem<1>{}); break;
    case 2: run(Elem<2>{}); break;
    case 4: run(Elem<4>{}); break;
    case 8: run(Elem<8>{}); break;
    case 16: run(Elem<16>{}); break;
    default: TORCH_CHECK(false, "index_patch_: unsupported element size ", act.element_size(), " of ",
                         act.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hooklens, m) {
  // index_patch_'s fake kernel and CUDA (Triton) kernel are registered from this Python module on first use.
  m.set_python_module("hooklens.ops.patching");
  m.def("index_patch_(Tensor(a!) act, Tensor clean, Tensor index, int[] axes) -> ()");
}

TORCH_LIBRARY_IMPL(hooklens, CPU, m) {
  m.impl("index_patch_", &index_patch_cpu);
}

}  // namespace hooklens
