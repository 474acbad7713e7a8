// Host-side planning for the CUDA BRGEMM kernels, in plain C++ (no CUDA headers), so it is
// compiled and unit-tested on machines without a GPU:
//   - NumPy-style broadcasting of the operands' leading (problem) dims into element strides
//     (shape/dims.h, shared with the CPU handlers),
//   - folding those dims into at most kMaxLeadRank dims the kernel decodes per block,
//   - tile and grid selection (one thread block per output tile of one problem).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/brgemm/types.h"
#include "shape/dims.h"

namespace jbr::cuda {

using shape::broadcast_strides;
using shape::dims_str;

// Folds `lead` (with one stride vector per operand, each lead.size() long; an empty vector
// means the operand is absent and counts as stride 0) into LeadDims: size-1 dims are dropped
// and neighbours that every operand walks contiguously are merged. Errors if more than
// kMaxLeadRank dims remain.
std::string fold_lead(const std::vector<int64_t>& lead,
                      const std::vector<int64_t> (&strides)[kNumOperands], LeadDims* out);

// What both handlers decode from their buffers' dims. An absent optional operand (c, bias)
// is passed as nullptr.
using shape::Dims;
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
