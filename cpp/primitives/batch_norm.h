// Batch normalisation over channels-last data: statistics, the normalising affine map with
// relu and a residual add fused, and the two backward passes. Every tensor is `groups`
// independent (rows x channels) row-major blocks back to back (NHWC with the leading dims
// flattened to rows; groups: vmapped copies); per-channel vectors are (groups x channels)
// float32. Activations are float32 or bfloat16; every sum is float32 over 32 rows at a
// time, then float64.
#pragma once

#include <cstdint>
#include <string>

#include "brgemm/brgemm.h"
#include "primitives/parallel.h"

namespace jbr::prim {

struct BatchNormShape {
  int64_t groups = 1, rows = 0, channels = 0;
};

// sum = sum_r (x - shift), sumsq = sum_r (x - shift)^2 per group and channel (shift: the
// caller's guess of the mean, so that var = E[d^2] - E[d]^2 does not cancel).
std::string batch_norm_stats(const BatchNormShape& s, DType x_dtype, const void* x,
                             const float* shift, float* sum, float* sumsq, Isa isa,
                             const Executor* executor);

// y = act(x * a + b + residual) per channel; act none or relu; residual may be null, else
// in y's dtype.
std::string batch_norm_apply(const BatchNormShape& s, DType x_dtype, const void* x, const float* a,
                             const float* b, DType y_dtype, const void* residual, bool relu, void* y,
                             Isa isa, const Executor* executor);

// With h = dy where y > 0 (y null: no relu, h = dy): sum_h = sum_r h,
// sum_hx = sum_r h (x - shift). dy and y share a dtype.
std::string batch_norm_backward_sums(const BatchNormShape& s, DType x_dtype, const void* x,
                                     DType dy_dtype, const void* dy, const void* y,
                                     const float* shift, float* sum_h, float* sum_hx, Isa isa,
                                     const Executor* executor);

// dx = h * a + x * b + c per channel (in x's dtype); d_residual = h (dy's dtype) where
// given.
std::string batch_norm_backward_apply(const BatchNormShape& s, DType x_dtype, const void* x,
                                      DType dy_dtype, const void* dy, const void* y, const float* a,
                                      const float* b, const float* c, void* dx, void* d_residual,
                                      Isa isa, const Executor* executor);

}  // namespace jbr::prim
