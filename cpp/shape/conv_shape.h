// The shape of a 2-D convolution and its checks, in plain header-only C++: the CPU
// primitives and handlers and the CUDA handlers (which do not link the CPU code) share it.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

namespace jbr::prim {

struct ConvShape {
  int64_t batch = 0, in_h = 0, in_w = 0, in_c = 0;  // x: (batch, in_h, in_w, in_c)
  int64_t out_h = 0, out_w = 0, out_c = 0;          // y: (batch, out_h, out_w, out_c)
  int64_t taps_h = 0, taps_w = 0;                   // w: (taps_h, taps_w, in_c / groups, out_c)
  int64_t groups = 1;
  int64_t stride_h = 1, stride_w = 1, dil_h = 1, dil_w = 1;
  int64_t pad_top = 0, pad_left = 0;  // bottom / right follow from out_h / out_w; may be < 0
};

// Empty when the shape can be run, else the reason (names the field).
inline std::string validate(const ConvShape& s) {
  const std::pair<const char*, int64_t> positive[] = {
      {"batch", s.batch}, {"in_h", s.in_h}, {"in_w", s.in_w}, {"in_c", s.in_c},
      {"out_h", s.out_h}, {"out_w", s.out_w}, {"out_c", s.out_c}, {"taps_h", s.taps_h},
      {"taps_w", s.taps_w}, {"groups", s.groups}, {"stride_h", s.stride_h},
      {"stride_w", s.stride_w}, {"dil_h", s.dil_h}, {"dil_w", s.dil_w}};
  for (auto [name, v] : positive)
    if (v < 1) return std::string(name) + " must be >= 1, got " + std::to_string(v);
  // The loop nests' int64 arithmetic multiplies these by tensor extents (jax_brgemm/nn/
  // conv.py, _fit, gives the reasoning and also clamps the stride to the padded extent).
  constexpr int64_t kMaxGeometry = (int64_t{1} << 31) - 1;
  const std::pair<const char*, int64_t> bounded[] = {
      {"stride_h", s.stride_h}, {"stride_w", s.stride_w}, {"dil_h", s.dil_h}, {"dil_w", s.dil_w},
      {"groups", s.groups}, {"pad_top", s.pad_top}, {"pad_left", s.pad_left}};
  for (auto [name, v] : bounded)
    if (v > kMaxGeometry || v < -kMaxGeometry)
      return std::string(name) + " must lie within 2**31 - 1, got " + std::to_string(v);
  if (s.in_c % s.groups != 0 || s.out_c % s.groups != 0)
    return "groups (" + std::to_string(s.groups) + ") must divide in_c (" +
           std::to_string(s.in_c) + ") and out_c (" + std::to_string(s.out_c) + ")";
  return "";
}

// The shape from the dims of x (N, H, W, C), w (R, S, C/groups, K) and y (N, P, Q, K), each
// of rank 4 (the callers check), and the geometry attribute [stride_h, stride_w, dil_h,
// dil_w, pad_top, pad_left, groups]; empty, or the reason naming the tensors.
inline std::string decode_conv_shape(const int64_t* x, const char* x_name, const int64_t* w,
                                     const char* w_name, const int64_t* y, const char* y_name,
                                     const int64_t* geometry, size_t geometry_size, ConvShape* s) {
  auto str = [](const int64_t* d) {
    return "(" + std::to_string(d[0]) + ", " + std::to_string(d[1]) + ", " +
           std::to_string(d[2]) + ", " + std::to_string(d[3]) + ")";
  };
  if (geometry_size != 7) return "geometry must hold 7 values";
  *s = ConvShape{};
  s->batch = x[0], s->in_h = x[1], s->in_w = x[2], s->in_c = x[3];
  s->taps_h = w[0], s->taps_w = w[1];
  s->out_h = y[1], s->out_w = y[2], s->out_c = y[3];
  s->stride_h = geometry[0], s->stride_w = geometry[1];
  s->dil_h = geometry[2], s->dil_w = geometry[3];
  s->pad_top = geometry[4], s->pad_left = geometry[5], s->groups = geometry[6];
  if (y[0] != x[0])
    return std::string(y_name) + " " + str(y) + " and " + x_name + " " + str(x) +
           " have different batch sizes";
  if (std::string e = validate(*s); !e.empty()) return e;
  if (w[2] * s->groups != s->in_c || w[3] != s->out_c)
    return std::string(w_name) + " " + str(w) + " does not match " + x_name + " " + str(x) +
           ", " + y_name + " " + str(y) + " and groups " + std::to_string(s->groups);
  return "";
}

}  // namespace jbr::prim
