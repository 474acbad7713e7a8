// The micro-kernel, epilogue and activation math, written once over the Vec interface of
// vec.h and compiled per ISA by isa_*.cc. Each of those defines JBR_VEC_<ISA>, JBR_ISA_NS,
// JBR_MAX_VECTORS and JBR_MAX_ROWS (register-block height limit per block width) first.
#pragma once

#include <array>
#include <chrono>
#include <utility>

#include "isa_impl.h"
#include "vec.h"

namespace jbr {
namespace JBR_ISA_NS {

constexpr int W = Vec::width;
constexpr int kMaxVectors = JBR_MAX_VECTORS;
constexpr std::array<int, detail::kMaxVectorsPerBlock + 1> kMaxRows = JBR_MAX_ROWS;

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

inline Vec activate(Vec x, Activation act) {
  switch (act) {
    case Activation::relu: return relu(x);
    case Activation::gelu: return gelu(x);
    case Activation::sigmoid: return sigmoid(x);
    case Activation::tanh: return tanh(x);
    case Activation::none: break;
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

// ---------------------------------------------------------------- micro-kernel
inline const float* block_a(const Batch& b, int64_t i) {
  switch (b.form) {
    case Batch::Form::stride: return static_cast<const float*>(b.a) + i * b.stride_a;
    case Batch::Form::offset: return static_cast<const float*>(b.a) + b.offs_a[i];
    case Batch::Form::address: break;
  }
  return static_cast<const float*>(b.ptrs_a[i]);
}

inline const float* block_b(const Batch& b, int64_t i) {
  switch (b.form) {
    case Batch::Form::stride: return static_cast<const float*>(b.b) + i * b.stride_b;
    case Batch::Form::offset: return static_cast<const float*>(b.b) + b.offs_b[i];
    case Batch::Form::address: break;
  }
  return static_cast<const float*>(b.ptrs_b[i]);
}

struct Tile {
  const Desc* desc;
  const Batch* batch;
  int64_t row0, col0;
  int tail_lanes;  // valid lanes of the last vector
  float* c;
  float alpha;
  const float* bias;
};

// One ROWS x (NV vectors) block of C: accumulate the whole batch in registers, then the
// epilogue on the registers, then one store. MASKED: the last vector is partial.
template <int ROWS, int NV, bool MASKED>
void tile_kernel(const Tile& t) {
  const Desc& d = *t.desc;
  const int64_t lda = d.lda, ldb = d.ldb, k = d.k;
  const auto mask = Vec::tail_mask(t.tail_lanes);
  Vec acc[ROWS][NV];
#pragma GCC unroll 32
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec::zero();

  for (int64_t i = 0; i < t.batch->count; ++i) {
    const float* a = block_a(*t.batch, i) + t.row0 * lda;
    const float* b = block_b(*t.batch, i) + t.col0;
#pragma GCC unroll 4
    for (int64_t p = 0; p < k; ++p, b += ldb) {
      Vec bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        bv[v] = (MASKED && v == NV - 1) ? Vec::load(b + v * W, mask) : Vec::load(b + v * W);
#pragma GCC unroll 32
      for (int r = 0; r < ROWS; ++r) {
        const Vec av = Vec::set1(a[r * lda + p]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = fmadd(av, bv[v], acc[r][v]);
      }
    }
  }

  const Vec alpha = Vec::set1(t.alpha), beta = Vec::set1(d.beta);
#pragma GCC unroll 32
  for (int r = 0; r < ROWS; ++r) {
    float* c = t.c + (t.row0 + r) * d.ldc + t.col0;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const bool partial = MASKED && v == NV - 1;
      Vec x = t.alpha == 1.0f ? acc[r][v] : acc[r][v] * alpha;
      if (d.beta != 0.0f) {
        const Vec old = partial ? Vec::load(c + v * W, mask) : Vec::load(c + v * W);
        x = d.beta == 1.0f ? x + old : fmadd(old, beta, x);
      }
      if (d.has_bias) {
        const float* bias = t.bias + t.col0 + v * W;
        x = x + (partial ? Vec::load(bias, mask) : Vec::load(bias));
      }
      x = activate(x, d.activation);
      if (partial) x.store(c + v * W, mask); else x.store(c + v * W);
    }
  }
}

// tile_table[nv][rows][masked]: every block shape the driver may need (edges included).
using TileFn = void (*)(const Tile&);
using RowTable = std::array<std::array<TileFn, 2>, 33>;

template <int NV, int... R>
constexpr RowTable make_rows(std::integer_sequence<int, R...>) {
  RowTable t{};
  ((t[R + 1] = {&tile_kernel<R + 1, NV, false>, &tile_kernel<R + 1, NV, true>}), ...);
  return t;
}

template <int NV>
constexpr RowTable rows_for() {
  if constexpr (NV > kMaxVectors) return RowTable{};
  else return make_rows<NV>(std::make_integer_sequence<int, kMaxRows[NV]>{});
}

const std::array<RowTable, detail::kMaxVectorsPerBlock + 1> tile_table = {
    RowTable{}, rows_for<1>(), rows_for<2>(), rows_for<3>(), rows_for<4>()};

inline void run_f32(const Kernel& kern, const Batch& batch, void* c_out, float alpha,
                    const float* bias) {
  const Desc& d = kern.desc;
  const int64_t block_cols = int64_t{kern.vectors_per_block} * W;
  Tile t{&d, &batch, 0, 0, W, static_cast<float*>(c_out), alpha, bias};
  for (int64_t col0 = 0; col0 < d.n; col0 += block_cols) {
    const int64_t cols = std::min(block_cols, d.n - col0);
    const int nv = static_cast<int>((cols + W - 1) / W);
    t.col0 = col0;
    t.tail_lanes = static_cast<int>(cols - int64_t{nv - 1} * W);
    const int masked = t.tail_lanes != W;
    for (int64_t row0 = 0; row0 < d.m; row0 += kern.rows_per_block) {
      const int rows = static_cast<int>(std::min<int64_t>(kern.rows_per_block, d.m - row0));
      t.row0 = row0;
      tile_table[nv][rows][masked](t);
    }
  }
}

// ---------------------------------------------------------------- peak
// Register-resident FMA loop with enough independent chains to cover the FMA latency.
inline double fma_peak_gflops(double seconds) {
  constexpr int kChains = 12;
  Vec acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = Vec::set1(1.0f + 1e-3f * j);
  const Vec x = Vec::set1(0.999999f), y = Vec::set1(1e-7f);
  using clock = std::chrono::steady_clock;
  int64_t iters = 0;
  const auto start = clock::now();
  double elapsed = 0.0;
  do {
    for (int rep = 0; rep < 4096; ++rep) {
#pragma GCC unroll 12
      for (int j = 0; j < kChains; ++j) acc[j] = fmadd(acc[j], x, y);
    }
    iters += 4096;
    elapsed = std::chrono::duration<double>(clock::now() - start).count();
  } while (elapsed < seconds);
  float sink[W];
  Vec total = acc[0];
  for (int j = 1; j < kChains; ++j) total = total + acc[j];
  total.store(sink);
  volatile float keep = sink[0];
  (void)keep;
  return 2.0 * W * kChains * static_cast<double>(iters) / elapsed * 1e-9;
}

inline detail::IsaImpl make_impl() {
  detail::IsaImpl impl{};
  impl.vector_width = W;
  impl.max_vectors = kMaxVectors;
  for (int v = 0; v <= detail::kMaxVectorsPerBlock; ++v) impl.max_rows[v] = kMaxRows[v];
  impl.run_f32 = &run_f32;
  impl.activation = &apply_activation;
  impl.fma_peak_gflops = &fma_peak_gflops;
  return impl;
}

}  // namespace JBR_ISA_NS
}  // namespace jbr
