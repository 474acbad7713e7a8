// The one CUDA BRGEMM routine, shared by the brgemm op, dense and conv2d: a thread block per
// output tile of one problem; inside the block the whole batch reduction (over i and k) with
// the tile in registers, then the epilogue. What differs between the ops is only where the
// blocks A(p, i), B(p, i) and the outputs live, which the kernels ask an addressing functor:
//
//   struct Addr {
//     using T = float | __nv_bfloat16 | __half;        // the A and B element type
//     static constexpr bool kAContig, kBContig;        // see below
//     int64_t m, n, k, count;                          // per problem: out m x n, A_i m x k
//     struct Block; struct Step;
//     Block block(int64_t p) const;                    // once per thread block
//     Step step(const Block&, int64_t i, bool first) const;  // per batch element (first: its k0 == 0)
//     const T* a(const Step&, int64_t row, int64_t kk) const;  // element (row, kk) of A(p, i); null: 0
//     const T* b(const Step&, int64_t kk, int64_t col) const;  // element (kk, col) of B(p, i); null: 0
//     void store(const Block&, int64_t row, int64_t col, float acc) const;  // epilogue, one element
//   };
//
// kAContig: a(row, kk + j) == a(row, kk) + j and null-ness does not depend on kk (a row-major
// row); then the 16-bit kernel copies 8 elements at once (cp.async). Else element by element.
// kBContig likewise along a row of B. Rows/columns/kk past m, n, k are never asked for.
//
// Splits (TilePlan::splits > 1): the reduction steps are split over that many blocks per tile,
// each storing its partial sum; the functor's store must then accumulate atomically.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "cuda/brgemm/kernels.h"
#include "cuda/brgemm/types.h"

namespace jbr::cuda::dev {

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// The CPU kernel's activations, one per entry of brgemm/activation.h (gelu in its tanh
// form: 0.5 x (1 + tanh(u)) == x sigmoid(2u)).
__device__ __forceinline__ float act_none(float x) { return x; }
__device__ __forceinline__ float act_relu(float x) { return x < 0.0f ? 0.0f : x; }  // NaN stays NaN
__device__ __forceinline__ float act_gelu(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x * sigmoid(2.0f * u);
}
__device__ __forceinline__ float act_sigmoid(float x) { return sigmoid(x); }
__device__ __forceinline__ float act_tanh(float x) { return tanhf(x); }

__device__ __forceinline__ float activate(Act act, float x) {
  switch (act) {
#define JBR_ACTIVATION_CASE(name) \
  case Act::name: return act_##name(x);
    JBR_ACTIVATIONS(JBR_ACTIVATION_CASE)
#undef JBR_ACTIVATION_CASE
  }
  return x;
}

// Which problem, output tile and split this block owns (1-D grid, n-tiles fastest).
struct TileId {
  int64_t p, row0, col0, split;
};
__device__ __forceinline__ TileId locate(const TilePlan& plan, int bm, int bn) {
  const int64_t bid = blockIdx.x;
  const int64_t tn = bid % plan.tiles_n, tm = bid / plan.tiles_n % plan.tiles_m;
  const int64_t rest = bid / (plan.tiles_n * plan.tiles_m);
  return {rest % plan.problems, tm * bm, tn * bn, rest / plan.problems};
}

// This split's share [begin, end) of `steps` reduction steps.
struct StepRange {
  int64_t begin, end;
};
__device__ __forceinline__ StepRange split_steps(int64_t steps, int64_t split, int64_t splits) {
  return {steps * split / splits, steps * (split + 1) / splits};
}

// ---------------------------------------------------------------- float32: SIMT

constexpr int F32_BM = 64, F32_BN = 64, F32_BK = 16, F32_THREADS = 256;
static_assert(kTileF32.bm == F32_BM && kTileF32.bn == F32_BN && kTileF32.bk == F32_BK &&
              kTileF32.threads == F32_THREADS, "plan.h and the float32 kernel disagree");

// 16 x 16 threads, each owning a 4 x 4 piece of the 64 x 64 tile. The reduction runs over
// count * ceil(k / BK) steps, one (i, k0) each; each thread loads its part of step s + 1 into
// registers while step s is multiplied out of shared memory.
template <class Addr>
__global__ void __launch_bounds__(F32_THREADS) gemm_f32(const Addr addr, const TilePlan plan) {
  static_assert(std::is_same_v<typename Addr::T, float>, "the SIMT kernel is float32 only");
  (void)Addr::kAContig, (void)Addr::kBContig;  // loads element by element either way
  constexpr int A_PER_THREAD = F32_BM * F32_BK / F32_THREADS;
  constexpr int B_PER_THREAD = F32_BK * F32_BN / F32_THREADS;
  __shared__ __align__(16) float As[F32_BK][F32_BM + 4];  // A tile, transposed (k-major)
  __shared__ __align__(16) float Bs[F32_BK][F32_BN + 4];
  const TileId t = locate(plan, F32_BM, F32_BN);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const typename Addr::Block blk = addr.block(t.p);
  const int64_t k_steps = (addr.k + F32_BK - 1) / F32_BK;
  const StepRange range = split_steps(addr.count * k_steps, t.split, plan.splits);

  // This thread's elements of step s (zeros past the edges and where the functor says so).
  float a_next[A_PER_THREAD], b_next[B_PER_THREAD];
  auto fetch = [&](int64_t s) {
    const int64_t i = s / k_steps, k0 = s % k_steps * F32_BK;
    const typename Addr::Step st = addr.step(blk, i, k0 == 0);
#pragma unroll
    for (int j = 0; j < A_PER_THREAD; ++j) {
      const int e = tid + j * F32_THREADS;
      const int64_t row = t.row0 + e / F32_BK, col = k0 + e % F32_BK;
      const float* src = row < addr.m && col < addr.k ? addr.a(st, row, col) : nullptr;
      a_next[j] = src != nullptr ? *src : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < B_PER_THREAD; ++j) {
      const int e = tid + j * F32_THREADS;
      const int64_t row = k0 + e / F32_BN, col = t.col0 + e % F32_BN;
      const float* src = row < addr.k && col < addr.n ? addr.b(st, row, col) : nullptr;
      b_next[j] = src != nullptr ? *src : 0.0f;
    }
  };

  float acc[4][4] = {};
  if (range.begin < range.end) fetch(range.begin);
  for (int64_t s = range.begin; s < range.end; ++s) {
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
    if (s + 1 < range.end) fetch(s + 1);  // in flight during the products below
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
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t row = t.row0 + ty * 4 + r;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t col = t.col0 + tx * 4 + c;
      if (row < addr.m && col < addr.n) addr.store(blk, row, col, acc[r][c]);
    }
  }
}

// ---------------------------------------------------------------- 16-bit: tensor cores

constexpr int H_BK = 32;
static_assert(kTile16Small.bk == H_BK && kTile16Large.bk == H_BK, "plan.h and the WMMA kernel disagree");

// 8 consecutive elements of a row into shared memory (16 bytes, aligned): an asynchronous
// copy (cp.async) when the source is aligned and all 8 are inside the row (`avail` elements
// are left in it), else element by element with zeros past the end. `src` null: zeros.
template <class T>
__device__ __forceinline__ void copy8(T* dst, const T* src, int64_t avail) {
  if (src != nullptr && avail >= 8 && (reinterpret_cast<uintptr_t>(src) & 15) == 0) {
    __pipeline_memcpy_async(dst, src, 16);
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) dst[j] = src != nullptr && j < avail ? src[j] : static_cast<T>(0.0f);
}

// Elements (row, kk .. kk + 7) of A(p, i) into dst (zeros past m and k).
template <class Addr, class T = typename Addr::T>
__device__ __forceinline__ void load_a8(T* dst, const Addr& addr, const typename Addr::Step& st,
                                        int64_t row, int64_t kk) {
  if constexpr (Addr::kAContig) {
    copy8(dst, row < addr.m && kk < addr.k ? addr.a(st, row, kk) : nullptr, addr.k - kk);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const T* src = row < addr.m && kk + j < addr.k ? addr.a(st, row, kk + j) : nullptr;
      dst[j] = src != nullptr ? *src : static_cast<T>(0.0f);
    }
  }
}

// Elements (kk, col .. col + 7) of B(p, i) into dst (zeros past k and n).
template <class Addr, class T = typename Addr::T>
__device__ __forceinline__ void load_b8(T* dst, const Addr& addr, const typename Addr::Step& st,
                                        int64_t kk, int64_t col) {
  if constexpr (Addr::kBContig) {
    copy8(dst, kk < addr.k && col < addr.n ? addr.b(st, kk, col) : nullptr, addr.n - col);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const T* src = kk < addr.k && col + j < addr.n ? addr.b(st, kk, col + j) : nullptr;
      dst[j] = src != nullptr ? *src : static_cast<T>(0.0f);
    }
  }
}

// BM x BN tile, WARPS_M x WARPS_N warps, each owning (BM/WARPS_M) x (BN/WARPS_N) as 16 x 16
// accumulator fragments. The reduction runs over count * ceil(k / BK) steps, one (i, k0) each,
// through two shared-memory stages: step s + 1 is copied in while step s is multiplied.
template <class Addr, int BM, int BN, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32)
gemm_wmma(const Addr addr, const TilePlan plan) {
  namespace wmma = nvcuda::wmma;
  using T = typename Addr::T;
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

  const TileId t = locate(plan, BM, BN);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const typename Addr::Block blk = addr.block(t.p);
  const int64_t k_steps = (addr.k + H_BK - 1) / H_BK;
  const StepRange range = split_steps(addr.count * k_steps, t.split, plan.splits);

  // Starts copying step s into shared-memory stage `st` (one commit group per step).
  auto fetch = [&](int st, int64_t s) {
    const int64_t i = s / k_steps, k0 = s % k_steps * H_BK;
    const typename Addr::Step step = addr.step(blk, i, k0 == 0);
#pragma unroll
    for (int q = tid; q < BM * H_BK / 8; q += THREADS) {
      const int r = q / (H_BK / 8), c = q % (H_BK / 8) * 8;
      load_a8(&As[st][r * LDA + c], addr, step, t.row0 + r, k0 + c);
    }
#pragma unroll
    for (int q = tid; q < H_BK * BN / 8; q += THREADS) {
      const int r = q / (BN / 8), c = q % (BN / 8) * 8;
      load_b8(&Bs[st][r * LDB + c], addr, step, k0 + r, t.col0 + c);
    }
    __pipeline_commit();
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
  for (int fm = 0; fm < FM; ++fm)
#pragma unroll
    for (int fn = 0; fn < FN; ++fn) wmma::fill_fragment(acc[fm][fn], 0.0f);

  if (range.begin < range.end) fetch(0, range.begin);
  for (int64_t s = range.begin; s < range.end; ++s) {
    const int st = static_cast<int>((s - range.begin) & 1);
    // Stage st ^ 1 was last read in step s - 1, which every warp finished (trailing barrier).
    if (s + 1 < range.end) {
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
        if (row < addr.m && col < addr.n) addr.store(blk, row, col, mine[e]);
      }
      __syncwarp();
    }
}

// Enqueues the kernel for Addr's element type and the plan's tile on `stream`.
template <class Addr>
cudaError_t launch_gemm(const Addr& addr, const TilePlan& plan, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.blocks));
  if constexpr (std::is_same_v<typename Addr::T, float>) {
    if (plan.tile.bm != F32_BM || plan.tile.bn != F32_BN) return cudaErrorInvalidConfiguration;
    gemm_f32<Addr><<<grid, F32_THREADS, 0, stream>>>(addr, plan);
  } else if (plan.tile.bm == kTile16Large.bm && plan.tile.bn == kTile16Large.bn) {
    static_assert(kTile16Large.threads == 4 * 2 * 32, "large tile: 4 x 2 warps");
    gemm_wmma<Addr, kTile16Large.bm, kTile16Large.bn, 4, 2>
        <<<grid, kTile16Large.threads, 0, stream>>>(addr, plan);
  } else if (plan.tile.bm == kTile16Small.bm && plan.tile.bn == kTile16Small.bn) {
    static_assert(kTile16Small.threads == 2 * 2 * 32, "small tile: 2 x 2 warps");
    gemm_wmma<Addr, kTile16Small.bm, kTile16Small.bn, 2, 2>
        <<<grid, kTile16Small.threads, 0, stream>>>(addr, plan);
  } else {
    return cudaErrorInvalidConfiguration;
  }
  return cudaGetLastError();
}

}  // namespace jbr::cuda::dev
