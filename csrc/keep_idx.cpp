// The value check of a caller's keep_idx (DESIGN.md 7), run at every public call: one pass over
// the positions in C++ instead of a handful of small tensor ops (host cost per call). The Python
// side (sbp_kernels/validation.py) checks the metadata first and calls this only where values can
// be read; it keeps a Python version of the same check for builds without the extension.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <string>

namespace sbp {
namespace {

void check_keep_idx(const at::Tensor& keep_idx, int64_t n, c10::string_view name) {
  const at::Tensor host = keep_idx.to(at::kCPU).contiguous();  // one copy (and sync) on a GPU
  const int64_t count = host.numel();
  if (count == 0) return;
  AT_DISPATCH_INDEX_TYPES(host.scalar_type(), "check_keep_idx", [&] {
    const index_t* pos = host.const_data_ptr<index_t>();
    TORCH_CHECK_VALUE(pos[0] >= 0 && pos[count - 1] < n, name, " values must lie in [0, ", n, "), got range [",
                      pos[0], ", ", pos[count - 1], "]");
    for (int64_t i = 1; i < count; ++i) {
      TORCH_CHECK_VALUE(pos[i] > pos[i - 1], name, " must be sorted in increasing order without duplicates");
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sbp, CompositeExplicitAutograd, m) { m.impl("check_keep_idx", &check_keep_idx); }

}  // namespace sbp
