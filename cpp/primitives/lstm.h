// LSTM over a whole sequence, forward and backward through time, as loop nests around the
// brgemm kernel (the RNN primitive of Georganas et al.). Gate order i, f, g, o:
//
//   z_t = x_t W_ih + h_{t-1} W_hh + bias         (N x 4K)
//   i, f, o = sigmoid(z_i, z_f, z_o), g = tanh(z_g)
//   c_t = f * c_{t-1} + i * g,  h_t = o * tanh(c_t)
//
// Sequence tensors (x, hs, cs, gates and their gradients) are row matrices whose row for
// (step t, batch n) is t * N + n (time-major) or n * T + t (batch-major); every kernel call
// names a step's rows through its leading dimension, so neither layout is ever copied.
#pragma once

#include <cstdint>
#include <string>

#include "brgemm/brgemm.h"
#include "primitives/parallel.h"

namespace jbr::prim {

struct LstmShape {
  int64_t steps = 0, batch = 0, in = 0, hidden = 0;  // T, N, C, K
  bool time_major = false;
};

// Element types. The GEMM operands (x, w_ih, w_hh, h0 and the hidden states hs) are all
// float32 or all bfloat16 (`dtype`; bfloat16 as uint16_t bit patterns), multiplied with
// float32 accumulation. Everything else is float32: bias, the cell states (c0, cs), the
// activated gates, the gate math, the incoming gradients and every gradient written (the
// weight gradients are sums over all steps and batch rows; callers round them once).
// In bfloat16, h_t is rounded once when stored into hs, and that rounded value is what the
// next step multiplies; backward rounds the gate gradients once before the products that
// consume them (dh recurrence, dx, dW), while dbias sums them unrounded.

// Forward. Kept for backward: gates (the activated i, f, g, o: 4K floats per step and batch
// row) and cs (the cell states: K floats), besides the output hs itself.
struct LstmForward {
  LstmShape shape;
  DType dtype = DType::f32;       // of x, w_ih, w_hh, h0, hs
  const void* x = nullptr;        // rows x C
  const void* w_ih = nullptr;     // C x 4K
  const void* w_hh = nullptr;     // K x 4K
  const float* bias = nullptr;    // 4K
  const void* h0 = nullptr;       // N x K
  const float* c0 = nullptr;      // N x K
  void* hs = nullptr;             // rows x K
  float* cs = nullptr;            // rows x K
  float* gates = nullptr;         // rows x 4K
  Isa isa = Isa::ref;
};

// Backward through time from the forward's residuals and the cotangents of hs and c_T
// (a cotangent of h_T is the caller's to add into d_hs's last step).
struct LstmBackward {
  LstmShape shape;
  DType dtype = DType::f32;  // of x, w_ih, w_hh, h0, hs
  const void *x = nullptr, *w_ih = nullptr, *w_hh = nullptr, *h0 = nullptr, *hs = nullptr;
  const float *c0 = nullptr, *cs = nullptr, *gates = nullptr;
  const float *d_hs = nullptr, *d_cT = nullptr;  // rows x K, N x K
  float *dx = nullptr, *dw_ih = nullptr, *dw_hh = nullptr, *dbias = nullptr;
  float *dh0 = nullptr, *dc0 = nullptr;
  Isa isa = Isa::ref;
};

// Empty on success, else a message naming what could not be run.
std::string lstm_forward(const LstmForward& p, const Executor* executor);
std::string lstm_backward(const LstmBackward& p, const Executor* executor);

}  // namespace jbr::prim
