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

// Forward. Kept for backward: gates (the activated i, f, g, o: 4K floats per step and batch
// row) and cs (the cell states: K floats), besides the output hs itself.
struct LstmForward {
  LstmShape shape;
  const float* x = nullptr;     // rows x C
  const float* w_ih = nullptr;  // C x 4K
  const float* w_hh = nullptr;  // K x 4K
  const float* bias = nullptr;  // 4K
  const float* h0 = nullptr;    // N x K
  const float* c0 = nullptr;    // N x K
  float* hs = nullptr;          // rows x K
  float* cs = nullptr;          // rows x K
  float* gates = nullptr;       // rows x 4K
  Isa isa = Isa::ref;
};

// Backward through time from the forward's residuals and the cotangents of hs, c_T, h_T.
struct LstmBackward {
  LstmShape shape;
  const float *x = nullptr, *w_ih = nullptr, *w_hh = nullptr, *h0 = nullptr, *c0 = nullptr;
  const float *hs = nullptr, *cs = nullptr, *gates = nullptr;
  const float *d_hs = nullptr, *d_cT = nullptr, *d_hT = nullptr;  // rows x K, N x K, N x K
  float *dx = nullptr, *dw_ih = nullptr, *dw_hh = nullptr, *dbias = nullptr;
  float *dh0 = nullptr, *dc0 = nullptr;
  Isa isa = Isa::ref;
};

// Empty on success, else a message naming what could not be run.
std::string lstm_forward(const LstmForward& p, const Executor* executor);
std::string lstm_backward(const LstmBackward& p, const Executor* executor);

}  // namespace jbr::prim
