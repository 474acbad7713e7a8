#include "primitives/attention.h"
#include "primitives/elements.h"
#include "primitives/scratch.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

namespace jbr::prim {
namespace {

// JAX's value for a masked logit (jax.nn.dot_product_attention: -0.7 * the float32 max):
// finite, so a row whose every logit is masked has equal logits and averages all values.
constexpr float kMasked = -0.7f * std::numeric_limits<float>::max();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Rows of queries per work item, and keys per block of the running softmax, per input type
// (Ctx::bq, bk): see make_ctx.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void transpose_block(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                     int64_t ldd, Isa isa) {
  transpose_f32(src, lds, rows, cols, dst, ldd, isa);
}
void transpose_block(const uint16_t* src, int64_t lds, int64_t rows, int64_t cols, uint16_t* dst,
                     int64_t ldd, Isa isa) {
  transpose_bf16(src, lds, rows, cols, dst, ldd, isa);
}

// A thread's scratch for one work item, reused across items and calls.
std::vector<float>& scratch_f32(int which, int64_t size) {
  thread_local std::vector<float> buffers[6];
  std::vector<float>& b = buffers[which];
  if (static_cast<int64_t>(b.size()) < size) b.resize(size);
  return b;
}
std::vector<uint16_t>& scratch_bf16(int which, int64_t size) {
  thread_local std::vector<uint16_t> buffers[3];
  std::vector<uint16_t>& b = buffers[which];
  if (static_cast<int64_t>(b.size()) < size) b.resize(size);
  return b;
}

// An operand (B, len, heads, H) re-laid out per (batch, head) as blocks of `block`
// positions, each contiguous: rows (block x H, as stored) or cols (H x block, transposed),
// either as a kernel reads a plain operand (ld: H or block) or in the pair layout of
// pack_b_vnni (ld: its tile distance). The loops read the blocks many times; in place,
// rows 2-4 KB apart put each of a block's 64 rows on its own page (8 heads of 64 float32:
// forward 106 -> 126 GFLOP/s on one core with the operands of one head contiguous).
enum class Form { rows, cols };
template <typename T>
struct Blocks {
  Buffer<T> data;
  int64_t per_block = 0, count = 0, ld = 0;  // elements per block, blocks per (batch, head)
  bool vnni = false;
  const T* at(int64_t bh, int64_t blk) const { return data.get() + (bh * count + blk) * per_block; }
};

template <typename T>
Blocks<T> pack_blocks(const T* src, int64_t batch, int64_t len, int64_t heads, int64_t H,
                      int64_t block, Form form, bool vnni, Isa isa, const Executor* ex) {
  Blocks<T> out;
  out.count = ceil_div(len, block), out.vnni = vnni;
  if (vnni) {
    out.per_block = form == Form::rows ? vnni_elements(block, H) : vnni_elements(H, block);
    out.ld = form == Form::rows ? vnni_tile_ld(block) : vnni_tile_ld(H);
  } else {
    out.per_block = block * H, out.ld = form == Form::rows ? H : block;
  }
  out.data = work_buffer<T>(batch * heads * out.count * out.per_block);
  const int64_t lds = heads * H;
  parallel_for(ex, batch * heads * out.count, [&](int64_t item) {
    const int64_t blk = item % out.count, bh = item / out.count, b = bh / heads, h = bh % heads;
    const int64_t j0 = blk * block, n = std::min(block, len - j0);
    const T* from = src + ((b * len + j0) * heads + h) * H;
    T* to = out.data.get() + item * out.per_block;
    if constexpr (std::is_same_v<T, uint16_t>) {
      if (vnni && form == Form::rows) return pack_b_vnni(from, lds, n, H, to, out.ld);
      if (vnni) {
        uint16_t* t = scratch_bf16(2, H * block).data();
        transpose_block(from, lds, n, H, t, block, isa);
        return pack_b_vnni(t, block, H, n, to, out.ld);
      }
    }
    if (form == Form::cols) return transpose_block(from, lds, n, H, to, block, isa);
    for (int64_t r = 0; r < n; ++r) std::copy(from + r * lds, from + r * lds + H, to + r * H);
  });
  return out;
}

// Shapes, masks and operands as the loops use them. T is float or uint16_t (bfloat16).
template <typename T>
struct Ctx {
  AttentionShape s;
  const AttentionMasks* m = nullptr;
  Isa isa = Isa::ref;
  const T *q = nullptr, *k = nullptr, *v = nullptr;
  int64_t group = 1;     // query heads per kv head
  int64_t bq = 64, bk = 128;  // queries per work item, keys per block
  int64_t ldq = 0, ldk = 0;  // row distances of q / out and of k / v
  bool vnni = false;     // B operands packed in the pair layout (wants_vnni_b)
  // Without a bias, S holds the logits unscaled (masked: -inf) and the exponentials apply
  // the scale in their FMA: the brgemm's result goes straight to S (AMX: no epilogue pass
  // over the tiles, bfloat16 forward 62 -> 54 us per query block of T=1024). A row's
  // softmax is the same: exp(scale * -inf - m) and exp(-0.7 FLT_MAX - m) are both 0, and
  // fully masked rows are told apart by their max (-inf either way). With a bias, S holds
  // scale * q k^T + bias and masked logits are JAX's -0.7 FLT_MAX.
  float logit_alpha = 1.0f, exp_scale = 1.0f, masked = kMasked;
  Blocks<T> qr, kt;      // Q per query block (rows), K^T per key block (cols)

  int64_t q_active(int64_t b) const {
    return m->q_lengths ? std::clamp<int64_t>(m->q_lengths[b], 0, s.q_len) : s.q_len;
  }
  // Keys [lo, hi) query row i may see by the range rules (causal, window, key length).
  void range(int64_t b, int64_t i, int64_t* lo, int64_t* hi) const {
    int64_t l = 0, h = s.kv_len;
    if (m->kv_lengths) h = std::min<int64_t>(h, std::max<int64_t>(0, m->kv_lengths[b]));
    if (m->causal) h = std::min(h, i + 1);
    if (m->window_left >= 0) l = std::max(l, i - m->window_left);
    if (m->window_right >= 0) h = std::min(h, i + m->window_right + 1);
    l = std::min(l, s.kv_len);
    *lo = l, *hi = std::max(l, h);
  }
  // The keys some row of [i0, i0 + rows) may see: lo and hi grow with i.
  void block_range(int64_t b, int64_t i0, int64_t rows, int64_t* lo, int64_t* hi) const {
    int64_t unused;
    range(b, i0, lo, &unused);
    range(b, i0 + rows - 1, &unused, hi);
  }
  const T* v_rows(int64_t b, int64_t j, int64_t kh) const { return v + ((b * s.kv_len + j) * s.kv_heads + kh) * s.head_dim; }

  // c (rows x cols, ldc, float32) = alpha * a (rows x depth) @ b (depth x cols) (+ c); b in
  // the pair layout (ldb its tile distance) where b_vnni; a stored transposed where a_t.
  void gemm(const T* a, int64_t lda, const T* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
            int64_t cols, int64_t depth, bool accumulate, float alpha = 1.0f,
            bool b_vnni = false, bool a_t = false) const {
    Desc d;
    d.m = rows, d.n = cols, d.k = depth, d.lda = lda, d.ldb = ldb, d.ldc = ldc;
    d.a_dtype = d.b_dtype = dtype_of<T>(), d.c_dtype = DType::f32;
    d.beta = accumulate ? 1.0f : 0.0f, d.isa = isa, d.b_vnni = b_vnni, d.a_transposed = a_t;
    get_kernel(d)(Batch::strided(a, 0, b, 0, 1), c, alpha);
  }
  // The same with b one of the packed blocks.
  void gemm(const T* a, int64_t lda, const Blocks<T>& b, int64_t bh, int64_t blk, float* c,
            int64_t ldc, int64_t rows, int64_t cols, int64_t depth, bool accumulate,
            float alpha = 1.0f) const {
    gemm(a, lda, b.at(bh, blk), b.ld, c, ldc, rows, cols, depth, accumulate, alpha, b.vnni);
  }
};

// S (rows x cols, ld ls) = the masked logits of queries i0.. (query block qb) of head h
// against keys j0.. (key block kb).
template <typename T>
void logits(const Ctx<T>& c, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
            int64_t cols, float* S, int64_t ls) {
  const AttentionMasks& m = *c.m;
  const int64_t kh = h / c.group, H = c.s.head_dim;
  c.gemm(c.qr.at(b * c.s.heads + h, i0 / c.bq), H, c.kt, b * c.s.kv_heads + kh, j0 / c.bk, S, ls, rows, cols, H, false, c.logit_alpha);
  if (m.bias) {
    const int64_t* bs = m.bias_strides;
    const float* base = m.bias + b * bs[0] + h * bs[1] + i0 * bs[2] + j0 * bs[3];
    for (int64_t r = 0; r < rows; ++r) {
      const float* br = base + r * bs[2];
      float* sr = S + r * ls;
      if (bs[3] == 1) {
        for (int64_t j = 0; j < cols; ++j) sr[j] += br[j];
      } else {
        for (int64_t j = 0; j < cols; ++j) sr[j] += br[j * bs[3]];
      }
    }
  }
  int64_t lo_last, hi_first, unused;
  c.range(b, i0 + rows - 1, &lo_last, &unused);
  c.range(b, i0, &unused, &hi_first);
  if (j0 < lo_last || j0 + cols > hi_first) {  // some row sees only part of the block
    for (int64_t r = 0; r < rows; ++r) {
      int64_t lo, hi;
      c.range(b, i0 + r, &lo, &hi);
      float* sr = S + r * ls;
      const int64_t a = std::clamp<int64_t>(lo - j0, 0, cols), e = std::clamp<int64_t>(hi - j0, a, cols);
      std::fill(sr, sr + a, c.masked);
      std::fill(sr + e, sr + cols, c.masked);
    }
  }
  if (m.mask) {
    const int64_t* ms = m.mask_strides;
    const uint8_t* base = m.mask + b * ms[0] + h * ms[1] + i0 * ms[2] + j0 * ms[3];
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* mr = base + r * ms[2];
      float* sr = S + r * ls;
      for (int64_t j = 0; j < cols; ++j) sr[j] = mr[j * ms[3]] ? sr[j] : c.masked;
    }
  }
}

// A row whose every logit was masked (or that saw no key): JAX's softmax is uniform there.
bool fully_masked(float max) { return max == -kInf || max == kMasked; }

template <typename T>
void forward_block(const Ctx<T>& c, const AttentionForward& p, const Blocks<T>& vr,
                   const float* v_mean, int64_t b, int64_t h, int64_t i0, int64_t block_rows) {
  const AttentionShape& s = c.s;
  const int64_t H = s.head_dim, kh = h / c.group, bk = c.bk;
  const int64_t rows = std::clamp<int64_t>(c.q_active(b) - i0, 0, block_rows);
  T* out = static_cast<T*>(p.out) + ((b * s.q_len + i0) * s.heads + h) * H;
  float* lse = p.lse + (b * s.heads + h) * s.q_len + i0;
  for (int64_t r = rows; r < block_rows; ++r) {  // past the query length: zero
    std::fill(out + r * c.ldq, out + r * c.ldq + H, T{0});
    lse[r] = kInf;
  }
  if (rows == 0) return;
  float* S = scratch_f32(0, c.bq * bk).data();
  float* O = scratch_f32(1, c.bq * H).data();
  float* stats = scratch_f32(2, 5 * c.bq).data();
  float *mx = stats, *sum = stats + c.bq, *old = stats + 2 * c.bq;
  float *shift = stats + 3 * c.bq, *row_sum = stats + 4 * c.bq;
  uint16_t* Pb = std::is_same_v<T, float> ? nullptr : scratch_bf16(0, c.bq * bk).data();
  std::fill(mx, mx + rows, -kInf);
  std::fill(sum, sum + rows, 0.0f);
  int64_t lo, hi;
  c.block_range(b, i0, rows, &lo, &hi);
  bool first = true;
  for (int64_t j0 = lo / bk * bk; j0 < hi; j0 += bk) {
    const int64_t cols = std::min(bk, s.kv_len - j0);
    logits(c, b, h, i0, rows, j0, cols, S, bk);
    std::copy(mx, mx + rows, old);
    rows_max(S, bk, rows, cols, mx, c.isa);
    for (int64_t r = 0; r < rows; ++r)  // nothing seen yet: exp(-inf) = 0, not NaN
      shift[r] = mx[r] == -kInf ? 0.0f : c.exp_scale * mx[r];
    const float zero = 0.0f;
    for (int64_t r = 0; r < rows; ++r) old[r] = c.exp_scale * old[r] - shift[r];
    rows_exp(old, rows, 1, rows, 1.0f, &zero, nullptr, nullptr, 0, c.isa);  // the factors for what was summed so far
    bool rescale = false;
    for (int64_t r = 0; r < rows; ++r) rescale |= old[r] != 1.0f;
    rows_exp(S, bk, rows, cols, c.exp_scale, shift, row_sum, Pb, bk, c.isa);
    for (int64_t r = 0; r < rows; ++r) sum[r] = sum[r] * old[r] + row_sum[r];
    if (!first && rescale) rows_scale(O, H, rows, H, old, c.isa);
    const T* P = Pb ? reinterpret_cast<const T*>(Pb) : reinterpret_cast<const T*>(S);
    c.gemm(P, bk, vr, b * s.kv_heads + kh, j0 / bk, O, H, rows, H, cols, !first);
    first = false;
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + r * c.ldq;
    if (first || fully_masked(mx[r])) {
      const float* mean = v_mean + (b * s.kv_heads + kh) * H;
      for (int64_t x = 0; x < H; ++x) store(mean[x], o + x);
      lse[r] = kInf;  // the backward adds this row's share to dV directly
      continue;
    }
    const float inv = 1.0f / sum[r];
    for (int64_t x = 0; x < H; ++x) store(O[r * H + x] * inv, o + x);
    lse[r] = c.exp_scale * mx[r] + std::log(sum[r]);
  }
}

template <typename T>
Ctx<T> make_ctx(const AttentionShape& s, const AttentionMasks& m, Isa isa, const void* q,
                const void* k, const void* v) {
  Ctx<T> c;
  c.s = s, c.m = &m, c.isa = isa;
  c.q = static_cast<const T*>(q), c.k = static_cast<const T*>(k), c.v = static_cast<const T*>(v);
  c.group = s.heads / s.kv_heads;
  c.ldq = s.heads * s.head_dim, c.ldk = s.kv_heads * s.head_dim;
  c.vnni = wants_vnni_b(isa, dtype_of<T>());
  // Block sizes measured (one core, B=4 N=8 T=1024 H=64): float32 64 x 128 (forward 101 ->
  // 111 GFLOP/s and backward 104 -> 113 against 64 x 64; 32 x 128, 64 x 256 and 128 x 128
  // between); bfloat16 on the tiles 128 x 128 (forward 200 -> 236, backward 219 -> 278
  // against 64 x 64: the softmax rows are the cost there, and longer ones cost less each).
  c.bq = uses_amx_tiles(isa, dtype_of<T>()) ? 128 : 64;
  if (!m.bias && m.scale > 0.0f && std::isfinite(m.scale)) {
    c.exp_scale = m.scale, c.masked = -kInf;
  } else {
    c.logit_alpha = m.scale;
  }
  return c;
}

// The mean of v over all keys per (batch, kv head): the result of a fully masked row.
template <typename T>
Buffer<float> value_means(const Ctx<T>& c, const Executor* ex) {
  const AttentionShape& s = c.s;
  const int64_t H = s.head_dim;
  Buffer<float> means = work_buffer<float>(s.batch * s.kv_heads * H);
  parallel_for(ex, s.batch * s.kv_heads, [&](int64_t item) {
    const int64_t b = item / s.kv_heads, kh = item % s.kv_heads;
    float* mean = means.get() + item * H;
    std::fill(mean, mean + H, 0.0f);
    for (int64_t j = 0; j < s.kv_len; ++j) {
      const T* row = c.v_rows(b, j, kh);
      for (int64_t x = 0; x < H; ++x) mean[x] += to_float(row[x]);
    }
    for (int64_t x = 0; x < H; ++x) mean[x] /= static_cast<float>(s.kv_len);
  });
  return means;
}

std::string check(const AttentionShape& s) {
  if (s.batch < 0 || s.q_len < 0 || s.kv_len < 0 || s.heads < 0 || s.head_dim < 0)
    return "attention: negative dimension";
  if (s.kv_heads < 1 || s.heads % s.kv_heads != 0)
    return "attention: kv heads must divide the query heads";
  return "";
}

// Float32 partial sums, one buffer per thread that takes part (lazily made, zeroed), so
// threads add into disjoint memory; sum() adds them up at the end.
class Partials {
 public:
  explicit Partials(int64_t size) : size_(size) {}
  float* acquire(int* id) {
    float* data;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!free_.empty()) {
        *id = free_.back();
        free_.pop_back();
        return buffers_[*id].get();
      }
      buffers_.push_back(work_buffer<float>(size_));
      *id = static_cast<int>(buffers_.size()) - 1;
      data = buffers_.back().get();
    }
    std::memset(data, 0, sizeof(float) * size_);
    return data;
  }
  void release(int id) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(id);
  }
  // dst[i - begin] = sum over buffers of [i], for i in [begin, end), rounded to dst's type.
  template <typename D>
  void sum(int64_t begin, int64_t end, D* dst) const {
    for (int64_t i = begin; i < end; ++i) {
      float t = 0.0f;
      for (const auto& b : buffers_) t += b[i];
      store(t, dst + (i - begin));
    }
  }

 private:
  int64_t size_;
  std::mutex mutex_;
  std::vector<Buffer<float>> buffers_;
  std::vector<int> free_;
};

template <typename T>
std::string forward(const AttentionForward& p, const Executor* ex) {
  Ctx<T> c = make_ctx<T>(p.shape, p.masks, p.isa, p.q, p.k, p.v);
  const AttentionShape& s = c.s;
  if (s.batch * s.heads * s.q_len * s.head_dim == 0) return "";
  if (s.kv_len == 0) return "attention: key and value need at least one position";
  const int64_t B = s.batch, N = s.heads, K = s.kv_heads, H = s.head_dim;
  c.qr = pack_blocks(c.q, B, s.q_len, N, H, c.bq, Form::rows, false, c.isa, ex);
  c.kt = pack_blocks(c.k, B, s.kv_len, K, H, c.bk, Form::cols, c.vnni, c.isa, ex);
  const Blocks<T> vr = pack_blocks(c.v, B, s.kv_len, K, H, c.bk, Form::rows, c.vnni, c.isa, ex);
  Buffer<float> means = value_means(c, ex);
  const int64_t blocks = ceil_div(s.q_len, c.bq);
  parallel_for(ex, s.batch * s.heads * blocks, [&](int64_t item) {
    const int64_t qb = item % blocks, bh = item / blocks;
    const int64_t i0 = qb * c.bq;
    forward_block(c, p, vr, means.get(), bh / s.heads, bh % s.heads, i0,
                  std::min(c.bq, s.q_len - i0));
  });
  return "";
}

template <typename T>
std::string backward(const AttentionBackward& p, const Executor* ex) {
  Ctx<T> c = make_ctx<T>(p.shape, p.masks, p.isa, p.q, p.k, p.v);
  const AttentionShape& s = c.s;
  const int64_t B = s.batch, N = s.heads, K = s.kv_heads, H = s.head_dim, Tq = s.q_len, Tk = s.kv_len;
  T* dq = static_cast<T*>(p.dq);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
  if (p.dbias) std::fill(p.dbias, p.dbias + p.bias_size, 0.0f);
  if (B * N * H == 0) return "";
  if (Tq == 0 || Tk == 0) {
    std::fill(dq, dq + B * Tq * N * H, T{0});
    std::fill(dk, dk + B * Tk * K * H, T{0});
    std::fill(dv, dv + B * Tk * K * H, T{0});
    return "";
  }
  const T* out = static_cast<const T*>(p.out);
  const T* d_out = static_cast<const T*>(p.d_out);
  // Every operand a block's products read, re-laid out per (batch, head) in blocks: K^T,
  // V^T and K per key block; Q, dO and (bfloat16: the float32 kernels read Q and dO's
  // blocks transposed in place) Q^T and dO^T per query block.
  const int64_t bq = c.bq, bk = c.bk, kblocks = ceil_div(Tk, bk);
  const int64_t qblocks = ceil_div(Tq, bq);
  c.qr = pack_blocks(c.q, B, Tq, N, H, bq, Form::rows, false, c.isa, ex);
  c.kt = pack_blocks(c.k, B, Tk, K, H, bk, Form::cols, c.vnni, c.isa, ex);
  const Blocks<T> vt = pack_blocks(c.v, B, Tk, K, H, bk, Form::cols, c.vnni, c.isa, ex);
  const Blocks<T> kr = pack_blocks(c.k, B, Tk, K, H, bk, Form::rows, c.vnni, c.isa, ex);
  const Blocks<T> gr = pack_blocks(d_out, B, Tq, N, H, bq, Form::rows, false, c.isa, ex);
  constexpr bool a_t = std::is_same_v<T, float>;
  Blocks<T> q_cols, g_cols;
  if (!a_t) {
    q_cols = pack_blocks(c.q, B, Tq, N, H, bq, Form::cols, false, c.isa, ex);
    g_cols = pack_blocks(d_out, B, Tq, N, H, bq, Form::cols, false, c.isa, ex);
  }
  const Blocks<T>& qt = a_t ? c.qr : q_cols;
  const Blocks<T>& gt = a_t ? gr : g_cols;
  const int64_t ldt = a_t ? H : bq;
  // Per (batch, head): D = rowsum(dO * O), and the dV share of fully masked rows (dO / Tk
  // to every key).
  Buffer<float> D = work_buffer<float>(B * N * Tq), uniform = work_buffer<float>(B * N * H);
  parallel_for(ex, B * N, [&](int64_t bh) {
    const int64_t b = bh / N, h = bh % N;
    const int64_t off = (b * Tq * N + h) * H;
    float* u = uniform.get() + bh * H;
    std::fill(u, u + H, 0.0f);
    const float* lse = p.lse + bh * Tq;
    for (int64_t i = 0; i < Tq; ++i) {
      const T* o = out + off + i * c.ldq;
      const T* g = d_out + off + i * c.ldq;
      float d = 0.0f;
      for (int64_t x = 0; x < H; ++x) d += to_float(o[x]) * to_float(g[x]);
      D[bh * Tq + i] = d;
      if (i < c.q_active(b) && lse[i] == kInf)
        for (int64_t x = 0; x < H; ++x) u[x] += to_float(g[x]) / static_cast<float>(Tk);
    }
  });
  // dQ's partial sums per (batch, head), rows of H contiguous.
  Partials dq_parts(B * N * Tq * H), dbias_parts(p.dbias ? p.bias_size : 0);
  const bool bf16 = !std::is_same_v<T, float>;
  parallel_for(ex, B * K * kblocks, [&](int64_t item) {
    const int64_t kb = item % kblocks, b = item / kblocks / K, kh = item / kblocks % K;
    const int64_t bkh = b * K + kh, j0 = kb * bk, cols = std::min(bk, Tk - j0);
    float* S = scratch_f32(0, bq * bk).data();
    float* dS = scratch_f32(1, bq * bk).data();
    float* dvt = scratch_f32(2, H * bk).data();
    float* dkt = scratch_f32(3, H * bk).data();
    float* tile = scratch_f32(4, bk * H).data();
    uint16_t* Pb = bf16 ? scratch_bf16(0, bq * bk).data() : nullptr;
    uint16_t* dSb = bf16 ? scratch_bf16(1, bq * bk).data() : nullptr;
    const T* P = Pb ? reinterpret_cast<const T*>(Pb) : reinterpret_cast<const T*>(S);
    const T* dS_in = dSb ? reinterpret_cast<const T*>(dSb) : reinterpret_cast<const T*>(dS);
    int dq_id = -1, db_id = -1;
    float* dq_part = nullptr;
    float* db_part = nullptr;
    bool first = true;
    for (int64_t g = 0; g < c.group; ++g) {
      const int64_t h = kh * c.group + g, bh = b * N + h;
      const int64_t qa = c.q_active(b);
      for (int64_t i0 = 0; i0 < qa; i0 += bq) {
        const int64_t rows = std::min(bq, qa - i0), qb = i0 / bq;
        int64_t lo, hi;
        c.block_range(b, i0, rows, &lo, &hi);
        if (lo >= j0 + cols || hi <= j0) continue;  // no row here sees these keys
        if (!dq_part) dq_part = dq_parts.acquire(&dq_id);
        if (p.dbias && !db_part) db_part = dbias_parts.acquire(&db_id);
        logits(c, b, h, i0, rows, j0, cols, S, bk);
        rows_exp(S, bk, rows, cols, c.exp_scale, p.lse + bh * Tq + i0, nullptr, Pb, bk, c.isa);  // P
        c.gemm(gt.at(bh, qb), ldt, P, bk, dvt, bk, H, cols, rows, !first, 1.0f, false,
               a_t);  // dV^T += dO^T P
        c.gemm(gr.at(bh, qb), H, vt, bkh, kb, dS, bk, rows, cols, H, false);  // dP = dO V^T
        rows_sub_mul(dS, bk, S, bk, rows, cols, D.get() + bh * Tq + i0, dSb, bk, c.isa);  // dS
        if (db_part) {
          const int64_t* bs = p.masks.bias_strides;
          float* base = db_part + b * bs[0] + h * bs[1] + i0 * bs[2] + j0 * bs[3];
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < cols; ++j) base[r * bs[2] + j * bs[3]] += dS[r * bk + j];
        }
        const float scale = p.masks.scale;
        c.gemm(qt.at(bh, qb), ldt, dS_in, bk, dkt, bk, H, cols, rows, !first, scale, false,
               a_t);  // dK^T += scale Q^T dS
        c.gemm(dS_in, bk, kr, bkh, kb, dq_part + (bh * Tq + i0) * H, H, rows, H, cols, true,
               scale);  // dQ += scale dS K
        first = false;
      }
    }
    if (dq_part) dq_parts.release(dq_id);
    if (db_part) dbias_parts.release(db_id);
    // dV (plus the fully masked rows' uniform share) and dK for these keys.
    for (int pass = 0; pass < 2; ++pass) {
      T* dst = (pass == 0 ? dv : dk) + ((b * Tk + j0) * K + kh) * H;
      if (first) {
        std::fill(tile, tile + cols * H, 0.0f);
      } else {
        transpose_f32(pass == 0 ? dvt : dkt, bk, H, cols, tile, H, c.isa);
      }
      for (int64_t j = 0; j < cols; ++j) {
        float* row = tile + j * H;
        if (pass == 0)
          for (int64_t g = 0; g < c.group; ++g) {
            const float* u = uniform.get() + (b * N + kh * c.group + g) * H;
            for (int64_t x = 0; x < H; ++x) row[x] += u[x];
          }
        for (int64_t x = 0; x < H; ++x) store(row[x], dst + j * c.ldk + x);
      }
    }
  });
  // Add up the partial sums of dQ (zero where no thread wrote) and of the bias gradient.
  parallel_for(ex, B * N * qblocks, [&](int64_t item) {
    const int64_t bh = item / qblocks, b = bh / N, h = bh % N, i0 = item % qblocks * bq;
    for (int64_t i = i0; i < std::min(Tq, i0 + bq); ++i)
      dq_parts.sum((bh * Tq + i) * H, (bh * Tq + i + 1) * H, dq + ((b * Tq + i) * N + h) * H);
  });
  constexpr int64_t chunk = 16384;
  if (p.dbias)
    parallel_for(ex, ceil_div(p.bias_size, chunk), [&](int64_t i) {
      dbias_parts.sum(i * chunk, std::min(p.bias_size, (i + 1) * chunk), p.dbias + i * chunk);
    });
  return "";
}

}  // namespace

std::string attention_forward(const AttentionForward& p, const Executor* executor) {
  if (std::string e = check(p.shape); !e.empty()) return e;
  return with_type(p.dtype, [&](auto zero) { return forward<decltype(zero)>(p, executor); });
}

std::string attention_backward(const AttentionBackward& p, const Executor* executor) {
  if (std::string e = check(p.shape); !e.empty()) return e;
  return with_type(p.dtype, [&](auto zero) { return backward<decltype(zero)>(p, executor); });
}

}  // namespace jbr::prim
