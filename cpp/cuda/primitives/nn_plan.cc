#include "cuda/primitives/nn_plan.h"

#include <initializer_list>
#include <utility>

namespace jbr::cuda {
namespace {

int64_t lead_count(const Dims& d, size_t block_rank) {
  int64_t p = 1;
  for (size_t i = 0; i + block_rank < d.size(); ++i) p *= d[i];
  return p;
}

// `d` has rank >= tail.size(), ends in `tail` and has 1 or `problems` leading problems
// (cpp/ffi/dense_ffi.cc's expect_operand, same wording); *shared when it has one.
std::string expect_operand(const Dims& d, const char* name, std::initializer_list<int64_t> tail,
                           int64_t problems, bool* shared) {
  bool ok = d.size() >= tail.size();
  size_t i = ok ? d.size() - tail.size() : 0;
  for (int64_t t : tail) ok = ok && d[i++] == t;
  if (!ok) {
    std::string want = "(...";
    for (int64_t t : tail) want += ", " + std::to_string(t);
    return std::string(name) + " must have shape " + want + "), got " + dims_str(d);
  }
  const int64_t p = lead_count(d, tail.size());
  if (p != 1 && p != problems)
    return std::string(name) + " has " + std::to_string(p) + " leading problems, expected 1 or " +
           std::to_string(problems);
  *shared = p == 1;
  return "";
}

// As expect_operand, and the operand must carry every problem (x, dy, dx, saved).
std::string expect_per_problem(const Dims& d, const char* name, std::initializer_list<int64_t> tail,
                               int64_t problems, const char* of) {
  bool shared = false;
  if (auto e = expect_operand(d, name, tail, problems, &shared); !e.empty()) return e;
  if (shared && problems != 1) return std::string(name) + "'s leading dims must match " + of + "'s";
  return "";
}

}  // namespace

std::string decode_dense_forward(const Dims& x, const Dims& w, const Dims* bias, const Dims& y,
                                 const Dims* preact, DenseDims* d) {
  *d = DenseDims{};
  if (x.size() < 2) return "x must have shape (..., n, c), got " + dims_str(x);
  d->problems = lead_count(x, 2);
  d->n = x[x.size() - 2], d->c = x[x.size() - 1];
  if (w.size() < 2) return "kernel must have shape (..., c, k), got " + dims_str(w);
  d->k = w.back();
  if (auto e = expect_operand(w, "kernel", {d->c, d->k}, d->problems, &d->w_shared); !e.empty()) return e;
  d->has_bias = bias != nullptr;
  if (bias != nullptr)
    if (auto e = expect_operand(*bias, "bias", {d->k}, d->problems, &d->bias_shared); !e.empty()) return e;
  if (auto e = expect_per_problem(y, "y", {d->n, d->k}, d->problems, "x"); !e.empty()) return e;
  d->has_preact = preact != nullptr;
  if (preact != nullptr)
    if (auto e = expect_per_problem(*preact, "preact", {d->n, d->k}, d->problems, "x"); !e.empty())
      return e;
  return "";
}

std::string decode_dense_backward(const Dims& dy, const Dims& x, const Dims& w, const Dims* saved,
                                  bool needs_saved, const Dims* dx, const Dims* dw,
                                  const Dims* dbias, DenseDims* d) {
  *d = DenseDims{};
  if (dy.size() < 2) return "dy must have shape (..., n, k), got " + dims_str(dy);
  d->problems = lead_count(dy, 2);
  d->n = dy[dy.size() - 2], d->k = dy[dy.size() - 1];
  if (x.size() < 2) return "x must have shape (..., n, c), got " + dims_str(x);
  d->c = x.back();
  if (auto e = expect_per_problem(x, "x", {d->n, d->c}, d->problems, "dy"); !e.empty()) return e;
  if (auto e = expect_operand(w, "kernel", {d->c, d->k}, d->problems, &d->w_shared); !e.empty()) return e;
  if (needs_saved) {
    if (saved == nullptr) return "saved must have shape (..., " + std::to_string(d->n) + ", " +
                                 std::to_string(d->k) + "), got (0,)";
    if (auto e = expect_per_problem(*saved, "saved", {d->n, d->k}, d->problems, "dy"); !e.empty())
      return e;
    d->has_saved = true;
  }
  d->want_dx = dx != nullptr, d->want_dw = dw != nullptr, d->want_dbias = dbias != nullptr;
  if (dx != nullptr)
    if (auto e = expect_per_problem(*dx, "dx", {d->n, d->c}, d->problems, "dy"); !e.empty()) return e;
  if (dw != nullptr)
    if (auto e = expect_operand(*dw, "dw", {d->c, d->k}, d->problems, &d->dw_shared); !e.empty()) return e;
  if (dbias != nullptr)
    if (auto e = expect_operand(*dbias, "dbias", {d->k}, d->problems, &d->dbias_shared); !e.empty())
      return e;
  return "";
}

StridedOffsets dense_offsets(Pass pass, const DenseDims& d) {
  StridedOffsets o;
  const int64_t P = d.problems, n = d.n, c = d.c, k = d.k;
  switch (pass) {
    case Pass::forward: {  // y (n, k) = x (n, c) @ w (c, k) + bias
      const bool fold = d.w_shared && (!d.has_bias || d.bias_shared);
      o.shape = {fold ? P * n : n, k, c, 1, fold ? 1 : P};
      o.a_p = n * c, o.a_row = c, o.a_k = 1;
      o.b_p = d.w_shared ? 0 : c * k, o.b_k = k, o.b_col = 1;
      o.out_p = n * k, o.ldo = k, o.bias_p = d.bias_shared ? 0 : k;
      break;
    }
    case Pass::backward_data: {  // dx (n, c) = dz (n, k) @ w^T (k, c)
      const bool fold = d.w_shared;
      o.shape = {fold ? P * n : n, c, k, 1, fold ? 1 : P};
      o.a_p = n * k, o.a_row = k, o.a_k = 1;
      o.b_p = d.w_shared ? 0 : c * k, o.b_k = 1, o.b_col = k;
      o.out_p = n * c, o.ldo = c;
      break;
    }
    case Pass::weight_update: {  // dw (c, k) = x^T (c, n) @ dz (n, k)
      o.a_row = 1, o.a_k = c, o.b_k = k, o.b_col = 1, o.ldo = k;
      if (d.dw_shared) {  // summed over the problems: they join the batch reduction
        o.shape = {c, k, n, P, 1};
        o.a_i = n * c, o.b_i = n * k;
      } else {
        o.shape = {c, k, n, 1, P};
        o.a_p = n * c, o.b_p = n * k, o.out_p = c * k;
      }
      break;
    }
  }
  return o;
}

std::string decode_conv(const Dims& x, const char* x_name, const Dims& w, const char* w_name,
                        const Dims& y, const char* y_name, const std::vector<int64_t>& geometry,
                        ConvGeom* g) {
  const std::pair<const Dims*, std::pair<const char*, const char*>> tensors[] = {
      {&x, {x_name, "(N, H, W, C)"}}, {&w, {w_name, "(R, S, C/groups, K)"}}, {&y, {y_name, "(N, P, Q, K)"}}};
  for (const auto& [d, what] : tensors)
    if (d->size() != 4)
      return std::string(what.first) + " must have shape " + what.second + ", got " + dims_str(*d);
  return prim::decode_conv_shape(x.data(), x_name, w.data(), w_name, y.data(), y_name,
                                 geometry.data(), geometry.size(), g);
}

namespace {
template <class Offsets>
Offsets conv_common(const ConvGeom& g) {
  Offsets o;
  o.g = g, o.cg = g.in_c / g.groups, o.kg = g.out_c / g.groups;
  return o;
}
}  // namespace

ConvForwardOffsets conv_forward_offsets(const ConvGeom& g) {
  auto o = conv_common<ConvForwardOffsets>(g);
  o.shape = {g.batch * g.out_h * g.out_w, o.kg, o.cg, g.taps_h * g.taps_w, g.groups};
  return o;
}

ConvBackwardDataOffsets conv_backward_data_offsets(const ConvGeom& g) {
  auto o = conv_common<ConvBackwardDataOffsets>(g);
  o.shape = {g.batch * g.in_h * g.in_w, o.cg, o.kg, g.taps_h * g.taps_w, g.groups};
  return o;
}

ConvWeightUpdateOffsets conv_weight_update_offsets(const ConvGeom& g) {
  auto o = conv_common<ConvWeightUpdateOffsets>(g);
  o.shape = {o.cg, o.kg, g.out_h * g.out_w, g.batch, g.taps_h * g.taps_w * g.groups};
  return o;
}

}  // namespace jbr::cuda
