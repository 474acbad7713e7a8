// The fully-connected layer as three loop nests around the brgemm kernel (forward,
// backward-data, weight-update), on plain row-major arrays:
//
//   forward:        y  = act(x @ w + bias)          x (n, c), w (c, k), y (n, k)
//   backward-data:  dx = dz @ w^T                    dz = dy * act'(...)  (n, k)
//   weight-update:  dw = x^T @ dz,  dbias = column sums of dz
//
// Blocks of the plain arrays are addressed through leading dimensions; only operands the
// kernel needs transposed (w^T panels, x^T) are packed, into per-call scratch.
//
// Element types: the inputs of a pass (x, w, dy) share one dtype, float32 or bfloat16
// (uint16_t bit patterns); every sum is float32 (the kernel's accumulators, and float32
// scratch where a block takes several kernel calls) and each output is rounded to its own
// dtype once. bias and the pre-activation are float32; the activation's derivative is
// computed in float32 and dz rounded to the input dtype for the two products.
#pragma once

#include <cstdint>
#include <string>

#include "brgemm/brgemm.h"
#include "primitives/parallel.h"

namespace jbr::prim {

struct DenseForward {
  int64_t n = 0, c = 0, k = 0;  // minibatch rows, input features, output features
  DType in = DType::f32;        // x and w
  const void* x = nullptr;      // (n, c)
  const void* w = nullptr;      // (c, k)
  const float* bias = nullptr;  // (k,) or null
  DType out = DType::f32;       // y
  void* y = nullptr;            // (n, k)
  // Optional (n, k): when set, receives the pre-activation x @ w + bias (gelu's backward
  // needs it) and y = act(preact) is written from the hot block.
  float* preact = nullptr;
  Activation activation = Activation::none;
  Isa isa = Isa::ref;
};

struct DenseBackward {
  int64_t n = 0, c = 0, k = 0;
  DType in = DType::f32;         // dy, x and w
  const void* dy = nullptr;      // (n, k) gradient of the layer's output
  const void* x = nullptr;       // (n, c)  (needed for dw)
  const void* w = nullptr;       // (c, k)  (needed for dx)
  // What the activation's derivative is computed from: the output y for relu, sigmoid
  // and tanh, the pre-activation for gelu; unused (may be null) for no activation.
  DType saved_dtype = DType::f32;
  const void* saved = nullptr;   // (n, k)
  Activation activation = Activation::none;
  Isa isa = Isa::ref;
  DType dx_dtype = DType::f32, dw_dtype = DType::f32, dbias_dtype = DType::f32;
  void* dx = nullptr;     // (n, c) or null: skip backward-data
  void* dw = nullptr;     // (c, k) or null: skip weight-update
  void* dbias = nullptr;  // (k,) or null
};

// Empty on success, else a message naming what could not be run.
std::string dense_forward(const DenseForward& p, const Executor* executor);
std::string dense_backward(const DenseBackward& p, const Executor* executor);

}  // namespace jbr::prim
