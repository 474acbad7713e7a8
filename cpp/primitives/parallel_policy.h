// The threading policy the FFI handlers apply to each call: whether it runs on the worker
// team or as one task on XLA's pool, and how long the team's workers keep polling after it.
// The handlers own only the XLA mechanics (cpp/ffi/common.h: team_call, run_sized).
#pragma once

#include <chrono>
#include <cstdint>

namespace jbr::prim {

// Dense calls of at most this many multiply-adds run as a single-threaded task on XLA's
// pool and the handler returns at once: two threads gain little on them (a 128x64x512
// weight gradient: 48 us on one thread, 44 on two), no helper is woken, and XLA's executor
// goes on with other thunks meanwhile (the optimizer's updates of other layers) instead of
// waiting. Flax digits MLP step (in-process A/B, 2 cores): its small backward calls as
// tasks +3-6 %, then its small forwards (64->512, 512->10) as tasks +12-13 % (1.05-1.08x
// stock); CNN level. Small convolution calls as tasks (the CNN's first layer) were level or
// 2 % slower, so convolutions do not use this (docs/design.md, Threads).
inline constexpr int64_t kSmallTaskMacs = int64_t{8} << 20;

inline bool runs_as_task(int64_t macs) { return macs <= kSmallTaskMacs; }

// Convolutions usually come back to back (a network's layers, a layer's three passes), so
// after one the library's workers keep polling for this long (TeamCall's linger): the next
// call finds its helper awake instead of waking a parked thread on an idle core. With the
// late task copies returning at once (parallel.cc, SharedWork), in-process A/B over the 60
// ResNet-50 passes called from Python, 2 cores: geometric mean +3.1 % (56x56 1x1 passes up
// to +7 %, strided 1x1 backward-data up to +18 %); Flax steps level (MLP +0.5 %, CNN -0.7 %,
// LSTM +1.9 %, within their noise). Dense and LSTM calls keep none: a linger after every
// call cost the Flax MLP step 3-5 % (docs/design.md, Threads).
inline constexpr std::chrono::microseconds kConvLinger{150};

}  // namespace jbr::prim
