// The CUDA BRGEMM kernels' interface: one launch per brgemm call, one thread block per output
// tile of one problem; inside a block, the whole batch reduction (over i and k) runs with the
// tile in registers, then the epilogue (beta * C, bias, activation) and one store.
//
//   out[p] = act(beta * c[p] + alpha * sum_i A(p, i) @ B(p, i) + bias[p])
//
// Stride form: A(p, i) = a + lead_offset(a, p) + i * m * k (contiguous (count, m, k) blocks),
// B likewise. Offset form: A(p, i) = a + a_index[p * count + i] * m * k with a_index checked
// against a_blocks on the device: a bad index is skipped (never read) and reported through
// `error`, which the handler copies back.
#pragma once

#include <cstdint>

#include "brgemm/activation.h"
#include "cuda/brgemm/types.h"

struct CUstream_st;

namespace jbr::cuda {

// The CPU kernel's activation set (brgemm/activation.h), one enum for both devices.
using Act = Activation;

struct Problem {
  ElemType type = ElemType::f32;  // of a and b; c, bias and out are float32
  const void* a = nullptr;
  const void* b = nullptr;
  const float* c = nullptr;     // read only when beta != 0
  const float* bias = nullptr;  // optional
  float* out = nullptr;         // (problems, m, n) contiguous
  int64_t m = 0, n = 0, k = 0, count = 0;
  float alpha = 1.0f, beta = 0.0f;
  Act act = Act::none;
  LeadDims lead;  // problems -> element offsets of a, b (stride form), c and bias
  // Offset form (a_index set): (problems, count) block indices, int32 or int64.
  const void* a_index = nullptr;
  const void* b_index = nullptr;
  bool index_is_64 = false;
  int64_t a_blocks = 0, b_blocks = 0;
  // Device memory for the index check, zeroed before the launch: error[0] |= 1 (a_index) or
  // 2 (b_index) when an index is out of range, error[1] / error[2] then hold one bad value.
  int64_t* error = nullptr;
};

// Enqueues the kernel on `stream`. Returns the CUDA error code of the launch (0 = success).
int launch_brgemm(const Problem& problem, const TilePlan& plan, CUstream_st* stream);

}  // namespace jbr::cuda
