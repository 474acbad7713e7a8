// Host-side planning for the CUDA BRGEMM kernels, in plain C++ (no CUDA headers), so it is
// compiled and unit-tested on machines without a GPU:
//   - NumPy-style broadcasting of the operands' leading (problem) dims into element strides,
//   - folding those dims into at most kMaxLeadRank dims the kernel decodes per block,
//   - tile and grid selection (one thread block per output tile of one problem).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#ifdef __CUDACC__
#define JBR_HOST_DEVICE __host__ __device__
#else
#define JBR_HOST_DEVICE
#endif

namespace jbr::cuda {

enum class ElemType : int { f32 = 0, bf16 = 1, f16 = 2 };
const char* elem_type_name(ElemType t);

// "(2, 3)", "(4,)": the CPU handlers' shape wording.
std::string dims_str(const std::vector<int64_t>& dims);

// Operands whose leading dims broadcast against the problems; index with these.
enum Operand : int { kA = 0, kB = 1, kC = 2, kBias = 3, kNumOperands = 4 };

// The kernel gets the problem shape and each operand's strides by value.
constexpr int kMaxLeadRank = 6;
struct LeadDims {
  int rank = 0;
  int64_t shape[kMaxLeadRank] = {};
  int64_t stride[kNumOperands][kMaxLeadRank] = {};  // elements; 0 where broadcast
};

// Element strides of an operand with dims `dims` whose last `block_rank` dims are its
// block, right-aligned against `lead` (a missing or size-1 dim gets stride 0). Empty on
// success, else a message naming `name`.
std::string broadcast_strides(const std::vector<int64_t>& dims, int block_rank,
                              const std::vector<int64_t>& lead, const char* name,
                              std::vector<int64_t>* strides);

// Folds `lead` (with one stride vector per operand, each lead.size() long; an empty vector
// means the operand is absent and counts as stride 0) into LeadDims: size-1 dims are dropped
// and neighbours that every operand walks contiguously are merged. Errors if more than
// kMaxLeadRank dims remain.
std::string fold_lead(const std::vector<int64_t>& lead,
                      const std::vector<int64_t> (&strides)[kNumOperands], LeadDims* out);

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

// What both handlers decode from their buffers' dims. An absent optional operand (c, bias)
// is passed as nullptr.
using Dims = std::vector<int64_t>;
struct Decoded {
  Dims lead;  // the result's leading dims (the problems)
  int64_t m = 0, n = 0, k = 0, count = 0, problems = 0;
  int64_t a_blocks = 0, b_blocks = 0;  // offset form: pool sizes
  LeadDims dims;                       // lead folded, with each operand's strides
};
// Stride form: a (..., count, m, k), b (..., count, k, n), c (..., m, n), bias (..., n),
// out (..., m, n); leading dims broadcast against out's.
std::string decode_stride_form(const Dims& a, const Dims& b, const Dims* c, const Dims* bias,
                               const Dims& out, Decoded* d);
// Offset form: a_blocks (Pa, m, k), b_blocks (Pb, k, n), a_index and b_index (..., count)
// with out's leading dims, c and bias as above (a and b get no lead strides).
std::string decode_offset_form(const Dims& a_blocks, const Dims& b_blocks, const Dims& a_index,
                               const Dims& b_index, const Dims* c, const Dims* bias,
                               const Dims& out, Decoded* d);

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

// Chooses the tile for an (m, n) output of `problems` problems of element type `t`. 16-bit
// types use the large tile only when it still gives every one of `sm_count` multiprocessors
// at least one block. Errors when the grid would exceed CUDA's limit (2^31 - 1 blocks).
std::string plan_tiles(ElemType t, int64_t m, int64_t n, int64_t problems, int sm_count,
                       TilePlan* plan);

// Split-k for reductions whose results are summed atomically into a zeroed float32 output
// (weight updates): when the grid gives fewer blocks than `sm_count`, the `steps` (count *
// ceil(k / bk)) reduction steps of every tile are split over up to 2 * sm_count / blocks
// blocks, each keeping at least kMinStepsPerSplit steps. Updates plan->splits and blocks.
constexpr int64_t kMinStepsPerSplit = 4;
std::string plan_splits(int64_t steps, int sm_count, TilePlan* plan);

}  // namespace jbr::cuda
