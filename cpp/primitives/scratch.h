// Work buffers of the loop nests (packed panels, transposes, partial sums), reused across
// calls. Allocating them per call and freeing them hands large blocks back to the OS, and
// first-touching them again one 4 KB page at a time cost a 4x1024 MLP training step 8400
// page faults (~10 ms of system time) against XLA's 3400. Buffers are uninitialised.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace jbr::prim {

// Asks the OS for transparent huge pages on the whole 2 MB pages inside [data, data +
// bytes): 1 fault instead of 512 when they are first touched. A hint only.
void advise_huge_pages(void* data, size_t bytes);

namespace detail {
struct Block {
  void* data;
  size_t capacity;
};
Block acquire(size_t bytes);
void release(Block block);
struct ReturnToPool {
  size_t capacity = 0;
  template <class T>
  void operator()(T* data) const { release({data, capacity}); }
};
}  // namespace detail

template <class T>
using Buffer = std::unique_ptr<T[], detail::ReturnToPool>;

// A buffer of `count` elements (at least one) from the process-wide pool, 64-byte aligned.
template <class T>
Buffer<T> work_buffer(int64_t count) {
  const size_t bytes = sizeof(T) * static_cast<size_t>(count > 0 ? count : 1);
  const detail::Block block = detail::acquire(bytes);
  return Buffer<T>(static_cast<T*>(block.data), detail::ReturnToPool{block.capacity});
}

}  // namespace jbr::prim
