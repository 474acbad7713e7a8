// Tuning constants of the dense-layer loop nests, in one place: block sizes and cache budgets
// with the measurements behind them. Only dense*.cc include this.
#pragma once

#include <cstdint>

namespace jbr::prim::dense_tuning {

// Block sizes (elements). A strip is a column block of the output that one work item
// owns; its B panel (kReduceChunk x kStripCols, 256 KB) stays in L2 while every row block
// of the item's rows uses it, and each brgemm call reduces kReduceBlock-deep blocks.
// Row groups are large so that a packed panel serves many row blocks (packing a strided
// panel per 256 rows cost ~10 % of a 4096-wide forward); the group's A block (4 MB) is
// read from L3 while the strips go by. (Measured single-threaded against chunks of 128 to
// 2048 and groups of 128 to 4096 rows: 256/512 was 3-12 % slower on the large layers.)
inline constexpr int64_t kStripCols = 64;
inline constexpr int64_t kRowTarget = 64;
inline constexpr int64_t kReduceChunk = 1024;  // float32; bfloat16 chunks hold the same bytes
inline constexpr int64_t kReduceBlock = 64;
// Calls start at multiples of kReduceBlock inside a chunk's panel; a VNNI panel is read in
// whole 32-row pieces, so those must be multiples of 32 (else a call reads the next one's rows).
static_assert(kReduceBlock % 32 == 0);
inline constexpr int64_t kGroupRows = 1024;
// Plain B panels are copied contiguous when their rows lie at least kPackLdb floats apart
// (2 KB or more: a 64-column strip's rows fall in few L1 sets, and from 4 KB each on its own
// page) and at least kPackRows rows share each copy (it costs a pass over the panel).
// kPackLdb was 2048 on Zen 4, where packing narrower strides measured no gain; on the Xeon
// (48 KB 12-way L1) 512 doubles the float32 forward of 1024-wide layers (1024^3: 121-130 ->
// 250-257 GFLOP/s, 1024x2048x512: 155-161 -> 241-246, 2 cores). kPackRows counts rows, not
// row blocks, since blocks shrink where m splits unevenly: 128 rows in three 43-row blocks
// do not pay for the copy (128x512x512 forward, one thread: 500-558 -> 480-493 us).
inline constexpr int64_t kPackLdb = 512;
inline constexpr int64_t kPackRows = 3 * kRowTarget;

// bfloat16: A rows a multiple of 4 KB apart all fall in the same L1 sets (8 KB for x of a
// 4096-wide layer: ~5-8 % of the forward). Where at least kPadStrips strips read A (so the
// copy costs a few % at most), it is copied once with its rows 64 bytes further apart.
// (Float32 runs A as it is: tuned and measured so.)
inline constexpr int64_t kPadStrips = 16;

}  // namespace jbr::prim::dense_tuning
