// dense and conv2d on CUDA: each pass is one launch of the shared BRGEMM kernels (gemm.cuh)
// with the addressing of nn_plan.h, plus two small element-wise kernels for dense's
// backward (the activation's derivative and the bias gradient).
#pragma once

#include <cstdint>

#include "cuda/brgemm/kernels.h"
#include "cuda/primitives/nn_plan.h"

namespace jbr::cuda {

// A device buffer and its element type (float32, bfloat16 or float16); p null: absent.
struct Buf {
  void* p = nullptr;
  ElemType t = ElemType::f32;
};

// What happens to a finished sum v at output offset o (bias offset ob):
//   v += bias[ob]; preact[o] = v; out[o] = act(v)           (accumulate false)
//   out[o] += v, atomically (out float32, zeroed first)     (accumulate true: split reductions)
struct Epilogue {
  Buf out, preact, bias;
  Act act = Act::none;
  bool accumulate = false;
};

// One pass: A and B of element type `in` (float32, bfloat16 or float16), addressed by `off`.
template <class Offsets>
struct NnGemm {
  ElemType in = ElemType::f32;
  const void* a = nullptr;
  const void* b = nullptr;
  Offsets off;
  Epilogue ep;
};

// Enqueue on `stream`; the CUDA error code of the launch (0 = success).
int launch_nn(const NnGemm<StridedOffsets>& g, const TilePlan& plan, CUstream_st* stream);
int launch_nn(const NnGemm<ConvForwardOffsets>& g, const TilePlan& plan, CUstream_st* stream);
int launch_nn(const NnGemm<ConvBackwardDataOffsets>& g, const TilePlan& plan, CUstream_st* stream);
int launch_nn(const NnGemm<ConvWeightUpdateOffsets>& g, const TilePlan& plan, CUstream_st* stream);

// dz[e] = dy[e] * act'(saved[e]) for e < size (saved: y for relu/sigmoid/tanh, the
// pre-activation for gelu; unused for none). dz may have another element type than dy.
int launch_activation_grad(Act act, Buf dy, Buf saved, Buf dz, int64_t size, CUstream_st* stream);

// dbias[q, col] = sum_{r < rows} dy[q, r, col] * act'(saved[q, r, col]), in float32, for
// q < sums (the problems that keep their own bias gradient), col < cols.
int launch_bias_grad(Act act, Buf dy, Buf saved, Buf dbias, int64_t sums, int64_t rows,
                     int64_t cols, CUstream_st* stream);

}  // namespace jbr::cuda
