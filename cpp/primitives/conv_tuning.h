// Tuning constants of the convolution loop nests, in one place: block sizes and cache budgets
// with the measurements behind them. Only conv*.cc include this.
#pragma once

#include <cstdint>

namespace jbr::prim::conv_tuning {

// Block sizes and cache budgets (measured on Zen 4: 32 KiB L1d, 1 MiB L2 per core).
inline constexpr int64_t kBlock = 64;                  // channel block: 4 AVX-512 vectors wide
inline constexpr int64_t kMaxRows = 56;                // output pixels per call (a multiple of 7 and 8)
inline constexpr int64_t kCallReduce = 56 * 256;       // pixels x reduced elements a call should reach
inline constexpr int64_t kMaxReduce = 1024;            // weight-update: pixels reduced per call
inline constexpr int64_t kPadWidth = 8;                // rows this narrow, bordered both sides: padded copy
inline constexpr int64_t kPanelBudget = 512 << 10;     // bytes of packed weights kept in L2 at once
inline constexpr int64_t kPartialBudget = 1 << 20;     // floats of weight-update partial sums, all splits
inline constexpr int64_t kTransposeBudget = 64 << 10;  // floats of transposed input per chunk
inline constexpr int64_t kPortionBudget = 64 << 10;    // floats of weight blocks one item accumulates

}  // namespace jbr::prim::conv_tuning
