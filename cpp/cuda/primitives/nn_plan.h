// Host-side planning for dense and conv2d on CUDA, in plain C++ (no CUDA headers), so it is
// compiled and unit-tested on machines without a GPU:
//   - decoding the buffers' dims with the CPU handlers' checks and wording,
//   - each pass as one batch-reduce GEMM: out[p] = sum_{i < count} A(p, i) @ B(p, i), with
//     `problems` independent outputs (the grid's problem index p), and the element offsets
//     of A, B, the output and the bias as functions of (p, i, row, kk, col).
// The offset functions are JBR_HOST_DEVICE: the GPU kernels call exactly these, and the tests
// run them through a host emulation of the GEMM against NumPy / lax references.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/primitives/plan.h"
#include "shape/conv_shape.h"

namespace jbr::cuda {

struct GemmShape {
  int64_t m = 0, n = 0, k = 0, count = 0, problems = 0;
};

// ---------------------------------------------------------------- dense

// x (P..., n, c), kernel (1 or P..., c, k), y (P..., n, k), etc.: vmap's leading problem dims.
struct DenseDims {
  int64_t problems = 1, n = 0, c = 0, k = 0;
  bool w_shared = true, bias_shared = true, dw_shared = true, dbias_shared = true;
  bool has_bias = false, has_preact = false, has_saved = false;
  bool want_dx = false, want_dw = false, want_dbias = false;
};
// Empty on success, else the CPU handler's message. An absent optional is nullptr.
std::string decode_dense_forward(const Dims& x, const Dims& w, const Dims* bias, const Dims& y,
                                 const Dims* preact, DenseDims* d);
// `needs_saved`: the activation is not none, so `saved` must be given.
std::string decode_dense_backward(const Dims& dy, const Dims& x, const Dims& w, const Dims* saved,
                                  bool needs_saved, const Dims* dx, const Dims* dw,
                                  const Dims* dbias, DenseDims* d);

// A GEMM over plain strided arrays: element (row, kk) of A(p, i) is at
// p * a_p + i * a_i + row * a_row + kk * a_k, and so on. Dense's three passes are these.
struct StridedOffsets {
  GemmShape shape;
  int64_t a_p = 0, a_i = 0, a_row = 0, a_k = 0;
  int64_t b_p = 0, b_i = 0, b_k = 0, b_col = 0;
  int64_t out_p = 0, ldo = 0, bias_p = 0;
  // Whether A's rows / B's rows are contiguous (the kernels' kAContig / kBContig).
  bool a_contig() const { return a_k == 1; }
  bool b_contig() const { return b_col == 1; }
  JBR_HOST_DEVICE int64_t a_offset(int64_t p, int64_t i, int64_t row, int64_t kk) const {
    return p * a_p + i * a_i + row * a_row + kk * a_k;
  }
  JBR_HOST_DEVICE int64_t b_offset(int64_t p, int64_t i, int64_t kk, int64_t col) const {
    return p * b_p + i * b_i + kk * b_k + col * b_col;
  }
  JBR_HOST_DEVICE int64_t out_offset(int64_t p, int64_t row, int64_t col) const {
    return p * out_p + row * ldo + col;
  }
  JBR_HOST_DEVICE int64_t bias_offset(int64_t p, int64_t col) const { return p * bias_p + col; }
};

enum class Pass : int { forward = 0, backward_data = 1, weight_update = 2 };

// forward:       y  = x @ w         (A = x, B = w; problems fold into the rows when w and
//                                     bias are shared)
// backward_data: dx = dz @ w^T      (B read transposed; folds when w is shared)
// weight_update: dw = x^T @ dz      (A read transposed; a shared dw sums the problems: they
//                                     become the batch reduction, count = problems)
StridedOffsets dense_offsets(Pass pass, const DenseDims& d);

// ---------------------------------------------------------------- conv2d

// x (N, H, W, C), w (R, S, C/G, K), y (N, P, Q, K); geometry = [stride_h, stride_w, dil_h,
// dil_w, pad_top, pad_left, groups] (the CPU handler's attribute).
using ConvGeom = prim::ConvShape;  // the CPU primitives' shape and checks (header-only)
std::string decode_conv(const Dims& x, const char* x_name, const Dims& w, const char* w_name,
                        const Dims& y, const char* y_name, const std::vector<int64_t>& geometry,
                        ConvGeom* g);

// The input pixel row (or column) that output row `o` reads through tap `t`; may be outside.
JBR_HOST_DEVICE inline int64_t conv_in(int64_t o, int64_t t, int64_t stride, int64_t dil,
                                       int64_t pad) {
  return o * stride + t * dil - pad;
}

// Forward: rows are output pixels (n, oh, ow), columns a group's output channels, the batch
// reduction runs over the taps (r, s) and k over the group's input channels. One problem per
// group. Taps that fall in the padding read zeros (offset -1).
struct ConvForwardOffsets {
  static constexpr bool kAContig = true, kBContig = true;  // see gemm.cuh
  bool a_contig() const { return kAContig; }
  bool b_contig() const { return kBContig; }
  ConvGeom g;
  GemmShape shape;
  int64_t cg = 0, kg = 0;
  JBR_HOST_DEVICE int64_t a_offset(int64_t grp, int64_t tap, int64_t row, int64_t kk) const {
    const int64_t r = tap / g.taps_w, s = tap % g.taps_w;
    const int64_t ow = row % g.out_w, t = row / g.out_w, oh = t % g.out_h, n = t / g.out_h;
    const int64_t ih = conv_in(oh, r, g.stride_h, g.dil_h, g.pad_top);
    const int64_t iw = conv_in(ow, s, g.stride_w, g.dil_w, g.pad_left);
    if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) return -1;
    return ((n * g.in_h + ih) * g.in_w + iw) * g.in_c + grp * cg + kk;
  }
  JBR_HOST_DEVICE int64_t b_offset(int64_t grp, int64_t tap, int64_t kk, int64_t col) const {
    return (tap * cg + kk) * g.out_c + grp * kg + col;
  }
  JBR_HOST_DEVICE int64_t out_offset(int64_t grp, int64_t row, int64_t col) const {
    return row * g.out_c + grp * kg + col;
  }
  JBR_HOST_DEVICE int64_t bias_offset(int64_t grp, int64_t col) const { return grp * kg + col; }
};

// Backward-data: rows are input pixels (n, h, w), columns a group's input channels, the
// reduction over the taps and the group's output channels: dx[h, w] gets dy[oh, ow] where
// h = oh * stride + r * dil - pad, i.e. only where (h + pad - r * dil) divides by the stride.
// B is w read transposed (w[r, s, col, kk]).
struct ConvBackwardDataOffsets {
  static constexpr bool kAContig = true, kBContig = false;  // see gemm.cuh
  bool a_contig() const { return kAContig; }
  bool b_contig() const { return kBContig; }
  ConvGeom g;
  GemmShape shape;
  int64_t cg = 0, kg = 0;
  JBR_HOST_DEVICE int64_t a_offset(int64_t grp, int64_t tap, int64_t row, int64_t kk) const {
    const int64_t r = tap / g.taps_w, s = tap % g.taps_w;
    const int64_t w = row % g.in_w, t = row / g.in_w, h = t % g.in_h, n = t / g.in_h;
    const int64_t ph = h + g.pad_top - r * g.dil_h, pw = w + g.pad_left - s * g.dil_w;
    if (ph < 0 || pw < 0 || ph % g.stride_h != 0 || pw % g.stride_w != 0) return -1;
    const int64_t oh = ph / g.stride_h, ow = pw / g.stride_w;
    if (oh >= g.out_h || ow >= g.out_w) return -1;
    return ((n * g.out_h + oh) * g.out_w + ow) * g.out_c + grp * kg + kk;
  }
  JBR_HOST_DEVICE int64_t b_offset(int64_t grp, int64_t tap, int64_t kk, int64_t col) const {
    return (tap * cg + col) * g.out_c + grp * kg + kk;
  }
  JBR_HOST_DEVICE int64_t out_offset(int64_t grp, int64_t row, int64_t col) const {
    return row * g.in_c + grp * cg + col;
  }
  JBR_HOST_DEVICE int64_t bias_offset(int64_t, int64_t) const { return 0; }
};

// Weight-update: one problem per (tap, group) (p = tap * groups + group), rows the group's
// input channels, columns its output channels; the batch reduction runs over the images and
// k over the output pixels (oh, ow). A is x read transposed, zeros in the padding.
struct ConvWeightUpdateOffsets {
  static constexpr bool kAContig = false, kBContig = true;  // see gemm.cuh
  bool a_contig() const { return kAContig; }
  bool b_contig() const { return kBContig; }
  ConvGeom g;
  GemmShape shape;
  int64_t cg = 0, kg = 0;
  JBR_HOST_DEVICE int64_t a_offset(int64_t p, int64_t n, int64_t row, int64_t kk) const {
    const int64_t tap = p / g.groups, grp = p % g.groups;
    const int64_t r = tap / g.taps_w, s = tap % g.taps_w;
    const int64_t oh = kk / g.out_w, ow = kk % g.out_w;
    const int64_t ih = conv_in(oh, r, g.stride_h, g.dil_h, g.pad_top);
    const int64_t iw = conv_in(ow, s, g.stride_w, g.dil_w, g.pad_left);
    if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) return -1;
    return ((n * g.in_h + ih) * g.in_w + iw) * g.in_c + grp * cg + row;
  }
  JBR_HOST_DEVICE int64_t b_offset(int64_t p, int64_t n, int64_t kk, int64_t col) const {
    return (n * g.out_h * g.out_w + kk) * g.out_c + p % g.groups * kg + col;
  }
  JBR_HOST_DEVICE int64_t out_offset(int64_t p, int64_t row, int64_t col) const {
    return (p / g.groups * cg + row) * g.out_c + p % g.groups * kg + col;
  }
  JBR_HOST_DEVICE int64_t bias_offset(int64_t, int64_t) const { return 0; }
};

ConvForwardOffsets conv_forward_offsets(const ConvGeom& g);
ConvBackwardDataOffsets conv_backward_data_offsets(const ConvGeom& g);
ConvWeightUpdateOffsets conv_weight_update_offsets(const ConvGeom& g);

}  // namespace jbr::cuda
