// Independent brgemm problems over leading (batch) dimensions: the loop nest behind
// jax_brgemm.brgemm and jax_brgemm.brgemm_indexed.
#pragma once

#include <cstdint>
#include <vector>

#include "brgemm/brgemm.h"
#include "primitives/parallel.h"

namespace jbr::prim {

struct BatchedBrgemm {
  // Problems: the output's leading shape; out is (lead..., m, n), contiguous.
  std::vector<int64_t> lead_shape;
  int64_t m = 0, n = 0, k = 0, count = 0;
  // Element strides of each operand's leading dims, aligned with lead_shape (0 broadcasts).
  // Per problem, a holds (count, m, k) and b (count, k, n) contiguous blocks, c (m, n).
  std::vector<int64_t> a_lead_strides, b_lead_strides, c_lead_strides, bias_lead_strides;
  // a and b are float32 or bfloat16 (in_dtype); c and out are out_dtype.
  DType in_dtype = DType::f32, out_dtype = DType::f32;
  const void* a = nullptr;
  const void* b = nullptr;
  const void* c = nullptr;  // optional addend (read only when beta != 0)
  void* out = nullptr;
  const float* bias = nullptr;  // optional (lead..., n), broadcast like c
  // Offset form: when set, a and b are block pools and problem p uses the element
  // offsets offs_a[p * count + i], offs_b[p * count + i] (lead strides are then unused).
  const int64_t* offs_a = nullptr;
  const int64_t* offs_b = nullptr;
  float alpha = 1.0f, beta = 0.0f;
  Activation activation = Activation::none;
  Isa isa = Isa::ref;
};

// Empty on success, else a message naming what could not be run.
std::string run_batched_brgemm(const BatchedBrgemm& problem, const Executor* executor);

}  // namespace jbr::prim
