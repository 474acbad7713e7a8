// Threading for the loop nests. The FFI layer adapts XLA's intra-op pool to Executor; the
// primitives only see this interface (no XLA types here).
#pragma once

#include <cstdint>
#include <functional>

namespace jbr::prim {

class Executor {
 public:
  virtual ~Executor() = default;
  // Worker threads available besides the calling thread (0: run everything inline).
  virtual int64_t num_workers() const = 0;
  virtual void schedule(std::function<void()> task) const = 0;
};

// Runs body(i) for every i in [0, n) on the calling thread and up to num_workers() pool
// tasks. Items are claimed from a shared counter and the caller works too, so the call
// returns once every item has run and never waits for a task that has not started: it
// cannot deadlock when the caller is itself a pool worker. `executor` may be null.
void parallel_for(const Executor* executor, int64_t n, const std::function<void(int64_t)>& body);

}  // namespace jbr::prim
