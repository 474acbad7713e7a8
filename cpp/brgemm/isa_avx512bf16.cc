// AVX512-BF16 path (compiled with -mavx512bf16 on top of AVX-512): bfloat16 inputs through
// VDPBF16PS, which multiplies pairs of bfloat16 along k and accumulates into float32 lanes.
// The instruction wants B's k-pairs interleaved: lane j of a B operand holds
// (B[p][j], B[p+1][j]). A's pair (A[r][p], A[r][p+1]) is adjacent in memory and is
// broadcast as one 32-bit value.
//
// Two kernel families. B pre-packed in that layout (Desc::b_vnni, what the primitives pass
// for their weights: wants_vnni_b) is read as is, one load per pair-row and 16 columns
// (tile_dot_vnni). Plain B (the brgemm op's stride and offset forms) is interleaved in
// registers with VPUNPCK{L,H}WD, which works inside 128-bit lanes, so the accumulators hold
// columns in a fixed shuffled order that the epilogue undoes once per block (tile_dot).
// Float32 inputs on this ISA use the AVX-512 kernels (dispatch.cc).
#define JBR_VEC_AVX512
#define JBR_ISA_NS avx512bf16
#define JBR_MAX_VECTORS 4
#define JBR_MAX_ROWS {0, 16, 14, 9, 7}
#define JBR_MAX_ROWS_BF16 {0, 13, 6, 0, 0}  // in units of 32-column pair groups
#include "kernel_impl.h"

namespace jbr {
namespace avx512bf16 {

constexpr int kGroupCols = 32;  // columns per interleaved pair group (two accumulators)
constexpr int kVnniCols = 16;   // columns per tile of the pair layout (one accumulator)

inline __m512i load_row(const uint16_t* p, __mmask32 mask, bool masked) {
  return masked ? _mm512_maskz_loadu_epi16(mask, p) : _mm512_loadu_si512(p);
}

inline uint32_t load_pair(const uint16_t* p) {
  uint32_t pair;
  std::memcpy(&pair, p, sizeof pair);
  return pair;
}

// A block at most 16 columns wide: rows p and p+1 are widened into the pair layout in
// natural column order (low half B[p][j], high half B[p+1][j]), so no lanes are wasted and
// the epilogue needs no shuffle.
template <int ROWS>
void tile_dot_narrow(const Tile& t) {
  const Desc& d = *t.desc;
  const int64_t lda = d.lda, ldb = d.ldb, k = d.k;
  const __mmask16 mask = static_cast<__mmask16>((1u << t.tail_lanes) - 1u);
  __m512 acc[ROWS];
#pragma GCC unroll 32
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < t.batch->count; ++i) {
    const uint16_t* a = block_a<uint16_t>(*t.batch, i) + t.row0 * lda;
    const uint16_t* b = block_b<uint16_t>(*t.batch, i) + t.col0;
    for (int64_t p = 0; p < k; p += 2) {
      const bool odd_tail = p + 1 == k;
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, b + p * ldb));
      const __m512i hi = odd_tail ? _mm512_setzero_si512()
                                  : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, b + (p + 1) * ldb));
      const __m512bh bv = reinterpret_cast<__m512bh>(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
#pragma GCC unroll 32
      for (int r = 0; r < ROWS; ++r) {
        const uint32_t pair = odd_tail ? uint32_t{a[r * lda + p]} : load_pair(a + r * lda + p);
        acc[r] = _mm512_dpbf16_ps(acc[r], reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair))), bv);
      }
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < ROWS; ++r) finish(t, Vec{acc[r]}, r, 0, t.tail_lanes < 16, mask);
}

template <int ROWS, int NG, bool MASKED>
void tile_dot(const Tile& t) {
  if constexpr (MASKED && NG == 1) {
    if (t.tail_lanes <= 16) return tile_dot_narrow<ROWS>(t);
  }
  const Desc& d = *t.desc;
  const int64_t lda = d.lda, ldb = d.ldb, k = d.k;
  // t.tail_lanes: valid columns of the last 32-column group.
  const __mmask32 row_mask = static_cast<__mmask32>((uint64_t{1} << t.tail_lanes) - 1);
  __m512 acc[ROWS][2 * NG];
#pragma GCC unroll 32
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < 2 * NG; ++g) acc[r][g] = _mm512_setzero_ps();

  for (int64_t i = 0; i < t.batch->count; ++i) {
    const uint16_t* a = block_a<uint16_t>(*t.batch, i) + t.row0 * lda;
    const uint16_t* b = block_b<uint16_t>(*t.batch, i) + t.col0;
    for (int64_t p = 0; p < k; p += 2) {
      const bool odd_tail = p + 1 == k;  // pair the last row of an odd k with zeros
      __m512i lo[NG], hi[NG];
#pragma GCC unroll 4
      for (int g = 0; g < NG; ++g) {
        const bool partial = MASKED && g == NG - 1;
        const __m512i r0 = load_row(b + p * ldb + g * kGroupCols, row_mask, partial);
        const __m512i r1 = odd_tail ? _mm512_setzero_si512()
                                    : load_row(b + (p + 1) * ldb + g * kGroupCols, row_mask, partial);
        lo[g] = _mm512_unpacklo_epi16(r0, r1);
        hi[g] = _mm512_unpackhi_epi16(r0, r1);
      }
#pragma GCC unroll 32
      for (int r = 0; r < ROWS; ++r) {
        const uint32_t pair = odd_tail ? uint32_t{a[r * lda + p]} : load_pair(a + r * lda + p);
        const __m512bh av = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
#pragma GCC unroll 4
        for (int g = 0; g < NG; ++g) {
          acc[r][2 * g] = _mm512_dpbf16_ps(acc[r][2 * g], av, reinterpret_cast<__m512bh>(lo[g]));
          acc[r][2 * g + 1] = _mm512_dpbf16_ps(acc[r][2 * g + 1], av, reinterpret_cast<__m512bh>(hi[g]));
        }
      }
    }
  }

  // Undo the interleave: lo holds columns {0-3, 8-11, 16-19, 24-27} of the group in its
  // four 128-bit lanes, hi holds {4-7, 12-15, 20-23, 28-31}.
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
#pragma GCC unroll 32
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) {
      const bool partial = MASKED && g == NG - 1;
      const int valid = partial ? t.tail_lanes : kGroupCols;
      const Vec v0{_mm512_permutex2var_ps(acc[r][2 * g], first, acc[r][2 * g + 1])};
      const Vec v1{_mm512_permutex2var_ps(acc[r][2 * g], second, acc[r][2 * g + 1])};
      finish(t, v0, r, g * kGroupCols, valid < 16, Vec::tail_mask(std::min(valid, 16)));
      if (valid > 16)
        finish(t, v1, r, g * kGroupCols + 16, valid < 32, Vec::tail_mask(valid - 16));
    }
}

template <int NG, int... R>
constexpr RowTable make_dot_rows(std::integer_sequence<int, R...>) {
  RowTable t{};
  ((t[R + 1] = {&tile_dot<R + 1, NG, false>, &tile_dot<R + 1, NG, true>}), ...);
  return t;
}

constexpr detail::Blocking kDotBlocking = {kGroupCols, 2, JBR_MAX_ROWS_BF16};

void run_dot(const Kernel& kern, const Batch& batch, void* c, float alpha, const float* bias) {
  static const TileTable table = {
      RowTable{}, make_dot_rows<1>(std::make_integer_sequence<int, kDotBlocking.max_rows[1]>{}),
      make_dot_rows<2>(std::make_integer_sequence<int, kDotBlocking.max_rows[2]>{}), RowTable{},
      RowTable{}};
  run_tiles(kern, batch, c, alpha, bias, table, kGroupCols);
}

// B in the pair layout (Desc::b_vnni, pack_b_vnni): pair-row q of a 16-column tile is one
// zmm of 16 (B[2q][j], B[2q+1][j]) pairs, exactly VDPBF16PS's B operand, so a step of the
// reduction is one load per vector and no shuffles, and the accumulators hold columns in
// order. The layout is zero past k and n: loads need no mask (only the stores do), and an
// odd k's last pair is (B[k-1][j], 0), met by A's last element paired with zero.
template <int ROWS, int NV, bool MASKED>
void tile_dot_vnni(const Tile& t) {
  const Desc& d = *t.desc;
  const int64_t lda = d.lda, ldb = d.ldb, k = d.k;
  // As tile_kernel: small blocks keep a second set of accumulators for odd pair-rows, as
  // one set's chains are too few to cover VDPBF16PS's latency.
  constexpr int kSets = ROWS * NV < 8 ? 2 : 1;
  Vec acc[kSets][ROWS][NV];
#pragma GCC unroll 2
  for (int s = 0; s < kSets; ++s)
#pragma GCC unroll 32
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[s][r][v] = Vec::zero();
  // Pair-row q (at b) times A's pair q (`pair(r)`) into `sum`.
  auto step = [&](Vec (&sum)[ROWS][NV], const uint16_t* b, auto pair) __attribute__((always_inline)) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + v * ldb));
#pragma GCC unroll 32
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh av = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair(r))));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) sum[r][v].v = _mm512_dpbf16_ps(sum[r][v].v, av, bv[v]);
    }
  };
  const int64_t pairs = k / 2;
  for (int64_t i = 0; i < t.batch->count; ++i) {
    const uint16_t* a = block_a<uint16_t>(*t.batch, i) + t.row0 * lda;
    const uint16_t* b = block_b<uint16_t>(*t.batch, i) + t.col0 / kVnniCols * ldb;
    int64_t q = 0;
    auto pair_at = [&](int64_t qq) { return [=](int r) { return load_pair(a + r * lda + 2 * qq); }; };
    if constexpr (kSets == 2) {
#pragma GCC unroll 2
      for (; q + 1 < pairs; q += 2) {
        step(acc[0], b + q * 2 * kVnniCols, pair_at(q));
        step(acc[1], b + (q + 1) * 2 * kVnniCols, pair_at(q + 1));
      }
    }
#pragma GCC unroll 4
    for (; q < pairs; ++q) step(acc[0], b + q * 2 * kVnniCols, pair_at(q));
    if (k % 2 != 0)
      step(acc[0], b + pairs * 2 * kVnniCols, [=](int r) { return uint32_t{a[r * lda + k - 1]}; });
  }
  if constexpr (kSets == 2)
#pragma GCC unroll 32
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[0][r][v] = acc[0][r][v] + acc[1][r][v];
  store_block<ROWS, NV, MASKED>(t, acc[0]);
}

template <int NV, int... R>
constexpr RowTable make_vnni_rows(std::integer_sequence<int, R...>) {
  RowTable t{};
  ((t[R + 1] = {&tile_dot_vnni<R + 1, NV, false>, &tile_dot_vnni<R + 1, NV, true>}), ...);
  return t;
}

// As the float32 kernel: up to 4 vectors of 16 columns, B's vectors and the A broadcast
// beside the accumulators in 32 registers.
constexpr detail::Blocking kVnniBlocking = {kVnniCols, 4, JBR_MAX_ROWS};

void run_dot_vnni(const Kernel& kern, const Batch& batch, void* c, float alpha, const float* bias) {
  static const TileTable table = {
      RowTable{}, make_vnni_rows<1>(std::make_integer_sequence<int, kVnniBlocking.max_rows[1]>{}),
      make_vnni_rows<2>(std::make_integer_sequence<int, kVnniBlocking.max_rows[2]>{}),
      make_vnni_rows<3>(std::make_integer_sequence<int, kVnniBlocking.max_rows[3]>{}),
      make_vnni_rows<4>(std::make_integer_sequence<int, kVnniBlocking.max_rows[4]>{})};
  run_tiles(kern, batch, c, alpha, bias, table, kVnniCols);
}

// Register-resident VDPBF16PS loop: 64 flops per instruction (16 lanes x 2 products).
double dot_peak_gflops(double seconds) {
  constexpr int kChains = 12;
  __m512 acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = _mm512_set1_ps(1.0f);
  const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi16(0x3F80));  // 1.0
  const __m512bh y = reinterpret_cast<__m512bh>(_mm512_set1_epi16(0x3400));  // ~1e-7
  const double rate = rounds_per_second([&] {
#pragma GCC unroll 12
    for (int j = 0; j < kChains; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], x, y);
  }, seconds);
  __m512 total = acc[0];
  for (int j = 1; j < kChains; ++j) total = _mm512_add_ps(total, acc[j]);
  volatile float keep = _mm512_reduce_add_ps(total);
  (void)keep;
  return 64.0 * kChains * rate * 1e-9;
}

}  // namespace avx512bf16

namespace detail {
namespace {
IsaImpl make_dot_impl() {
  // Float32 inputs on this ISA run the AVX-512 kernels (see dispatch.cc).
  IsaImpl impl;
  impl.bf16 = avx512bf16::kDotBlocking;
  impl.run_bf16 = &avx512bf16::run_dot;
  impl.bf16_vnni = avx512bf16::kVnniBlocking;
  impl.run_bf16_vnni = &avx512bf16::run_dot_vnni;
  impl.bf16_peak_gflops = &avx512bf16::dot_peak_gflops;
  impl.activation = &avx512bf16::apply_activation;
  impl.fma_peak_gflops = &avx512bf16::fma_peak_gflops;
  impl.rows = {&avx512bf16::rows_max, &avx512bf16::rows_exp, &avx512bf16::rows_scale,
               &avx512bf16::rows_sub_mul};
  return impl;
}
}  // namespace
const IsaImpl impl_avx512bf16 = make_dot_impl();
}  // namespace detail
}  // namespace jbr
