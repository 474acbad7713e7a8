#include "primitives/conv.h"

#include <algorithm>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace jbr::prim {
namespace {

constexpr int64_t kBlock = 64;     // channel block: 4 AVX-512 vectors wide
constexpr int64_t kMaxRows = 56;   // output pixels per call (a multiple of 7 and 8)
constexpr int64_t kMaxReduce = 512;  // weight-update: pixels reduced per call

int64_t floor_div(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }
int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

int64_t threads_of(const Executor* executor) {
  return executor ? executor->num_workers() + 1 : 1;
}

// Maps an output index o and a tap t to an input index (o*mul + t*tmul + off) / div; it
// exists only where the division is exact and the result lies in [0, extent).
struct AxisMap {
  int64_t mul, tmul, off, div, extent;
  bool at(int64_t o, int64_t t, int64_t* i) const {
    const int64_t num = o * mul + t * tmul + off;
    if (num % div != 0) return false;
    *i = num / div;
    return *i >= 0 && *i < extent;
  }
};

// m x n block (leading dimension ld) = act(bias or 0): the output of an empty reduction.
void fill_epilogue(float* out, int64_t m, int64_t n, int64_t ld, const float* bias,
                   Activation act, Isa isa) {
  for (int64_t i = 0; i < m; ++i) {
    float* row = out + i * ld;
    for (int64_t j = 0; j < n; ++j) row[j] = bias ? bias[j] : 0.0f;
    apply_activation(act, row, n, isa);
  }
}

const Kernel* kernel_for(Desc d, std::string* error) {
  if (std::string e = validate(d); !e.empty()) {
    *error = e;
    return nullptr;
  }
  return &get_kernel(d);
}

// HWIO weights as the B blocks of a RowPass: dst[g][blk][t][i][j], i < rows, j < bw (zero
// past the last block's edge). Forward: rows are the group's input channels and columns
// its output channels, w[t][i][g*Kg + col]. Transposed (backward data): rows are output
// channels, columns input channels, w[t][col][g*Kg + i].
std::unique_ptr<float[]> pack_weights(const ConvShape& s, const float* w, bool transposed,
                                      int64_t bw, const Executor* executor) {
  const int64_t taps = s.taps_h * s.taps_w, cg = s.in_c / s.groups, kg = s.out_c / s.groups;
  const int64_t rows = transposed ? kg : cg, cols = transposed ? cg : kg;
  const int64_t blocks = ceil_div(cols, bw);
  std::unique_ptr<float[]> dst(new float[s.groups * blocks * taps * rows * bw]);
  parallel_for(executor, s.groups * blocks * taps, [&](int64_t item) {
    const int64_t t = item % taps, blk = item / taps % blocks, g = item / taps / blocks;
    const int64_t width = std::min(bw, cols - blk * bw);
    float* out = dst.get() + item * rows * bw;
    const float* src = w + t * cg * s.out_c + g * kg;
    for (int64_t i = 0; i < rows; ++i, out += bw) {
      for (int64_t j = 0; j < width; ++j) {
        const int64_t col = blk * bw + j;
        out[j] = transposed ? src[col * s.out_c + i] : src[i * s.out_c + col];
      }
      std::fill(out + width, out + bw, 0.0f);
    }
  });
  return dst;
}

// The loop nest shared by the forward and backward-data passes: rows of output pixels,
//   out[img, o, f + j*phases, g*ng + :] =
//       act(bias + sum_{r, s} A[img, rows(o, r), cols(f + j*phases, s), g*kg + :kg] @ B[g, r, s])
// with one brgemm call per (image, output row, run of pixels, block of bn output channels)
// reducing over every tap that lands inside A. Pixels whose set of valid taps differs (the
// borders) get calls of their own, so padding needs no copy. B is packed [g][blk][r][s][kg][bn].
struct RowPass {
  int64_t images, groups, taps_r, taps_s;
  int64_t out_rows, out_cols, out_pix;  // out: (images, out_rows, out_cols, out_pix)
  int64_t in_rows, in_cols, in_pix;     // A:   (images, in_rows, in_cols, in_pix)
  int64_t kg, ng, bn;
  int64_t phases;  // output columns handled as `phases` interleaved sets
  AxisMap rows, cols;
  const float* a;
  const float* b;
  const float* bias;  // (groups * ng) or null
  float* out;
  Activation act;
  Isa isa;
};

struct Piece {
  int64_t phase, j0, j1;  // output columns phase + j*phases, j in [j0, j1)
  int64_t tap0, tap1;     // its valid column taps: col_taps[tap0, tap1)
};
struct ColTap {
  int64_t s, col;  // tap and the A column of the piece's first pixel
};

std::string run_rows(const RowPass& rp, const Executor* executor) {
  const int64_t step = rp.phases * rp.cols.mul / rp.cols.div;  // A columns per output pixel
  std::vector<Piece> pieces;
  std::vector<ColTap> col_taps;
  for (int64_t f = 0; f < rp.phases; ++f) {
    const int64_t count = ceil_div(rp.out_cols - f, rp.phases);
    struct Range { int64_t s, col0, lo, hi; };
    std::vector<Range> ranges;
    std::vector<int64_t> cuts = {0, count};
    for (int64_t s = 0; s < rp.taps_s; ++s) {
      const int64_t num = f * rp.cols.mul + s * rp.cols.tmul + rp.cols.off;
      if (num % rp.cols.div != 0) continue;
      const int64_t col0 = num / rp.cols.div;
      const int64_t lo = std::max<int64_t>(0, ceil_div(-col0, step));
      const int64_t hi = std::min(count, floor_div(rp.cols.extent - 1 - col0, step) + 1);
      if (lo >= hi) continue;
      ranges.push_back({s, col0, lo, hi});
      cuts.push_back(lo), cuts.push_back(hi);
    }
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    for (size_t c = 0; c + 1 < cuts.size(); ++c) {
      for (int64_t j0 = cuts[c]; j0 < cuts[c + 1]; j0 += kMaxRows) {
        Piece piece{f, j0, std::min(j0 + kMaxRows, cuts[c + 1]), int64_t(col_taps.size()), 0};
        for (const Range& rg : ranges)
          if (rg.lo <= piece.j0 && piece.j1 <= rg.hi) col_taps.push_back({rg.s, rg.col0 + j0 * step});
        piece.tap1 = col_taps.size();
        pieces.push_back(piece);
      }
    }
  }

  const int64_t blocks = ceil_div(rp.ng, rp.bn);
  const int64_t last_n = rp.ng - (blocks - 1) * rp.bn;
  Desc d;
  d.k = rp.kg, d.lda = step * rp.in_pix, d.ldb = rp.bn, d.ldc = rp.phases * rp.out_pix;
  d.activation = rp.act, d.has_bias = rp.bias != nullptr, d.isa = rp.isa;
  std::vector<const Kernel*> kernels(2 * pieces.size());  // [piece][last block?]
  std::string error;
  for (size_t i = 0; i < pieces.size(); ++i) {
    d.m = pieces[i].j1 - pieces[i].j0;
    d.n = rp.bn;
    if (!(kernels[2 * i] = kernel_for(d, &error))) return error;
    d.n = last_n;
    if (!(kernels[2 * i + 1] = kernel_for(d, &error))) return error;
  }

  const int64_t n_pieces = pieces.size();
  const int64_t items = rp.groups * rp.images * blocks * rp.out_rows * n_pieces;
  parallel_for(executor, items, [&](int64_t item) {
    const Piece& pc = pieces[item % n_pieces];
    int64_t rest = item / n_pieces;
    const int64_t o = rest % rp.out_rows;
    rest /= rp.out_rows;
    const int64_t blk = rest % blocks;
    rest /= blocks;
    const int64_t img = rest % rp.images, g = rest / rp.images;

    const int64_t channel = g * rp.ng + blk * rp.bn;
    const Kernel& kernel = *kernels[2 * (item % n_pieces) + (blk + 1 == blocks)];
    float* out = rp.out + ((img * rp.out_rows + o) * rp.out_cols + pc.phase + pc.j0 * rp.phases) *
                              rp.out_pix + channel;
    const float* bias = rp.bias ? rp.bias + channel : nullptr;

    thread_local std::vector<int64_t> offs_a, offs_b;
    offs_a.clear(), offs_b.clear();
    const float* b_block = rp.b + (g * blocks + blk) * rp.taps_r * rp.taps_s * rp.kg * rp.bn;
    for (int64_t r = 0; r < rp.taps_r; ++r) {
      int64_t row;
      if (!rp.rows.at(o, r, &row)) continue;
      const int64_t row_base = (img * rp.in_rows + row) * rp.in_cols;
      for (int64_t t = pc.tap0; t < pc.tap1; ++t) {
        offs_a.push_back((row_base + col_taps[t].col) * rp.in_pix + g * rp.kg);
        offs_b.push_back((r * rp.taps_s + col_taps[t].s) * rp.kg * rp.bn);
      }
    }
    if (offs_a.empty()) {
      fill_epilogue(out, kernel.desc.m, kernel.desc.n, kernel.desc.ldc, bias, rp.act, rp.isa);
      return;
    }
    kernel(Batch::offsets(rp.a, offs_a.data(), b_block, offs_b.data(), offs_a.size()), out, 1.0f,
           bias);
  });
  return "";
}

// A 1x1, stride-1, unpadded convolution is one GEMM over all pixels: one long row.
bool pointwise(const ConvShape& s) {
  return s.taps_h == 1 && s.taps_w == 1 && s.stride_h == 1 && s.stride_w == 1 &&
         s.pad_top == 0 && s.pad_left == 0 && s.out_h == s.in_h && s.out_w == s.in_w;
}

}  // namespace

std::string validate(const ConvShape& s) {
  const std::pair<const char*, int64_t> positive[] = {
      {"batch", s.batch}, {"in_h", s.in_h}, {"in_w", s.in_w}, {"in_c", s.in_c},
      {"out_h", s.out_h}, {"out_w", s.out_w}, {"out_c", s.out_c}, {"taps_h", s.taps_h},
      {"taps_w", s.taps_w}, {"groups", s.groups}, {"stride_h", s.stride_h},
      {"stride_w", s.stride_w}, {"dil_h", s.dil_h}, {"dil_w", s.dil_w}};
  for (auto [name, v] : positive)
    if (v < 1) return std::string(name) + " must be >= 1, got " + std::to_string(v);
  if (s.in_c % s.groups != 0 || s.out_c % s.groups != 0)
    return "groups (" + std::to_string(s.groups) + ") must divide in_c (" +
           std::to_string(s.in_c) + ") and out_c (" + std::to_string(s.out_c) + ")";
  return "";
}

std::string conv2d_forward(const ConvShape& s, const float* x, const float* w, const float* bias,
                           Activation act, float* y, Isa isa, const Executor* executor) {
  if (std::string e = validate(s); !e.empty()) return e;
  const int64_t cg = s.in_c / s.groups, kg = s.out_c / s.groups, bn = std::min(kg, kBlock);
  auto packed = pack_weights(s, w, /*transposed=*/false, bn, executor);
  RowPass rp;
  rp.images = s.batch, rp.groups = s.groups, rp.taps_r = s.taps_h, rp.taps_s = s.taps_w;
  rp.out_rows = s.out_h, rp.out_cols = s.out_w, rp.out_pix = s.out_c;
  rp.in_rows = s.in_h, rp.in_cols = s.in_w, rp.in_pix = s.in_c;
  rp.kg = cg, rp.ng = kg, rp.bn = bn, rp.phases = 1;
  rp.rows = {s.stride_h, s.dil_h, -s.pad_top, 1, s.in_h};
  rp.cols = {s.stride_w, s.dil_w, -s.pad_left, 1, s.in_w};
  if (pointwise(s)) {
    rp.images = rp.in_rows = rp.out_rows = 1;
    rp.in_cols = rp.out_cols = s.batch * s.in_h * s.in_w;
    rp.rows.extent = 1, rp.cols.extent = rp.in_cols;
  }
  rp.a = x, rp.b = packed.get(), rp.bias = bias, rp.out = y, rp.act = act, rp.isa = isa;
  return run_rows(rp, executor);
}

std::string conv2d_backward_data(const ConvShape& s, const float* dy, const float* w, float* dx,
                                 Isa isa, const Executor* executor) {
  if (std::string e = validate(s); !e.empty()) return e;
  const int64_t cg = s.in_c / s.groups, kg = s.out_c / s.groups, bn = std::min(cg, kBlock);
  auto packed = pack_weights(s, w, /*transposed=*/true, bn, executor);
  // dx[n, h, v] = sum over taps of dy[n, p, q] @ w[r, s]^T where h = p*sh + r*dh - pt,
  // i.e. p = (h + pt - r*dh) / sh when exact; columns likewise, one phase per v mod sw.
  RowPass rp;
  rp.images = s.batch, rp.groups = s.groups, rp.taps_r = s.taps_h, rp.taps_s = s.taps_w;
  rp.out_rows = s.in_h, rp.out_cols = s.in_w, rp.out_pix = s.in_c;
  rp.in_rows = s.out_h, rp.in_cols = s.out_w, rp.in_pix = s.out_c;
  rp.kg = kg, rp.ng = cg, rp.bn = bn, rp.phases = s.stride_w;
  rp.rows = {1, -s.dil_h, s.pad_top, s.stride_h, s.out_h};
  rp.cols = {1, -s.dil_w, s.pad_left, s.stride_w, s.out_w};
  if (pointwise(s)) {
    rp.images = rp.in_rows = rp.out_rows = 1;
    rp.in_cols = rp.out_cols = s.batch * s.in_h * s.in_w;
    rp.rows.extent = 1, rp.cols.extent = rp.in_cols;
  }
  rp.a = dy, rp.b = packed.get(), rp.bias = nullptr, rp.out = dx, rp.act = Activation::none;
  rp.isa = isa;
  return run_rows(rp, executor);
}

std::string conv2d_weight_update(const ConvShape& s, const float* x, const float* dy, float* dw,
                                 Isa isa, const Executor* executor) {
  if (std::string e = validate(s); !e.empty()) return e;
  const int64_t cg = s.in_c / s.groups, kg = s.out_c / s.groups;
  const int64_t bc = std::min(cg, kBlock), bk = std::min(kg, kBlock);
  const int64_t cblocks = ceil_div(cg, bc), kblocks = ceil_div(kg, bk);
  const int64_t sw = s.stride_w, phase_w = ceil_div(s.in_w, sw);

  // x transposed per input row, group and column phase: xt[n][h][g][v % sw][c][v / sw], so
  // that the pixels a tap reads form contiguous rows of a (channels x pixels) A block.
  const int64_t row_size = s.groups * sw * cg * phase_w;
  std::unique_ptr<float[]> xt(new float[s.batch * s.in_h * row_size]);
  parallel_for(executor, s.batch * s.in_h, [&](int64_t nh) {
    const float* src = x + nh * s.in_w * s.in_c;
    float* dst = xt.get() + nh * row_size;
    for (int64_t g = 0; g < s.groups; ++g)
      for (int64_t f = 0; f < sw; ++f)
        for (int64_t c = 0; c < cg; ++c) {
          float* out = dst + ((g * sw + f) * cg + c) * phase_w;
          for (int64_t v = f, i = 0; v < s.in_w; v += sw, ++i) out[i] = src[v * s.in_c + g * cg + c];
        }
  });

  // Rows of the reduction for each filter row r: every (image, output row) whose input
  // row exists, as element offsets into xt and dy.
  const AxisMap rows{s.stride_h, s.dil_h, -s.pad_top, 1, s.in_h};
  std::vector<std::vector<std::pair<int64_t, int64_t>>> entries(s.taps_h);
  for (int64_t r = 0; r < s.taps_h; ++r)
    for (int64_t n = 0; n < s.batch; ++n)
      for (int64_t p = 0; p < s.out_h; ++p) {
        int64_t h;
        if (rows.at(p, r, &h))
          entries[r].push_back({(n * s.in_h + h) * row_size, (n * s.out_h + p) * s.out_w * s.out_c});
      }
  // Output columns q whose input column q*sw + s*dw - pl exists, per filter column.
  struct Cols { int64_t lo, hi, phase, shift; };  // input column = (q + shift) * sw + phase
  std::vector<Cols> cols(s.taps_w);
  for (int64_t t = 0; t < s.taps_w; ++t) {
    const int64_t c0 = t * s.dil_w - s.pad_left;
    cols[t] = {std::max<int64_t>(0, ceil_div(-c0, sw)),
               std::min(s.out_w, floor_div(s.in_w - 1 - c0, sw) + 1), c0 - floor_div(c0, sw) * sw,
               floor_div(c0, sw)};
  }

  // Enough independent pieces for every thread: split the reduction when there are few
  // weight blocks, into partial sums added up at the end.
  const int64_t blocks = s.groups * s.taps_h * s.taps_w * cblocks * kblocks;
  const int64_t threads = threads_of(executor);
  const int64_t splits =
      threads == 1 ? 1 : std::clamp<int64_t>(ceil_div(8 * threads, blocks), 1, s.batch * s.out_h);
  const int64_t dw_size = s.taps_h * s.taps_w * cg * s.out_c;
  std::unique_ptr<float[]> partial(splits > 1 ? new float[splits * dw_size] : nullptr);

  std::string error;
  std::mutex error_mutex;
  parallel_for(executor, blocks * splits, [&](int64_t item) {
    const int64_t split = item % splits;
    int64_t rest = item / splits;
    const int64_t kb = rest % kblocks;
    rest /= kblocks;
    const int64_t cb = rest % cblocks;
    rest /= cblocks;
    const int64_t t = rest % s.taps_w;
    rest /= s.taps_w;
    const int64_t r = rest % s.taps_h, g = rest / s.taps_h;

    Desc d;
    d.m = std::min(bc, cg - cb * bc), d.n = std::min(bk, kg - kb * bk);
    d.k = cols[t].hi - cols[t].lo;
    d.lda = phase_w, d.ldb = s.out_c, d.ldc = s.out_c, d.isa = isa;
    float* out = (splits > 1 ? partial.get() + split * dw_size : dw) +
                 ((r * s.taps_w + t) * cg + cb * bc) * s.out_c + g * kg + kb * bk;
    const auto& rows_r = entries[r];
    const int64_t e0 = rows_r.size() * split / splits, e1 = rows_r.size() * (split + 1) / splits;
    if (d.k <= 0 || e0 == e1) {
      fill_epilogue(out, d.m, d.n, d.ldc, nullptr, Activation::none, isa);
      return;
    }
    const int64_t a_shift = ((g * sw + cols[t].phase) * cg + cb * bc) * phase_w + cols[t].lo + cols[t].shift;
    const int64_t b_shift = cols[t].lo * s.out_c + g * kg + kb * bk;
    const int64_t per_call = std::max<int64_t>(1, kMaxReduce / d.k);
    thread_local std::vector<int64_t> offs_a, offs_b;
    for (int64_t e = e0; e < e1; e += per_call) {
      const int64_t count = std::min(per_call, e1 - e);
      offs_a.resize(count), offs_b.resize(count);
      for (int64_t i = 0; i < count; ++i) {
        offs_a[i] = rows_r[e + i].first + a_shift;
        offs_b[i] = rows_r[e + i].second + b_shift;
      }
      d.beta = e == e0 ? 0.0f : 1.0f;
      std::string kernel_error;
      const Kernel* kernel = kernel_for(d, &kernel_error);
      if (!kernel) {
        std::lock_guard<std::mutex> lock(error_mutex);
        error = kernel_error;
        return;
      }
      (*kernel)(Batch::offsets(xt.get(), offs_a.data(), dy, offs_b.data(), count), out);
    }
  });
  if (!error.empty() || splits == 1) return error;

  const int64_t chunk = 4096;
  parallel_for(executor, ceil_div(dw_size, chunk), [&](int64_t c) {
    const int64_t i0 = c * chunk, i1 = std::min(dw_size, i0 + chunk);
    std::copy(partial.get() + i0, partial.get() + i1, dw + i0);
    for (int64_t sp = 1; sp < splits; ++sp) {
      const float* src = partial.get() + sp * dw_size;
      for (int64_t i = i0; i < i1; ++i) dw[i] += src[i];
    }
  });
  return "";
}

}  // namespace jbr::prim
