// The brgemm op on CUDA: the addressing functor of the stride and offset forms for the shared
// BRGEMM kernels (gemm.cuh), and the launch.
#include "cuda/brgemm/gemm.cuh"
#include "cuda/brgemm/kernels.h"

namespace jbr::cuda {
namespace {

// A(p, i), B(p, i) of the stride form (lead offsets + i * block size) or the offset form
// (a_index / b_index, checked against the pools: an index out of range gives null blocks,
// nothing is read, and the first step's thread 0 reports the bad value through pr.error).
template <class TT>
struct BrgemmAddr {
  using T = TT;
  static constexpr bool kAContig = true, kBContig = true;
  Problem pr;
  int64_t m, n, k, count;

  struct Block {
    int64_t p, a_base, b_base, c_base, bias_base;
  };
  struct Step {
    const T* a;
    const T* b;
  };
  explicit BrgemmAddr(const Problem& problem)
      : pr(problem), m(problem.m), n(problem.n), k(problem.k), count(problem.count) {}

  __device__ Block block(int64_t p) const {
    return {p, lead_offset(pr.lead, kA, p), lead_offset(pr.lead, kB, p), lead_offset(pr.lead, kC, p),
            lead_offset(pr.lead, kBias, p)};
  }
  __device__ Step step(const Block& bl, int64_t i, bool report) const {
    const T* a = static_cast<const T*>(pr.a);
    const T* b = static_cast<const T*>(pr.b);
    if (pr.a_index == nullptr) return {a + bl.a_base + i * m * k, b + bl.b_base + i * k * n};
    const int64_t at = bl.p * count + i;
    const int64_t ia = pr.index_is_64 ? static_cast<const int64_t*>(pr.a_index)[at]
                                      : static_cast<const int32_t*>(pr.a_index)[at];
    const int64_t ib = pr.index_is_64 ? static_cast<const int64_t*>(pr.b_index)[at]
                                      : static_cast<const int32_t*>(pr.b_index)[at];
    const bool bad_a = ia < 0 || ia >= pr.a_blocks, bad_b = ib < 0 || ib >= pr.b_blocks;
    if (!bad_a && !bad_b) return {a + ia * m * k, b + ib * k * n};
    if (report && threadIdx.x == 0) {
      using ull = unsigned long long;
      if (bad_a) atomicExch(reinterpret_cast<ull*>(&pr.error[1]), static_cast<ull>(ia));
      if (bad_b) atomicExch(reinterpret_cast<ull*>(&pr.error[2]), static_cast<ull>(ib));
      atomicOr(reinterpret_cast<ull*>(&pr.error[0]),
               static_cast<ull>((bad_a ? 1 : 0) | (bad_b ? 2 : 0)));
    }
    return {nullptr, nullptr};
  }
  __device__ const T* a(const Step& st, int64_t row, int64_t kk) const {
    return st.a != nullptr ? st.a + row * k + kk : nullptr;
  }
  __device__ const T* b(const Step& st, int64_t kk, int64_t col) const {
    return st.b != nullptr ? st.b + kk * n + col : nullptr;
  }
  __device__ void store(const Block& bl, int64_t row, int64_t col, float acc) const {
    float v = pr.alpha * acc;
    if (pr.beta != 0.0f) v += pr.beta * pr.c[bl.c_base + row * n + col];
    if (pr.bias != nullptr) v += pr.bias[bl.bias_base + col];
    pr.out[(bl.p * m + row) * n + col] = dev::activate(pr.act, v);
  }
};

}  // namespace

int launch_brgemm(const Problem& pr, const TilePlan& plan, CUstream_st* stream) {
  if (plan.splits != 1) return cudaErrorInvalidConfiguration;  // the epilogue is not a sum
  switch (pr.type) {
    case ElemType::f32: return dev::launch_gemm(BrgemmAddr<float>(pr), plan, stream);
    case ElemType::bf16: return dev::launch_gemm(BrgemmAddr<__nv_bfloat16>(pr), plan, stream);
    case ElemType::f16: return dev::launch_gemm(BrgemmAddr<__half>(pr), plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jbr::cuda
