// What the C++ timing scripts (dense_timing.cc, conv_timing.cc) share: buffers aligned as
// XLA's are, and the best and median time of a call over rounds.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <vector>

namespace timing {

// 64-byte aligned storage, as XLA's buffers are (std::vector's 16-byte alignment made the
// kernel split its row loads across cache lines and silently turned off its streaming
// stores, which need aligned rows).
template <class T>
struct Aligned {
  using value_type = T;
  Aligned() = default;
  template <class U>
  Aligned(const Aligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64)); }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const Aligned&) const { return true; }
  bool operator!=(const Aligned&) const { return false; }
};
using Floats = std::vector<float, Aligned<float>>;

inline double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Times {
  double best, median;  // seconds per call
};

// `warmup` calls, then `rounds` rounds of back-to-back calls for `seconds` each.
template <class F>
Times time_calls(F run, int warmup, int rounds, double seconds) {
  for (int i = 0; i < warmup; ++i) run();
  std::vector<double> t;
  for (int r = 0; r < rounds; ++r) {
    const double t0 = now();
    int calls = 0;
    while (now() - t0 < seconds) run(), ++calls;
    t.push_back((now() - t0) / calls);
  }
  std::sort(t.begin(), t.end());
  return {t[0], t[t.size() / 2]};
}

}  // namespace timing
