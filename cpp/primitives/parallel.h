// Threading for the loop nests. The FFI handlers run them on a TeamCall (below); the
// primitives only see the Executor interface (no XLA types here).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace jbr::prim {

class Executor {
 public:
  virtual ~Executor() = default;
  // Worker threads available besides the calling thread (0: run everything inline).
  virtual int64_t num_workers() const = 0;
  virtual void schedule(std::function<void()> task) const = 0;
};

// Runs body(i) for every i in [0, n) on the calling thread and up to num_workers() worker
// tasks. Each joining thread runs its own contiguous range of the items, then takes the
// others' unstarted ones, and the caller works too, so the call returns once every item
// has run and never waits for a task that has not started: it cannot deadlock when the
// caller is itself a worker. `executor` may be null.
void parallel_for(const Executor* executor, int64_t n, const std::function<void(int64_t)>& body);

// Independent pieces of work for parallel_lanes: `prepare` (may be empty) runs once, then
// `item(i)` for every i in [0, items), after it and in any order.
struct Lane {
  std::function<void()> prepare;
  int64_t items = 0;
  std::function<void(int64_t)> item;
};

// Runs the lanes side by side: every joining thread (the caller first) takes the next
// lane nobody has started, prepares it and runs its items; a thread with no lane left
// takes items of prepared lanes. So each lane's data (say one GEMM of a backward pass,
// with its packed operand) mostly stays on the core that prepared it, while the threads
// still balance each other's tails. Same guarantees as parallel_for.
void parallel_lanes(const Executor* executor, const std::vector<Lane>& lanes);

// The library's own worker threads, serving one call (an FFI handler's lifetime) as an
// Executor: `threads - 1` workers besides the caller, shared by every call in the process.
// The handlers pass the size of XLA's intra-op pool, so XLA's thread settings hold.
// While any call is open, and for its `linger` after a call closes (JAX_BRGEMM_LINGER_US
// microseconds instead, for every call, where that is set), an idle worker polls for the
// next task (yielding the core to any other runnable thread) for up to JAX_BRGEMM_SPIN_US
// microseconds (default 300; 0: park at once), so the many parallel loops of one call (an
// LSTM's time steps) find it awake; then workers park and leave the cores to XLA's own
// threads. A linger helps calls that come back to back (convolutions pass kConvLinger,
// parallel_policy.h) but costs
// a training step whose XLA thunks run between our calls (a linger after every call: Flax
// digits MLP step 3-5 % slower in `bench flax`, 2026-12-05), so other calls pass none.
//
// Every task is also handed to `also_run` (the handlers pass XLA's intra-op pool), and
// the first copies to start join the loop, up to one thread per range of items (a later
// copy returns at once: parallel.cc, SharedWork). Neither
// pool alone starts tasks promptly on the 2-core VMs we measure on: a parked team worker
// started the first loop of a call within 20 us in 18 % of calls and took over 300 us in
// 23 % (its core busy with XLA's threads), and XLA's parked threads took 20-900 us to wake;
// offered to both, 72 % started within 20 us and 1 % took over 300 us (Flax CNN step
// 8.0-8.7 -> 7.2-7.3 ms; LSTM 512/512 forward+backward 174-180 -> 197-198 GFLOP/s).
// The largest JAX_BRGEMM_SPIN_US / JAX_BRGEMM_LINGER_US (a minute: no one means more).
inline constexpr int64_t kMaxWaitMicros = 60'000'000;

// Why JAX_BRGEMM_SPIN_US or JAX_BRGEMM_LINGER_US is malformed or over kMaxWaitMicros, or ''.
// The team clamps such a value instead (it starts from a kernel call, not from Python).
std::string wait_env_error();

class TeamCall final : public Executor {
 public:
  using Runner = std::function<void(std::function<void()>)>;
  explicit TeamCall(int64_t threads, Runner also_run = nullptr,
                    std::chrono::microseconds linger = std::chrono::microseconds(0));
  ~TeamCall() override;
  TeamCall(const TeamCall&) = delete;
  TeamCall& operator=(const TeamCall&) = delete;
  int64_t num_workers() const override { return workers_; }
  void schedule(std::function<void()> task) const override;

 private:
  int64_t workers_;
  Runner also_run_;
  std::chrono::microseconds linger_;
};

}  // namespace jbr::prim
