// The micro-kernel, epilogue and activation math, written once over the Vec interface of
// vec.h and compiled per ISA by isa_*.cc. Each of those defines JBR_VEC_<ISA>, JBR_ISA_NS,
// JBR_MAX_VECTORS, JBR_MAX_ROWS and JBR_MAX_ROWS_BF16 (register-block height limits per
// block width, for float32 and converted bfloat16 inputs) first.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "isa_impl.h"
#include "vec.h"

namespace jbr {
namespace JBR_ISA_NS {

constexpr int W = Vec::width;
constexpr int kMaxVectors = JBR_MAX_VECTORS;

// ---------------------------------------------------------------- activation math
inline Vec sigmoid(Vec x) { return Vec::set1(1.0f) / (Vec::set1(1.0f) + exp(Vec::zero() - x)); }

inline Vec tanh(Vec x) {
  // Odd Taylor series near 0 (where 1 - 2/(e^2x + 1) cancels), the exp form elsewhere.
  const Vec ax = abs(x);
  const Vec x2 = x * x;
  Vec poly = fmadd(x2, Vec::set1(62.0f / 2835.0f), Vec::set1(-17.0f / 315.0f));
  poly = fmadd(poly, x2, Vec::set1(2.0f / 15.0f));
  poly = fmadd(poly, x2, Vec::set1(-1.0f / 3.0f));
  const Vec small = fmadd(poly * x2, x, x);
  const Vec e = exp(Vec::set1(-2.0f) * ax);
  const Vec large = copysign((Vec::set1(1.0f) - e) / (Vec::set1(1.0f) + e), x);
  return select(less(ax, Vec::set1(0.3f)), small, large);
}

inline Vec gelu(Vec x) {
  // Tanh form: 0.5 x (1 + tanh(u)) == x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
  const Vec u2 = Vec::set1(2.0f * 0.7978845608028654f) *
                 fmadd(Vec::set1(0.044715f) * x * x, x, x);
  return x * sigmoid(u2);
}

// One function per entry of activation.h; the switch below expands that list.
inline Vec act_none(Vec x) { return x; }
inline Vec act_relu(Vec x) { return relu(x); }
inline Vec act_gelu(Vec x) { return gelu(x); }
inline Vec act_sigmoid(Vec x) { return sigmoid(x); }
inline Vec act_tanh(Vec x) { return tanh(x); }

inline Vec activate(Vec x, Activation act) {
  switch (act) {
#define JBR_ACTIVATION_CASE(name) \
  case Activation::name: return act_##name(x);
    JBR_ACTIVATIONS(JBR_ACTIVATION_CASE)
#undef JBR_ACTIVATION_CASE
  }
  return x;
}

inline void apply_activation(Activation act, float* data, int64_t size) {
  if (act == Activation::none) return;
  int64_t i = 0;
  for (; i + W <= size; i += W) activate(Vec::load(data + i), act).store(data + i);
  if (i < size) {
    const auto mask = Vec::tail_mask(static_cast<int>(size - i));
    activate(Vec::load(data + i, mask), act).store(data + i, mask);
  }
}

// ---------------------------------------------------------------- row operations
// On row-major float32 blocks (rows x cols, leading dimension ld): what a running
// normalisation of long rows, taken a block of columns at a time, needs (brgemm.h).
// (Across lanes: vec.h's lanes_max and lanes_sum, trees of shuffles. Through memory and a
// scalar loop they were a 16-step chain per row: rows of 64 logits, exp 1.6 -> 0.8 cycles
// an element.)
inline void rows_max(const float* x, int64_t ld, int64_t rows, int64_t cols, float* max) {
  const Vec lowest = Vec::set1(-INFINITY);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * ld;
    Vec m0 = lowest, m1 = lowest;  // two chains: the max's latency is not the limit
    int64_t j = 0;
    for (; j + 2 * W <= cols; j += 2 * W) {
      m0 = vmax(m0, Vec::load(row + j));
      m1 = vmax(m1, Vec::load(row + j + W));
    }
    for (; j + W <= cols; j += W) m0 = vmax(m0, Vec::load(row + j));
    if (j < cols) {
      const auto mask = Vec::tail_mask(static_cast<int>(cols - j));
      m1 = vmax(m1, select(mask, Vec::load(row + j, mask), lowest));
    }
    const float m = lanes_max(vmax(m0, m1));
    if (m > max[r]) max[r] = m;
  }
}

template <bool kCopy>
inline void rows_exp_impl(float* x, int64_t ld, int64_t rows, int64_t cols, float scale,
                          const float* shift, float* sum, uint16_t* out, int64_t ld_out) {
  const Vec sc = Vec::set1(scale);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * ld;
    uint16_t* orow = kCopy ? out + r * ld_out : nullptr;
    const Vec s = Vec::set1(-shift[r]);
    Vec acc = Vec::zero();
    int64_t j = 0;
    for (; j + W <= cols; j += W) {
      const Vec e = exp(fmadd(Vec::load(row + j), sc, s));
      e.store(row + j);
      if constexpr (kCopy) e.store_bf16_fast(orow + j);
      acc = acc + e;
    }
    if (j < cols) {
      const auto mask = Vec::tail_mask(static_cast<int>(cols - j));
      const Vec e = select(mask, exp(fmadd(Vec::load(row + j, mask), sc, s)), Vec::zero());
      e.store(row + j, mask);
      if constexpr (kCopy) e.store_bf16_fast(orow + j, mask);
      acc = acc + e;
    }
    if (sum) sum[r] = lanes_sum(acc);
  }
}
inline void rows_exp(float* x, int64_t ld, int64_t rows, int64_t cols, float scale,
                     const float* shift, float* sum, uint16_t* out, int64_t ld_out) {
  if (out) rows_exp_impl<true>(x, ld, rows, cols, scale, shift, sum, out, ld_out);
  else rows_exp_impl<false>(x, ld, rows, cols, scale, shift, sum, nullptr, 0);
}

inline void rows_scale(float* x, int64_t ld, int64_t rows, int64_t cols, const float* factor) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * ld;
    const Vec f = Vec::set1(factor[r]);
    int64_t j = 0;
    for (; j + W <= cols; j += W) (Vec::load(row + j) * f).store(row + j);
    if (j < cols) {
      const auto mask = Vec::tail_mask(static_cast<int>(cols - j));
      (Vec::load(row + j, mask) * f).store(row + j, mask);
    }
  }
}

template <bool kCopy>
inline void rows_sub_mul_impl(float* x, int64_t ld, const float* y, int64_t ldy, int64_t rows,
                              int64_t cols, const float* sub, uint16_t* out, int64_t ld_out) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * ld;
    const float* yrow = y + r * ldy;
    uint16_t* orow = kCopy ? out + r * ld_out : nullptr;
    const Vec s = Vec::set1(sub[r]);
    int64_t j = 0;
    for (; j + W <= cols; j += W) {
      const Vec v = Vec::load(yrow + j) * (Vec::load(row + j) - s);
      v.store(row + j);
      if constexpr (kCopy) v.store_bf16_fast(orow + j);
    }
    if (j < cols) {
      const auto mask = Vec::tail_mask(static_cast<int>(cols - j));
      const Vec v = Vec::load(yrow + j, mask) * (Vec::load(row + j, mask) - s);
      v.store(row + j, mask);
      if constexpr (kCopy) v.store_bf16_fast(orow + j, mask);
    }
  }
}
inline void rows_sub_mul(float* x, int64_t ld, const float* y, int64_t ldy, int64_t rows,
                         int64_t cols, const float* sub, uint16_t* out, int64_t ld_out) {
  if (out) rows_sub_mul_impl<true>(x, ld, y, ldy, rows, cols, sub, out, ld_out);
  else rows_sub_mul_impl<false>(x, ld, y, ldy, rows, cols, sub, nullptr, 0);
}

// ---------------------------------------------------------------- column operations
// Per-column sums and affine maps over row-major blocks (brgemm.h, cols_*): every operand
// rows x cols with leading dimension ld, float32 or uint16_t (bfloat16 bits), math in float32.
// Rows outer, columns inner: each row streams through contiguous memory, and the per-column
// accumulators (caller's arrays, a few KB) stay in L1.
template <bool TAIL, class T>
inline Vec load_cols(const T* p, Vec::Mask m) {
  if constexpr (TAIL) {
    if constexpr (std::is_same_v<T, float>) return Vec::load(p, m);
    else return Vec::load_bf16(p, m);
  } else {
    if constexpr (std::is_same_v<T, float>) return Vec::load(p);
    else return Vec::load_bf16(p);
  }
}
template <bool TAIL>
inline void store_cols(Vec v, float* p, Vec::Mask m) { if (TAIL) v.store(p, m); else v.store(p); }
template <bool TAIL>
inline void store_cols(Vec v, uint16_t* p, Vec::Mask m) { if (TAIL) v.store_bf16(p, m); else v.store_bf16(p); }

// body<TAIL>(j, mask) for every vector of columns [j, j + W) of a row, the last one masked.
template <class Body>
[[gnu::always_inline]] inline void over_cols(int64_t cols, Body body) {
  const auto full = Vec::tail_mask(W);
  int64_t j = 0;
#pragma GCC unroll 4
  for (; j + W <= cols; j += W) body(std::false_type{}, j, full);
  if (j < cols) body(std::true_type{}, j, Vec::tail_mask(static_cast<int>(cols - j)));
}

// h = g where m > 0, else 0 (m null: h = g).
template <bool TAIL, class TG>
inline Vec masked_cols(const TG* g, const TG* m, Vec::Mask mask) {
  const Vec gv = load_cols<TAIL>(g, mask);
  if (!m) return gv;
  return select(less(Vec::zero(), load_cols<TAIL>(m, mask)), gv, Vec::zero());
}

template <class TX>
void cols_sums_t(const TX* x, int64_t ld, int64_t rows, int64_t cols, const float* shift,
                 float* sum, float* sumsq) {
  for (int64_t r = 0; r < rows; ++r)
    over_cols(cols, [&](auto tail, int64_t j, Vec::Mask mask) {
      constexpr bool T = decltype(tail)::value;
      Vec d = load_cols<T>(x + r * ld + j, mask);
      if (shift) d = d - load_cols<T>(shift + j, mask);
      store_cols<T>(load_cols<T>(sum + j, mask) + d, sum + j, mask);
      store_cols<T>(fmadd(d, d, load_cols<T>(sumsq + j, mask)), sumsq + j, mask);
    });
}

template <class TG, class TX>
void cols_masked_sums_t(const TG* g, const TG* m, const TX* x, int64_t ld, int64_t rows,
                        int64_t cols, const float* shift, float* sum, float* dot) {
  for (int64_t r = 0; r < rows; ++r)
    over_cols(cols, [&](auto tail, int64_t j, Vec::Mask mask) {
      constexpr bool T = decltype(tail)::value;
      const int64_t o = r * ld + j;
      const Vec h = masked_cols<T>(g + o, m ? m + o : nullptr, mask);
      Vec d = load_cols<T>(x + o, mask);
      if (shift) d = d - load_cols<T>(shift + j, mask);
      store_cols<T>(load_cols<T>(sum + j, mask) + h, sum + j, mask);
      store_cols<T>(fmadd(h, d, load_cols<T>(dot + j, mask)), dot + j, mask);
    });
}

template <class TX, class TY>
void cols_affine_t(const TX* x, const float* a, const float* b, const TY* add, bool relu_out,
                   TY* y, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    over_cols(cols, [&](auto tail, int64_t j, Vec::Mask mask) {
      constexpr bool T = decltype(tail)::value;
      const int64_t o = r * ld + j;
      Vec v = fmadd(load_cols<T>(x + o, mask), load_cols<T>(a + j, mask), load_cols<T>(b + j, mask));
      if (add) v = v + load_cols<T>(add + o, mask);
      if (relu_out) v = relu(v);
      store_cols<T>(v, y + o, mask);
    });
}

template <class TG, class TX>
void cols_masked_affine_t(const TG* g, const TG* m, const TX* x, const float* a, const float* b,
                          const float* c, TX* z, TG* h_out, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    over_cols(cols, [&](auto tail, int64_t j, Vec::Mask mask) {
      constexpr bool T = decltype(tail)::value;
      const int64_t o = r * ld + j;
      const Vec h = masked_cols<T>(g + o, m ? m + o : nullptr, mask);
      const Vec v = fmadd(h, load_cols<T>(a + j, mask),
                          fmadd(load_cols<T>(x + o, mask), load_cols<T>(b + j, mask), load_cols<T>(c + j, mask)));
      store_cols<T>(v, z + o, mask);
      if (h_out) store_cols<T>(h, h_out + o, mask);
    });
}

// f(T{}) with T the element type of `d` (float or uint16_t).
template <class F>
inline void with_elem(DType d, F f) {
  if (d == DType::bf16) f(uint16_t{}); else f(float{});
}

inline void cols_sums(const void* x, DType xt, int64_t ld, int64_t rows, int64_t cols,
                      const float* shift, float* sum, float* sumsq) {
  with_elem(xt, [&](auto tx) {
    using TX = decltype(tx);
    cols_sums_t(static_cast<const TX*>(x), ld, rows, cols, shift, sum, sumsq);
  });
}
inline void cols_masked_sums(const void* g, const void* m, DType gt, const void* x, DType xt,
                             int64_t ld, int64_t rows, int64_t cols, const float* shift,
                             float* sum, float* dot) {
  with_elem(gt, [&](auto tg) {
    with_elem(xt, [&](auto tx) {
      using TG = decltype(tg);
      using TX = decltype(tx);
      cols_masked_sums_t(static_cast<const TG*>(g), static_cast<const TG*>(m),
                         static_cast<const TX*>(x), ld, rows, cols, shift, sum, dot);
    });
  });
}
inline void cols_affine(const void* x, DType xt, const float* a, const float* b, const void* add,
                        bool relu_out, void* y, DType yt, int64_t ld, int64_t rows, int64_t cols) {
  with_elem(xt, [&](auto tx) {
    with_elem(yt, [&](auto ty) {
      using TX = decltype(tx);
      using TY = decltype(ty);
      cols_affine_t(static_cast<const TX*>(x), a, b, static_cast<const TY*>(add), relu_out,
                    static_cast<TY*>(y), ld, rows, cols);
    });
  });
}
inline void cols_masked_affine(const void* g, const void* m, DType gt, const void* x, DType xt,
                               const float* a, const float* b, const float* c, void* z,
                               void* h_out, int64_t ld, int64_t rows, int64_t cols) {
  with_elem(gt, [&](auto tg) {
    with_elem(xt, [&](auto tx) {
      using TG = decltype(tg);
      using TX = decltype(tx);
      cols_masked_affine_t(static_cast<const TG*>(g), static_cast<const TG*>(m),
                           static_cast<const TX*>(x), a, b, c, static_cast<TX*>(z),
                           static_cast<TG*>(h_out), ld, rows, cols);
    });
  });
}

// Window operations (brgemm.h, cols_window_*): `count` taps, each a row of `cols` elements
// (null: a padding tap, -inf), for `pixels` windows `step` elements apart. Pixels outer,
// then a vector of columns, then the taps: the vector's accumulators stay in registers.
template <class T>
void cols_window_max_t(const T* const* taps, int64_t count, int64_t pixels, int64_t step,
                       int64_t cols, T* y) {
  for (int64_t p = 0; p < pixels; ++p)
    over_cols(cols, [&](auto tail, int64_t j, Vec::Mask mask) {
      constexpr bool TL = decltype(tail)::value;
      Vec acc = Vec::set1(-INFINITY);
      for (int64_t t = 0; t < count; ++t)
        if (taps[t]) acc = max_nan(acc, load_cols<TL>(taps[t] + p * step + j, mask));
      store_cols<TL>(acc, y + p * cols + j, mask);
    });
}

// The winner of each column is chosen as XLA's select_and_scatter (select: ge) chooses:
// the first tap, replaced by each later one unless the current winner is >= it. So ties go
// to the first tap in window order, a padding tap (-inf) can win (its gradient is
// dropped), and after a NaN the next tap wins. Tap numbers ride as floats (exact below
// 2^24) so the choice is two selects per tap. dx is read, added to and stored in T, so
// bfloat16 sums round after every add, as XLA's bfloat16 scatter-add does.
template <class T>
void cols_window_max_backward_t(const T* const* taps, T* const* dx, int64_t count,
                                int64_t pixels, int64_t step, int64_t cols, const T* g) {
  for (int64_t p = 0; p < pixels; ++p)
    over_cols(cols, [&](auto tail, int64_t j, Vec::Mask mask) {
      constexpr bool TL = decltype(tail)::value;
      const int64_t o = p * step + j;
      const Vec pad = Vec::set1(-INFINITY);
      Vec best = taps[0] ? load_cols<TL>(taps[0] + o, mask) : pad, winner = Vec::zero();
      for (int64_t t = 1; t < count; ++t) {
        const Vec v = taps[t] ? load_cols<TL>(taps[t] + o, mask) : pad;
        const auto keep = greater_equal(best, v);
        best = select(keep, best, v);
        winner = select(keep, winner, Vec::set1(static_cast<float>(t)));
      }
      const Vec gv = load_cols<TL>(g + p * cols + j, mask);
      for (int64_t t = 0; t < count; ++t) {
        if (!dx[t]) continue;
        const Vec add = select(equal(winner, Vec::set1(static_cast<float>(t))), gv, Vec::zero());
        store_cols<TL>(load_cols<TL>(dx[t] + o, mask) + add, dx[t] + o, mask);
      }
    });
}

inline void cols_window_max(const void* const* taps, int64_t count, DType dt, int64_t pixels,
                            int64_t step, int64_t cols, void* y) {
  with_elem(dt, [&](auto tx) {
    using TX = decltype(tx);
    cols_window_max_t(reinterpret_cast<const TX* const*>(taps), count, pixels, step, cols,
                      static_cast<TX*>(y));
  });
}
inline void cols_window_max_backward(const void* const* taps, void* const* dx, int64_t count,
                                     DType dt, int64_t pixels, int64_t step, int64_t cols,
                                     const void* g) {
  with_elem(dt, [&](auto tx) {
    using TX = decltype(tx);
    cols_window_max_backward_t(reinterpret_cast<const TX* const*>(taps),
                               reinterpret_cast<TX* const*>(dx), count, pixels, step,
                               cols, static_cast<const TX*>(g));
  });
}

// ---------------------------------------------------------------- micro-kernel
// Always inlined: as calls, every batch element of a tile saved and restored all its
// accumulators around them (in cache, 56x64x64x9: 165 -> 176 GFLOP/s once inlined).
template <class T>
[[gnu::always_inline]] inline const T* block_a(const Batch& b, int64_t i) {
  switch (b.form) {
    case Batch::Form::stride: return static_cast<const T*>(b.a) + i * b.stride_a;
    case Batch::Form::offset: return static_cast<const T*>(b.a) + b.offs_a[i];
    case Batch::Form::address: break;
  }
  return static_cast<const T*>(b.ptrs_a[i]);
}

template <class T>
[[gnu::always_inline]] inline const T* block_b(const Batch& b, int64_t i) {
  switch (b.form) {
    case Batch::Form::stride: return static_cast<const T*>(b.b) + i * b.stride_b;
    case Batch::Form::offset: return static_cast<const T*>(b.b) + b.offs_b[i];
    case Batch::Form::address: break;
  }
  return static_cast<const T*>(b.ptrs_b[i]);
}

// Inputs are float32 or bfloat16 (stored as uint16_t); math is float32 either way.
inline float scalar_in(float x) { return x; }
inline float scalar_in(uint16_t x) { return bf16_to_f32(x); }
inline Vec load_in(const float* p) { return Vec::load(p); }
inline Vec load_in(const float* p, Vec::Mask m) { return Vec::load(p, m); }
inline Vec load_in(const uint16_t* p) { return Vec::load_bf16(p); }
inline Vec load_in(const uint16_t* p, Vec::Mask m) { return Vec::load_bf16(p, m); }

struct Tile {
  const Desc* desc;
  const Batch* batch;
  int64_t row0, col0;
  int tail_lanes;  // valid lanes of the last vector
  void* c;        // float32 or bfloat16, as desc->c_dtype says
  float alpha;
  const float* bias;
  bool stream;  // full vectors of C go out as non-temporal stores
};

// The epilogue on one finished vector of C (row r, columns col.. of the tile), in registers:
// alpha, beta * C, bias, activation, then the one store (float32 or bfloat16).
inline void finish(const Tile& t, Vec x, int r, int col, bool partial, Vec::Mask mask) {
  const Desc& d = *t.desc;
  const int64_t offset = (t.row0 + r) * d.ldc + t.col0 + col;
  const bool c_bf16 = d.c_dtype == DType::bf16;
  float* c32 = static_cast<float*>(t.c) + offset;
  uint16_t* c16 = static_cast<uint16_t*>(t.c) + offset;
  if (t.alpha != 1.0f) x = x * Vec::set1(t.alpha);
  if (d.beta != 0.0f) {
    const Vec old = c_bf16 ? (partial ? Vec::load_bf16(c16, mask) : Vec::load_bf16(c16))
                           : (partial ? Vec::load(c32, mask) : Vec::load(c32));
    x = d.beta == 1.0f ? x + old : fmadd(old, Vec::set1(d.beta), x);
  }
  if (d.has_bias) {
    const float* bias = t.bias + t.col0 + col;
    x = x + (partial ? Vec::load(bias, mask) : Vec::load(bias));
  }
  x = activate(x, d.activation);
  if (c_bf16) {
    if (partial) x.store_bf16(c16, mask); else if (t.stream) x.stream_bf16(c16); else x.store_bf16(c16);
  } else {
    if (partial) x.store(c32, mask); else if (t.stream) x.stream(c32); else x.store(c32);
  }
}

// The epilogue of one ROWS x (NV vectors) block of accumulators (the last vector partial
// where MASKED): every tile kernel of an ISA ends here.
template <int ROWS, int NV, bool MASKED>
[[gnu::always_inline]] inline void store_block(const Tile& t, const Vec (&acc)[ROWS][NV]) {
  const Desc& d = *t.desc;
  const auto mask = Vec::tail_mask(t.tail_lanes);
  // The common float32 epilogues (C = alpha acc or C += alpha acc, plus bias and relu,
  // stored normally) inline, in one pass; everything else through finish(), a call per
  // vector that first spills every accumulator (in cache, 64x64x128: 159 -> 175 GFLOP/s
  // inline; with bias, one thread, 128x64x512 forward 64 -> 60 us; with alpha, attention's
  // scaled logits 64x64x64: 155 -> 167 GFLOP/s).
  if (detail::inline_f32_epilogue(d) && !t.stream) {
    float* c = static_cast<float*>(t.c) + t.row0 * d.ldc + t.col0;
    const bool add = d.beta == 1.0f, relu_out = d.activation == Activation::relu;
    const bool scale = t.alpha != 1.0f;
    const Vec alpha = Vec::set1(t.alpha);
    Vec bias[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bias[v] = !d.has_bias ? Vec::zero()
                : (MASKED && v == NV - 1) ? Vec::load(t.bias + t.col0 + v * W, mask)
                                          : Vec::load(t.bias + t.col0 + v * W);
#pragma GCC unroll 32
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        float* p = c + r * d.ldc + v * W;
        const bool partial = MASKED && v == NV - 1;
        Vec x = acc[r][v];
        if (scale) x = x * alpha;
        if (add) x = x + (partial ? Vec::load(p, mask) : Vec::load(p));
        if (d.has_bias) x = x + bias[v];
        if (relu_out) x = relu(x);
        if (partial) x.store(p, mask); else x.store(p);
      }
    return;
  }
#pragma GCC unroll 32
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      finish(t, acc[r][v], r, v * W, MASKED && v == NV - 1, mask);
}

// One ROWS x (NV vectors) block of C: accumulate the whole batch in registers, then the
// epilogue on the registers, then one store. MASKED: the last vector is partial. A_T: A is
// stored transposed (Desc::a_transposed), its rows' elements lda apart.
template <class T, int ROWS, int NV, bool MASKED, bool A_T>
void tile_kernel(const Tile& t) {
  const Desc& d = *t.desc;
  const int64_t lda = d.lda, ldb = d.ldb, k = d.k;
  const auto mask = Vec::tail_mask(t.tail_lanes);
  // Blocks of fewer than 8 accumulators cannot cover the FMA latency on two ports: they
  // keep a second set for odd steps of the reduction, added in at the end (1 x 4 vectors,
  // the border pixels of a 3x3 convolution row: 1x64x64x9 in cache 63 -> 73-83 GFLOP/s).
  constexpr int kSets = ROWS * NV < 8 ? 2 : 1;
  Vec acc[kSets][ROWS][NV];
#pragma GCC unroll 2
  for (int s = 0; s < kSets; ++s)
#pragma GCC unroll 32
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[s][r][v] = Vec::zero();

  // The first row block of a call meets B's rows cold; where they lie a page or more apart
  // (a 4096-wide weight matrix read in place) the hardware prefetchers do not follow, so it
  // asks for them 16 rows ahead (64x4096x4096 forward +5 %).
  const bool prefetch_b = t.row0 == 0 && ldb * int64_t{sizeof(T)} >= 4096;
  const int64_t pf_ahead = 16 * ldb;
  const int64_t row_step = A_T ? 1 : lda, col_step = A_T ? lda : 1;
  // One step of the reduction: row p of B (at b) times column p of A into `sum`.
  auto step = [&](Vec (&sum)[ROWS][NV], const T* a, const T* b, int64_t p) __attribute__((always_inline)) {
    if (prefetch_b)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) __builtin_prefetch(b + pf_ahead + v * W, 0, 3);
    Vec bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = (MASKED && v == NV - 1) ? load_in(b + v * W, mask) : load_in(b + v * W);
#pragma GCC unroll 32
    for (int r = 0; r < ROWS; ++r) {
      const Vec av = Vec::set1(scalar_in(a[r * row_step + p * col_step]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) sum[r][v] = fmadd(av, bv[v], sum[r][v]);
    }
  };
  for (int64_t i = 0; i < t.batch->count; ++i) {
    const T* a = block_a<T>(*t.batch, i) + (A_T ? t.row0 : t.row0 * lda);
    const T* b = block_b<T>(*t.batch, i) + t.col0;
    int64_t p = 0;
    if constexpr (kSets == 2) {
#pragma GCC unroll 2
      for (; p + 1 < k; p += 2, b += 2 * ldb) step(acc[0], a, b, p), step(acc[1], a, b + ldb, p + 1);
    }
#pragma GCC unroll 4
    for (; p < k; ++p, b += ldb) step(acc[0], a, b, p);
  }
  if constexpr (kSets == 2)
#pragma GCC unroll 32
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[0][r][v] = acc[0][r][v] + acc[1][r][v];

  store_block<ROWS, NV, MASKED>(t, acc[0]);
}

// tile_table<T>()[nv][rows][masked]: every block shape the driver may need (edges
// included), instantiated only for the input types an ISA uses.
using TileFn = void (*)(const Tile&);
using RowTable = std::array<std::array<TileFn, 2>, 33>;
using TileTable = std::array<RowTable, detail::kMaxVectorsPerBlock + 1>;

template <class T, int NV, bool A_T, int... R>
constexpr RowTable make_rows(std::integer_sequence<int, R...>) {
  RowTable t{};
  ((t[R + 1] = {&tile_kernel<T, R + 1, NV, false, A_T>, &tile_kernel<T, R + 1, NV, true, A_T>}), ...);
  return t;
}

template <class T, int NV, const detail::Blocking& B, bool A_T>
constexpr RowTable rows_for() {
  if constexpr (NV > B.max_vectors) return RowTable{};
  else return make_rows<T, NV, A_T>(std::make_integer_sequence<int, B.max_rows[NV]>{});
}

template <class T, const detail::Blocking& B, bool A_T>
const TileTable& tile_table() {
  static const TileTable table = {RowTable{}, rows_for<T, 1, B, A_T>(), rows_for<T, 2, B, A_T>(),
                                  rows_for<T, 3, B, A_T>(), rows_for<T, 4, B, A_T>()};
  return table;
}

// Covers C with the kernel's register blocks; `table` holds the block kernels.
inline void run_tiles(const Kernel& kern, const Batch& batch, void* c, float alpha,
                      const float* bias, const TileTable& table, int width) {
  const Desc& d = kern.desc;
  const int64_t block_cols = int64_t{kern.vectors_per_block} * width;
  const int64_t c_size = d.c_dtype == DType::bf16 ? 2 : 4;
  const bool stream = d.stream_c && d.ldc % W == 0 &&  // (each store: W lanes, aligned)
                      reinterpret_cast<uintptr_t>(c) % (c_size * W) == 0;
  Tile t{&d, &batch, 0, 0, width, c, alpha, bias, stream};
  for (int64_t col0 = 0; col0 < d.n; col0 += block_cols) {
    const int64_t cols = std::min(block_cols, d.n - col0);
    const int nv = static_cast<int>((cols + width - 1) / width);
    t.col0 = col0;
    t.tail_lanes = static_cast<int>(cols - int64_t{nv - 1} * width);
    const int masked = t.tail_lanes != width;
    for (int64_t row0 = 0; row0 < d.m; row0 += kern.rows_per_block) {
      const int rows = static_cast<int>(std::min<int64_t>(kern.rows_per_block, d.m - row0));
      t.row0 = row0;
      table[nv][rows][masked](t);
    }
  }
  if (stream) store_fence();  // non-temporal stores are weakly ordered: done before return
}

template <class T, const detail::Blocking& B>
void run_converting(const Kernel& kern, const Batch& batch, void* c, float alpha, const float* bias) {
  // (validate() admits a transposed A for float32 only: no such tables for bfloat16.)
  if constexpr (std::is_same_v<T, float>) {
    if (kern.desc.a_transposed) return run_tiles(kern, batch, c, alpha, bias, tile_table<T, B, true>(), W);
  }
  run_tiles(kern, batch, c, alpha, bias, tile_table<T, B, false>(), W);
}

// ---------------------------------------------------------------- peak
// Rounds per second (thread CPU time) of `round()`, one step of independent register-
// resident chains, repeated until `seconds` have passed: the measured-peak loops use it.
template <class Round>
double rounds_per_second(Round round, double seconds) {
  int64_t rounds = 0;
  const double start = thread_cpu_seconds();
  double elapsed = 0.0;
  do {
    for (int rep = 0; rep < 4096; ++rep) round();
    rounds += 4096;
    elapsed = thread_cpu_seconds() - start;
  } while (elapsed < seconds);
  return static_cast<double>(rounds) / elapsed;
}

// Register-resident FMA loop with enough independent chains to cover the FMA latency.
inline double fma_peak_gflops(double seconds) {
  constexpr int kChains = 12;
  Vec acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = Vec::set1(1.0f + 1e-3f * j);
  const Vec x = Vec::set1(0.999999f), y = Vec::set1(1e-7f);
  const double rate = rounds_per_second([&] {
#pragma GCC unroll 12
    for (int j = 0; j < kChains; ++j) acc[j] = fmadd(acc[j], x, y);
  }, seconds);
  float sink[W];
  Vec total = acc[0];
  for (int j = 1; j < kChains; ++j) total = total + acc[j];
  total.store(sink);
  volatile float keep = sink[0];
  (void)keep;
  return 2.0 * W * kChains * rate * 1e-9;
}

// Register-block limits for float32 inputs and for bfloat16 converted on the fly (which
// needs a register for the converted A value).
constexpr detail::Blocking kF32Blocking = {W, kMaxVectors, JBR_MAX_ROWS};
constexpr detail::Blocking kBf16Blocking = {W, kMaxVectors, JBR_MAX_ROWS_BF16};

// The ISA's implementation with float32 math for both input types.
inline detail::IsaImpl make_impl() {
  detail::IsaImpl impl;
  impl.f32 = kF32Blocking;
  impl.bf16 = kBf16Blocking;
  impl.run_f32 = &run_converting<float, kF32Blocking>;
  impl.run_bf16 = &run_converting<uint16_t, kBf16Blocking>;
  impl.activation = &apply_activation;
  impl.fma_peak_gflops = &fma_peak_gflops;
  impl.rows = {&rows_max, &rows_exp, &rows_scale, &rows_sub_mul};
  impl.cols = {&cols_sums, &cols_masked_sums, &cols_affine, &cols_masked_affine, &cols_window_max,
               &cols_window_max_backward};
  return impl;
}

}  // namespace JBR_ISA_NS
}  // namespace jbr
