#include "primitives/scratch.h"

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace jbr::prim {

void advise_huge_pages(void* data, size_t bytes) {
#if defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)data, (void)bytes;
#endif
}

namespace detail {
namespace {

// Free blocks kept for reuse, at most kPoolBytes in all (the oldest go first beyond that).
constexpr size_t kPoolBytes = size_t{256} << 20;
constexpr size_t kGranule = size_t{64} << 10;  // capacities are multiples of this

struct Pool {
  std::mutex mutex;
  std::vector<Block> free;  // oldest first
  size_t bytes = 0;
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: buffers may be released during exit
  return *p;
}

}  // namespace

Block acquire(size_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    // The smallest free block that fits, unless it is more than twice the size asked for
    // (that one is kept for a larger request).
    auto best = p.free.end();
    for (auto it = p.free.begin(); it != p.free.end(); ++it)
      if (it->capacity >= bytes && it->capacity <= 2 * bytes + kGranule &&
          (best == p.free.end() || it->capacity < best->capacity))
        best = it;
    if (best != p.free.end()) {
      const Block block = *best;
      p.free.erase(best);
      p.bytes -= block.capacity;
      return block;
    }
  }
  const size_t capacity = (bytes + kGranule - 1) / kGranule * kGranule;
  void* data = std::aligned_alloc(64, capacity);
  if (data == nullptr) throw std::bad_alloc();
  advise_huge_pages(data, capacity);
  return {data, capacity};
}

void release(Block block) {
  if (block.data == nullptr) return;
  std::vector<void*> dropped;
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    p.free.push_back(block);
    p.bytes += block.capacity;
    while (p.bytes > kPoolBytes) {
      dropped.push_back(p.free.front().data);
      p.bytes -= p.free.front().capacity;
      p.free.erase(p.free.begin());
    }
  }
  for (void* data : dropped) std::free(data);
}

}  // namespace detail
}  // namespace jbr::prim
