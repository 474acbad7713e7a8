#include "primitives/conv.h"
#include "primitives/conv_layout.h"
#include "primitives/conv_tuning.h"
#include "primitives/elements.h"
#include "primitives/scratch.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

namespace jbr::prim {
namespace {

using namespace conv_tuning;  // block sizes and budgets: conv_tuning.h
using namespace conv_layout;  // shared helpers and re-layouts: conv_layout.h

// HWIO weights as the B blocks of a RowPass: dst[g][blk][t] is a rows x bw block (zero
// past the last block's edge), plain or, where the kernel wants it (wants_vnni_b), in the pair-
// interleaved layout (brgemm.h: pack_b_vnni). Forward: rows are the group's input
// channels and columns its output channels, w[t][i][g*Kg + col]. Transposed (backward
// data): rows are output channels, columns input channels, w[t][col][g*Kg + i].
struct PackedWeights {
  Buffer<float> data;
  int64_t ld;        // the blocks' leading dimension (Desc::ldb)
  int64_t tap_size;  // elements of one (g, blk, t) block
  bool vnni;
};

PackedWeights pack_weights(const ConvShape& s, DType dtype, const void* w_in, bool transposed,
                           int64_t bw, Isa isa, const Executor* executor) {
  const int64_t taps = s.taps_h * s.taps_w, cg = s.in_c / s.groups, kg = s.out_c / s.groups;
  const int64_t rows = transposed ? kg : cg, cols = transposed ? cg : kg;
  const int64_t blocks = ceil_div(cols, bw);
  const bool vnni = wants_vnni_b(isa, dtype);
  const int64_t ld = vnni ? vnni_tile_ld(rows) : bw;
  const int64_t tap_size = vnni ? vnni_elements(rows, bw) : rows * bw;
  auto dst = buffer(s.groups * blocks * taps * tap_size, size_of(dtype));
  with_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    const T* w = static_cast<const T*>(w_in);
    parallel_for(executor, s.groups * blocks * taps, [&](int64_t item) {
      const int64_t t = item % taps, blk = item / taps % blocks, g = item / taps / blocks;
      const int64_t width = std::min(bw, cols - blk * bw);
      thread_local std::vector<T> plain;  // the plain block, where it is packed again
      if (vnni) plain.resize(rows * bw);
      T* out = vnni ? plain.data() : reinterpret_cast<T*>(dst.get()) + item * tap_size;
      const T* src = w + t * cg * s.out_c + g * kg;
      if (transposed) {
        transpose(src + blk * bw * s.out_c, s.out_c, width, rows, out, bw);
      } else {
        for (int64_t i = 0; i < rows; ++i) std::copy_n(src + i * s.out_c + blk * bw, width, out + i * bw);
      }
      for (int64_t i = 0; i < rows; ++i) std::fill(out + i * bw + width, out + (i + 1) * bw, zero);
      if constexpr (std::is_same_v<T, uint16_t>)
        if (vnni) pack_b_vnni(out, bw, rows, bw, reinterpret_cast<T*>(dst.get()) + item * tap_size, ld);
    });
    return 0;
  });
  return {std::move(dst), ld, tap_size, vnni};
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
  DType in, out_dtype;  // of a and b; of out
  const void* a;
  const void* b;
  int64_t ldb, tap_size;  // of the B blocks: leading dimension, elements of one block
  bool b_vnni;            // B blocks in the pair-interleaved layout
  const float* bias;  // (groups * ng) or null
  void* out;
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

std::string run_rows(const RowPass& rp, const Executor* executor);

// Narrow rows whose border pixels miss some taps would split into short calls (m of 1 at
// each edge of a 7-pixel row). There, a copy of A with zero columns on both sides is
// cheaper: every pixel then uses every tap and each row is one call per channel block.
std::string run_rows_padded(const RowPass& rp, int64_t left, int64_t right, const Executor* executor) {
  RowPass padded = rp;
  padded.in_cols = rp.in_cols + left + right;
  padded.cols.off += left * rp.cols.div, padded.cols.extent = padded.in_cols;
  const int64_t size = size_of(rp.in), row = padded.in_cols * rp.in_pix * size;
  const int64_t before = left * rp.in_pix * size, middle = rp.in_cols * rp.in_pix * size;
  auto a = buffer(rp.images * rp.in_rows * padded.in_cols * rp.in_pix, size);
  parallel_for(executor, rp.images * rp.in_rows, [&](int64_t i) {  // zero bits are 0.0 in both dtypes
    char* dst = reinterpret_cast<char*>(a.get()) + i * row;
    std::memset(dst, 0, before);
    std::memcpy(dst + before, static_cast<const char*>(rp.a) + i * middle, middle);
    std::memset(dst + before + middle, 0, row - before - middle);
  });
  padded.a = a.get();
  return run_rows(padded, executor);
}

std::string run_rows(const RowPass& rp, const Executor* executor) {
  const int64_t step = rp.phases * rp.cols.mul / rp.cols.div;  // A columns per output pixel
  // Border pixels that miss some column taps get calls of their own, and most of those go
  // down the columns (below). Rows of a few pixels with borders on both sides keep a
  // padded copy of A instead: there the corner pixels' calls are a large share (7x7 512->512
  // 3x3, 2 threads: 410 GFLOP/s padded, 320 by columns). On AMX a border pixel's own call
  // re-reads every B tile for one row of C: there every row gets the padded copy (ResNet
  // 3x3/64 at 56x56, bfloat16: +15 % forward and backward).
  const bool amx = uses_amx_tiles(rp.isa, rp.in);
  if (rp.phases == 1 && rp.cols.div == 1 && (amx || rp.out_cols <= kPadWidth)) {
    int64_t first = rp.cols.off, last = first;  // A columns the taps reach
    for (int64_t s = 0; s < rp.taps_s; ++s) {
      const int64_t col0 = s * rp.cols.tmul + rp.cols.off;
      first = std::min(first, col0), last = std::max(last, col0 + (rp.out_cols - 1) * step);
    }
    const int64_t left = std::max<int64_t>(0, -first), right = std::max<int64_t>(0, last - rp.cols.extent + 1);
    const bool borders = amx ? left > 0 || right > 0 : left > 0 && right > 0;
    if (borders && left + right <= rp.in_cols) return run_rows_padded(rp, left, right, executor);
  }
  std::vector<Piece> pieces;
  std::vector<ColTap> col_taps;
  // Short reductions (a pointwise layer over 64 channels) leave each call too little work
  // to hide its fixed costs: there calls take up to 4 x kMaxRows pixels of a long row
  // (float32 56x56 64->64 1x1, 2 threads: 300 -> 340 GFLOP/s). Not on AMX, where calls
  // of more than 56 pixels measured no faster (2026-12-05; docs/design.md, Loop nests).
  const int64_t reduce = rp.kg * rp.taps_r * rp.taps_s;
  const int64_t max_rows =
      amx ? kMaxRows : std::clamp(kCallReduce / reduce / kMaxRows, int64_t{1}, int64_t{4}) * kMaxRows;
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
      for (int64_t j0 = cuts[c]; j0 < cuts[c + 1]; j0 += max_rows) {
        Piece piece{f, j0, std::min(j0 + max_rows, cuts[c + 1]), int64_t(col_taps.size()), 0};
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
  d.k = rp.kg, d.lda = step * rp.in_pix, d.ldb = rp.ldb, d.ldc = rp.phases * rp.out_pix;
  d.b_vnni = rp.b_vnni;
  d.activation = rp.act, d.has_bias = rp.bias != nullptr, d.isa = rp.isa;
  d.stream_c = rp.images * rp.out_rows * rp.out_cols * rp.out_pix * size_of(rp.out_dtype) >= conv_stream_bytes();
  d.a_dtype = d.b_dtype = rp.in, d.c_dtype = rp.out_dtype;
  const int64_t in_size = size_of(rp.in), out_size = size_of(rp.out_dtype);
  std::vector<const Kernel*> kernels(2 * pieces.size());  // [piece][last block?]
  std::string error;
  for (size_t i = 0; i < pieces.size(); ++i) {
    d.m = pieces[i].j1 - pieces[i].j0;
    d.n = rp.bn;
    if (!(kernels[2 * i] = kernel_for(d, &error))) return error;
    d.n = last_n;
    if (!(kernels[2 * i + 1] = kernel_for(d, &error))) return error;
  }

  // A border pixel that misses some column taps is a piece of its own, and one call per
  // output row would be a one-row block re-reading the whole B panel for a single pixel.
  // Over the output rows whose row taps all land inside A (one contiguous run), the pixel's
  // column is one call instead, its rows the output rows: A rows one input row (times the
  // row stride) apart, C rows one output row apart. 2 threads, forward and backward-data:
  // 56x56 64->64 3x3 +4 %, 28x28 128->128 3x3 +5 % (was a padded copy), 5x5 on 28x28 +4 %,
  // 56x56 -> 28x28 3x3 stride 2 forward +18 %.
  int64_t col_lo = 0, col_hi = 0;  // output rows [col_lo, col_hi) go by column
  if (rp.rows.div == 1) {
    auto all_rows = [&](int64_t o) {
      int64_t row;
      for (int64_t r = 0; r < rp.taps_r; ++r)
        if (!rp.rows.at(o, r, &row)) return false;
      return true;
    };
    while (col_lo < rp.out_rows && !all_rows(col_lo)) ++col_lo;
    for (col_hi = col_lo; col_hi < rp.out_rows && all_rows(col_hi); ++col_hi) {}
  }
  std::vector<int64_t> col_pieces;  // pieces that go by column over [col_lo, col_hi)
  if (col_hi - col_lo >= 2)
    for (size_t i = 0; i < pieces.size(); ++i) {
      const Piece& pc = pieces[i];
      if (pc.j1 - pc.j0 == 1 && pc.tap1 > pc.tap0 && pc.tap1 - pc.tap0 < rp.taps_s) col_pieces.push_back(i);
    }
  std::vector<char> by_column(pieces.size(), 0);
  for (int64_t i : col_pieces) by_column[i] = 1;
  std::vector<const Kernel*> col_kernels(2);  // [last block?]
  if (!col_pieces.empty()) {
    Desc dc = d;
    dc.m = col_hi - col_lo;
    dc.lda = rp.rows.mul * rp.in_cols * rp.in_pix, dc.ldc = rp.out_cols * rp.out_pix;
    dc.n = rp.bn;
    if (!(col_kernels[0] = kernel_for(dc, &error))) return error;
    dc.n = last_n;
    if (!(col_kernels[1] = kernel_for(dc, &error))) return error;
  }

  // Loop order (outer to inner): group, image, set of channel blocks, output row, piece,
  // block of the set. A set's B panels stay in L2 while every row of A that uses them
  // streams through once per set, not once per block. Where reading all of B once per
  // image moves more bytes than reading all images' A once per set (small maps, many
  // channels), images go inside sets instead: 7x7 512->512 3x3 re-read its 9.4 MB of
  // weights for each of 8 images.
  const int64_t panel_bytes = rp.taps_r * rp.taps_s * rp.tap_size * in_size;
  int64_t per_set = std::clamp<int64_t>(kPanelBudget / panel_bytes, 1, blocks);
  while (blocks % per_set != 0) --per_set;
  const int64_t sets = blocks / per_set;
  const int64_t image_bytes = rp.in_rows * rp.in_cols * rp.in_pix * in_size;
  const bool images_inside = sets * rp.images * image_bytes < rp.images * blocks * panel_bytes;
  // Outputs no tap reaches (most of dx for a strided 1x1 convolution) are zero: then one
  // memset pass over the whole output beats filling them block by block.
  bool some_empty = false;
  for (const Piece& pc : pieces) some_empty |= pc.tap0 == pc.tap1;
  for (int64_t o = 0; o < rp.out_rows && !some_empty; ++o) {
    int64_t row, valid = 0;
    for (int64_t r = 0; r < rp.taps_r; ++r) valid += rp.rows.at(o, r, &row);
    some_empty = valid == 0;
  }
  const bool zeroed = some_empty && rp.bias == nullptr && rp.act == Activation::none;
  if (zeroed) {
    const int64_t size = rp.images * rp.out_rows * rp.out_cols * rp.out_pix * out_size, chunk = 1 << 18;
    parallel_for(executor, ceil_div(size, chunk), [&](int64_t c) {
      std::memset(static_cast<char*>(rp.out) + c * chunk, 0, std::min(chunk, size - c * chunk));
    });
  }
  // One call: piece pc of output row o (its first row, for a column call) of image img,
  // group g, channel block blk, reducing over every tap that lands inside A.
  auto call = [&](const Kernel& kernel, int64_t g, int64_t img, int64_t o, const Piece& pc, int64_t blk) {
    const int64_t channel = g * rp.ng + blk * rp.bn;
    char* out = static_cast<char*>(rp.out) +
                ((img * rp.out_rows + o) * rp.out_cols + pc.phase + pc.j0 * rp.phases) * rp.out_pix * out_size +
                channel * out_size;
    const float* bias = rp.bias ? rp.bias + channel : nullptr;
    thread_local std::vector<int64_t> offs_a, offs_b;
    offs_a.clear(), offs_b.clear();
    const char* b_block = static_cast<const char*>(rp.b) + (g * blocks + blk) * rp.taps_r * rp.taps_s * rp.tap_size * in_size;
    for (int64_t r = 0; r < rp.taps_r; ++r) {
      int64_t row;
      if (!rp.rows.at(o, r, &row)) continue;
      const int64_t row_base = (img * rp.in_rows + row) * rp.in_cols;
      for (int64_t t = pc.tap0; t < pc.tap1; ++t) {
        offs_a.push_back((row_base + col_taps[t].col) * rp.in_pix + g * rp.kg);
        offs_b.push_back((r * rp.taps_s + col_taps[t].s) * rp.tap_size);
      }
    }
    if (offs_a.empty()) {
      if (!zeroed) fill_epilogue(out, rp.out_dtype, kernel.desc.m, kernel.desc.n, kernel.desc.ldc, bias, rp.act, rp.isa);
      return;
    }
    kernel(Batch::offsets(rp.a, offs_a.data(), b_block, offs_b.data(), offs_a.size()), out, 1.0f, bias);
  };
  const int64_t n_pieces = pieces.size(), n_cols = col_pieces.size();
  const int64_t row_items = rp.groups * rp.images * blocks * rp.out_rows * n_pieces;
  const int64_t items = row_items + rp.groups * rp.images * n_cols * blocks;
  parallel_for(executor, items, [&](int64_t item) {
    if (item >= row_items) {  // a column call: (group, image, column piece, block)
      const int64_t rest = item - row_items, blk = rest % blocks, cp = rest / blocks % n_cols;
      const int64_t img = rest / blocks / n_cols % rp.images, g = rest / blocks / n_cols / rp.images;
      return call(*col_kernels[blk + 1 == blocks], g, img, col_lo, pieces[col_pieces[cp]], blk);
    }
    const int64_t blk_in_set = item % per_set;
    int64_t rest = item / per_set;
    const int64_t piece = rest % n_pieces;
    rest /= n_pieces;
    const int64_t o = rest % rp.out_rows;
    rest /= rp.out_rows;
    int64_t set, img;
    if (images_inside) img = rest % rp.images, rest /= rp.images, set = rest % sets, rest /= sets;
    else set = rest % sets, rest /= sets, img = rest % rp.images, rest /= rp.images;
    const int64_t blk = set * per_set + blk_in_set, g = rest;
    if (by_column[piece] && o >= col_lo && o < col_hi) return;  // its column call does it
    call(*kernels[2 * piece + (blk + 1 == blocks)], g, img, o, pieces[piece], blk);
  });
  return "";
}

// A 1x1, stride-1, unpadded convolution is one GEMM over all pixels: one long row.
bool pointwise(const ConvShape& s) {
  return s.taps_h == 1 && s.taps_w == 1 && s.stride_h == 1 && s.stride_w == 1 &&
         s.pad_top == 0 && s.pad_left == 0 && s.out_h == s.in_h && s.out_w == s.in_w;
}

// Such a pass (forward or backward-data) as that one row.
void as_one_row(const ConvShape& s, RowPass* rp) {
  rp->images = rp->in_rows = rp->out_rows = 1;
  rp->in_cols = rp->out_cols = s.batch * s.in_h * s.in_w;
  rp->rows.extent = 1, rp->cols.extent = rp->in_cols;
}

// The forward pass of shape s as rows of output pixels (before any one-long-row view).
RowPass forward_rows(const ConvShape& s, DType in, const void* x, const PackedWeights& packed, int64_t bn,
                     const float* bias, Activation act, DType out, void* y, Isa isa) {
  RowPass rp;
  rp.images = s.batch, rp.groups = s.groups, rp.taps_r = s.taps_h, rp.taps_s = s.taps_w;
  rp.out_rows = s.out_h, rp.out_cols = s.out_w, rp.out_pix = s.out_c;
  rp.in_rows = s.in_h, rp.in_cols = s.in_w, rp.in_pix = s.in_c;
  rp.kg = s.in_c / s.groups, rp.ng = s.out_c / s.groups, rp.bn = bn, rp.phases = 1;
  rp.rows = {s.stride_h, s.dil_h, -s.pad_top, 1, s.in_h};
  rp.cols = {s.stride_w, s.dil_w, -s.pad_left, 1, s.in_w};
  rp.in = in, rp.out_dtype = out;
  rp.a = x, rp.b = packed.data.get(), rp.ldb = packed.ld, rp.tap_size = packed.tap_size, rp.b_vnni = packed.vnni;
  rp.bias = bias, rp.out = y, rp.act = act, rp.isa = isa;
  return rp;
}

}  // namespace

std::string conv2d_forward(const ConvShape& s, DType in, const void* x, const void* w,
                           const float* bias, Activation act, DType out, void* y, Isa isa,
                           const Executor* executor) {
  if (std::string e = validate(s); !e.empty()) return e;
  const int64_t bn = std::min(s.out_c / s.groups, kBlock);
  if (widen_pays(s) && s.dil_w == 1) {
    // Undilated, a wide pixel is the run of S * C values of x from column q * sw - pl on:
    // the calls read those runs in place (rows lda = sw * C apart, overlapping) from a copy
    // of x with zero columns at both ends, instead of a widened copy S / sw times x's size
    // (the stem: 4.9 instead of 17 MB written).
    const ConvShape ws = widened(s);
    auto packed = pack_weights(ws, in, w, /*transposed=*/false, bn, isa, executor);
    RowPass rp = forward_rows(ws, in, x, packed, bn, bias, act, out, y, isa);
    rp.in_cols = s.in_w, rp.in_pix = s.in_c;
    rp.cols = {s.stride_w, 0, -s.pad_left, 1, s.in_w};
    const int64_t left = std::max<int64_t>(0, s.pad_left);
    const int64_t right = std::max<int64_t>(0, (s.out_w - 1) * s.stride_w - s.pad_left + s.taps_w - s.in_w);
    return run_rows_padded(rp, left, right, executor);
  }
  if (widen_pays(s)) {  // k = S * C per call instead of C, S times fewer calls
    return with_type(in, [&](auto zero) {
      using T = decltype(zero);
      auto wide = widen_input(s, static_cast<const T*>(x), executor);
      return conv2d_forward(widened(s), in, wide.get(), w, bias, act, out, y, isa, executor);
    });
  }
  // A strided pointwise layer with narrow output rows (7 pixels at 14x14 -> 7x7) would make
  // each call one tile that re-reads its weight panel for 7 pixels; gathered, the pixels
  // make one long row (float32 14x14 1024->2048/2, 2 threads: 297-317 -> 360-373 GFLOP/s;
  // at 28 or 14 output pixels per row the copy costs more than it saves). Not on AMX,
  // where it was not measured.
  if (subsample_pays(s) && s.out_w <= 8 && !uses_amx_tiles(isa, in)) {
    return with_type(in, [&](auto zero) {
      using T = decltype(zero);
      auto sub = subsample_input(s, static_cast<const T*>(x), executor);
      return conv2d_forward(subsampled(s), in, sub.get(), w, bias, act, out, y, isa, executor);
    });
  }
  auto packed = pack_weights(s, in, w, /*transposed=*/false, bn, isa, executor);
  RowPass rp = forward_rows(s, in, x, packed, bn, bias, act, out, y, isa);
  if (pointwise(s)) as_one_row(s, &rp);
  return run_rows(rp, executor);
}

std::string conv2d_backward_data(const ConvShape& s, DType in, const void* dy, const void* w,
                                 DType out, void* dx, Isa isa, const Executor* executor) {
  if (std::string e = validate(s); !e.empty()) return e;
  if (widen_pays(s)) {
    const ConvShape ws = widened(s);
    Buffer<float> wide = work_buffer<float>(ws.batch * ws.in_h * ws.in_w * ws.in_c);
    if (std::string e = conv2d_backward_data(ws, in, dy, w, DType::f32, wide.get(), isa, executor); !e.empty())
      return e;
    narrow_gradient(s, wide.get(), out, dx, executor);
    return "";
  }
  const int64_t cg = s.in_c / s.groups, kg = s.out_c / s.groups, bn = std::min(cg, kBlock);
  auto packed = pack_weights(s, in, w, /*transposed=*/true, bn, isa, executor);
  // dx[n, h, v] = sum over taps of dy[n, p, q] @ w[r, s]^T where h = p*sh + r*dh - pt,
  // i.e. p = (h + pt - r*dh) / sh when exact; columns likewise, one phase per v mod sw.
  RowPass rp;
  rp.images = s.batch, rp.groups = s.groups, rp.taps_r = s.taps_h, rp.taps_s = s.taps_w;
  rp.out_rows = s.in_h, rp.out_cols = s.in_w, rp.out_pix = s.in_c;
  rp.in_rows = s.out_h, rp.in_cols = s.out_w, rp.in_pix = s.out_c;
  rp.kg = kg, rp.ng = cg, rp.bn = bn, rp.phases = s.stride_w;
  rp.rows = {1, -s.dil_h, s.pad_top, s.stride_h, s.out_h};
  rp.cols = {1, -s.dil_w, s.pad_left, s.stride_w, s.out_w};
  if (pointwise(s)) as_one_row(s, &rp);
  rp.in = in, rp.out_dtype = out;
  rp.a = dy, rp.b = packed.data.get(), rp.ldb = packed.ld, rp.tap_size = packed.tap_size, rp.b_vnni = packed.vnni;
  rp.bias = nullptr, rp.out = dx, rp.act = Activation::none;
  rp.isa = isa;
  return run_rows(rp, executor);
}
}  // namespace jbr::prim
