// AVX-512 path (compiled with -mavx512f -mavx512dq ...): 32 zmm registers, so up to 28
// accumulators plus the B vectors (the A value is a broadcast operand of the FMA).
#define JBR_VEC_AVX512
#define JBR_ISA_NS avx512
#define JBR_MAX_VECTORS 4
#define JBR_MAX_ROWS {0, 16, 14, 9, 7}
#define JBR_MAX_ROWS_BF16 {0, 16, 13, 8, 6}
#include "kernel_impl.h"

#include <algorithm>

namespace jbr::avx512 {

// Transposes 16 rows of 16 32-bit lanes in registers: on return r[j] holds what was
// column j. Three rounds of interleaves (32-bit, 64-bit, 128-bit lanes).
inline void transpose_16x16_regs(__m512 r[16]) {
  __m512 t[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  // u[4k + c]: lane L holds column 4L + c of rows 4k..4k+3.
  for (int k = 0; k < 4; ++k) {
    const __m512d a = _mm512_castps_pd(t[4 * k]), b = _mm512_castps_pd(t[4 * k + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * k + 1]), d = _mm512_castps_pd(t[4 * k + 3]);
    r[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
    const __m512 w0 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
    const __m512 w1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_f32x4(v0, w0, 0x88);       // column c
    t[4 + c] = _mm512_shuffle_f32x4(v0, w0, 0xDD);   // column 4 + c
    t[8 + c] = _mm512_shuffle_f32x4(v1, w1, 0x88);   // column 8 + c
    t[12 + c] = _mm512_shuffle_f32x4(v1, w1, 0xDD);  // column 12 + c
  }
  for (int j = 0; j < 16; ++j) r[j] = t[j];
}

// One 16 x 16 block: rows [0, h) and columns [0, w) of src land as rows [0, w) and columns
// [0, h) of dst. 16-bit elements ride zero-extended in 32-bit lanes.
inline void transpose_16x16(const float* src, int64_t lds, int h, int w, float* dst, int64_t ldd) {
  const __mmask16 col_mask = static_cast<__mmask16>((1u << w) - 1u);
  const __mmask16 row_mask = static_cast<__mmask16>((1u << h) - 1u);
  __m512 r[16];
  for (int i = 0; i < 16; ++i)
    r[i] = i < h ? _mm512_maskz_loadu_ps(col_mask, src + i * lds) : _mm512_setzero_ps();
  transpose_16x16_regs(r);
  for (int j = 0; j < w; ++j) _mm512_mask_storeu_ps(dst + j * ldd, row_mask, r[j]);
}

inline void transpose_16x16(const uint16_t* src, int64_t lds, int h, int w, uint16_t* dst,
                            int64_t ldd) {
  const __mmask16 col_mask = static_cast<__mmask16>((1u << w) - 1u);
  const __mmask16 row_mask = static_cast<__mmask16>((1u << h) - 1u);
  __m512 r[16];
  for (int i = 0; i < 16; ++i) {
    const __m256i row = i < h ? _mm256_maskz_loadu_epi16(col_mask, src + i * lds)
                              : _mm256_setzero_si256();
    r[i] = _mm512_castsi512_ps(_mm512_cvtepu16_epi32(row));
  }
  transpose_16x16_regs(r);
  for (int j = 0; j < w; ++j)
    _mm512_mask_cvtepi32_storeu_epi16(dst + j * ldd, row_mask, _mm512_castps_si512(r[j]));
}

template <class T>
void transpose(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
  for (int64_t i0 = 0; i0 < rows; i0 += 16)
    for (int64_t j0 = 0; j0 < cols; j0 += 16)
      transpose_16x16(src + i0 * lds + j0, lds, static_cast<int>(std::min<int64_t>(16, rows - i0)),
                      static_cast<int>(std::min<int64_t>(16, cols - j0)), dst + j0 * ldd + i0, ldd);
}

// src (k x n, lds) into the pair layout (brgemm.h: pack_b_vnni), tiles ld apart.
void pack_vnni(const uint16_t* src, int64_t lds, int64_t k, int64_t n, uint16_t* dst, int64_t ld) {
  // Interleaving 16-bit lanes works inside 128-bit lanes; the permutes put the four
  // 4-pair pieces of each half back in column order.
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  constexpr int kTileCols = 16;  // columns of a tile of the pair layout
  const int64_t tiles = (n + kTileCols - 1) / kTileCols;
  for (int64_t q = 0; q < vnni_rows(k) / 2; ++q) {
    const uint16_t* row0 = 2 * q < k ? src + 2 * q * lds : nullptr;
    const uint16_t* row1 = 2 * q + 1 < k ? src + (2 * q + 1) * lds : nullptr;
    for (int64_t t = 0; t < tiles; t += 2) {  // two tiles (32 columns) per pair of loads
      const int64_t j = t * kTileCols, valid = std::clamp<int64_t>(n - j, 0, 32);
      const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << valid) - 1);
      const __m512i r0 = row0 ? _mm512_maskz_loadu_epi16(mask, row0 + j) : _mm512_setzero_si512();
      const __m512i r1 = row1 ? _mm512_maskz_loadu_epi16(mask, row1 + j) : _mm512_setzero_si512();
      const __m512i lo = _mm512_unpacklo_epi16(r0, r1), hi = _mm512_unpackhi_epi16(r0, r1);
      _mm512_storeu_si512(dst + t * ld + q * 2 * kTileCols, _mm512_permutex2var_epi64(lo, first, hi));
      if (t + 1 < tiles)
        _mm512_storeu_si512(dst + (t + 1) * ld + q * 2 * kTileCols, _mm512_permutex2var_epi64(lo, second, hi));
    }
  }
}

}  // namespace jbr::avx512

namespace jbr::detail {
void pack_vnni_avx512(const uint16_t* src, int64_t lds, int64_t k, int64_t n, uint16_t* dst, int64_t ld) {
  avx512::pack_vnni(src, lds, k, n, dst, ld);
}

namespace {
IsaImpl make_avx512_impl() {
  IsaImpl impl = avx512::make_impl();
  impl.transpose_f32 = &avx512::transpose<float>;
  impl.transpose_bf16 = &avx512::transpose<uint16_t>;
  return impl;
}
}  // namespace
const IsaImpl impl_avx512 = make_avx512_impl();
}  // namespace jbr::detail
