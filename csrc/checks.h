// Argument checks shared by every compiled backend. They only look at metadata (shape, dtype, device, strides),
// never at values, so they cost no device synchronisation and are safe under CUDA-graph capture. Value checks
// (row range, NaN/Inf, lo <= hi) live in the Python wrapper, which can afford a sync outside capture.
#pragma once

#include <torch/library.h>
#include <ATen/core/Tensor.h>

namespace emokern {

inline void check_hidden_and_vectors(const char* op, const at::Tensor& h, const at::Tensor& V) {
  TORCH_CHECK(h.dim() == 2, op, ": argument 'h' must be 2-D (N, d); got shape ", h.sizes());
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kHalf || h.scalar_type() == at::kBFloat16,
              op, ": argument 'h' must be float32, float16 or bfloat16; got ", h.scalar_type());
  TORCH_CHECK(h.size(1) == 0 || h.stride(1) == 1, op,
              ": argument 'h' must have unit stride in its last dimension; got strides ", h.strides());
  TORCH_CHECK(V.dim() == 2, op, ": argument 'V' must be 2-D (K, d); got shape ", V.sizes());
  TORCH_CHECK(V.size(0) >= 1, op, ": argument 'V' must hold at least one vector (K >= 1); got K = 0");
  TORCH_CHECK(V.size(1) == h.size(1), op, ": argument 'V' must have shape (K, d) with d = ", h.size(1),
              " (h.shape[1]); got ", V.sizes());
  TORCH_CHECK(V.scalar_type() == h.scalar_type(), op, ": argument 'V' must have h's dtype ", h.scalar_type(),
              "; got ", V.scalar_type());
  TORCH_CHECK(V.is_contiguous(), op, ": argument 'V' must be contiguous; got strides ", V.strides());
  TORCH_CHECK(V.device() == h.device(), op, ": argument 'V' must be on h's device ", h.device(), "; got ",
              V.device());
}

inline void check_projection_out(const char* op, const at::Tensor& h, const at::Tensor& V, const at::Tensor& P_out) {
  TORCH_CHECK(P_out.dim() == 2 && P_out.size(0) == h.size(0) && P_out.size(1) == V.size(0), op,
              ": argument 'P_out' must have shape (N, K) = (", h.size(0), ", ", V.size(0), "); got ", P_out.sizes());
  TORCH_CHECK(P_out.scalar_type() == at::kFloat, op, ": argument 'P_out' must be float32; got ",
              P_out.scalar_type());
  TORCH_CHECK(P_out.size(1) <= 1 || P_out.stride(1) == 1, op,
              ": argument 'P_out' must have unit stride in its last dimension; got strides ", P_out.strides());
  TORCH_CHECK(P_out.device() == h.device(), op, ": argument 'P_out' must be on h's device ", h.device(), "; got ",
              P_out.device());
}

inline void check_steering_tables(const char* op, const at::Tensor& h, const at::Tensor& V, const at::Tensor& row,
                                  const at::Tensor& a, const at::Tensor& b, const at::Tensor& lo,
                                  const at::Tensor& hi) {
  TORCH_CHECK(row.dim() == 1 && row.size(0) == h.size(0), op, ": argument 'row' must have shape (N,) = (",
              h.size(0), ",); got ", row.sizes());
  TORCH_CHECK(row.scalar_type() == at::kInt, op, ": argument 'row' must be int32; got ", row.scalar_type());
  TORCH_CHECK(row.is_contiguous(), op, ": argument 'row' must be contiguous; got strides ", row.strides());
  TORCH_CHECK(row.device() == h.device(), op, ": argument 'row' must be on h's device ", h.device(), "; got ",
              row.device());
  const char* names[4] = {"a", "b", "lo", "hi"};
  const at::Tensor* tables[4] = {&a, &b, &lo, &hi};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& t = *tables[i];
    TORCH_CHECK(t.dim() == 2 && t.size(1) == V.size(0) && t.size(0) >= 1, op, ": argument '", names[i],
                "' must have shape (R, K) with R >= 1 and K = ", V.size(0), "; got ", t.sizes());
    TORCH_CHECK(t.sizes() == a.sizes(), op, ": argument '", names[i], "' must have the same shape as 'a' ",
                a.sizes(), "; got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": argument '", names[i], "' must be float32; got ",
                t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), op, ": argument '", names[i], "' must be contiguous; got strides ", t.strides());
    TORCH_CHECK(t.device() == h.device(), op, ": argument '", names[i], "' must be on h's device ", h.device(),
                "; got ", t.device());
  }
}

}  // namespace emokern
