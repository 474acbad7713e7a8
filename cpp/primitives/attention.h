// Scaled dot-product attention as loop nests around the brgemm kernel, flash style: no
// T_q x T_k buffer is ever formed. Layout (B, T, N, H) as jax.nn.dot_product_attention:
//
//   q (B, Tq, N, H), k and v (B, Tk, K, H) with K dividing N (query head h reads kv head
//   h / (N / K)); out (B, Tq, N, H); lse (B, N, Tq) float32, the per-row log-sum-exp the
//   backward recomputes the probabilities from (+inf for rows without a result, below).
//
//   logits = scale * q k^T + bias, masked entries set to -0.7 * FLT_MAX (JAX's value), so a
//   row whose every key is masked averages all of v (as JAX does); rows at or past a query
//   length are zero.
//
// Forward, per (batch, head, block of queries): S = Q_blk K_j^T by brgemm against K^T
// packed once per (batch, kv head), an online softmax (running max and sum; the kernel
// layer's row operations), O += P V_j by brgemm. Key blocks no row of the query block may
// see (causal, window, key length) are skipped. Backward, per (batch, kv head, key
// block): P recomputed from lse, dV += P^T dO, dP = dO V^T, dS = P (dP - D), dK += dS^T Q,
// dQ += dS K into per-thread partial sums that are added up at the end, so no two threads
// write one element. Inputs float32 or bfloat16 (uint16_t bits); every sum is float32.
#pragma once

#include <cstdint>
#include <string>

#include "brgemm/brgemm.h"
#include "primitives/parallel.h"

namespace jbr::prim {

struct AttentionShape {
  int64_t batch = 0, q_len = 0, kv_len = 0;  // B, Tq, Tk
  int64_t heads = 0, kv_heads = 0, head_dim = 0;  // N, K, H
};

// What decides which logits take part. A 4-D operand broadcast to (B, N, Tq, Tk) is given
// by its strides in elements (0 along a broadcast dim).
struct AttentionMasks {
  float scale = 1.0f;
  bool causal = false;            // key j <= query i (top-left aligned, as JAX)
  int64_t window_left = -1;       // >= 0: key j >= i - window_left
  int64_t window_right = -1;      // >= 0: key j <= i + window_right
  const int32_t* q_lengths = nullptr;   // (B,) or null: queries i >= q_lengths[b] are zero
  const int32_t* kv_lengths = nullptr;  // (B,) or null: keys j >= kv_lengths[b] are masked
  const float* bias = nullptr;          // added to the logits, or null
  int64_t bias_strides[4] = {};
  const uint8_t* mask = nullptr;        // nonzero: takes part; or null
  int64_t mask_strides[4] = {};
};

struct AttentionForward {
  AttentionShape shape;
  AttentionMasks masks;
  DType dtype = DType::f32;  // q, k, v and out
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // (B, N, Tq)
  Isa isa = Isa::ref;
};

struct AttentionBackward {
  AttentionShape shape;
  AttentionMasks masks;
  DType dtype = DType::f32;  // q, k, v, out, d_out and dq, dk, dv
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;
  const void* d_out = nullptr;
  const float* lse = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  // Gradient of the bias, float32, in the bias's own (broadcast) shape, contiguous, whose
  // strides masks.bias_strides are; bias_size its element count. Null: not computed.
  float* dbias = nullptr;
  int64_t bias_size = 0;
  Isa isa = Isa::ref;
};

// Empty on success, else a message naming what could not be run.
std::string attention_forward(const AttentionForward& p, const Executor* executor);
std::string attention_backward(const AttentionBackward& p, const Executor* executor);

}  // namespace jbr::prim
