// 2-D convolution as loop nests around the brgemm kernel: forward, backward-data and
// weight-update (Georganas et al., IPDPS 2020). NHWC activations, HWIO weights. Inputs are
// float32 or bfloat16 (`in`: x, w and dy alike, bfloat16 as uint16_t bit patterns); every
// sum is float32; forward and backward-data write float32 or bfloat16 (`out`), rounded once.
//
//   y[n, p, q, g*Kg + k] = sum_{r, s, c < Cg} x[n, p*sh + r*dh - pt, q*sw + s*dw - pl, g*Cg + c]
//                                             * w[r, s, c, g*Kg + k]
//
// Taps that fall outside x read zeros (the padding). Cg = in_c / groups, Kg = out_c / groups.
#pragma once

#include <cstdint>
#include <string>

#include "brgemm/brgemm.h"
#include "shape/conv_shape.h"
#include "primitives/parallel.h"

namespace jbr::prim {

// y = act(conv(x, w) + bias); bias (out_c, float32) may be null.
std::string conv2d_forward(const ConvShape& shape, DType in, const void* x, const void* w,
                           const float* bias, Activation act, DType out, void* y, Isa isa,
                           const Executor* executor);

// dx = d(sum(conv(x, w) * dy)) / dx.
std::string conv2d_backward_data(const ConvShape& shape, DType in, const void* dy, const void* w,
                                 DType out, void* dx, Isa isa, const Executor* executor);

// dw = d(sum(conv(x, w) * dy)) / dw, in HWIO, float32 (accumulated over every image and row).
std::string conv2d_weight_update(const ConvShape& shape, DType in, const void* x, const void* dy,
                                 float* dw, Isa isa, const Executor* executor);

}  // namespace jbr::prim
