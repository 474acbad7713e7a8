// Tuning constants of the LSTM loop nests, in one place: block sizes and cache budgets
// with the measurements behind them. Only lstm*.cc include this.
#pragma once

#include <cstdint>

namespace jbr::prim::lstm_tuning {

inline constexpr int64_t kPanel = 64;     // column panel width of packed B operands
inline constexpr int64_t kMaxUnits = 64;  // hidden units per work item of a step
inline constexpr int64_t kChunk = 512;    // longest float32 reduction per call (bfloat16: twice that)

}  // namespace jbr::prim::lstm_tuning
