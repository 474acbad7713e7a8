// One vector type per ISA with the same small interface, so the micro-kernel and the
// activation math are written once (kernel_impl.h) and compiled per ISA. Each ISA's
// translation unit defines JBR_VEC_* and JBR_ISA_NS before including this file and sees
// only its own type.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "brgemm.h"

#if defined(JBR_VEC_AVX512) || defined(JBR_VEC_AVX2)
#include <immintrin.h>
#endif

namespace jbr {
namespace JBR_ISA_NS {  // distinct per translation unit: no ODR clash between ISAs


// Coefficients of exp(r) on |r| <= ln2/2 (Cephes expf), shared by the SIMD types.
struct ExpConstants {
  static constexpr float hi = 88.3762626647949f, lo = -87.3365447504f;
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr float c0 = 1.9875691500e-4f, c1 = 1.3981999507e-3f,
                         c2 = 8.3334519073e-3f, c3 = 4.1665795894e-2f,
                         c4 = 1.6666665459e-1f, c5 = 5.0000001201e-1f;
};

#if defined(JBR_VEC_SCALAR)
// Portable path: one float, std:: math.
struct Vec {
  float v;
  using Mask = bool;
  static constexpr int width = 1;
  static Mask tail_mask(int) { return true; }
  static Vec zero() { return {0.0f}; }
  static Vec set1(float x) { return {x}; }
  static Vec load(const float* p) { return {*p}; }
  static Vec load(const float* p, Mask) { return {*p}; }
  void store(float* p) const { *p = v; }
  void stream(float* p) const { *p = v; }  // (no non-temporal store: a plain one)
  void store(float* p, Mask) const { *p = v; }
  static Vec load_bf16(const uint16_t* p) { return {bf16_to_f32(*p)}; }
  static Vec load_bf16(const uint16_t* p, Mask) { return {bf16_to_f32(*p)}; }
  void store_bf16(uint16_t* p) const { *p = round_to_bf16(v); }
  void stream_bf16(uint16_t* p) const { store_bf16(p); }
  void store_bf16(uint16_t* p, Mask) const { *p = round_to_bf16(v); }
  void store_bf16_fast(uint16_t* p) const { store_bf16(p); }
  void store_bf16_fast(uint16_t* p, Mask m) const { store_bf16(p, m); }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {a.v * b.v + c.v}; }
  friend Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
  friend Vec operator-(Vec a, Vec b) { return {a.v - b.v}; }
  friend Vec operator*(Vec a, Vec b) { return {a.v * b.v}; }
  friend Vec operator/(Vec a, Vec b) { return {a.v / b.v}; }
  // max(0, x) that keeps NaN, as XLA's relu does.
  friend Vec relu(Vec x) { return {std::isnan(x.v) ? x.v : (x.v > 0.0f ? x.v : 0.0f)}; }
  friend Vec abs(Vec x) { return {std::fabs(x.v)}; }
  friend Mask less(Vec a, Vec b) { return a.v < b.v; }
  friend Vec select(Mask m, Vec a, Vec b) { return m ? a : b; }
  friend Vec copysign(Vec mag, Vec sign) { return {std::copysign(mag.v, sign.v)}; }
  friend Vec exp(Vec x) { return {std::exp(x.v)}; }
  friend Vec vmax(Vec a, Vec b) { return {a.v > b.v ? a.v : b.v}; }
  // max(a, b), NaN where either is (XLA's max).
  friend Vec max_nan(Vec a, Vec b) { return {std::isnan(a.v) ? a.v : (std::isnan(b.v) || b.v > a.v ? b.v : a.v)}; }
  // Ordered comparisons: false where either is NaN.
  friend Mask greater_equal(Vec a, Vec b) { return a.v >= b.v; }
  friend Mask equal(Vec a, Vec b) { return a.v == b.v; }
  friend float lanes_sum(Vec x) { return x.v; }
  friend float lanes_max(Vec x) { return x.v; }
};
inline void store_fence() {}
#elif defined(JBR_VEC_AVX512)
struct Vec {
  __m512 v;
  using Mask = __mmask16;
  static constexpr int width = 16;
  static Mask tail_mask(int lanes) { return static_cast<Mask>((1u << lanes) - 1u); }
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const float* p, Mask m) { return {_mm512_maskz_loadu_ps(m, p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void stream(float* p) const { _mm512_stream_ps(p, v); }  // p 64-byte aligned
  void store(float* p, Mask m) const { _mm512_mask_storeu_ps(p, m, v); }
  static Vec from_bf16(__m256i h) {
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  static Vec load_bf16(const uint16_t* p) { return from_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static Vec load_bf16(const uint16_t* p, Mask m) { return from_bf16(_mm256_maskz_loadu_epi16(m, p)); }
  __m256i to_bf16() const {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
  }
  void store_bf16(uint16_t* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16()); }
  void stream_bf16(uint16_t* p) const {  // p 32-byte aligned
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16());
  }
  void store_bf16(uint16_t* p, Mask m) const { _mm256_mask_storeu_epi16(p, m, to_bf16()); }
  // As store_bf16 where the ISA has AVX512-BF16's one-instruction conversion (nearest even,
  // NaN quiet, but subnormals flushed to zero): the row operations' bfloat16 copies of
  // probabilities, where that 8-instruction sequence was a third of the exponentials' cost.
#if defined(__AVX512BF16__)
  __m256i to_bf16_fast() const { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)); }
#else
  __m256i to_bf16_fast() const { return to_bf16(); }
#endif
  void store_bf16_fast(uint16_t* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_fast()); }
  void store_bf16_fast(uint16_t* p, Mask m) const { _mm256_mask_storeu_epi16(p, m, to_bf16_fast()); }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
  // MAXPS returns its second operand when either is NaN: x second keeps NaN.
  friend Vec relu(Vec x) { return {_mm512_max_ps(_mm512_setzero_ps(), x.v)}; }
  friend Vec vmax(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  // max(a, b), NaN where either is (XLA's max): MAXPS gives b where either is NaN, so
  // only a NaN a needs patching.
  friend Vec max_nan(Vec a, Vec b) {
    return {_mm512_mask_mov_ps(_mm512_max_ps(a.v, b.v), _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q), a.v)};
  }
  // Ordered comparisons: false where either is NaN.
  friend Mask greater_equal(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ); }
  friend Mask equal(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ); }
  // Across the lanes as a tree (4 dependent steps, not 15): a row operation's per-row tail.
  friend float lanes_sum(Vec x) { return _mm512_reduce_add_ps(x.v); }
  friend float lanes_max(Vec x) { return _mm512_reduce_max_ps(x.v); }
  friend Vec abs(Vec x) { return {_mm512_abs_ps(x.v)}; }
  friend Mask less(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
  friend Vec select(Mask m, Vec a, Vec b) { return {_mm512_mask_blend_ps(m, b.v, a.v)}; }
  friend Vec copysign(Vec mag, Vec sign) {
    const __m512i sign_bit = _mm512_set1_epi32(INT32_MIN);
    // bit = (sign & sign_bit) | (mag & ~sign_bit)
    return {_mm512_castsi512_ps(_mm512_ternarylogic_epi32(
        sign_bit, _mm512_castps_si512(sign.v), _mm512_castps_si512(mag.v), 0xCA))};
  }
  friend Vec exp(Vec x) {
    using K = ExpConstants;
    // Clamp with x as the second operand so NaN passes through; scalef turns
    // out-of-range exponents into inf or 0 exactly.
    __m512 t = _mm512_min_ps(_mm512_set1_ps(104.0f), x.v);
    t = _mm512_max_ps(_mm512_set1_ps(-104.0f), t);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(K::log2e)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(K::ln2_hi), t);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(K::ln2_lo), r);
    __m512 p = _mm512_set1_ps(K::c0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::c1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::c2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::c3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::c4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::c5));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return {_mm512_scalef_ps(p, n)};
  }
};
inline void store_fence() { _mm_sfence(); }  // orders the stream() stores before later ones
#elif defined(JBR_VEC_AVX2)
struct Vec {
  __m256 v;
  using Mask = __m256;  // all-ones lanes
  static constexpr int width = 8;
  static Mask tail_mask(int lanes) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), lane));
  }
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const float* p, Mask m) {
    return {_mm256_maskload_ps(p, _mm256_castps_si256(m))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void stream(float* p) const { _mm256_stream_ps(p, v); }  // p 32-byte aligned
  void store(float* p, Mask m) const { _mm256_maskstore_ps(p, _mm256_castps_si256(m), v); }
  static int lanes(Mask m) { return __builtin_popcount(_mm256_movemask_ps(m)); }
  static Vec from_bf16(__m128i h) {
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
  }
  static Vec load_bf16(const uint16_t* p) { return from_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static Vec load_bf16(const uint16_t* p, Mask m) {  // no 16-bit masked load in AVX2
    uint16_t tail[8] = {};
    std::memcpy(tail, p, sizeof(uint16_t) * lanes(m));
    return load_bf16(tail);
  }
  __m128i to_bf16() const {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    rounded = _mm256_castps_si256(_mm256_blendv_ps(
        _mm256_castsi256_ps(rounded),
        _mm256_castsi256_ps(_mm256_or_si256(bits, _mm256_set1_epi32(0x400000))), nan));
    const __m256i high = _mm256_srli_epi32(rounded, 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
  }
  void store_bf16(uint16_t* p) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16()); }
  void stream_bf16(uint16_t* p) const {  // p 16-byte aligned
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16());
  }
  void store_bf16(uint16_t* p, Mask m) const {
    uint16_t tail[8];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tail), to_bf16());
    std::memcpy(p, tail, sizeof(uint16_t) * lanes(m));
  }
  void store_bf16_fast(uint16_t* p) const { store_bf16(p); }
  void store_bf16_fast(uint16_t* p, Mask m) const { store_bf16(p, m); }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  friend Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
  friend Vec relu(Vec x) { return {_mm256_max_ps(_mm256_setzero_ps(), x.v)}; }
  friend Vec vmax(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  // max(a, b), NaN where either is (XLA's max); MAXPS gives b where either is NaN.
  friend Vec max_nan(Vec a, Vec b) {
    return {_mm256_blendv_ps(_mm256_max_ps(a.v, b.v), a.v, _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q))};
  }
  // Ordered comparisons: false where either is NaN.
  friend Mask greater_equal(Vec a, Vec b) { return _mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ); }
  friend Mask equal(Vec a, Vec b) { return _mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ); }
  friend float lanes_sum(Vec x) {  // a tree: halves, then pairs
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(x.v), _mm256_extractf128_ps(x.v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
  friend float lanes_max(Vec x) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(x.v), _mm256_extractf128_ps(x.v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  }
  friend Vec abs(Vec x) {
    return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x.v)};
  }
  friend Mask less(Vec a, Vec b) { return _mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ); }
  friend Vec select(Mask m, Vec a, Vec b) { return {_mm256_blendv_ps(b.v, a.v, m)}; }
  friend Vec copysign(Vec mag, Vec sign) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    return {_mm256_or_ps(_mm256_and_ps(sign_bit, sign.v), _mm256_andnot_ps(sign_bit, mag.v))};
  }
  friend Vec exp(Vec x) {
    using K = ExpConstants;
    __m256 t = _mm256_min_ps(_mm256_set1_ps(K::hi), x.v);
    t = _mm256_max_ps(_mm256_set1_ps(K::lo), t);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(K::log2e)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(K::ln2_hi), t);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(K::ln2_lo), r);
    __m256 p = _mm256_set1_ps(K::c0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(K::c1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(K::c2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(K::c3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(K::c4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(K::c5));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // 2^n via the exponent field; the clamp keeps n in [-126, 127].
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    // Values beyond the clamp: exact inf / 0 as the other paths give.
    __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    result = _mm256_blendv_ps(result, _mm256_set1_ps(INFINITY),
                              _mm256_cmp_ps(x.v, _mm256_set1_ps(K::hi), _CMP_GT_OQ));
    return {_mm256_blendv_ps(result, _mm256_setzero_ps(),
                             _mm256_cmp_ps(x.v, _mm256_set1_ps(K::lo), _CMP_LT_OQ))};
  }
};
inline void store_fence() { _mm_sfence(); }  // orders the stream() stores before later ones
#else
#error "define one of JBR_VEC_SCALAR, JBR_VEC_AVX2, JBR_VEC_AVX512 before including vec.h"
#endif

}  // namespace JBR_ISA_NS
}  // namespace jbr
