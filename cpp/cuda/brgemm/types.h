// The CUDA kernels' contract types, shared by the kernels (cuda/brgemm/) and the host-side
// planning that fills them (cuda/primitives/): element types, the folded problem dims with
// each operand's strides, and the output tiles. Plain C++ (no CUDA headers).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define JBR_HOST_DEVICE __host__ __device__
#else
#define JBR_HOST_DEVICE
#endif

namespace jbr::cuda {

enum class ElemType : int { f32 = 0, bf16 = 1, f16 = 2 };
inline const char* elem_type_name(ElemType t) {
  switch (t) {
    case ElemType::f32: return "float32";
    case ElemType::bf16: return "bfloat16";
    case ElemType::f16: return "float16";
  }
  return "?";
}

// Operands whose leading dims broadcast against the problems; index with these.
enum Operand : int { kA = 0, kB = 1, kC = 2, kBias = 3, kNumOperands = 4 };

// The kernel gets the problem shape and each operand's strides by value.
constexpr int kMaxLeadRank = 6;
struct LeadDims {
  int rank = 0;
  int64_t shape[kMaxLeadRank] = {};
  int64_t stride[kNumOperands][kMaxLeadRank] = {};  // elements; 0 where broadcast
};

// Element offset of problem p (row-major over dims.shape) for operand `op`; the kernels
// call this same function on the device.
JBR_HOST_DEVICE inline int64_t lead_offset(const LeadDims& dims, int op, int64_t p) {
  int64_t offset = 0;
  for (int d = dims.rank - 1; d >= 0; --d) {
    offset += (p % dims.shape[d]) * dims.stride[op][d];
    p /= dims.shape[d];
  }
  return offset;
}

// Output tiles of the kernels. Keep in sync with the kernel templates (kernels.cu
// static_asserts against these).
struct TileShape {
  int bm, bn, bk, threads;
};
constexpr TileShape kTileF32 = {64, 64, 16, 256};     // SIMT float32, 4x4 per thread
constexpr TileShape kTile16Small = {64, 64, 32, 128};  // WMMA 16x16x16, 4 warps of 32x32
constexpr TileShape kTile16Large = {128, 128, 32, 256};  // WMMA, 8 warps of 32x64

struct TilePlan {
  TileShape tile{};
  int64_t tiles_m = 0, tiles_n = 0, problems = 0;
  int64_t splits = 1;  // the reduction's steps split over this many blocks (see plan_splits)
  // tiles_m * tiles_n * problems * splits: a 1-D grid, n-tiles fastest, splits slowest
  int64_t blocks = 0;
};

}  // namespace jbr::cuda
