// What the convolution passes share beyond the row-pass engine: index arithmetic, work
// buffers, transposes, and the two re-layouts of x that make a pass cheaper (widening
// few-channel inputs, subsampling strided 1x1 convolutions). Internal to cpp/primitives.
#pragma once

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "brgemm/brgemm.h"
#include "primitives/elements.h"
#include "primitives/parallel.h"
#include "primitives/scratch.h"
#include "shape/conv_shape.h"

namespace jbr::prim::conv_layout {

inline int64_t floor_div(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }
inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

inline int64_t threads_of(const Executor* executor) {
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

// Work buffers of `count` elements of `size` bytes (float storage keeps them aligned).
inline Buffer<float> buffer(int64_t count, int64_t size) { return work_buffer<float>((count * size + 3) / 4); }

// m x n block (leading dimension ld, dtype `dtype`) = act(bias or 0): the output of an
// empty reduction.
inline void fill_epilogue(void* out, DType dtype, int64_t m, int64_t n, int64_t ld, const float* bias,
                   Activation act, Isa isa) {
  thread_local std::vector<float> row;
  row.resize(n);
  for (int64_t j = 0; j < n; ++j) row[j] = bias ? bias[j] : 0.0f;
  apply_activation(act, row.data(), n, isa);
  with_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) store(row[j], static_cast<T*>(out) + i * ld + j);
    return 0;
  });
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < rows, j < cols, through the kernel
// layer's vectorised transposes.
inline void transpose(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst,
               int64_t ld_dst) {
  transpose_f32(src, ld_src, rows, cols, dst, ld_dst, active_isa());
}

inline void transpose(const uint16_t* src, int64_t ld_src, int64_t rows, int64_t cols, uint16_t* dst,
               int64_t ld_dst) {
  transpose_bf16(src, ld_src, rows, cols, dst, ld_dst, active_isa());
}

inline const Kernel* kernel_for(Desc d, std::string* error) {
  if (std::string e = validate(d); !e.empty()) {
    *error = e;
    return nullptr;
  }
  return &get_kernel(d);
}

// Few input channels use few vector lanes in every pass (the stem's
// 3). Folding the filter columns into the channels, x_wide[n, h, q, t*C + c] =
// x[n, h, q*sw + t*dw - pl, c] (zero outside x), turns the problem into one with a single
// filter column, t*C + c channels and stride 1 along the width, whose HWIO weights
// (R, 1, S*C, K) are the same array.
inline bool widen_pays(const ConvShape& s) { return s.groups == 1 && s.taps_w > 1 && s.in_c < 16; }

inline ConvShape widened(const ConvShape& s) {
  ConvShape w = s;
  w.in_w = s.out_w, w.in_c = s.taps_w * s.in_c;
  w.taps_w = 1, w.stride_w = 1, w.dil_w = 1, w.pad_left = 0;
  return w;
}

// Calls visit(input column or -1, wide column offset) for every (q, t) of input row data.
template <typename Visit>
void for_each_wide_pixel(const ConvShape& s, Visit visit) {
  for (int64_t q = 0; q < s.out_w; ++q)
    for (int64_t t = 0; t < s.taps_w; ++t) {
      const int64_t v = q * s.stride_w + t * s.dil_w - s.pad_left;
      visit(v >= 0 && v < s.in_w ? v : -1, (q * s.taps_w + t) * s.in_c);
    }
}

// Undilated, wide pixel q is the run of S adjacent input pixels from column q * sw - pl
// on; its taps [lo, hi) lie inside x (the others read the padding).
struct WideRun {
  int64_t first, lo, hi;
};
inline WideRun wide_run(const ConvShape& s, int64_t q) {
  const int64_t first = q * s.stride_w - s.pad_left;
  const int64_t lo = std::clamp<int64_t>(-first, 0, s.taps_w);
  return {first, lo, std::clamp<int64_t>(s.in_w - first, lo, s.taps_w)};
}

template <typename T>
Buffer<T> widen_input(const ConvShape& s, const T* x, const Executor* executor) {
  const int64_t span = s.taps_w * s.in_c, row = s.out_w * span;
  Buffer<T> wide = work_buffer<T>(s.batch * s.in_h * row);
  parallel_for(executor, s.batch * s.in_h, [&](int64_t nh) {
    const T* src = x + nh * s.in_w * s.in_c;
    T* dst = wide.get() + nh * row;
    if (s.dil_w != 1) {
      for_each_wide_pixel(s, [&](int64_t v, int64_t at) {
        for (int64_t c = 0; c < s.in_c; ++c) dst[at + c] = v < 0 ? T{} : src[v * s.in_c + c];
      });
      return;
    }
    // Undilated, a wide pixel is one run of S adjacent input pixels: copy it whole (the
    // stem's widening took 27 % of its forward element by element), zeros past the edges.
    for (int64_t q = 0; q < s.out_w; ++q, dst += span) {
      const WideRun run = wide_run(s, q);
      std::fill(dst, dst + run.lo * s.in_c, T{});
      std::copy(src + (run.first + run.lo) * s.in_c, src + (run.first + run.hi) * s.in_c, dst + run.lo * s.in_c);
      std::fill(dst + run.hi * s.in_c, dst + span, T{});
    }
  });
  return wide;
}

// dx (dtype `out`) from the widened problem's float32 input gradient: every wide column
// adds into its pixel, in float32, rounded once at the end.
inline void narrow_gradient(const ConvShape& s, const float* wide, DType out, void* dx, const Executor* executor) {
  const int64_t row = s.out_w * s.taps_w * s.in_c, pixels = s.in_w * s.in_c;
  parallel_for(executor, s.batch * s.in_h, [&](int64_t nh) {
    const float* src = wide + nh * row;
    thread_local std::vector<float> sum;
    sum.assign(pixels, 0.0f);
    if (s.dil_w != 1) {
      for_each_wide_pixel(s, [&](int64_t v, int64_t at) {
        if (v >= 0)
          for (int64_t c = 0; c < s.in_c; ++c) sum[v * s.in_c + c] += src[at + c];
      });
    } else {
      // Undilated: each wide pixel adds one run of adjacent pixels (see widen_input).
      const int64_t span = s.taps_w * s.in_c;
      for (int64_t q = 0; q < s.out_w; ++q) {
        const WideRun run = wide_run(s, q);
        float* to = sum.data() + (run.first + run.lo) * s.in_c;
        const float* from = src + q * span + run.lo * s.in_c;
        for (int64_t i = 0; i < (run.hi - run.lo) * s.in_c; ++i) to[i] += from[i];
      }
    }
    with_type(out, [&](auto zero) {
      using T = decltype(zero);
      T* dst = static_cast<T*>(dx) + nh * pixels;
      for (int64_t i = 0; i < pixels; ++i) store(sum[i], dst + i);
      return 0;
    });
  });
}

// A strided 1x1 convolution whose every output pixel reads a real input pixel (no
// padding) uses only every stride-th pixel of x: gathered together, they make it a
// pointwise convolution, whose weight-update reduces long runs of contiguous pixels
// instead of one short strided row per call.
inline bool subsample_pays(const ConvShape& s) {
  return s.taps_h == 1 && s.taps_w == 1 && (s.stride_h > 1 || s.stride_w > 1) &&
         s.pad_top == 0 && s.pad_left == 0 && (s.out_h - 1) * s.stride_h < s.in_h &&
         (s.out_w - 1) * s.stride_w < s.in_w;
}

inline ConvShape subsampled(const ConvShape& s) {
  ConvShape p = s;
  p.in_h = s.out_h, p.in_w = s.out_w, p.stride_h = p.stride_w = 1;
  return p;
}

template <typename T>
Buffer<T> subsample_input(const ConvShape& s, const T* x, const Executor* executor) {
  Buffer<T> sub = work_buffer<T>(s.batch * s.out_h * s.out_w * s.in_c);
  parallel_for(executor, s.batch * s.out_h, [&](int64_t np) {
    const T* src = x + ((np / s.out_h * s.in_h) + np % s.out_h * s.stride_h) * s.in_w * s.in_c;
    T* dst = sub.get() + np * s.out_w * s.in_c;
    for (int64_t q = 0; q < s.out_w; ++q)
      std::copy_n(src + q * s.stride_w * s.in_c, s.in_c, dst + q * s.in_c);
  });
  return sub;
}

}  // namespace jbr::prim::conv_layout
