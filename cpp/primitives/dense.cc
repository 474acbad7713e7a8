#include "primitives/dense.h"
#include "primitives/dense_tuning.h"
#include "primitives/elements.h"
#include "primitives/scratch.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace jbr::prim {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t threads_of(const Executor* executor) {
  return executor ? executor->num_workers() + 1 : 1;
}

using namespace dense_tuning;  // block sizes and packing thresholds: dense_tuning.h

// dst[0..size) = src[0..size), rounded to dst's dtype.
void store_row(const float* __restrict src, void* __restrict dst, DType dtype, int64_t size) {
  with_type(dtype, [&](auto zero) {
    auto* d = static_cast<decltype(zero)*>(dst);
    for (int64_t i = 0; i < size; ++i) store(src[i], d + i);
    return 0;
  });
}

// dst[0..size) = act(src[0..size)) in dst's dtype.
void activate_row(Activation act, const float* src, void* dst, DType dtype, int64_t size, Isa isa) {
  thread_local std::vector<float> row;
  float* f = static_cast<float*>(dst);
  if (dtype != DType::f32) row.resize(size), f = row.data();
  std::memcpy(f, src, sizeof(float) * size);
  apply_activation(act, f, size, isa);
  if (dtype != DType::f32) store_row(f, dst, dtype, size);
}

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols (the kernel layer's
// vectorised transposes).
void transpose_block(const float* __restrict src, int64_t lds, int64_t rows, int64_t cols,
                     float* __restrict dst, int64_t ldd) {
  transpose_f32(src, lds, rows, cols, dst, ldd, active_isa());
}
void transpose_block(const uint16_t* __restrict src, int64_t lds, int64_t rows, int64_t cols,
                     uint16_t* __restrict dst, int64_t ldd) {
  transpose_bf16(src, lds, rows, cols, dst, ldd, active_isa());
}

// dst (cols x rows, ldd) = src (rows x cols, lds)^T, in parallel over column slabs of src.
template <typename T>
void transpose(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd,
               const Executor* executor) {
  constexpr int64_t slab = 64;
  parallel_for(executor, ceil_div(cols, slab), [&](int64_t s) {
    const int64_t j0 = s * slab;
    transpose_block(src + j0, lds, rows, std::min(slab, cols - j0), dst + j0 * ldd, ldd);
  });
}

// A float32 block (rows x cols, lds) transposed into dst (ldd) of dtype `dtype`.
void transpose_out(const float* src, int64_t lds, int64_t rows, int64_t cols, void* dst,
                   DType dtype, int64_t ldd) {
  if (dtype == DType::f32) return transpose_block(src, lds, rows, cols, static_cast<float*>(dst), ldd);
  thread_local std::vector<uint16_t> tile;
  tile.resize(rows * cols);
  for (int64_t i = 0; i < rows; ++i) store_row(src + i * lds, tile.data() + i * cols, dtype, cols);
  transpose_block(tile.data(), cols, rows, cols, static_cast<uint16_t*>(dst), ldd);
}

// One GEMM as a loop nest of brgemm calls:
//   out[m x n] (ldo) = epilogue(A[m x r] (lda) @ B[r x n])
// where B is either plain (b, ldb) or, with b_transposed, the transpose of b (n x r, ldb).
// Work items are (column strip, row group); each walks the reduction in chunks, and packs
// the strip's (chunk x strip) B panel into per-thread scratch just before its row blocks
// use it: always when transposed, when plain only where enough rows share the copy.
// A and B have element type T; out is float32 or bfloat16 (out_dtype).
template <typename T>
struct GemmNest {
  int64_t m = 0, n = 0, r = 0;
  const T* a = nullptr;
  int64_t lda = 0;
  const T* b = nullptr;
  int64_t ldb = 0;
  bool b_transposed = false;
  void* out = nullptr;
  DType out_dtype = DType::f32;
  int64_t ldo = 0;
  const float* bias = nullptr;  // epilogue, on the last reduction chunk
  Activation activation = Activation::none;
  // When set (out must then be float32): `out` gets the pre-activation (bias only in the
  // epilogue) and act_out (ldo) gets activation(out), computed from the hot block.
  void* act_out = nullptr;
  // When set (out float32): each finished out block is also written transposed here (ld
  // ldt), from cache.
  void* out_t = nullptr;
  int64_t ldt = 0;
  DType side_dtype = DType::f32;  // of act_out and out_t
  bool stream_out = false;  // non-temporal stores for out (GemmPlan decides)
  Isa isa = Isa::ref;
};

// A (rows x depth, lda) @ B (depth x cols, ldb) into c (ldc, c_dtype), as full
// kReduceBlock-deep blocks in one batch-reduce call plus a tail call. first: overwrite c
// (beta 0), else accumulate; last: apply the epilogue (bias: this block's columns).
// b_vnni: B is a panel in the pair layout (ldb: its tiles' distance, brgemm.h).
template <typename T>
void reduce_into(const GemmNest<T>& g, const T* a, const T* b, int64_t ldb, bool b_vnni,
                 int64_t rows, int64_t cols, int64_t depth, void* c, int64_t ldc,
                 DType c_dtype, const float* bias, bool first, bool last) {
  const int64_t kb = std::min(kReduceBlock, depth);
  const int64_t full = depth / kb, tail = depth - full * kb;
  Desc d;
  d.m = rows, d.n = cols, d.lda = g.lda, d.ldb = ldb, d.ldc = ldc, d.isa = g.isa;
  d.b_vnni = b_vnni;
  d.a_dtype = d.b_dtype = dtype_of<T>(), d.c_dtype = c_dtype;
  d.stream_c = g.stream_out;
  const Activation epilogue_act = g.act_out ? Activation::none : g.activation;
  auto call = [&](const T* ab, const T* bb, int64_t k, int64_t count, bool beta0,
                  bool epilogue) {
    d.k = k;
    d.beta = beta0 ? 0.0f : 1.0f;
    d.has_bias = epilogue && bias != nullptr;
    d.activation = epilogue ? epilogue_act : Activation::none;
    get_kernel(d)(Batch::strided(ab, k, bb, b_row_offset(k, ldb, b_vnni), count), c, 1.0f,
                  d.has_bias ? bias : nullptr);
  };
  call(a, b, kb, full, first, last && tail == 0);
  if (tail > 0) call(a + full * kb, b + b_row_offset(full * kb, ldb, b_vnni), tail, 1, false, last);
}

// bfloat16 A rows a multiple of 4 KB apart are copied with padded rows (dense_tuning.h, kPadStrips).
template <typename T>
bool pad_a(const GemmNest<T>& g) {
  return !std::is_same_v<T, float> && rows_page_apart<T>(g.lda) && g.n >= kPadStrips * kStripCols;
}

// A GemmNest cut into independent work items, (column strip, row group) pairs: run_item(i)
// for every i < items, in any order and on any threads, computes the whole GEMM. Separate
// from running it so that the two GEMMs of a backward pass can run as parallel lanes.
template <typename T>
class GemmPlan {
 public:
  int64_t items = 0;

  // Empty on success, else why the nest cannot run.
  std::string plan(const GemmNest<T>& nest, int64_t threads) {
    g_ = nest;
    if (g_.m == 0 || g_.n == 0) return "";
    if (g_.out_dtype != DType::f32 && (g_.act_out || g_.out_t))
      return "dense: an output with side outputs must be float32";
    if (pad_a(g_)) {
      padded_lda_ = g_.r + 64 / sizeof(T);
      if (rows_page_apart<T>(padded_lda_)) padded_lda_ += 64 / sizeof(T);
      padded_a_ = work_buffer<T>(g_.m * padded_lda_);
    }
    vnni_ = wants_vnni_b(g_.isa, dtype_of<T>());
    // Validate the shapes the nest will ask for (they differ only in m, n, k, beta, epilogue).
    Desc probe;
    probe.m = std::min(g_.m, kRowTarget), probe.n = std::min(g_.n, kStripCols);
    probe.k = std::min(g_.r, kReduceBlock);
    probe.lda = padded_a_ ? padded_lda_ : g_.lda, probe.ldb = g_.b_transposed ? probe.n : g_.ldb;
    if (vnni_) probe.ldb = vnni_tile_ld(probe.k), probe.b_vnni = true;
    probe.ldc = g_.ldo;
    probe.a_dtype = probe.b_dtype = dtype_of<T>(), probe.c_dtype = g_.out_dtype;
    probe.isa = g_.isa;
    if (std::string e = validate(probe); !e.empty()) return e;
    // Row blocks. float32: kRowTarget rows each, the last one short. (Splitting m evenly,
    // as on Zen 4, gives blocks like 57 rows whose register tiles end in a short one; on
    // the Xeon, one thread: 128x512x512 forward 484-486 -> 452-467 us in 6 of 7 runs, the
    // notebook MLP step 2.74 -> 2.69-2.70 ms; its backward swung 1.06-1.35 ms either way.)
    // bfloat16: about kRowTarget rows, a multiple of the register block; its blocks (6 rows
    // of 64 columns) never split a power of two evenly, so the last one is short.
    if (std::is_same_v<T, float>) {
      bm_ = kRowTarget;
    } else {
      const int64_t tile_rows = get_kernel(probe).rows_per_block;
      bm_ = tile_rows * std::max<int64_t>(1, kRowTarget / tile_rows);
      if (g_.m % bm_ != 0) bm_ = ceil_div(ceil_div(g_.m, ceil_div(g_.m, bm_)), tile_rows) * tile_rows;
    }
    // Row groups of about kGroupRows rows; smaller groups where there would be too few
    // items for the threads.
    strips_ = ceil_div(g_.n, kStripCols);
    const int64_t row_blocks = ceil_div(g_.m, bm_);
    // (A transposed B panel costs more to pack than a copy: four times larger groups.)
    const int64_t target_rows = g_.b_transposed ? 4 * kGroupRows : kGroupRows;
    int64_t group_blocks = std::clamp<int64_t>(target_rows / bm_, 1, row_blocks);
    while (group_blocks > 1 && strips_ * ceil_div(row_blocks, group_blocks) < 4 * threads)
      group_blocks = ceil_div(group_blocks, 2);
    const int64_t groups = ceil_div(row_blocks, group_blocks);
    group_blocks = ceil_div(row_blocks, groups);  // balanced: no runt group at the end
    group_rows_ = group_blocks * bm_;
    chunk_ = std::min<int64_t>(g_.r, kReduceChunk * sizeof(float) / sizeof(T));
    // (A VNNI B is always packed: once per panel here, else by every kernel call.)
    // Rows a multiple of 4 KB apart are packed even for few rows: in place, a strip's panel
    // maps onto 1/32 of L2's sets and does not stay there between row blocks.
    pack_ = vnni_ || g_.b_transposed ||
            (g_.ldb >= kPackLdb && (group_rows_ >= kPackRows || rows_page_apart<T>(g_.ldb)));
    // A bfloat16 out block that takes several kernel calls (several chunks, or a tail block)
    // is summed in float32 scratch and rounded into out once, after the last.
    accumulate_ = g_.out_dtype != DType::f32 &&
                  (g_.r > chunk_ || (g_.r > kReduceBlock && g_.r % kReduceBlock != 0));
    // A large float32 out that one kernel call per block finishes (one chunk, no tail
    // call, nothing read back from it) streams past the caches.
    const bool one_call = g_.r <= chunk_ && (g_.r <= kReduceBlock || g_.r % kReduceBlock == 0);
    g_.stream_out = one_call && !accumulate_ && !g_.act_out && !g_.out_t &&
                    g_.out_dtype == DType::f32 && g_.m * g_.n * int64_t{sizeof(float)} >= dense_stream_bytes();
    items = strips_ * groups;
    return "";
  }

  // The padded copy of A, where plan() asked for one: run before any item.
  void copy_a(const Executor* executor) {
    if (!padded_a_) return;
    constexpr int64_t rows = 64;
    parallel_for(executor, ceil_div(g_.m, rows), [&](int64_t b) {
      for (int64_t i = b * rows; i < std::min(g_.m, (b + 1) * rows); ++i)
        std::memcpy(padded_a_.get() + i * padded_lda_, g_.a + i * g_.lda, sizeof(T) * g_.r);
    });
    g_.a = padded_a_.get(), g_.lda = padded_lda_;
  }

  // Strips vary fastest, so items running at the same time share their A block.
  void run_item(int64_t item) const {
    const int64_t strip = item % strips_, group = item / strips_;
    const int64_t col0 = strip * kStripCols, cols = std::min(kStripCols, g_.n - col0);
    const int64_t row_begin = group * group_rows_, row_end = std::min(g_.m, row_begin + group_rows_);
    const int64_t out_size = size_of(g_.out_dtype), side_size = size_of(g_.side_dtype);
    const int64_t panel_size = vnni_ ? vnni_elements(chunk_, cols) : chunk_ * cols;
    thread_local std::vector<T> panel, plain;  // plain: B^T's chunk before its VNNI packing
    thread_local std::vector<float> sums;
    if (pack_ && panel.size() < static_cast<size_t>(panel_size)) panel.resize(panel_size);
    if (vnni_ && g_.b_transposed && plain.size() < static_cast<size_t>(chunk_ * cols))
      plain.resize(chunk_ * cols);
    if (accumulate_ && sums.size() < static_cast<size_t>(group_rows_ * cols))
      sums.resize(group_rows_ * cols);
    for (int64_t r0 = 0; r0 < g_.r; r0 += chunk_) {
      const int64_t depth = std::min(chunk_, g_.r - r0);
      const T* b = g_.b + r0 * g_.ldb + col0;
      int64_t ldb = g_.ldb;
      if (g_.b_transposed) {
        T* dst = vnni_ ? plain.data() : panel.data();
        transpose_block(g_.b + col0 * g_.ldb + r0, g_.ldb, cols, depth, dst, cols);
        b = dst, ldb = cols;
      } else if (pack_ && !vnni_) {
        for (int64_t i = 0; i < depth; ++i)
          std::memcpy(panel.data() + i * cols, b + i * g_.ldb, sizeof(T) * cols);
        b = panel.data(), ldb = cols;
      }
      if constexpr (!std::is_same_v<T, float>) {
        if (vnni_) {
          pack_b_vnni(b, ldb, depth, cols, panel.data(), vnni_tile_ld(depth));
          b = panel.data(), ldb = vnni_tile_ld(depth);
        }
      }
      const bool first = r0 == 0, last = r0 + depth == g_.r;
      for (int64_t row0 = row_begin; row0 < row_end; row0 += bm_) {
        const int64_t rows = std::min(bm_, row_end - row0);
        char* out = static_cast<char*>(g_.out) + (row0 * g_.ldo + col0) * out_size;
        void* c = out;
        int64_t ldc = g_.ldo;
        if (accumulate_) c = sums.data() + (row0 - row_begin) * cols, ldc = cols;
        reduce_into(g_, g_.a + row0 * g_.lda + r0, b, ldb, vnni_, rows, cols, depth, c, ldc,
                    accumulate_ ? DType::f32 : g_.out_dtype, g_.bias ? g_.bias + col0 : nullptr,
                    first, last);
        if (!last) continue;
        const float* block = static_cast<const float*>(c);  // float32 from here on
        if (accumulate_)
          for (int64_t i = 0; i < rows; ++i)
            store_row(block + i * ldc, out + i * g_.ldo * out_size, g_.out_dtype, cols);
        if (g_.act_out)
          for (int64_t i = 0; i < rows; ++i)
            activate_row(g_.activation, block + i * ldc,
                         static_cast<char*>(g_.act_out) + ((row0 + i) * g_.ldo + col0) * side_size,
                         g_.side_dtype, cols, g_.isa);
        if (g_.out_t)
          transpose_out(block, ldc, rows, cols,
                        static_cast<char*>(g_.out_t) + (col0 * g_.ldt + row0) * side_size,
                        g_.side_dtype, g_.ldt);
      }
    }
  }

 private:
  GemmNest<T> g_;
  int64_t bm_ = 0, strips_ = 0, group_rows_ = 0, chunk_ = 0;
  bool pack_ = false, accumulate_ = false;
  bool vnni_ = false;  // B panels packed in the VNNI layout (wants_vnni_b)
  Buffer<T> padded_a_;
  int64_t padded_lda_ = 0;
};

template <typename T>
std::string run_gemm(const GemmNest<T>& g, const Executor* executor) {
  GemmPlan<T> plan;
  if (std::string e = plan.plan(g, threads_of(executor)); !e.empty()) return e;
  plan.copy_a(executor);
  parallel_for(executor, plan.items, [&](int64_t i) { plan.run_item(i); });
  return "";
}

// Fills y (n x k) with act(bias or 0) (and preact with bias or 0): the forward of c == 0.
void bias_only(const DenseForward& p) {
  std::vector<float> row(p.k);
  for (int64_t j = 0; j < p.k; ++j) row[j] = p.bias ? p.bias[j] : 0.0f;
  for (int64_t i = 0; i < p.n; ++i) {
    if (p.preact) std::memcpy(p.preact + i * p.k, row.data(), sizeof(float) * p.k);
    activate_row(p.activation, row.data(), static_cast<char*>(p.y) + i * p.k * size_of(p.out),
                 p.out, p.k, p.isa);
  }
}

// d act(z) / dz * dy in float32, from y (relu, sigmoid, tanh) or z (gelu, tanh form);
// dy and saved are float or uint16_t (bfloat16).
template <typename G, typename S>
void activation_grad(Activation act, const G* __restrict dy, const S* __restrict saved,
                     float* __restrict dz, int64_t size) {
  switch (act) {
    case Activation::none:
      for (int64_t i = 0; i < size; ++i) dz[i] = to_float(dy[i]);
      return;
    case Activation::relu:  // select by bit mask: vectorises, and a branch would mispredict
      for (int64_t i = 0; i < size; ++i) {
        const float g = to_float(dy[i]);
        uint32_t bits;
        std::memcpy(&bits, &g, sizeof bits);
        bits &= 0u - static_cast<uint32_t>(to_float(saved[i]) > 0.0f);
        std::memcpy(dz + i, &bits, sizeof bits);
      }
      return;
    case Activation::sigmoid:
      for (int64_t i = 0; i < size; ++i) {
        const float s = to_float(saved[i]);
        dz[i] = to_float(dy[i]) * s * (1.0f - s);
      }
      return;
    case Activation::tanh:
      for (int64_t i = 0; i < size; ++i) {
        const float t = to_float(saved[i]);
        dz[i] = to_float(dy[i]) * (1.0f - t * t);
      }
      return;
    case Activation::gelu:
      for (int64_t i = 0; i < size; ++i) {
        // gelu(z) = 0.5 z (1 + tanh(u)), u = s (z + 0.044715 z^3)
        constexpr float s = 0.7978845608028654f, a = 0.044715f;
        const float z = to_float(saved[i]);
        const float t = std::tanh(s * (z + a * z * z * z));
        const float du = s * (1.0f + 3.0f * a * z * z);
        dz[i] = to_float(dy[i]) * (0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * du);
      }
      return;
  }
}

template <typename T>
std::string forward(const DenseForward& p, const Executor* executor) {
  GemmNest<T> g;
  g.m = p.n, g.n = p.k, g.r = p.c;
  g.a = static_cast<const T*>(p.x), g.lda = p.c;
  g.b = static_cast<const T*>(p.w), g.ldb = p.k;
  g.bias = p.bias, g.activation = p.activation, g.isa = p.isa;
  g.ldo = p.k;
  if (p.preact) {
    g.out = p.preact, g.act_out = p.y, g.side_dtype = p.out;
  } else {
    g.out = p.y, g.out_dtype = p.out;
  }
  return run_gemm(g, executor);
}

template <typename T>
std::string backward(const DenseBackward& p, const Executor* executor) {
  const int64_t n = p.n, c = p.c, k = p.k;
  const T* dy = static_cast<const T*>(p.dy);
  // dz = dy * act'(...) (in float32, then rounded to T), and dbias = the column sums of the
  // float32 dz, in one pass over column slabs.
  Buffer<T> dz_store;
  const T* dz = dy;
  if (p.activation != Activation::none) dz_store = work_buffer<T>(n * k), dz = dz_store.get();
  constexpr int64_t slab = 256;
  auto dz_slab = [&](int64_t s) {
    const int64_t j0 = s * slab, cols = std::min(slab, k - j0);
    float sums[slab] = {};
    thread_local std::vector<float> scratch;  // a float32 row of dz, where T is not float
    scratch.resize(slab);
    for (int64_t i = 0; i < n; ++i) {
      if (p.activation == Activation::none) {
        for (int64_t j = 0; j < cols; ++j) sums[j] += to_float(dy[i * k + j0 + j]);
        continue;
      }
      T* dz_row = dz_store.get() + i * k + j0;
      float* row = scratch.data();
      if constexpr (std::is_same_v<T, float>) row = dz_row;
      with_type(p.saved_dtype, [&](auto zero) {
        using S = decltype(zero);
        activation_grad(p.activation, dy + i * k + j0, static_cast<const S*>(p.saved) + i * k + j0,
                        row, cols);
        return 0;
      });
      if constexpr (!std::is_same_v<T, float>) store_row(row, dz_row, dtype_of<T>(), cols);
      for (int64_t j = 0; j < cols; ++j) sums[j] += row[j];
    }
    if (p.dbias) store_row(sums, static_cast<char*>(p.dbias) + j0 * size_of(p.dbias_dtype), p.dbias_dtype, cols);
  };
  // dx and dw are independent GEMMs. Both wanted, on two threads: they run as two lanes,
  // the first thread to take a lane makes its transposed operand and runs its items, so
  // each GEMM's data stays on one core (as when XLA runs its dx and dW dots side by side),
  // and whoever finishes first helps with the other's items; dbias alone (no activation)
  // is a third lane. Otherwise (one GEMM, or more threads than lanes, which would idle
  // through the single-threaded transposes) transposes and items are parallel loops.
  const int64_t threads = threads_of(executor);
  const bool two_lanes = p.dx && p.dw && c > 0 && threads == 2;
  if (p.activation != Activation::none || (p.dbias && !two_lanes))
    parallel_for(executor, ceil_div(k, slab), dz_slab);  // the GEMMs need dz first
  GemmPlan<T> dx_plan, dw_plan;
  Buffer<T> dzt, xt;
  Buffer<float> dxt;
  if (p.dx && c > 0) {
    const T* w = static_cast<const T*>(p.w);
    GemmNest<T> g;
    g.isa = p.isa;
    // Few rows: transposing dz and the result (n (c + k) elements) is cheaper than w
    // (c k): dx^T (c x n, float32) = w (c x k, as it is) @ dz^T, each finished block of
    // it transposed into dx while hot. At twice the margin where w's rows, read in place
    // as A, lie a multiple of 4 KB apart (in the same L1 sets). One thread: 128x512x512
    // 529 -> 461 us, 64x256x256 84 -> 69; 256x1024x1024 would go 3.44 -> 3.64 ms.
    const int64_t margin = rows_page_apart<T>(k) ? 2 : 1;
    if (margin * n * (c + k) < c * k) {
      dzt = work_buffer<T>(k * n);
      dxt = work_buffer<float>(c * n);
      g.m = c, g.n = n, g.r = k;
      g.a = w, g.lda = k;
      g.b = dzt.get(), g.ldb = n;
      g.out = dxt.get(), g.ldo = n;
      g.out_t = p.dx, g.ldt = c, g.side_dtype = p.dx_dtype;
    } else {
      // dx (n x c) = dz (n x k) @ w^T, each w^T panel packed just before its use.
      g.m = n, g.n = c, g.r = k;
      g.a = dz, g.lda = k;
      g.b = w, g.ldb = k, g.b_transposed = true;
      g.out = p.dx, g.out_dtype = p.dx_dtype, g.ldo = c;
    }
    if (std::string e = dx_plan.plan(g, threads); !e.empty()) return e;
  }
  Buffer<T> dzt_w;
  Buffer<float> dwt;
  if (p.dw && c > 0) {
    GemmNest<T> g;
    g.isa = p.isa;
    if (2 * (n + c) * k < n * c) {
      // Few output features (a classifier's last layer): transposing dz and the result
      // (k (n + c) elements) is cheaper than x (n c): dw^T (k x c, float32) = dz^T @ x
      // (as it is), each finished block of it transposed into dw while hot. At twice the
      // margin, since its blocks have only k rows. One thread, with dbias: 128x512x10
      // 25.7 -> 10.1 us, 32x2048x10 29 -> 18, 256x1024x100 357 -> 318; at margin 1,
      // 128x512x64 would go 52 -> 55.
      dzt_w = work_buffer<T>(k * n);
      dwt = work_buffer<float>(k * c);
      g.m = k, g.n = c, g.r = n;
      g.a = dzt_w.get(), g.lda = n;
      g.b = static_cast<const T*>(p.x), g.ldb = c;
      g.out = dwt.get(), g.ldo = c;
      g.out_t = p.dw, g.ldt = k, g.side_dtype = p.dw_dtype;
    } else {
      // dw (c x k) = x^T (c x n, packed once) @ dz.
      xt = work_buffer<T>(c * n);  // not zeroed: fully written
      g.m = c, g.n = k, g.r = n;
      g.a = xt.get(), g.lda = n;
      g.b = dz, g.ldb = k;
      g.out = p.dw, g.out_dtype = p.dw_dtype, g.ldo = k;
    }
    if (std::string e = dw_plan.plan(g, threads); !e.empty()) return e;
  }
  auto prepare_dx = [&](const Executor* ex) {
    if (dzt) transpose(dz, k, n, k, dzt.get(), n, ex);
    dx_plan.copy_a(ex);
  };
  // (dzt and dzt_w are never both made: the few-rows route needs n < k, the few-outputs
  // route 2k < n.)
  auto prepare_dw = [&](const Executor* ex) {
    if (xt) transpose(static_cast<const T*>(p.x), c, n, c, xt.get(), n, ex);
    if (dzt_w) transpose(dz, k, n, k, dzt_w.get(), n, ex);
    dw_plan.copy_a(ex);
  };
  if (!two_lanes) {
    prepare_dx(executor), prepare_dw(executor);
    parallel_for(executor, dx_plan.items + dw_plan.items, [&](int64_t i) {
      i < dx_plan.items ? dx_plan.run_item(i) : dw_plan.run_item(i - dx_plan.items);
    });
    return "";
  }
  std::vector<Lane> lanes = {
      {[&] { prepare_dx(nullptr); }, dx_plan.items, [&](int64_t i) { dx_plan.run_item(i); }},
      {[&] { prepare_dw(nullptr); }, dw_plan.items, [&](int64_t i) { dw_plan.run_item(i); }}};
  if (p.activation == Activation::none && p.dbias)
    lanes.push_back({[&] { for (int64_t s = 0; s < ceil_div(k, slab); ++s) dz_slab(s); }, 0, nullptr});
  parallel_lanes(executor, lanes);
  return "";
}

}  // namespace

std::string dense_forward(const DenseForward& p, const Executor* executor) {
  if (p.n == 0 || p.k == 0) return "";
  if (p.c == 0) return bias_only(p), "";
  return with_type(p.in, [&](auto zero) { return forward<decltype(zero)>(p, executor); });
}

std::string dense_backward(const DenseBackward& p, const Executor* executor) {
  const int64_t n = p.n, c = p.c, k = p.k;
  if (p.dx && n * c > 0 && k == 0) std::memset(p.dx, 0, size_of(p.dx_dtype) * n * c);
  if (p.dw && c * k > 0 && n == 0) std::memset(p.dw, 0, size_of(p.dw_dtype) * c * k);
  if (p.dbias && k > 0 && n == 0) std::memset(p.dbias, 0, size_of(p.dbias_dtype) * k);
  if (n == 0 || k == 0) return "";
  return with_type(p.in, [&](auto zero) { return backward<decltype(zero)>(p, executor); });
}

}  // namespace jbr::prim
