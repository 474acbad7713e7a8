#include "primitives/lstm.h"
#include "primitives/lstm_tuning.h"
#include "primitives/elements.h"
#include "primitives/scratch.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace jbr::prim {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

using namespace lstm_tuning;  // block sizes: lstm_tuning.h

// Row index of (step t, batch n) in a sequence tensor, and the row distance between
// consecutive batch rows of one step (the factor a step's leading dimension carries).
struct Rows {
  int64_t steps, batch;
  bool time_major;
  int64_t row(int64_t t, int64_t n) const { return time_major ? t * batch + n : n * steps + t; }
  int64_t batch_stride() const { return time_major ? 1 : steps; }
};

// dst (cols x rows, leading dimension ldd) = src (rows x cols, lds) transposed: the kernel
// layer's vectorised transposes.
void transpose_block(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                     int64_t ldd, Isa isa) {
  transpose_f32(src, lds, rows, cols, dst, ldd, isa);
}
void transpose_block(const uint16_t* src, int64_t lds, int64_t rows, int64_t cols, uint16_t* dst,
                     int64_t ldd, Isa isa) {
  transpose_bf16(src, lds, rows, cols, dst, ldd, isa);
}

// B (k x n) as contiguous column panels of `width` columns (leading dimension width), so a
// kernel call streams its B block linearly instead of one row per page. With transposed,
// B is src^T (src is n x k, leading dimension ld). With vnni (bfloat16 on avx512bf16
// and amx: wants_vnni_b) each panel is in the pair layout (brgemm.h: pack_b_vnni), so the kernel
// calls need not pack B again each time.
template <typename T>
struct Panels {
  Buffer<T> data;
  int64_t k = 0, width = 0, count = 0;
  bool vnni = false;
  int64_t size() const { return vnni ? vnni_elements(k, width) : k * width; }  // per panel
  int64_t ld() const { return vnni ? vnni_tile_ld(k) : width; }  // the kernel's ldb
  const T* panel(int64_t j) const { return data.get() + j * size(); }
};

template <typename T>
Panels<T> pack_panels(const Executor* ex, Isa isa, const T* src, int64_t ld, bool transposed,
                      int64_t k, int64_t n, int64_t width) {
  Panels<T> p{Buffer<T>(), k, width, ceil_div(n, width), wants_vnni_b(isa, dtype_of<T>())};
  p.data = work_buffer<T>(p.count * p.size());
  parallel_for(ex, p.count, [&](int64_t j) {
    const int64_t j0 = j * width, w = std::min(width, n - j0);
    T* dst = p.data.get() + j * p.size();
    if constexpr (!std::is_same_v<T, float>) {
      if (p.vnni) {
        thread_local std::vector<T> plain;  // the transposed panel before its packing
        const T* b = src + j0;
        int64_t ldb = ld;
        if (transposed) {
          plain.resize(k * w);
          transpose_block(src + j0 * ld, ld, w, k, plain.data(), w, isa);
          b = plain.data(), ldb = w;
        }
        pack_b_vnni(b, ldb, k, w, dst, p.ld());
        return;
      }
    }
    if (transposed) {
      transpose_block(src + j0 * ld, ld, w, k, dst, width, isa);
    } else {
      for (int64_t r = 0; r < k; ++r) std::copy_n(src + r * ld + j0, w, dst + r * width);
    }
  });
  return p;
}

// Kernel calls C = act(beta * C + A @ B + bias) on one block, B the first n columns of
// panel j of `b`, with the first validation failure remembered (calls happen inside
// parallel loops). A long reduction is cut into chunks of at most 4 * kChunk bytes of an A
// row (beta = 1 after the first, bias and activation on the last) so that the A rows and
// the B block of a chunk stay in L2 while the kernel sweeps the block's tiles.
class Gemm {
 public:
  explicit Gemm(Isa isa) : isa_(isa) {}

  template <typename T>
  void operator()(int64_t m, int64_t n, const T* a, int64_t lda, const Panels<T>& b, int64_t j,
                  float* c, int64_t ldc, float beta, Activation act = Activation::none,
                  const float* bias = nullptr) {
    const int64_t k = b.k;
    const int64_t chunks = ceil_div(k, kChunk * 4 / int64_t(sizeof(T)));
    int64_t kc = ceil_div(k, chunks);
    // The kernel reads a VNNI B in whole 32-row pieces: chunks start at multiples of 32.
    if (b.vnni) kc = ceil_div(kc, 32) * 32;
    for (int64_t p0 = 0; p0 < k; p0 += kc) {
      const bool last = p0 + kc >= k;
      Desc d;
      d.m = m, d.n = n, d.k = std::min(kc, k - p0), d.lda = lda, d.ldb = b.ld(), d.ldc = ldc;
      d.beta = p0 == 0 ? beta : 1.0f, d.isa = isa_, d.b_vnni = b.vnni;
      d.a_dtype = d.b_dtype = dtype_of<T>();
      d.activation = last ? act : Activation::none, d.has_bias = last && bias != nullptr;
      if (std::string error = validate(d); !error.empty()) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (error_.empty()) error_ = "lstm: " + error;
        return;
      }
      get_kernel(d)(Batch::strided(a + p0, 0, b.panel(j) + b_row_offset(p0, b.width, b.vnni), 0, 1), c, 1.0f,
                    d.has_bias ? bias : nullptr);
    }
  }

  std::string error() {
    std::lock_guard<std::mutex> lock(mutex_);
    return error_;
  }
  Isa isa() const { return isa_; }

 private:
  Isa isa_;
  std::mutex mutex_;
  std::string error_;
};

// C (m x n) = A (m x k) @ B + bias, B given as panels, split into (row block x panel)
// items, enough of them to keep every thread busy.
template <typename T>
void parallel_gemm(Gemm& gemm, const Executor* ex, int64_t m, int64_t n, const T* a,
                   int64_t lda, const Panels<T>& b, float* c, int64_t ldc,
                   const float* bias = nullptr) {
  const int64_t target = 4 * (ex ? ex->num_workers() + 1 : 1);
  int64_t bm = 64;
  while (ceil_div(m, bm) * b.count < target && bm > 16) bm /= 2;
  parallel_for(ex, ceil_div(m, bm) * b.count, [&](int64_t item) {
    const int64_t i0 = item / b.count * bm, j = item % b.count, j0 = j * b.width;
    gemm(std::min(bm, m - i0), std::min(b.width, n - j0), a + i0 * lda, lda, b, j,
         c + i0 * ldc + j0, ldc, 0.0f, Activation::none, bias ? bias + j0 : nullptr);
  });
}

// dst (cols x rows, row-major) = transpose of the matrix whose row r is src_row(r)[0, cols),
// in tiles; each run of rows that lie ld apart in memory is one vectorised transpose.
template <typename T, class SrcRow>
void transpose(const Executor* ex, Isa isa, int64_t rows, int64_t cols, int64_t ld,
               const SrcRow& src_row, T* dst) {
  constexpr int64_t B = 64;
  const int64_t tiles_c = ceil_div(cols, B);
  parallel_for(ex, ceil_div(rows, B) * tiles_c, [&](int64_t item) {
    const int64_t r0 = item / tiles_c * B, c0 = item % tiles_c * B;
    const int64_t r1 = std::min(rows, r0 + B), c1 = std::min(cols, c0 + B);
    for (int64_t r = r0, end; r < r1; r = end) {
      const T* s = src_row(r);
      for (end = r + 1; end < r1 && src_row(end) == s + (end - r) * ld;) ++end;
      transpose_block(s + c0, ld, end - r, c1 - c0, dst + c0 * rows + r, rows, isa);
    }
  });
}

// Work items of one step: blocks of batch rows x blocks of hidden units (each unit block
// is covered in all four gates by one item, so the cell update stays on the hot block).
// Unit blocks stay at least min_units wide (bfloat16: 32, the kernel's column group).
struct StepBlocking {
  int64_t rows, units, row_blocks, unit_blocks;
  StepBlocking(int64_t batch, int64_t hidden, const Executor* ex, int64_t min_units) {
    const int64_t target = 2 * (ex ? ex->num_workers() + 1 : 1);
    rows = batch, units = kMaxUnits;
    auto items = [&] { return ceil_div(batch, rows) * ceil_div(hidden, units); };
    while (items() < target && units > min_units) units /= 2;
    while (items() < target && rows > 8) rows = ceil_div(rows, 2);
    row_blocks = ceil_div(batch, rows), unit_blocks = ceil_div(hidden, units);
  }
  int64_t items() const { return row_blocks * unit_blocks; }
};

template <typename T>
int64_t min_units() { return dtype_of<T>() == DType::bf16 ? 32 : 16; }

template <typename T>
std::string forward(const LstmForward& p, const Executor* ex) {
  const LstmShape& s = p.shape;
  const int64_t T_ = s.steps, N = s.batch, C = s.in, K = s.hidden, G = 4 * K;
  const Rows rows{T_, N, s.time_major};
  const int64_t ldn = rows.batch_stride();
  const T *x = static_cast<const T*>(p.x), *h0 = static_cast<const T*>(p.h0);
  T* hs = static_cast<T*>(p.hs);
  Gemm gemm(p.isa);

  // The input products of every step in one well-parallelised GEMM: gates = x W_ih + bias.
  parallel_gemm(gemm, ex, T_ * N, G, x, C,
                pack_panels(ex, p.isa, static_cast<const T*>(p.w_ih), G, false, C, G, kPanel), p.gates, G,
                p.bias);

  // W_hh per gate in panels of one unit block, so that an item's four B blocks are linear.
  const StepBlocking blk(N, K, ex, min_units<T>());
  Panels<T> w_hh[4];
  for (int gate = 0; gate < 4; ++gate)
    w_hh[gate] = pack_panels(ex, p.isa, static_cast<const T*>(p.w_hh) + gate * K, G, false, K, K, blk.units);

  for (int64_t t = 0; t < T_; ++t) {
    const T* h_prev = t ? hs + rows.row(t - 1, 0) * K : h0;
    const float* c_prev = t ? p.cs + rows.row(t - 1, 0) * K : p.c0;
    const int64_t ld_prev = t ? ldn * K : K;
    parallel_for(ex, blk.items(), [&](int64_t item) {
      const int64_t jb = item % blk.unit_blocks, n0 = item / blk.unit_blocks * blk.rows;
      const int64_t j0 = jb * blk.units;
      const int64_t m = std::min(blk.rows, N - n0), u = std::min(blk.units, K - j0);
      // z += h_{t-1} W_hh on each gate's block, activated in the kernel's epilogue.
      float* g = p.gates + rows.row(t, n0) * G + j0;
      const int64_t ldg = ldn * G;
      for (int gate = 0; gate < 4; ++gate)
        gemm(m, u, h_prev + n0 * ld_prev, ld_prev, w_hh[gate], jb, g + gate * K, ldg, 1.0f,
             gate == 2 ? Activation::tanh : Activation::sigmoid);
      float tanh_c[kMaxUnits];
      for (int64_t r = 0; r < m; ++r) {
        const float *gi = g + r * ldg, *gf = gi + K, *gg = gi + 2 * K, *go = gi + 3 * K;
        const float* cp = c_prev + (n0 + r) * ld_prev + j0;
        float* c = p.cs + rows.row(t, n0 + r) * K + j0;
        T* h = hs + rows.row(t, n0 + r) * K + j0;
        for (int64_t j = 0; j < u; ++j) tanh_c[j] = c[j] = gf[j] * cp[j] + gi[j] * gg[j];
        apply_activation(Activation::tanh, tanh_c, u, gemm.isa());
        for (int64_t j = 0; j < u; ++j) store(go[j] * tanh_c[j], h + j);
      }
    });
  }
  return gemm.error();
}

template <typename T>
std::string backward(const LstmBackward& p, const Executor* ex) {
  const LstmShape& s = p.shape;
  const int64_t T_ = s.steps, N = s.batch, C = s.in, K = s.hidden, G = 4 * K, R = T_ * N;
  const Rows rows{T_, N, s.time_major};
  const int64_t ldn = rows.batch_stride();
  const T *x = static_cast<const T*>(p.x), *h0 = static_cast<const T*>(p.h0);
  const T* hs = static_cast<const T*>(p.hs);
  Gemm gemm(p.isa);

  // Gate pre-activation gradients of every step (in T: the operand of the GEMMs that
  // consume them), kept for the GEMMs after the loop.
  Buffer<T> dgates = work_buffer<T>(R * G);
  Buffer<float> dh = work_buffer<float>(N * K);
  const StepBlocking blk(N, K, ex, min_units<T>());
  // dbias = column sums of dgates (float32, before any rounding), summed per row block on
  // the hot block, then over blocks.
  Buffer<float> dbias_part = work_buffer<float>(blk.row_blocks * G);
  std::fill(dbias_part.get(), dbias_part.get() + blk.row_blocks * G, 0.0f);
  const Panels<T> w_hh_t =
      pack_panels(ex, p.isa, static_cast<const T*>(p.w_hh), G, true, G, K, blk.units);  // W_hh^T
  std::memcpy(p.dc0, p.d_cT, sizeof(float) * N * K);  // dc, carried back through time

  for (int64_t t = T_ - 1; t >= 0; --t) {
    parallel_for(ex, blk.items(), [&](int64_t item) {
      const int64_t jb = item % blk.unit_blocks, n0 = item / blk.unit_blocks * blk.rows;
      const int64_t j0 = jb * blk.units;
      const int64_t m = std::min(blk.rows, N - n0), u = std::min(blk.units, K - j0);
      // dh_t = d_hs[t] + dgates_{t+1} W_hh^T on this block.
      float* dhb = dh.get() + n0 * K + j0;
      for (int64_t r = 0; r < m; ++r)
        std::memcpy(dhb + r * K, p.d_hs + rows.row(t, n0 + r) * K + j0, sizeof(float) * u);
      if (t + 1 < T_)
        gemm(m, u, dgates.get() + rows.row(t + 1, n0) * G, ldn * G, w_hh_t, jb, dhb, K, 1.0f);
      float tanh_c[kMaxUnits];
      for (int64_t r = 0; r < m; ++r) {
        const int64_t row = rows.row(t, n0 + r);
        const float *gi = p.gates + row * G + j0, *gf = gi + K, *gg = gi + 2 * K, *go = gi + 3 * K;
        const float* c = p.cs + row * K + j0;
        const float* cp = t ? p.cs + rows.row(t - 1, n0 + r) * K + j0 : p.c0 + (n0 + r) * K + j0;
        const float* dhr = dhb + r * K;
        float* dc = p.dc0 + (n0 + r) * K + j0;
        T* di = dgates.get() + row * G + j0;
        T *df = di + K, *dg = di + 2 * K, *d_o = di + 3 * K;
        float* db = dbias_part.get() + n0 / blk.rows * G + j0;
        std::memcpy(tanh_c, c, sizeof(float) * u);
        apply_activation(Activation::tanh, tanh_c, u, gemm.isa());
        for (int64_t j = 0; j < u; ++j) {
          const float tc = tanh_c[j], i = gi[j], f = gf[j], g = gg[j], o = go[j];
          const float dcv = dc[j] + dhr[j] * o * (1.0f - tc * tc);
          const float vi = dcv * g * i * (1.0f - i), vf = dcv * cp[j] * f * (1.0f - f);
          const float vg = dcv * i * (1.0f - g * g), vo = dhr[j] * tc * o * (1.0f - o);
          dc[j] = dcv * f;
          store(vi, di + j), store(vf, df + j), store(vg, dg + j), store(vo, d_o + j);
          db[j] += vi, db[K + j] += vf, db[2 * K + j] += vg, db[3 * K + j] += vo;
        }
      }
    });
  }

  // dh0 = dgates_0 W_hh^T; dx = dgates W_ih^T for every step at once.
  parallel_gemm(gemm, ex, N, K, dgates.get() + rows.row(0, 0) * G, ldn * G, w_hh_t, p.dh0, K);
  parallel_gemm(gemm, ex, R, C, dgates.get(), G,
                pack_panels(ex, p.isa, static_cast<const T*>(p.w_ih), G, true, G, C, kPanel), p.dx, C);
  // Weight gradients reduce over every (step, batch) row: dW = A^T dgates with A = x for
  // W_ih and A = h_{t-1} (h0 at t = 0) for W_hh, the transposes packed once.
  {
    const Panels<T> d_panels = pack_panels<T>(ex, p.isa, dgates.get(), G, false, R, G, kPanel);
    Buffer<T> a_t = work_buffer<T>(std::max(C, K) * R);
    transpose(ex, p.isa, R, C, C, [&](int64_t r) { return x + r * C; }, a_t.get());
    parallel_gemm(gemm, ex, C, G, a_t.get(), R, d_panels, p.dw_ih, G);
    const int64_t back = s.time_major ? N : 1;  // row distance to the previous step
    transpose(ex, p.isa, R, K, K, [&](int64_t r) {
      const bool first = s.time_major ? r < N : r % T_ == 0;
      return first ? h0 + (s.time_major ? r : r / T_) * K : hs + (r - back) * K;
    }, a_t.get());
    parallel_gemm(gemm, ex, K, G, a_t.get(), R, d_panels, p.dw_hh, G);
  }
  for (int64_t j = 0; j < G; ++j) {
    float sum = 0.0f;
    for (int64_t b = 0; b < blk.row_blocks; ++b) sum += dbias_part[b * G + j];
    p.dbias[j] = sum;
  }
  return gemm.error();
}

}  // namespace

std::string lstm_forward(const LstmForward& p, const Executor* ex) {
  return with_type(p.dtype, [&](auto zero) { return forward<decltype(zero)>(p, ex); });
}

std::string lstm_backward(const LstmBackward& p, const Executor* ex) {
  return with_type(p.dtype, [&](auto zero) { return backward<decltype(zero)>(p, ex); });
}

}  // namespace jbr::prim
