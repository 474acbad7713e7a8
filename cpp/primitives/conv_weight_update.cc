// The weight-update pass of the 2-D convolution (conv.h): dw = sum over images and pixels of
// x^T dy per tap, as brgemm calls over runs of pixels.
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


// Whether batch element i's A and B blocks start i * step_a and i * step_b after the
// first's: then the batch is one block, `size()` times as deep.
bool rows_contiguous(const std::vector<int64_t>& offs_a, int64_t step_a,
                     const std::vector<int64_t>& offs_b, int64_t step_b) {
  for (size_t i = 1; i < offs_a.size(); ++i)
    if (offs_a[i] != offs_a[0] + int64_t(i) * step_a || offs_b[i] != offs_b[0] + int64_t(i) * step_b)
      return false;
  return true;
}

// The weight-update for element type T (x and dy); dw is float32.
template <typename T>
std::string weight_update(const ConvShape& s, const T* x, const T* dy, float* dw, Isa isa,
                          const Executor* executor) {
  if (widen_pays(s)) return weight_update(widened(s), widen_input(s, x, executor).get(), dy, dw, isa, executor);
  if (subsample_pays(s))
    return weight_update(subsampled(s), subsample_input(s, x, executor).get(), dy, dw, isa, executor);
  const int64_t cg = s.in_c / s.groups, kg = s.out_c / s.groups;
  const int64_t bc = std::min(cg, kBlock), bk = std::min(kg, kBlock);
  const int64_t cblocks = ceil_div(cg, bc), kblocks = ceil_div(kg, bk);
  const int64_t sw = s.stride_w, phase_w = ceil_div(s.in_w, sw);
  const int64_t taps = s.taps_h * s.taps_w;

  // Per filter column t: the output columns q whose input column q*sw + t*dw - pl exists,
  // and where that column lands in x transposed by phase: (q + shift) * sw + phase.
  struct Cols { int64_t lo, hi, phase, shift; };
  std::vector<Cols> cols(s.taps_w);
  std::vector<char> phase_used(sw, 0);
  for (int64_t t = 0; t < s.taps_w; ++t) {
    const int64_t c0 = t * s.dil_w - s.pad_left;
    cols[t] = {std::max<int64_t>(0, ceil_div(-c0, sw)),
               std::min(s.out_w, floor_div(s.in_w - 1 - c0, sw) + 1), c0 - floor_div(c0, sw) * sw,
               floor_div(c0, sw)};
    if (cols[t].lo < cols[t].hi) phase_used[cols[t].phase] = 1;
  }
  // bfloat16 on avx512bf16 and amx (wants_vnni_b): dy is packed once into the kernel's pair layout, one block per output
  // row, and every tap reduces over the whole row of out_w pixels; x's transposed rows get
  // zero columns on both sides, so a tap that reaches past the image edge multiplies zeros
  // (per-call packing of shifted dy windows cost ~30 % of the kernel's time).
  const bool vnni = wants_vnni_b(isa, dtype_of<T>());
  int64_t pad_lo = 0, pad_hi = 0;
  if (vnni)
    for (const Cols& ct : cols) {
      if (ct.lo >= ct.hi) continue;  // (a tap that sees only padding is skipped)
      pad_lo = std::max(pad_lo, -ct.shift);
      pad_hi = std::max(pad_hi, s.out_w + ct.shift - phase_w);
    }
  const int64_t row_w = phase_w + pad_lo + pad_hi;  // columns of one transposed phase row
  const AxisMap rows{s.stride_h, s.dil_h, -s.pad_top, 1, s.in_h};
  // float32 reads x in place, as the kernel's transposed A (element (c, q) of a call's A at
  // x[pixel q * sw][c]); bfloat16, whose dot kernels pair elements along A's rows,
  // transposes x's rows into channels x pixels first.
  constexpr bool direct = std::is_same_v<T, float>;

  // Work items: (split of the reduction rows, group, range of input-channel blocks, range
  // of output-channel blocks). Each reduces its rows in chunks: transpose the chunk's input
  // rows (its channels only) into a local buffer, then one brgemm call per (tap, channel
  // block, output-channel block) accumulating into that weight block. The ranges keep an
  // item's weight blocks in L2 across chunks (each range re-reads x or dy, so they stay as
  // wide as that allows); reduction splits into partial sums, while those stay small, and
  // then narrower ranges give every thread enough items.
  const int64_t reduce_rows = s.batch * s.out_h;
  const int64_t dw_size = taps * cg * s.out_c;
  const int64_t want = threads_of(executor) == 1 ? 1 : 8 * threads_of(executor);
  const int64_t splits = std::clamp<int64_t>(
      want / s.groups, 1, std::min(reduce_rows, std::max<int64_t>(1, kPartialBudget / dw_size)));
  int64_t cranges = 1, kranges = 1;
  auto narrow = [&] {  // split the wider of the two ranges further; false when both are single blocks
    const bool more_k = kranges < kblocks && (cranges == cblocks || kblocks / kranges >= cblocks / cranges);
    if (!more_k && cranges == cblocks) return false;
    int64_t& ranges = more_k ? kranges : cranges;
    const int64_t total = more_k ? kblocks : cblocks;
    for (++ranges; total % ranges != 0; ++ranges) {}
    return true;
  };
  while (taps * ceil_div(cg, cranges) * ceil_div(kg, kranges) > kPortionBudget && narrow()) {}
  while (splits * s.groups * cranges * kranges < want && narrow()) {}
  const int64_t cb_per_range = cblocks / cranges, kb_per_range = kblocks / kranges;
  Buffer<float> partial;
  if (splits > 1) partial = work_buffer<float>(splits * dw_size);
  const int64_t range_c = cb_per_range * bc;  // channels a transposed row holds
  const int64_t slot_size = sw * range_c * row_w;  // one transposed input row: [phase][c][v / sw]
  // Output rows per chunk: at most kMaxReduce pixels per call, and the input rows they read,
  // (rows - 1) * sh + (R - 1) * dh + 1, within the transpose buffer.
  const int64_t halo = (s.taps_h - 1) * s.dil_h + 1;
  const int64_t rows_per_chunk = std::clamp<int64_t>(
      std::min(kMaxReduce / s.out_w, (kTransposeBudget / slot_size - halo) / s.stride_h + 1), 1,
      reduce_rows);

  // Input row (channels x pixels, one matrix per column phase), as the A blocks want it:
  // phase f holds pixels f, f + sw, ..., through the kernel layer's vectorised transpose.
  auto transpose_row = [&](const T* src, int64_t channels, int64_t phase_channels, T* dst) {
    if (vnni) std::fill_n(dst, sw * phase_channels * row_w, T{});
    for (int64_t f = 0; f < sw; ++f) {
      const int64_t pixels = ceil_div(s.in_w - f, sw);
      if (phase_used[f] && pixels > 0)
        transpose(src + f * s.in_c, sw * s.in_c, pixels, channels, dst + f * phase_channels * row_w + pad_lo, row_w);
    }
  };
  // Several output-channel ranges would each transpose the same rows: then transpose every
  // used row once up front, x_t[n][h][g][phase][c][v / sw].
  const bool shared = !direct && kranges > 1;
  const int64_t shared_row = s.groups * sw * cg * row_w;
  Buffer<T> x_t;
  if (shared) {
    std::vector<char> row_used(s.in_h, 0);
    for (int64_t p = 0; p < s.out_h; ++p)
      for (int64_t r = 0; r < s.taps_h; ++r) {
        int64_t h;
        if (rows.at(p, r, &h)) row_used[h] = 1;
      }
    x_t = work_buffer<T>(s.batch * s.in_h * shared_row);
    parallel_for(executor, s.batch * s.in_h, [&](int64_t nh) {
      if (!row_used[nh % s.in_h]) return;
      for (int64_t g = 0; g < s.groups; ++g)
        transpose_row(x + nh * s.in_w * s.in_c + g * cg, cg, cg, x_t.get() + nh * shared_row + g * sw * cg * row_w);
    });
  }

  // dy's rows are out_c apart: with several output-channel blocks, pack them
  // [g][kb][n * out_h + p][q][bk] so each call's B panel is contiguous, where its rows lie a
  // multiple of 4 KiB apart (all in the same L1 sets), or 1 KiB and more and each panel is
  // read by 16 or more (tap, input-channel block) calls. Elsewhere the copy (a pass over all
  // of dy) costs more than it saves. One thread, GFLOP/s: 56x56 64->256 1x1 95 -> 130
  // unpacked, 28x28 128->512 1x1 121 -> 138; 14x14 256->256 3x3 136 unpacked -> 151.
  const int64_t dy_row_bytes = s.out_c * int64_t{sizeof(T)};
  const bool pack_dy = s.out_c != bk && (rows_page_apart<T>(s.out_c) || (dy_row_bytes >= 1024 && taps * cblocks >= 16));
  const int64_t ldb = pack_dy ? bk : s.out_c;
  Buffer<T> dy_packed;
  if (pack_dy && !vnni) {
    const int64_t plane = reduce_rows * s.out_w * bk;
    dy_packed = work_buffer<T>(s.groups * kblocks * plane);
    parallel_for(executor, reduce_rows, [&](int64_t e) {
      for (int64_t q = 0; q < s.out_w; ++q) {
        const T* src = dy + (e * s.out_w + q) * s.out_c;
        for (int64_t g = 0; g < s.groups; ++g)
          for (int64_t kb = 0; kb < kblocks; ++kb)
            std::copy_n(src + g * kg + kb * bk, std::min(bk, kg - kb * bk),
                        dy_packed.get() + (g * kblocks + kb) * plane + (e * s.out_w + q) * bk);
      }
    });
  }
  const int64_t ld_vnni = vnni_tile_ld(s.out_w), vnni_row = vnni_elements(s.out_w, bk);
  Buffer<T> dy_vnni;  // [g][kb][n * out_h + p] pair-layout blocks of out_w x bk
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (vnni) {
      dy_vnni = work_buffer<T>(s.groups * kblocks * reduce_rows * vnni_row);
      parallel_for(executor, s.groups * kblocks * reduce_rows, [&](int64_t item) {
        const int64_t e = item % reduce_rows, kb = item / reduce_rows % kblocks, g = item / reduce_rows / kblocks;
        pack_b_vnni(dy + e * s.out_w * s.out_c + g * kg + kb * bk, s.out_c, s.out_w, std::min(bk, kg - kb * bk),
                    dy_vnni.get() + item * vnni_row, ld_vnni);
      });
    }
  }
  auto b_base = [&](int64_t g, int64_t kb) {
    if (vnni) return static_cast<const T*>(dy_vnni.get() + (g * kblocks + kb) * reduce_rows * vnni_row);
    return pack_dy ? dy_packed.get() + (g * kblocks + kb) * reduce_rows * s.out_w * bk
                   : dy + g * kg + kb * bk;
  };

  std::string error;
  std::mutex error_mutex;
  parallel_for(executor, splits * s.groups * cranges * kranges, [&](int64_t item) {
    const int64_t kr = item % kranges, cr = item / kranges % cranges;
    const int64_t g = item / kranges / cranges % s.groups;
    const int64_t split = item / kranges / cranges / s.groups;
    const int64_t c_first = cr * range_c, c_count = std::min(range_c, cg - c_first);
    float* out = splits > 1 ? partial.get() + split * dw_size : dw;
    // Weight block (r, t, cb-th block of the range, kb-th block of the range), HWIO.
    auto block_index = [&](int64_t r, int64_t t, int64_t cb, int64_t kb) {
      return ((r * s.taps_w + t) * cb_per_range + cb) * kb_per_range + kb;
    };
    auto block_of = [&](int64_t r, int64_t t, int64_t cb, int64_t kb) {
      return out + ((r * s.taps_w + t) * cg + c_first + cb * bc) * s.out_c + g * kg +
             (kr * kb_per_range + kb) * bk;
    };
    thread_local std::vector<T> xt;
    thread_local std::vector<int64_t> slot_of, offs_a, offs_b;
    std::vector<char> written(taps * cb_per_range * kb_per_range, 0);

    const int64_t e_begin = reduce_rows * split / splits, e_end = reduce_rows * (split + 1) / splits;
    for (int64_t e0 = e_begin; e0 < e_end; e0 += rows_per_chunk) {
      const int64_t e1 = std::min(e_end, e0 + rows_per_chunk);
      // Transpose every input row the chunk reads, once (unless x_t holds them all).
      const int64_t n_first = e0 / s.out_h, n_last = (e1 - 1) / s.out_h;
      if (!direct && !shared) {
        slot_of.assign((n_last - n_first + 1) * s.in_h, -1);
        int64_t slots = 0;
        for (int64_t e = e0; e < e1; ++e)
          for (int64_t r = 0; r < s.taps_h; ++r) {
            int64_t h;
            if (rows.at(e % s.out_h, r, &h) && slot_of[(e / s.out_h - n_first) * s.in_h + h] < 0)
              slot_of[(e / s.out_h - n_first) * s.in_h + h] = slots++;
          }
        if (static_cast<int64_t>(xt.size()) < slots * slot_size) xt.resize(slots * slot_size);
        for (int64_t key = 0; key < static_cast<int64_t>(slot_of.size()); ++key)
          if (slot_of[key] >= 0)
            transpose_row(x + ((n_first * s.in_h + key) * s.in_w) * s.in_c + g * cg + c_first, c_count,
                          range_c, xt.data() + slot_of[key] * slot_size);
      }
      const T* a_base = direct ? x + g * cg + c_first
                        : shared ? x_t.get() + (g * sw * cg + c_first) * row_w : xt.data();
      const int64_t phase_size = (shared ? cg : range_c) * row_w;
      // One call per (tap, channel block, output-channel block) over the chunk's rows.
      for (int64_t r = 0; r < s.taps_h; ++r)
        for (int64_t t = 0; t < s.taps_w; ++t) {
          const Cols& ct = cols[t];
          if (ct.lo >= ct.hi) continue;
          const int64_t lo = vnni ? 0 : ct.lo, hi = vnni ? s.out_w : ct.hi;
          offs_a.clear(), offs_b.clear();
          for (int64_t e = e0; e < e1; ++e) {
            int64_t h;
            if (!rows.at(e % s.out_h, r, &h)) continue;
            if (direct) {
              offs_a.push_back(((e / s.out_h * s.in_h + h) * s.in_w + (ct.lo + ct.shift) * sw + ct.phase) * s.in_c);
            } else {
              const int64_t row = shared ? (e / s.out_h * s.in_h + h) * shared_row
                                         : slot_of[(e / s.out_h - n_first) * s.in_h + h] * slot_size;
              offs_a.push_back(row + ct.phase * phase_size + pad_lo + lo + ct.shift);
            }
            offs_b.push_back(vnni ? e * vnni_row : (e * s.out_w + lo) * ldb);
          }
          if (offs_a.empty()) continue;
          const int64_t lda = direct ? sw * s.in_c : row_w;
          int64_t depth = hi - lo;
          if (direct && rows_contiguous(offs_a, depth * lda, offs_b, depth * ldb)) {
            // One long reduction instead of a batch of short rows (7 pixels each on 7x7 maps).
            depth *= static_cast<int64_t>(offs_a.size());
            offs_a.resize(1), offs_b.resize(1);
          }
          for (int64_t cb = 0; cb < cb_per_range; ++cb)
            for (int64_t kb = 0; kb < kb_per_range; ++kb) {
              char& seen = written[block_index(r, t, cb, kb)];
              const int64_t kb_abs = kr * kb_per_range + kb, k_first = kb_abs * bk;
              Desc d;
              d.m = std::min(bc, c_count - cb * bc), d.n = std::min(bk, kg - k_first);
              d.k = depth;
              d.lda = lda, d.ldb = vnni ? ld_vnni : ldb, d.ldc = s.out_c, d.isa = isa;
              d.b_vnni = vnni;
              d.a_transposed = direct;
              d.a_dtype = d.b_dtype = dtype_of<T>();
              d.beta = seen ? 1.0f : 0.0f;
              std::string kernel_error;
              const Kernel* kernel = kernel_for(d, &kernel_error);
              if (!kernel) {
                std::lock_guard<std::mutex> lock(error_mutex);
                error = kernel_error;
                return;
              }
              (*kernel)(Batch::offsets(a_base + cb * bc * (direct ? 1 : row_w), offs_a.data(), b_base(g, kb_abs),
                                       offs_b.data(), offs_a.size()),
                        block_of(r, t, cb, kb));
              seen = 1;
            }
        }
    }
    // Weight blocks no row reached (taps that only see padding) are zero.
    for (int64_t r = 0; r < s.taps_h; ++r)
      for (int64_t t = 0; t < s.taps_w; ++t)
        for (int64_t cb = 0; cb < cb_per_range; ++cb)
          for (int64_t kb = 0; kb < kb_per_range; ++kb)
            if (!written[block_index(r, t, cb, kb)])
              fill_epilogue(block_of(r, t, cb, kb), DType::f32, std::min(bc, c_count - cb * bc),
                            std::min(bk, kg - (kr * kb_per_range + kb) * bk), s.out_c, nullptr,
                            Activation::none, isa);
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

}  // namespace

std::string conv2d_weight_update(const ConvShape& s, DType in, const void* x, const void* dy,
                                 float* dw, Isa isa, const Executor* executor) {
  if (std::string e = validate(s); !e.empty()) return e;
  return with_type(in, [&](auto zero) {
    using T = decltype(zero);
    return weight_update(s, static_cast<const T*>(x), static_cast<const T*>(dy), dw, isa, executor);
  });
}

}  // namespace jbr::prim
