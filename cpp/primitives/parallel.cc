#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace jbr::prim {
namespace {

// JAX_BRGEMM_SPIN_US / JAX_BRGEMM_LINGER_US: digits (surrounding blanks allowed), at most
// kMaxWaitMicros. Empty where unset; where malformed, *error says why and the value is the
// digits read so far, saturated at the maximum, so that no parse and no conversion to clock
// ticks (nanoseconds: 6e7 us is 6e10 ns) can overflow.
std::optional<std::chrono::microseconds> wait_setting(const char* name, std::string* error) {
  const char* value = std::getenv(name);
  if (!value) return std::nullopt;
  const char* p = value;
  while (*p == ' ' || *p == '\t') ++p;
  int64_t micros = 0;
  const char* digits = p;
  for (; *p >= '0' && *p <= '9'; ++p) micros = std::min(micros * 10 + (*p - '0'), kMaxWaitMicros + 1);
  const bool some = p != digits;
  while (*p == ' ' || *p == '\t' || *p == '\n') ++p;
  if (!some || *p != '\0' || micros > kMaxWaitMicros)
    *error = std::string(name) + "='" + value + "' must be a whole number of microseconds in [0, " +
             std::to_string(kMaxWaitMicros) + "]";
  return std::chrono::microseconds(std::min(micros, kMaxWaitMicros));
}

// The items of a parallel_for, split into one contiguous range per thread. A thread runs
// its own range front to back, then takes items from the back of the others' ranges, so
// neighbouring items (which share input rows, weight panels and prefetch streams) mostly
// run on one core, and a thread that joins late or runs slow is still relieved. Each task
// has two copies (team, XLA's pool): once every range has its thread, a later copy returns
// at once, so a loop never runs on more threads than it was split for. As an extra thief
// it put three threads on two cores whenever our worker was already awake (polling after
// a convolution) and XLA's thread woke later: in-process A/B, isolated 56x56 256->64 1x1
// backward-data with the convolution linger 0.81x without this, 1.02x with it (2026-12-05; docs/design.md, Threads).
struct SharedWork {
  SharedWork(int64_t n, int64_t slots, const std::function<void(int64_t)>& body)
      : body(body), ranges(slots) {
    for (int64_t s = 0; s < slots; ++s) ranges[s].set(n * s / slots, n * (s + 1) / slots);
  }
  // Only dereferenced while items remain, i.e. before parallel_for returns.
  const std::function<void(int64_t)>& body;
  // Unclaimed items [front, back) of one range, packed in one word so that the owner
  // (claiming at the front) and a thief (at the back) agree on the last item.
  struct alignas(64) Range {
    std::atomic<uint64_t> bounds;
    void set(int64_t front, int64_t back) { bounds.store(uint64_t(front) | uint64_t(back) << 32); }
    bool claim(bool from_front, int64_t* item) {
      uint64_t b = bounds.load(std::memory_order_relaxed);
      for (;;) {
        const int64_t front = b & 0xffffffffu, back = b >> 32;
        if (front >= back) return false;
        const uint64_t next = from_front ? b + 1 : b - (uint64_t{1} << 32);
        if (bounds.compare_exchange_weak(b, next, std::memory_order_relaxed)) {
          *item = from_front ? front : back - 1;
          return true;
        }
      }
    }
  };
  std::vector<Range> ranges;
  std::atomic<int64_t> joined{0};
  std::atomic<int64_t> finished{0};

  void work() {
    const int64_t slots = ranges.size(), slot = joined.fetch_add(1, std::memory_order_relaxed);
    if (slot >= slots) return;  // a later copy: every range has its thread
    int64_t mine = 0;
    for (int64_t k = 0, i; k < slots; ++k) {
      Range& range = ranges[(slot + k) % slots];
      while (range.claim(/*from_front=*/k == 0, &i)) body(i), ++mine;
    }
    if (mine > 0) finished.fetch_add(mine, std::memory_order_acq_rel);
  }
};

// The claim counters of parallel_lanes, shared with late tasks (which find nothing left).
struct SharedLanes {
  explicit SharedLanes(const std::vector<Lane>& lanes)
      : lanes(lanes), next_item(lanes.size()), prepared(lanes.size()) {
    for (const Lane& l : lanes) items.push_back(l.items), units += l.items + 1;  // + 1: prepare
  }
  // Only dereferenced for a lane or item just claimed, i.e. before the call returns.
  const std::vector<Lane>& lanes;
  std::vector<int64_t> items;
  int64_t units = 0;
  std::atomic<size_t> next_lane{0};
  std::vector<std::atomic<int64_t>> next_item;
  std::vector<std::atomic<bool>> prepared;
  std::atomic<int64_t> finished{0};

  int64_t drain(size_t l) {
    int64_t mine = 0;
    for (int64_t i; (i = next_item[l].fetch_add(1, std::memory_order_relaxed)) < items[l]; ++mine)
      lanes[l].item(i);
    return mine;
  }

  void work() {
    int64_t mine = 0;
    for (size_t l; (l = next_lane.fetch_add(1, std::memory_order_relaxed)) < items.size();) {
      if (lanes[l].prepare) lanes[l].prepare();
      prepared[l].store(true, std::memory_order_release);
      mine += 1 + drain(l);
    }
    // Every lane is taken: help with the others' items once they are prepared.
    for (size_t l = 0; l < items.size(); ++l) {
      if (next_item[l].load(std::memory_order_relaxed) >= items[l]) continue;
      while (!prepared[l].load(std::memory_order_acquire)) std::this_thread::yield();
      mine += drain(l);
    }
    if (mine > 0) finished.fetch_add(mine, std::memory_order_acq_rel);
  }
};

// Hands `work` (SharedWork or SharedLanes: counters that late tasks find exhausted, kept
// alive by the shared_ptr) to `workers` tasks, works on it from the calling thread too, and
// returns once `units` of it have finished. What is left by then is at most one unit per
// worker, already running: poll rather than park (a parked caller waits as long to be
// woken as the workers do).
template <class Work>
void share(const Executor& executor, int64_t workers, const std::shared_ptr<Work>& work, int64_t units) {
  for (int64_t w = 0; w < workers; ++w) executor.schedule([work] { work->work(); });
  work->work();
  while (work->finished.load(std::memory_order_acquire) != units) std::this_thread::yield();
}

// Tasks in a queue that workers poll, then park on. Process-wide and never destroyed
// (its threads are detached: a static destructor would race them at exit).
class Team {
 public:
  static Team& instance() {
    static Team* team = new Team;
    return *team;
  }

  // A call opens: at least `workers` threads running (they are only ever added), and
  // idle ones poll until the last open call closes.
  void open_call(int64_t workers) {
    open_calls_.fetch_add(1, std::memory_order_acq_rel);
    std::lock_guard<std::mutex> lock(mutex_);
    while (started_ < workers) {
      std::thread([this] { serve(); }).detach();
      ++started_;
    }
  }
  // A call closes; idle workers keep polling for `linger` more (JAX_BRGEMM_LINGER_US, where
  // set, instead), unless another call already keeps them longer.
  void close_call(std::chrono::microseconds linger) {
    const Clock::rep until = (Clock::now() + linger_.value_or(linger)).time_since_epoch().count();
    Clock::rep current = linger_until_.load(std::memory_order_relaxed);
    while (current < until && !linger_until_.compare_exchange_weak(current, until, std::memory_order_relaxed)) {}
    open_calls_.fetch_sub(1, std::memory_order_acq_rel);
  }

  void schedule(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      tasks_.push_back(std::move(task));
      queued_.fetch_add(1, std::memory_order_release);
    }
    if (parked_.load(std::memory_order_acquire) > 0) wake_.notify_one();
  }

 private:
  using Clock = std::chrono::steady_clock;

  // Settings in microseconds, empty where unset. A bad one (jax_brgemm/_ext.py refuses it
  // at import, through wait_env_error) still gives a safe value here: see wait_setting.
  static std::optional<std::chrono::microseconds> micros_from_env(const char* name) {
    std::string error;
    return wait_setting(name, &error);
  }

  Team()
      : spin_(micros_from_env("JAX_BRGEMM_SPIN_US").value_or(std::chrono::microseconds(300))),
        linger_(micros_from_env("JAX_BRGEMM_LINGER_US")) {}

  // A call is open, or the last one closed less than its linger ago.
  bool busy() const {
    return open_calls_.load(std::memory_order_acquire) > 0 ||
           Clock::now().time_since_epoch().count() < linger_until_.load(std::memory_order_relaxed);
  }

  void serve() {
    for (;;) {
      std::function<void()> task = next();
      task();
    }
  }

  std::function<void()> next() {
    const auto polled_since = Clock::now();
    for (;;) {
      if (queued_.load(std::memory_order_acquire) > 0) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!tasks_.empty()) return pop();
      } else if (busy() && Clock::now() - polled_since < spin_) {
        std::this_thread::yield();
      } else {
        std::unique_lock<std::mutex> lock(mutex_);
        parked_.fetch_add(1, std::memory_order_acq_rel);
        wake_.wait(lock, [&] { return !tasks_.empty(); });
        parked_.fetch_sub(1, std::memory_order_acq_rel);
        return pop();
      }
    }
  }

  std::function<void()> pop() {  // mutex_ held, tasks_ not empty
    std::function<void()> task = std::move(tasks_.front());
    tasks_.pop_front();
    queued_.fetch_sub(1, std::memory_order_release);
    return task;
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> tasks_;
  std::atomic<int64_t> queued_{0};
  std::atomic<int64_t> parked_{0};
  std::atomic<int64_t> open_calls_{0};
  std::atomic<Clock::rep> linger_until_{0};  // idle workers poll until then (Clock ticks)
  int64_t started_ = 0;
  std::chrono::microseconds spin_;
  std::optional<std::chrono::microseconds> linger_;
};

}  // namespace

std::string wait_env_error() {
  std::string error;
  for (const char* name : {"JAX_BRGEMM_SPIN_US", "JAX_BRGEMM_LINGER_US"})
    if (wait_setting(name, &error); !error.empty()) break;
  return error;
}

TeamCall::TeamCall(int64_t threads, Runner also_run, std::chrono::microseconds linger)
    : workers_(std::max<int64_t>(threads - 1, 0)), also_run_(std::move(also_run)), linger_(linger) {
  Team::instance().open_call(workers_);
}

TeamCall::~TeamCall() { Team::instance().close_call(linger_); }

void TeamCall::schedule(std::function<void()> task) const {
  if (also_run_) also_run_(task);
  Team::instance().schedule(std::move(task));
}

void parallel_for(const Executor* executor, int64_t n, const std::function<void(int64_t)>& body) {
  if (n <= 0) return;
  const int64_t workers = executor ? std::min(executor->num_workers(), n - 1) : 0;
  if (workers <= 0) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  // Ranges hold 32-bit bounds: loops of more items run in parts.
  constexpr int64_t kMaxItems = int64_t{1} << 31;
  if (n > kMaxItems) {
    for (int64_t start = 0; start < n; start += kMaxItems)
      parallel_for(executor, std::min(kMaxItems, n - start), [&](int64_t i) { body(start + i); });
    return;
  }
  share(*executor, workers, std::make_shared<SharedWork>(n, workers + 1, body), n);
}

void parallel_lanes(const Executor* executor, const std::vector<Lane>& lanes) {
  int64_t parts = 0;
  for (const Lane& l : lanes) parts += std::max<int64_t>(l.items, 1);
  const int64_t workers = executor ? std::min(executor->num_workers(), parts - 1) : 0;
  if (workers <= 0) {
    for (const Lane& l : lanes) {
      if (l.prepare) l.prepare();
      for (int64_t i = 0; i < l.items; ++i) l.item(i);
    }
    return;
  }
  auto work = std::make_shared<SharedLanes>(lanes);
  share(*executor, workers, work, work->units);
}

}  // namespace jbr::prim
