// Elements of the primitives' operands: float (float32) or uint16_t (bfloat16 bit
// patterns). The loop nests that move them are templates on that type, instantiated
// through with_type; conversions are the kernel layer's scalar ones (inline, so loops over
// rows vectorise).
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "brgemm/brgemm.h"

namespace jbr::prim {

inline int64_t size_of(DType d) { return d == DType::bf16 ? 2 : 4; }

template <typename T>
constexpr DType dtype_of() { return std::is_same_v<T, float> ? DType::f32 : DType::bf16; }

// f(T{}) with T the element type of `d`.
template <typename F>
auto with_type(DType d, F f) {
  return d == DType::bf16 ? f(uint16_t{}) : f(float{});
}

// Rows `ld` elements apart lie a multiple of 4 KB apart: each on its own page, all in the
// same L1 (and few L2) sets.
template <typename T>
bool rows_page_apart(int64_t ld) { return (ld * int64_t{sizeof(T)}) % 4096 == 0; }

inline float to_float(float v) { return v; }
inline float to_float(uint16_t h) { return bf16_to_f32(h); }
inline void store(float v, float* dst) { *dst = v; }
inline void store(float v, uint16_t* dst) { *dst = round_to_bf16(v); }

// Results at least this large are written once with non-temporal stores (Desc::stream_c)
// where one kernel call finishes each block. Dense: 8 MB (Zen 4 and the Xeon, 2026-12-05,
// alike: 16-64 MB results 2-8 % faster streamed there, 2 threads). Convolutions: only
// results that would not stay in the last-level cache, a quarter of it and at least 8 MB.
// On Zen 4 (32 MB L3), 2 cores, float32 convolution outputs of 25 MB were 25-30 % faster
// streamed, of 12.8 MB 6-20 %, of 6.4 MB no change; on the Xeon (480 MB L3) streaming
// 8-26 MB convolution outputs was 8-35 % slower (its lines come back from DRAM for the
// next read; the short reductions write them fast). set_stream_bytes overrides both
// (tests force the streaming path with it; 0: these defaults).
inline std::atomic<int64_t>& forced_stream_bytes() {
  static std::atomic<int64_t> bytes{0};
  return bytes;
}
inline void set_stream_bytes(int64_t bytes) { forced_stream_bytes().store(bytes, std::memory_order_relaxed); }
inline int64_t dense_stream_bytes() {
  const int64_t forced = forced_stream_bytes().load(std::memory_order_relaxed);
  return forced > 0 ? forced : int64_t{8} << 20;
}
inline int64_t conv_stream_bytes() {
  static const int64_t beyond_cache = [] {
    long l3 = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);  // 0 or -1 where unknown
#endif
    return std::max<int64_t>(int64_t{8} << 20, l3 > 0 ? l3 / 4 : 0);
  }();
  const int64_t forced = forced_stream_bytes().load(std::memory_order_relaxed);
  return forced > 0 ? forced : beyond_cache;
}

}  // namespace jbr::prim
