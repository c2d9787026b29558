// Gathering the kept rows of a [..., n, d] tensor (dim -2) and scattering them back into zeros: the
// two moves of every kept-rows op. On CPU they are a loop of row copies (at::index_select and
// index_copy_ on a small tensor cost several dispatches and a per-index select each, the largest
// share of an eager op's host time); on other devices, the ATen ops.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <cstring>

namespace sbp {
namespace rows_detail {

// Real CPU memory, read and written directly: not a fake / meta / functional or other Python-level
// tensor, and no dispatch mode (FakeTensorMode in a simulated step) that would make an output one.
inline bool real_cpu_memory(const at::Tensor& t) {
  const auto keys = t.key_set();
  return t.is_cpu() && t.has_storage() && !keys.has_any(c10::python_ks) && !keys.has(c10::DispatchKey::Functionalize) &&
         !c10::impl::TorchDispatchModeTLS::any_modes_set();
}

// ... and no autograd history to record: a row copy has none, so in a backward with create_graph=True
// (grad mode on, gradients that require grad) the differentiable ATen ops serve.
inline bool row_copyable(const at::Tensor& t) {
  return t.dim() >= 2 && real_cpu_memory(t) && !(at::GradMode::is_enabled() && t.requires_grad());
}

inline bool index_readable(const at::Tensor& keep_idx) { return keep_idx.is_contiguous() && real_cpu_memory(keep_idx); }

// dst[..., dst_row(i), :] = src[..., src_row(i), :] for i < count and every index of the leading
// dims (src and dst share them); a null row list means row i itself. Any strides: a row whose last
// dim is contiguous on both sides is one memcpy, else element by element (an expanded gradient).
template <typename index_t>
void copy_rows(const at::Tensor& src, const index_t* src_rows, const at::Tensor& dst, const index_t* dst_rows,
               int64_t count) {
  const int64_t lead = src.dim() - 2, esize = src.element_size(), width = src.size(-1);
  int64_t outer = 1;
  for (int64_t i = 0; i < lead; ++i) outer *= src.size(i);
  const char* from = static_cast<const char*>(src.const_data_ptr());
  char* to = static_cast<char*>(dst.mutable_data_ptr());
  const int64_t src_row_stride = src.stride(-2) * esize, dst_row_stride = dst.stride(-2) * esize;
  const int64_t src_col_stride = src.stride(-1) * esize, dst_col_stride = dst.stride(-1) * esize;
  const bool whole_rows = src_col_stride == esize && dst_col_stride == esize;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, count * width * esize));
  at::parallel_for(0, outer, grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      int64_t src_offset = 0, dst_offset = 0;
      for (int64_t i = lead - 1, rest = o; i >= 0; --i) {
        const int64_t index = rest % src.size(i);
        rest /= src.size(i);
        src_offset += index * src.stride(i) * esize;
        dst_offset += index * dst.stride(i) * esize;
      }
      for (int64_t i = 0; i < count; ++i) {
        const char* row_from = from + src_offset + (src_rows ? src_rows[i] : i) * src_row_stride;
        char* row_to = to + dst_offset + (dst_rows ? dst_rows[i] : i) * dst_row_stride;
        if (whole_rows) {
          std::memcpy(row_to, row_from, width * esize);
        } else {
          for (int64_t c = 0; c < width; ++c) std::memcpy(row_to + c * dst_col_stride, row_from + c * src_col_stride, esize);
        }
      }
    }
  });
}

}  // namespace rows_detail

// `out` (any strides) filled with t[..., keep_idx, :].
inline at::Tensor take_rows_into(const at::Tensor& out, const at::Tensor& t, const at::Tensor& keep_idx) {
  if (!rows_detail::row_copyable(t) || !rows_detail::row_copyable(out) || !rows_detail::index_readable(keep_idx))
    return out.copy_(t.index_select(-2, keep_idx));
  AT_DISPATCH_INDEX_TYPES(keep_idx.scalar_type(), "take_rows", [&] {
    rows_detail::copy_rows<index_t>(t, keep_idx.const_data_ptr<index_t>(), out, nullptr, keep_idx.numel());
  });
  return out;
}

// t[..., keep_idx, :]: a new contiguous tensor, or t itself when keep_idx holds every row (a
// validated keep_idx of n positions is 0..n-1: r = 1, or a recompute-mode replay on the kept rows).
// Callers only read the result.
inline at::Tensor take_rows(const at::Tensor& t, const at::Tensor& keep_idx) {
  if (keep_idx.numel() == t.size(-2)) return t;
  if (!rows_detail::row_copyable(t) || !rows_detail::index_readable(keep_idx)) return t.index_select(-2, keep_idx);
  auto sizes = t.sizes().vec();
  sizes[sizes.size() - 2] = keep_idx.numel();
  return take_rows_into(at::empty(sizes, t.options()), t, keep_idx);
}

// `out` (zeros of the full shape, any strides) with `kept` written at rows keep_idx (dim -2).
inline at::Tensor put_rows(const at::Tensor& out, const at::Tensor& kept, const at::Tensor& keep_idx) {
  if (!rows_detail::row_copyable(kept) || !rows_detail::row_copyable(out) || !rows_detail::index_readable(keep_idx)) {
    return out.index_copy_(-2, keep_idx.to(at::kLong), kept);
  }
  AT_DISPATCH_INDEX_TYPES(keep_idx.scalar_type(), "put_rows", [&] {
    rows_detail::copy_rows<index_t>(kept, nullptr, out, keep_idx.const_data_ptr<index_t>(), keep_idx.numel());
  });
  return out;
}

}  // namespace sbp
