#include "primitives/dense.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

namespace jbr::prim {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t threads_of(const Executor* executor) {
  return executor ? executor->num_workers() + 1 : 1;
}

// Block sizes (elements). A strip is a column block of the output that one work item
// owns; its B panel (kReduceChunk x kStripCols) stays in L2 while every row block of
// the item's rows uses it, and each brgemm call reduces kReduceBlock-deep blocks.
constexpr int64_t kStripCols = 64;
constexpr int64_t kRowTarget = 64;
constexpr int64_t kReduceChunk = 512;
constexpr int64_t kReduceBlock = 64;
constexpr int64_t kGroupRows = 256;
// Plain B panels are copied contiguous when their rows lie at least kPackLdb floats apart
// (each on its own page, all in the same few L1 sets: TLB and cache-set misses) and at
// least kPackBlocks row blocks share each copy (it costs a pass over the panel).
constexpr int64_t kPackLdb = 2048;
constexpr int64_t kPackBlocks = 3;

// One GEMM as a loop nest of brgemm calls:
//   out[m x n] (ldo) = epilogue(A[m x r] (lda) @ B[r x n])
// where B is either plain (b, ldb) or, with b_transposed, the transpose of b (n x r, ldb).
// Work items are (column strip, row group); each walks the reduction in chunks, and packs
// the strip's (chunk x strip) B panel into per-thread scratch just before its row blocks
// use it: always when transposed, when plain only where enough rows share the copy.
struct GemmNest {
  int64_t m = 0, n = 0, r = 0;
  const float* a = nullptr;
  int64_t lda = 0;
  const float* b = nullptr;
  int64_t ldb = 0;
  bool b_transposed = false;
  float* out = nullptr;
  int64_t ldo = 0;
  const float* bias = nullptr;  // epilogue, on the last reduction chunk
  Activation activation = Activation::none;
  // When set: `out` gets the pre-activation (bias only in the epilogue) and act_out
  // (ldo) gets activation(out), computed from the hot block.
  float* act_out = nullptr;
  // When set: each finished out block is also written transposed here (ld ldt), from cache.
  float* out_t = nullptr;
  int64_t ldt = 0;
  Isa isa = Isa::ref;
};

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols, in 16 x 16 tiles staged
// through a local buffer: every source and destination line is read or written whole in
// one go, so nothing has to stay cached across a power-of-two stride (which would put
// all the lines of a tile in one L1 set).
void transpose_block(const float* __restrict src, int64_t lds, int64_t rows, int64_t cols,
                     float* __restrict dst, int64_t ldd) {
  constexpr int64_t T = 16;
  float tile[T][T];
  for (int64_t i0 = 0; i0 < rows; i0 += T) {
    const int64_t h = std::min(T, rows - i0);
    for (int64_t j0 = 0; j0 < cols; j0 += T) {
      const int64_t w = std::min(T, cols - j0);
      for (int64_t i = 0; i < h; ++i)
        for (int64_t j = 0; j < w; ++j) tile[j][i] = src[(i0 + i) * lds + j0 + j];
      for (int64_t j = 0; j < w; ++j)
        for (int64_t i = 0; i < h; ++i) dst[(j0 + j) * ldd + i0 + i] = tile[j][i];
    }
  }
}

// dst (cols x rows, ldd) = src (rows x cols, lds)^T, in parallel over column slabs of src.
void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
               int64_t ldd, const Executor* executor) {
  constexpr int64_t slab = 64;
  parallel_for(executor, ceil_div(cols, slab), [&](int64_t s) {
    const int64_t j0 = s * slab;
    transpose_block(src + j0, lds, rows, std::min(slab, cols - j0), dst + j0 * ldd, ldd);
  });
}

// A (rows x depth, lda) @ B (depth x cols, ldb) into out (ldo), as full kReduceBlock-deep
// blocks in one batch-reduce call plus a tail call. first: overwrite out (beta 0), else
// accumulate; last: apply the epilogue (bias: this block's columns).
void reduce_into(const GemmNest& g, const float* a, const float* b, int64_t ldb, int64_t rows,
                 int64_t cols, int64_t depth, float* out, const float* bias, bool first,
                 bool last) {
  const int64_t kb = std::min(kReduceBlock, depth);
  const int64_t full = depth / kb, tail = depth - full * kb;
  Desc d;
  d.m = rows, d.n = cols, d.lda = g.lda, d.ldb = ldb, d.ldc = g.ldo, d.isa = g.isa;
  const Activation epilogue_act = g.act_out ? Activation::none : g.activation;
  auto call = [&](const float* ab, const float* bb, int64_t k, int64_t count, bool beta0,
                  bool epilogue) {
    d.k = k;
    d.beta = beta0 ? 0.0f : 1.0f;
    d.has_bias = epilogue && bias != nullptr;
    d.activation = epilogue ? epilogue_act : Activation::none;
    get_kernel(d)(Batch::strided(ab, k, bb, k * ldb, count), out, 1.0f,
                  d.has_bias ? bias : nullptr);
  };
  call(a, b, kb, full, first, last && tail == 0);
  if (tail > 0) call(a + full * kb, b + full * kb * ldb, tail, 1, false, last);
}

std::string run_gemm(const GemmNest& g, const Executor* executor) {
  if (g.m == 0 || g.n == 0) return "";
  // Validate the shapes the nest will ask for (they differ only in m, n, k, beta, epilogue).
  Desc probe;
  probe.m = std::min(g.m, kRowTarget), probe.n = std::min(g.n, kStripCols);
  probe.k = std::min(g.r, kReduceBlock);
  probe.lda = g.lda, probe.ldb = g.b_transposed ? probe.n : g.ldb, probe.ldc = g.ldo;
  probe.isa = g.isa;
  if (std::string e = validate(probe); !e.empty()) return e;
  // Row blocks of about kRowTarget rows, a multiple of the register block where that
  // splits m evenly, else m split evenly (the kernel picks the register blocking per m).
  const int64_t tile_rows = get_kernel(probe).rows_per_block;
  int64_t bm = tile_rows * std::max<int64_t>(1, kRowTarget / tile_rows);
  if (g.m % bm != 0) bm = ceil_div(g.m, ceil_div(g.m, bm));

  // Row groups of about kGroupRows rows keep an item's A block (group x chunk) in L2 while
  // the strips go by; smaller groups where there would be too few items for the threads.
  const int64_t strips = ceil_div(g.n, kStripCols);
  const int64_t row_blocks = ceil_div(g.m, bm);
  // (A transposed B panel costs more to pack than a copy: four times larger groups.)
  const int64_t target_rows = g.b_transposed ? 4 * kGroupRows : kGroupRows;
  int64_t group_blocks = std::clamp<int64_t>(target_rows / bm, 1, row_blocks);
  while (group_blocks > 1 && strips * ceil_div(row_blocks, group_blocks) < 4 * threads_of(executor))
    group_blocks = ceil_div(group_blocks, 2);
  const int64_t groups = ceil_div(row_blocks, group_blocks);
  group_blocks = ceil_div(row_blocks, groups);  // balanced: no runt group at the end
  const int64_t group_rows = group_blocks * bm;
  const int64_t chunk = std::min(g.r, kReduceChunk);
  const bool pack = g.b_transposed || (g.ldb >= kPackLdb && group_blocks >= kPackBlocks);

  // Strips vary fastest, so items running at the same time share their A block.
  parallel_for(executor, strips * groups, [&](int64_t item) {
    const int64_t strip = item % strips, group = item / strips;
    const int64_t col0 = strip * kStripCols, cols = std::min(kStripCols, g.n - col0);
    const int64_t row_begin = group * group_rows, row_end = std::min(g.m, row_begin + group_rows);
    thread_local std::vector<float> panel;
    if (pack && panel.size() < static_cast<size_t>(chunk * cols))
      panel.resize(chunk * cols);
    for (int64_t r0 = 0; r0 < g.r; r0 += chunk) {
      const int64_t depth = std::min(chunk, g.r - r0);
      const float* b = g.b + r0 * g.ldb + col0;
      int64_t ldb = g.ldb;
      if (g.b_transposed) {
        transpose_block(g.b + col0 * g.ldb + r0, g.ldb, cols, depth, panel.data(), cols);
        b = panel.data(), ldb = cols;
      } else if (pack) {
        for (int64_t i = 0; i < depth; ++i)
          std::memcpy(panel.data() + i * cols, b + i * g.ldb, sizeof(float) * cols);
        b = panel.data(), ldb = cols;
      }
      const bool first = r0 == 0, last = r0 + depth == g.r;
      for (int64_t row0 = row_begin; row0 < row_end; row0 += bm) {
        const int64_t rows = std::min(bm, row_end - row0);
        float* out = g.out + row0 * g.ldo + col0;
        reduce_into(g, g.a + row0 * g.lda + r0, b, ldb, rows, cols, depth, out,
                    g.bias ? g.bias + col0 : nullptr, first, last);
        if (last && g.act_out) {
          for (int64_t i = 0; i < rows; ++i) {
            float* dst = g.act_out + (row0 + i) * g.ldo + col0;
            std::memcpy(dst, out + i * g.ldo, sizeof(float) * cols);
            apply_activation(g.activation, dst, cols, g.isa);
          }
        }
        if (last && g.out_t)
          transpose_block(out, g.ldo, rows, cols, g.out_t + col0 * g.ldt + row0, g.ldt);
      }
    }
  });
  return "";
}

// Fills out (n x k) with bias (or zeros) then the activation: the forward of c == 0.
void bias_only(const DenseForward& p) {
  for (int64_t i = 0; i < p.n; ++i) {
    float* row = p.y + i * p.k;
    for (int64_t j = 0; j < p.k; ++j) row[j] = p.bias ? p.bias[j] : 0.0f;
    if (p.preact) std::memcpy(p.preact + i * p.k, row, sizeof(float) * p.k);
    apply_activation(p.activation, row, p.k, p.isa);
  }
}

// d act(z) / dz * dy, from y (relu, sigmoid, tanh) or z (gelu, tanh form).
void activation_grad(Activation act, const float* __restrict dy,
                     const float* __restrict saved, float* __restrict dz, int64_t size) {
  switch (act) {
    case Activation::none: std::memcpy(dz, dy, sizeof(float) * size); return;
    case Activation::relu:  // select by bit mask: vectorises, and a branch would mispredict
      for (int64_t i = 0; i < size; ++i) {
        uint32_t bits;
        std::memcpy(&bits, dy + i, sizeof bits);
        bits &= 0u - static_cast<uint32_t>(saved[i] > 0.0f);
        std::memcpy(dz + i, &bits, sizeof bits);
      }
      return;
    case Activation::sigmoid:
      for (int64_t i = 0; i < size; ++i) dz[i] = dy[i] * saved[i] * (1.0f - saved[i]);
      return;
    case Activation::tanh:
      for (int64_t i = 0; i < size; ++i) dz[i] = dy[i] * (1.0f - saved[i] * saved[i]);
      return;
    case Activation::gelu:
      for (int64_t i = 0; i < size; ++i) {
        // gelu(z) = 0.5 z (1 + tanh(u)), u = s (z + 0.044715 z^3)
        constexpr float s = 0.7978845608028654f, a = 0.044715f;
        const float z = saved[i];
        const float t = std::tanh(s * (z + a * z * z * z));
        const float du = s * (1.0f + 3.0f * a * z * z);
        dz[i] = dy[i] * (0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * du);
      }
      return;
  }
}

}  // namespace

std::string dense_forward(const DenseForward& p, const Executor* executor) {
  if (p.n == 0 || p.k == 0) return "";
  if (p.c == 0) return bias_only(p), "";
  GemmNest g;
  g.m = p.n, g.n = p.k, g.r = p.c;
  g.a = p.x, g.lda = p.c;
  g.b = p.w, g.ldb = p.k;
  g.bias = p.bias, g.activation = p.activation, g.isa = p.isa;
  g.ldo = p.k;
  if (p.preact) {
    g.out = p.preact, g.act_out = p.y;
  } else {
    g.out = p.y;
  }
  return run_gemm(g, executor);
}

std::string dense_backward(const DenseBackward& p, const Executor* executor) {
  const int64_t n = p.n, c = p.c, k = p.k;
  if (p.dx && n * c > 0 && k == 0) std::memset(p.dx, 0, sizeof(float) * n * c);
  if (p.dw && c * k > 0 && n == 0) std::memset(p.dw, 0, sizeof(float) * c * k);
  if (p.dbias && k > 0 && n == 0) std::memset(p.dbias, 0, sizeof(float) * k);
  if (n == 0 || k == 0) return "";

  // dz = dy * act'(...), and dbias = its column sums, in one pass over column slabs.
  std::unique_ptr<float[]> dz_store;
  const float* dz = p.dy;
  if (p.activation != Activation::none) dz_store.reset(new float[n * k]), dz = dz_store.get();
  if (p.activation != Activation::none || p.dbias) {
    constexpr int64_t slab = 256;
    parallel_for(executor, ceil_div(k, slab), [&](int64_t s) {
      const int64_t j0 = s * slab, cols = std::min(slab, k - j0);
      float sums[slab] = {};
      for (int64_t i = 0; i < n; ++i) {
        const float* row = dz + i * k + j0;
        if (p.activation != Activation::none) {
          activation_grad(p.activation, p.dy + i * k + j0, p.saved + i * k + j0,
                          dz_store.get() + i * k + j0, cols);
        }
        for (int64_t j = 0; j < cols; ++j) sums[j] += row[j];
      }
      if (p.dbias) std::memcpy(p.dbias + j0, sums, sizeof(float) * cols);
    });
  }

  if (p.dx && c > 0) {
    if (2 * n * (c + k) < c * k) {
      // Few rows: transposing dz and the result (n (c + k) elements) is cheaper than w
      // (c k): dx^T (c x n) = w (c x k, as it is) @ dz^T, each finished block of it
      // transposed into dx while hot.
      std::unique_ptr<float[]> dzt(new float[k * n]), dxt(new float[c * n]);
      transpose(dz, k, n, k, dzt.get(), n, executor);
      GemmNest g;
      g.m = c, g.n = n, g.r = k;
      g.a = p.w, g.lda = k;
      g.b = dzt.get(), g.ldb = n;
      g.out = dxt.get(), g.ldo = n, g.isa = p.isa;
      g.out_t = p.dx, g.ldt = c;
      if (std::string e = run_gemm(g, executor); !e.empty()) return e;
    } else {
      // dx (n x c) = dz (n x k) @ w^T, each w^T panel packed just before its use.
      GemmNest g;
      g.m = n, g.n = c, g.r = k;
      g.a = dz, g.lda = k;
      g.b = p.w, g.ldb = k, g.b_transposed = true;
      g.out = p.dx, g.ldo = c, g.isa = p.isa;
      if (std::string e = run_gemm(g, executor); !e.empty()) return e;
    }
  }
  if (p.dw && c > 0) {  // weight-update: dw (c x k) = x^T (c x n, packed once) @ dz
    std::unique_ptr<float[]> xt(new float[c * n]);  // not zeroed: fully written
    transpose(p.x, c, n, c, xt.get(), n, executor);
    GemmNest g;
    g.m = c, g.n = k, g.r = n;
    g.a = xt.get(), g.lda = n;
    g.b = dz, g.ldb = k;
    g.out = p.dw, g.ldo = k, g.isa = p.isa;
    if (std::string e = run_gemm(g, executor); !e.empty()) return e;
  }
  return "";
}

}  // namespace jbr::prim
