#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>

namespace jbr::prim {
namespace {

struct SharedWork {
  explicit SharedWork(int64_t n, const std::function<void(int64_t)>& body) : n(n), body(body) {}
  const int64_t n;
  // Only dereferenced while items remain, i.e. before parallel_for returns.
  const std::function<void(int64_t)>& body;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex mutex;
  std::condition_variable all_finished;

  void work() {
    int64_t mine = 0;
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n; ++mine) body(i);
    if (mine > 0 && finished.fetch_add(mine, std::memory_order_acq_rel) + mine == n) {
      std::lock_guard<std::mutex> lock(mutex);
      all_finished.notify_all();
    }
  }
};

}  // namespace

void parallel_for(const Executor* executor, int64_t n, const std::function<void(int64_t)>& body) {
  if (n <= 0) return;
  const int64_t workers = executor ? std::min(executor->num_workers(), n - 1) : 0;
  if (workers <= 0) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  // Late-starting tasks only touch the counters, kept alive by their shared_ptr.
  auto work = std::make_shared<SharedWork>(n, body);
  for (int64_t w = 0; w < workers; ++w) executor->schedule([work] { work->work(); });
  work->work();
  std::unique_lock<std::mutex> lock(work->mutex);
  work->all_finished.wait(lock, [&] { return work->finished.load() == n; });
}

}  // namespace jbr::prim
