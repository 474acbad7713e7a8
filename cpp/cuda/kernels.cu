// The CUDA BRGEMM kernels (see kernels.h): a SIMT kernel for float32 and a tensor-core (WMMA
// 16x16x16, float32 accumulators) kernel for bfloat16 and float16. Both: one block per output
// tile of one problem, the batch reduction over i and k inside the block, the tile held in
// registers from the first product to the fused epilogue.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "cuda/kernels.h"

namespace jbr::cuda {
namespace {

// ---------------------------------------------------------------- shared pieces

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// The CPU kernel's activations (gelu in its tanh form: 0.5 x (1 + tanh(u)) == x sigmoid(2u)).
__device__ __forceinline__ float activate(Act act, float x) {
  switch (act) {
    case Act::none: return x;
    case Act::relu: return x < 0.0f ? 0.0f : x;  // NaN stays NaN
    case Act::gelu: {
      const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
      return x * sigmoid(2.0f * u);
    }
    case Act::sigmoid: return sigmoid(x);
    case Act::tanh: return tanhf(x);
  }
  return x;
}

// Which problem and output tile this block owns (1-D grid, n-tiles fastest).
struct Tile {
  int64_t p, row0, col0;
};
__device__ __forceinline__ Tile locate(int64_t tiles_m, int64_t tiles_n, int bm, int bn) {
  const int64_t bid = blockIdx.x;
  const int64_t tn = bid % tiles_n, tm = (bid / tiles_n) % tiles_m;
  return {bid / (tiles_n * tiles_m), tm * bm, tn * bn};
}

// The A and B blocks of batch element i of problem p, whose stride-form bases are a_base and
// b_base. In the offset form an index out of range gives null blocks: nothing is read, and
// (when `report`) the bad value goes to pr.error for the handler. Uniform across the block.
template <class T>
struct Blocks {
  const T* a;
  const T* b;
};
template <class T>
__device__ __forceinline__ Blocks<T> batch_blocks(const Problem& pr, int64_t p, int64_t i,
                                                  int64_t a_base, int64_t b_base, bool report) {
  const int64_t a_size = pr.m * pr.k, b_size = pr.k * pr.n;
  const T* a = static_cast<const T*>(pr.a);
  const T* b = static_cast<const T*>(pr.b);
  if (pr.a_index == nullptr) return {a + a_base + i * a_size, b + b_base + i * b_size};
  const int64_t at = p * pr.count + i;
  const int64_t ia = pr.index_is_64 ? static_cast<const int64_t*>(pr.a_index)[at]
                                    : static_cast<const int32_t*>(pr.a_index)[at];
  const int64_t ib = pr.index_is_64 ? static_cast<const int64_t*>(pr.b_index)[at]
                                    : static_cast<const int32_t*>(pr.b_index)[at];
  const bool bad_a = ia < 0 || ia >= pr.a_blocks, bad_b = ib < 0 || ib >= pr.b_blocks;
  if (!bad_a && !bad_b) return {a + ia * a_size, b + ib * b_size};
  if (report && threadIdx.x == 0) {
    using ull = unsigned long long;
    if (bad_a) atomicExch(reinterpret_cast<ull*>(&pr.error[1]), static_cast<ull>(ia));
    if (bad_b) atomicExch(reinterpret_cast<ull*>(&pr.error[2]), static_cast<ull>(ib));
    atomicOr(reinterpret_cast<ull*>(&pr.error[0]), static_cast<ull>((bad_a ? 1 : 0) | (bad_b ? 2 : 0)));
  }
  return {nullptr, nullptr};
}

// The epilogue for one element of the finished sum `acc` at (row, col) of problem p.
__device__ __forceinline__ void store_out(const Problem& pr, int64_t p, int64_t c_base,
                                          int64_t bias_base, int64_t row, int64_t col,
                                          float acc) {
  float v = pr.alpha * acc;
  if (pr.beta != 0.0f) v += pr.beta * pr.c[c_base + row * pr.n + col];
  if (pr.bias != nullptr) v += pr.bias[bias_base + col];
  pr.out[(p * pr.m + row) * pr.n + col] = activate(pr.act, v);
}

// ---------------------------------------------------------------- float32: SIMT

constexpr int F32_BM = 64, F32_BN = 64, F32_BK = 16, F32_THREADS = 256;
static_assert(kTileF32.bm == F32_BM && kTileF32.bn == F32_BN && kTileF32.bk == F32_BK &&
              kTileF32.threads == F32_THREADS, "plan.h and the float32 kernel disagree");

// 16 x 16 threads, each owning a 4 x 4 piece of the 64 x 64 tile. The reduction runs over
// count * ceil(k / BK) steps, one (i, k0) each; each thread loads its part of step s + 1 into
// registers while step s is multiplied out of shared memory.
__global__ void __launch_bounds__(F32_THREADS)
brgemm_f32(const Problem pr, int64_t tiles_m, int64_t tiles_n) {
  constexpr int A_PER_THREAD = F32_BM * F32_BK / F32_THREADS;
  constexpr int B_PER_THREAD = F32_BK * F32_BN / F32_THREADS;
  __shared__ __align__(16) float As[F32_BK][F32_BM + 4];  // A tile, transposed (k-major)
  __shared__ __align__(16) float Bs[F32_BK][F32_BN + 4];
  const Tile t = locate(tiles_m, tiles_n, F32_BM, F32_BN);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t a_base = lead_offset(pr.lead, kA, t.p), b_base = lead_offset(pr.lead, kB, t.p);
  const int64_t k_steps = (pr.k + F32_BK - 1) / F32_BK, steps = pr.count * k_steps;

  // This thread's elements of step s (zeros past the edges and for a skipped block).
  float a_next[A_PER_THREAD], b_next[B_PER_THREAD];
  auto fetch = [&](int64_t s) {
    const int64_t i = s / k_steps, k0 = s % k_steps * F32_BK;
    const Blocks<float> blk = batch_blocks<float>(pr, t.p, i, a_base, b_base, k0 == 0);
#pragma unroll
    for (int j = 0; j < A_PER_THREAD; ++j) {
      const int e = tid + j * F32_THREADS;
      const int64_t row = t.row0 + e / F32_BK, col = k0 + e % F32_BK;
      a_next[j] = blk.a != nullptr && row < pr.m && col < pr.k ? blk.a[row * pr.k + col] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < B_PER_THREAD; ++j) {
      const int e = tid + j * F32_THREADS;
      const int64_t row = k0 + e / F32_BN, col = t.col0 + e % F32_BN;
      b_next[j] = blk.b != nullptr && row < pr.k && col < pr.n ? blk.b[row * pr.n + col] : 0.0f;
    }
  };

  float acc[4][4] = {};
  if (steps > 0) fetch(0);
  for (int64_t s = 0; s < steps; ++s) {
#pragma unroll
    for (int j = 0; j < A_PER_THREAD; ++j) {
      const int e = tid + j * F32_THREADS;
      As[e % F32_BK][e / F32_BK] = a_next[j];
    }
#pragma unroll
    for (int j = 0; j < B_PER_THREAD; ++j) {
      const int e = tid + j * F32_THREADS;
      Bs[e / F32_BN][e % F32_BN] = b_next[j];
    }
    __syncthreads();
    if (s + 1 < steps) fetch(s + 1);  // in flight during the products below
#pragma unroll
    for (int kk = 0; kk < F32_BK; ++kk) {
      const float4 av = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 bv = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
      const float ar[4] = {av.x, av.y, av.z, av.w}, br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(ar[r], br[c], acc[r][c]);
    }
    __syncthreads();
  }
  const int64_t c_base = lead_offset(pr.lead, kC, t.p), bias_base = lead_offset(pr.lead, kBias, t.p);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t row = t.row0 + ty * 4 + r;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t col = t.col0 + tx * 4 + c;
      if (row < pr.m && col < pr.n) store_out(pr, t.p, c_base, bias_base, row, col, acc[r][c]);
    }
  }
}

// ---------------------------------------------------------------- 16-bit: tensor cores

constexpr int H_BK = 32;
static_assert(kTile16Small.bk == H_BK && kTile16Large.bk == H_BK, "plan.h and the WMMA kernel disagree");

// 8 consecutive elements of a row into shared memory (16 bytes, aligned): an asynchronous
// copy (cp.async) when the source is aligned and fully inside the row, else element by element
// with zeros past the end. `src_row` is null for a row past the end (or a skipped block).
template <class T>
__device__ __forceinline__ void copy8(T* dst, const T* src_row, int64_t col, int64_t cols) {
  if (src_row != nullptr && col + 8 <= cols &&
      (reinterpret_cast<uintptr_t>(src_row + col) & 15) == 0) {
    __pipeline_memcpy_async(dst, src_row + col, 16);
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j)
    dst[j] = src_row != nullptr && col + j < cols ? src_row[col + j] : static_cast<T>(0.0f);
}

// BM x BN tile, WARPS_M x WARPS_N warps, each owning (BM/WARPS_M) x (BN/WARPS_N) as 16 x 16
// accumulator fragments. The reduction runs over count * ceil(k / BK) steps, one (i, k0) each,
// through two shared-memory stages: step s + 1 is copied in while step s is multiplied.
template <class T, int BM, int BN, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32)
brgemm_wmma(const Problem pr, int64_t tiles_m, int64_t tiles_n) {
  namespace wmma = nvcuda::wmma;
  constexpr int THREADS = WARPS_M * WARPS_N * 32;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N, FM = WM / 16, FN = WN / 16;
  constexpr int LDA = H_BK + 8, LDB = BN + 8;  // padded rows (multiples of 8 elements)
  static_assert(WM % 16 == 0 && WN % 16 == 0 && (BM * H_BK / 8) % THREADS == 0 &&
                (H_BK * BN / 8) % THREADS == 0, "tile does not split evenly");
  // Fragment pointers must be 32-byte aligned: rows of 16 * LD elements are, and so are
  // column offsets of 16 elements; 8-element chunks are 16-byte aligned for cp.async.
  __shared__ __align__(128) T As[2][BM * LDA];
  __shared__ __align__(128) T Bs[2][H_BK * LDB];
  __shared__ __align__(128) float stage_out[WARPS_M * WARPS_N][16 * 16];  // epilogue, per warp

  const Tile t = locate(tiles_m, tiles_n, BM, BN);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int64_t a_base = lead_offset(pr.lead, kA, t.p), b_base = lead_offset(pr.lead, kB, t.p);
  const int64_t k_steps = (pr.k + H_BK - 1) / H_BK, steps = pr.count * k_steps;

  // Starts copying step s into shared-memory stage `st` (one commit group per step).
  auto fetch = [&](int st, int64_t s) {
    const int64_t i = s / k_steps, k0 = s % k_steps * H_BK;
    const Blocks<T> blk = batch_blocks<T>(pr, t.p, i, a_base, b_base, k0 == 0);
#pragma unroll
    for (int q = tid; q < BM * H_BK / 8; q += THREADS) {
      const int r = q / (H_BK / 8), c = q % (H_BK / 8) * 8;
      const int64_t row = t.row0 + r;
      copy8(&As[st][r * LDA + c], blk.a != nullptr && row < pr.m ? blk.a + row * pr.k : nullptr,
            k0 + c, pr.k);
    }
#pragma unroll
    for (int q = tid; q < H_BK * BN / 8; q += THREADS) {
      const int r = q / (BN / 8), c = q % (BN / 8) * 8;
      const int64_t row = k0 + r;
      copy8(&Bs[st][r * LDB + c], blk.b != nullptr && row < pr.k ? blk.b + row * pr.n : nullptr,
            t.col0 + c, pr.n);
    }
    __pipeline_commit();
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
  for (int fm = 0; fm < FM; ++fm)
#pragma unroll
    for (int fn = 0; fn < FN; ++fn) wmma::fill_fragment(acc[fm][fn], 0.0f);

  if (steps > 0) fetch(0, 0);
  for (int64_t s = 0; s < steps; ++s) {
    const int st = static_cast<int>(s & 1);
    // Stage st ^ 1 was last read in step s - 1, which every warp finished (trailing barrier).
    if (s + 1 < steps) {
      fetch(st ^ 1, s + 1);
      __pipeline_wait_prior(1);  // step s's copies have landed; s + 1's may still fly
    } else {
      __pipeline_wait_prior(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < H_BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[FN];
#pragma unroll
      for (int fm = 0; fm < FM; ++fm)
        wmma::load_matrix_sync(fa[fm], &As[st][(wm * WM + fm * 16) * LDA + kk], LDA);
#pragma unroll
      for (int fn = 0; fn < FN; ++fn)
        wmma::load_matrix_sync(fb[fn], &Bs[st][kk * LDB + wn * WN + fn * 16], LDB);
#pragma unroll
      for (int fm = 0; fm < FM; ++fm)
#pragma unroll
        for (int fn = 0; fn < FN; ++fn) wmma::mma_sync(acc[fm][fn], fa[fm], fb[fn], acc[fm][fn]);
    }
    __syncthreads();
  }

  // Epilogue: each warp stages one 16 x 16 fragment at a time and stores it element-wise.
  const int64_t c_base = lead_offset(pr.lead, kC, t.p), bias_base = lead_offset(pr.lead, kBias, t.p);
  float* mine = stage_out[warp];
#pragma unroll
  for (int fm = 0; fm < FM; ++fm)
#pragma unroll
    for (int fn = 0; fn < FN; ++fn) {
      wmma::store_matrix_sync(mine, acc[fm][fn], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 16 * 16; e += 32) {
        const int64_t row = t.row0 + wm * WM + fm * 16 + e / 16;
        const int64_t col = t.col0 + wn * WN + fn * 16 + e % 16;
        if (row < pr.m && col < pr.n) store_out(pr, t.p, c_base, bias_base, row, col, mine[e]);
      }
      __syncwarp();
    }
}

template <class T>
cudaError_t launch_16bit(const Problem& pr, const TilePlan& plan, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.blocks));
  if (plan.tile.bm == kTile16Large.bm && plan.tile.bn == kTile16Large.bn) {
    static_assert(kTile16Large.threads == 4 * 2 * 32, "large tile: 4 x 2 warps");
    brgemm_wmma<T, kTile16Large.bm, kTile16Large.bn, 4, 2>
        <<<grid, kTile16Large.threads, 0, stream>>>(pr, plan.tiles_m, plan.tiles_n);
  } else if (plan.tile.bm == kTile16Small.bm && plan.tile.bn == kTile16Small.bn) {
    static_assert(kTile16Small.threads == 2 * 2 * 32, "small tile: 2 x 2 warps");
    brgemm_wmma<T, kTile16Small.bm, kTile16Small.bn, 2, 2>
        <<<grid, kTile16Small.threads, 0, stream>>>(pr, plan.tiles_m, plan.tiles_n);
  } else {
    return cudaErrorInvalidConfiguration;
  }
  return cudaGetLastError();
}

}  // namespace

int launch_brgemm(const Problem& pr, const TilePlan& plan, CUstream_st* stream) {
  switch (pr.type) {
    case ElemType::f32:
      if (plan.tile.bm != F32_BM || plan.tile.bn != F32_BN) return cudaErrorInvalidConfiguration;
      brgemm_f32<<<dim3(static_cast<unsigned>(plan.blocks)), F32_THREADS, 0, stream>>>(
          pr, plan.tiles_m, plan.tiles_n);
      return cudaGetLastError();
    case ElemType::bf16: return launch_16bit<__nv_bfloat16>(pr, plan, stream);
    case ElemType::f16: return launch_16bit<__half>(pr, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jbr::cuda
