// dense and conv2d on CUDA (see nn_kernels.h): the addressing functor that turns the offset
// functions of cuda/nn_plan.h into the shared BRGEMM kernels' interface (gemm.cuh), and
// dense's two element-wise backward kernels.
#include <algorithm>

#include "cuda/brgemm/gemm.cuh"
#include "cuda/primitives/nn_kernels.h"

namespace jbr::cuda {
namespace {

__device__ __forceinline__ float load_elem(const void* p, ElemType t, int64_t i) {
  switch (t) {
    case ElemType::f32: return static_cast<const float*>(p)[i];
    case ElemType::bf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case ElemType::f16: return __half2float(static_cast<const __half*>(p)[i]);
  }
  return 0.0f;
}

__device__ __forceinline__ void store_elem(void* p, ElemType t, int64_t i, float v) {
  switch (t) {
    case ElemType::f32: static_cast<float*>(p)[i] = v; return;
    case ElemType::bf16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); return;
    case ElemType::f16: static_cast<__half*>(p)[i] = __float2half_rn(v); return;
  }
}

// dy * act'(z), from saved = y (relu, sigmoid, tanh) or z (gelu): the CPU's formulas
// (cpp/primitives/dense.cc, activation_grad).
// One function per entry of brgemm/activation.h.
__device__ __forceinline__ float grad_none(float dy, float) { return dy; }
__device__ __forceinline__ float grad_relu(float dy, float y) { return y > 0.0f ? dy : 0.0f; }
__device__ __forceinline__ float grad_sigmoid(float dy, float y) { return dy * y * (1.0f - y); }
__device__ __forceinline__ float grad_tanh(float dy, float y) { return dy * (1.0f - y * y); }
__device__ __forceinline__ float grad_gelu(float dy, float z) {
  constexpr float s = 0.7978845608028654f, a = 0.044715f;
  const float t = tanhf(s * (z + a * z * z * z));
  const float du = s * (1.0f + 3.0f * a * z * z);
  return dy * (0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * du);
}

__device__ __forceinline__ float activation_grad(Act act, float dy, float saved) {
  switch (act) {
#define JBR_ACTIVATION_CASE(name) \
  case Act::name: return grad_##name(dy, saved);
    JBR_ACTIVATIONS(JBR_ACTIVATION_CASE)
#undef JBR_ACTIVATION_CASE
  }
  return dy;
}

// The BRGEMM addressing functor (gemm.cuh) over one of nn_plan.h's offset structs: an
// offset of -1 is a zero (padding), the epilogue as Epilogue says.
template <class TT, class Offsets, bool A_CONTIG, bool B_CONTIG>
struct NnAddr {
  using T = TT;
  static constexpr bool kAContig = A_CONTIG, kBContig = B_CONTIG;
  const T* a_ptr;
  const T* b_ptr;
  Offsets off;
  Epilogue ep;
  int64_t m, n, k, count;

  struct Block {
    int64_t p;
  };
  struct Step {
    int64_t p, i;
  };
  explicit NnAddr(const NnGemm<Offsets>& g)
      : a_ptr(static_cast<const T*>(g.a)), b_ptr(static_cast<const T*>(g.b)), off(g.off), ep(g.ep),
        m(g.off.shape.m), n(g.off.shape.n), k(g.off.shape.k), count(g.off.shape.count) {}

  __device__ Block block(int64_t p) const { return {p}; }
  __device__ Step step(const Block& bl, int64_t i, bool) const { return {bl.p, i}; }
  __device__ const T* a(const Step& st, int64_t row, int64_t kk) const {
    const int64_t o = off.a_offset(st.p, st.i, row, kk);
    return o < 0 ? nullptr : a_ptr + o;
  }
  __device__ const T* b(const Step& st, int64_t kk, int64_t col) const {
    const int64_t o = off.b_offset(st.p, st.i, kk, col);
    return o < 0 ? nullptr : b_ptr + o;
  }
  __device__ void store(const Block& bl, int64_t row, int64_t col, float v) const {
    const int64_t o = off.out_offset(bl.p, row, col);
    if (ep.accumulate) {
      atomicAdd(static_cast<float*>(ep.out.p) + o, v);
      return;
    }
    if (ep.bias.p != nullptr) v += load_elem(ep.bias.p, ep.bias.t, off.bias_offset(bl.p, col));
    if (ep.preact.p != nullptr) store_elem(ep.preact.p, ep.preact.t, o, v);
    store_elem(ep.out.p, ep.out.t, o, dev::activate(ep.act, v));
  }
};

// float32 or bfloat16 inputs, as the CPU handlers take.
template <class Offsets, bool A_CONTIG, bool B_CONTIG>
int launch_typed(const NnGemm<Offsets>& g, const TilePlan& plan, cudaStream_t stream) {
  if (g.ep.accumulate && (g.ep.out.t != ElemType::f32 || g.ep.bias.p != nullptr ||
                          g.ep.preact.p != nullptr || g.ep.act != Act::none))
    return cudaErrorInvalidValue;
  if (!g.ep.accumulate && plan.splits != 1) return cudaErrorInvalidConfiguration;
  switch (g.in) {
    case ElemType::f32:
      return dev::launch_gemm(NnAddr<float, Offsets, A_CONTIG, B_CONTIG>(g), plan, stream);
    case ElemType::bf16:
      return dev::launch_gemm(NnAddr<__nv_bfloat16, Offsets, A_CONTIG, B_CONTIG>(g), plan, stream);
    default: return cudaErrorInvalidValue;
  }
}

__global__ void activation_grad_kernel(Act act, Buf dy, Buf saved, Buf dz, int64_t size) {
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < size;
       e += int64_t{gridDim.x} * blockDim.x) {
    const float s = saved.p != nullptr ? load_elem(saved.p, saved.t, e) : 0.0f;
    store_elem(dz.p, dz.t, e, activation_grad(act, load_elem(dy.p, dy.t, e), s));
  }
}

// Block (32, 8): 32 columns, 8 row phases summed in shared memory. Grid (column blocks, sums).
constexpr int kBiasCols = 32, kBiasRows = 8;
__global__ void bias_grad_kernel(Act act, Buf dy, Buf saved, Buf dbias, int64_t rows, int64_t cols) {
  __shared__ float part[kBiasRows][kBiasCols];
  const int64_t q = blockIdx.y, col = blockIdx.x * int64_t{kBiasCols} + threadIdx.x;
  float sum = 0.0f;
  if (col < cols)
    for (int64_t r = threadIdx.y; r < rows; r += kBiasRows) {
      const int64_t e = (q * rows + r) * cols + col;
      const float s = saved.p != nullptr ? load_elem(saved.p, saved.t, e) : 0.0f;
      sum += activation_grad(act, load_elem(dy.p, dy.t, e), s);
    }
  part[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    for (int j = 1; j < kBiasRows; ++j) sum += part[j][threadIdx.x];
    store_elem(dbias.p, dbias.t, q * cols + col, sum);
  }
}

}  // namespace

int launch_nn(const NnGemm<StridedOffsets>& g, const TilePlan& plan, CUstream_st* stream) {
  // dense: forward reads both row-major, backward-data w transposed, weight-update x transposed.
  const bool a_contig = g.off.a_k == 1, b_contig = g.off.b_col == 1;
  if (a_contig && b_contig) return launch_typed<StridedOffsets, true, true>(g, plan, stream);
  if (a_contig) return launch_typed<StridedOffsets, true, false>(g, plan, stream);
  if (b_contig) return launch_typed<StridedOffsets, false, true>(g, plan, stream);
  return cudaErrorInvalidValue;
}

int launch_nn(const NnGemm<ConvForwardOffsets>& g, const TilePlan& plan, CUstream_st* stream) {
  return launch_typed<ConvForwardOffsets, ConvForwardOffsets::kAContig, ConvForwardOffsets::kBContig>(
      g, plan, stream);
}

int launch_nn(const NnGemm<ConvBackwardDataOffsets>& g, const TilePlan& plan, CUstream_st* stream) {
  return launch_typed<ConvBackwardDataOffsets, ConvBackwardDataOffsets::kAContig, ConvBackwardDataOffsets::kBContig>(
      g, plan, stream);
}

int launch_nn(const NnGemm<ConvWeightUpdateOffsets>& g, const TilePlan& plan, CUstream_st* stream) {
  return launch_typed<ConvWeightUpdateOffsets, ConvWeightUpdateOffsets::kAContig, ConvWeightUpdateOffsets::kBContig>(
      g, plan, stream);
}

int launch_activation_grad(Act act, Buf dy, Buf saved, Buf dz, int64_t size, CUstream_st* stream) {
  if (size <= 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((size + 255) / 256, 65536);
  activation_grad_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(act, dy, saved, dz, size);
  return cudaGetLastError();
}

int launch_bias_grad(Act act, Buf dy, Buf saved, Buf dbias, int64_t sums, int64_t rows,
                     int64_t cols, CUstream_st* stream) {
  if (sums <= 0 || cols <= 0) return cudaSuccess;
  if (sums > 65535) return cudaErrorInvalidConfiguration;  // grid.y; the handler checks first
  const dim3 grid(static_cast<unsigned>((cols + kBiasCols - 1) / kBiasCols), static_cast<unsigned>(sums));
  bias_grad_kernel<<<grid, dim3(kBiasCols, kBiasRows), 0, stream>>>(act, dy, saved, dbias, rows, cols);
  return cudaGetLastError();
}

}  // namespace jbr::cuda
