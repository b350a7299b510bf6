// hooklens::masked_patch — apply many activation patches at once.
//
// The patching engine stacks n patch variants of a batch of b prompts on the batch dimension. Each variant v
// takes the clean activation wherever its mask is true and keeps the corrupted activation elsewhere:
//
//   act   [n*b, ...]   corrupted activations, variant-major (rows v*b .. v*b+b-1 belong to variant v)
//   clean [b, ...]     the clean run's activation (shared by all variants)
//   mask  [n, ...]     bool, where each variant patches
//   ->    [n*b, ...]   patched activations (a new tensor)
//
// One call per chunk of variants, no loop over variants. Registered as CompositeImplicitAutograd: it is
// expressed in ATen ops, so autograd, meta/fake tensors (torch.compile) and every device work without extra
// kernels. Supported dtypes: all that at::where supports (act and clean promote as in at::where); mask must
// be bool; all three on one device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

namespace hooklens {
namespace {

at::Tensor masked_patch_impl(const at::Tensor& act, const at::Tensor& clean, const at::Tensor& mask) {
  TORCH_CHECK(act.defined() && clean.defined() && mask.defined(),
              "hooklens::masked_patch: act, clean and mask must be defined tensors");
  // One device for all three: at::where would otherwise fail with a message naming no argument, and under
  // meta (shape-only) tensors mixed with real ones it would not fail at all.
  TORCH_CHECK(clean.device() == act.device() && mask.device() == act.device(),
              "hooklens::masked_patch: act, clean and mask must be on one device, got act on ", act.device(),
              ", clean on ", clean.device(), " and mask on ", mask.device(), "; move them with .to(act.device)");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "hooklens::masked_patch: mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(act.dim() >= 1 && act.dim() == clean.dim() && act.dim() == mask.dim(),
              "hooklens::masked_patch: act [n*b, ...], clean [b, ...] and mask [n, ...] need the same number of "
              "dimensions, got ", act.sizes(), ", ", clean.sizes(), ", ", mask.sizes());
  const int64_t n = mask.size(0);
  const int64_t b = clean.size(0);
  TORCH_CHECK(act.size(0) == n * b, "hooklens::masked_patch: act has ", act.size(0), " rows, expected n*b = ", n,
              "*", b, " = ", n * b);
  for (int64_t d = 1; d < act.dim(); ++d) {
    TORCH_CHECK(act.size(d) == clean.size(d) && act.size(d) == mask.size(d), "hooklens::masked_patch: dimension ",
                d, " differs: act ", act.sizes(), ", clean ", clean.sizes(), ", mask ", mask.sizes());
  }
  std::vector<int64_t> stacked{n, b};
  for (int64_t d = 1; d < act.dim(); ++d) stacked.push_back(act.size(d));
  // [n, b, ...]: variant v's rows see mask[v] and the shared clean activation.
  at::Tensor out = at::where(mask.unsqueeze(1), clean.unsqueeze(0), act.reshape(stacked));
  return out.reshape(act.sizes());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hooklens, m) {
  m.def("masked_patch(Tensor act, Tensor clean, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(hooklens, CompositeImplicitAutograd, m) {
  m.impl("masked_patch", &masked_patch_impl);
}

}  // namespace hooklens
