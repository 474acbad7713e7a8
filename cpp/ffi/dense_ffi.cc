// Handlers for jax_brgemm.nn.dense: the forward and the backward (data and weight) passes.
//
// Python hands plain 2-D arrays: x (n, c), w (c, k), bias (k,). vmap (expand_dims) adds
// leading "problem" dims: x (P..., n, c), w (1 or P..., c, k), etc. When the weights and
// bias are shared the problems fold into the minibatch; otherwise they run one by one.
//
// dtypes come from the buffers: the inputs of a pass (x and kernel; dy, x and kernel) are
// all float32 or all bfloat16; bias and the pre-activation are float32; y, dx, dkernel,
// dbias and the saved output may each be float32 or bfloat16 (each rounded once).
#include <string>
#include <vector>

#include "ffi/common.h"
#include "ffi/signatures.h"
#include "primitives/dense.h"

namespace jbr::ffi_handlers {
namespace {

int64_t lead_count(const ffi::AnyBuffer& b, size_t block_rank) {
  auto d = b.dimensions();
  int64_t p = 1;
  for (size_t i = 0; i + block_rank < d.size(); ++i) p *= d[i];
  return p;
}

// Checks `b` has rank >= block_rank, ends in `tail` and has 1 or `problems` leading
// problems; sets *shared when it has one.
ffi::Error expect_operand(const ffi::AnyBuffer& b, const char* name,
                          std::initializer_list<int64_t> tail, int64_t problems, bool* shared) {
  auto d = b.dimensions();
  bool ok = d.size() >= tail.size();
  size_t i = d.size() - tail.size();
  for (int64_t t : tail) ok = ok && d[i++] == t;
  std::string want = "(...";
  for (int64_t t : tail) want += ", " + std::to_string(t);
  if (!ok) return invalid(std::string(name) + " must have shape " + want + "), got " + dims_str(d));
  const int64_t p = lead_count(b, tail.size());
  if (p != 1 && p != problems)
    return invalid(std::string(name) + " has " + std::to_string(p) + " leading problems, expected 1 or " +
                   std::to_string(problems));
  *shared = p == 1;
  return ffi::Error::Success();
}

// `b` is float32 or bfloat16 (*dtype), and `want` where that is given.
ffi::Error expect_dtype(const ffi::AnyBuffer& b, const char* name, DType* dtype,
                        const DType* want = nullptr) {
  if (auto e = kernel_dtype(b, name, dtype); e.failure()) return e;
  if (want && *dtype != *want)
    return invalid(std::string(name) + " must have the same dtype as the pass's other inputs (" +
                   (*want == DType::bf16 ? "bfloat16" : "float32") + ")");
  return ffi::Error::Success();
}

// The address `elements` elements of `dtype` past base.
template <typename Byte>
Byte* at(Byte* base, DType dtype, int64_t elements) {
  return base + elements * (dtype == DType::bf16 ? 2 : 4);
}

ffi::Error setup(std::string_view activation, Activation* act, Isa* isa) {
  if (!parse_activation(activation, act))
    return invalid("unknown activation '" + std::string(activation) + "'");
  return current_isa(isa);
}

// The forward pass's problems (one, or one per leading problem when the weights are not
// shared), checked against the buffers.
ffi::Error plan_forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer bias,
                        ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> preact,
                        std::string_view activation, std::vector<prim::DenseForward>* problems_out) {
  prim::DenseForward p;
  if (auto e = setup(activation, &p.activation, &p.isa); e.failure()) return e;
  if (auto e = expect_dtype(x, "x", &p.in); e.failure()) return e;
  auto xd = x.dimensions();
  if (xd.size() < 2) return invalid("x must have shape (..., n, c), got " + dims_str(xd));
  const int64_t problems = lead_count(x, 2);
  p.n = xd[xd.size() - 2], p.c = xd[xd.size() - 1];
  DType w_dtype;
  if (auto e = expect_dtype(w, "kernel", &w_dtype, &p.in); e.failure()) return e;
  auto wd = w.dimensions();
  if (wd.size() < 2) return invalid("kernel must have shape (..., c, k), got " + dims_str(wd));
  p.k = wd[wd.size() - 1];
  bool w_shared = true, b_shared = true, unused = true;
  if (auto e = expect_operand(w, "kernel", {p.c, p.k}, problems, &w_shared); e.failure()) return e;
  const bool has_bias = bias.element_count() > 0;
  if (has_bias) {
    if (auto e = expect_f32(bias, "bias"); e.failure()) return e;
    if (auto e = expect_operand(bias, "bias", {p.k}, problems, &b_shared); e.failure()) return e;
  }
  if (auto e = expect_dtype(*y, "y", &p.out); e.failure()) return e;
  if (auto e = expect_operand(*y, "y", {p.n, p.k}, problems, &unused); e.failure()) return e;
  const bool save = preact->element_count() > 0;
  if (save) {
    if (auto e = expect_f32(*preact, "preact"); e.failure()) return e;
    if (auto e = expect_operand(*preact, "preact", {p.n, p.k}, problems, &unused); e.failure()) return e;
  }
  if (lead_count(*y, 2) != problems) return invalid("y's leading dims must match x's");

  prefer_huge_pages(y, preact);
  const bool fold = w_shared && b_shared;
  const int64_t runs = fold ? 1 : problems;
  if (fold) p.n *= problems;
  const int64_t x_step = p.n * p.c, y_step = p.n * p.k;
  for (int64_t i = 0; i < runs; ++i) {
    prim::DenseForward q = p;
    q.x = at(static_cast<const char*>(x.untyped_data()), p.in, i * x_step);
    q.w = at(static_cast<const char*>(w.untyped_data()), p.in, w_shared ? 0 : i * p.c * p.k);
    q.bias = has_bias ? static_cast<const float*>(bias.untyped_data()) + (b_shared ? 0 : i * p.k) : nullptr;
    q.y = at(static_cast<char*>(y->untyped_data()), p.out, i * y_step);
    q.preact = save ? static_cast<float*>(preact->untyped_data()) + i * y_step : nullptr;
    problems_out->push_back(q);
  }
  return ffi::Error::Success();
}

ffi::Future dense_fwd_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                           ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                           ffi::Result<ffi::AnyBuffer> preact, std::string_view activation) {
  std::vector<prim::DenseForward> problems;
  if (auto e = plan_forward(x, w, bias, y, preact, activation, &problems); e.failure())
    return finished(std::move(e));
  int64_t macs = 0;
  for (const prim::DenseForward& q : problems) macs += q.n * q.c * q.k;
  return run_sized(pool, macs, [problems = std::move(problems)](const prim::Executor* executor) {
    for (const prim::DenseForward& q : problems)
      if (std::string e = prim::dense_forward(q, executor); !e.empty()) return invalid(e);
    return ffi::Error::Success();
  });
}

// The backward pass's problems (one, or one per leading problem when the weights are not
// shared), checked against the buffers.
ffi::Error plan_backward(ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer saved,
                         ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dw,
                         ffi::Result<ffi::AnyBuffer> dbias, std::string_view activation,
                         std::vector<prim::DenseBackward>* problems_out) {
  prim::DenseBackward p;
  if (auto e = setup(activation, &p.activation, &p.isa); e.failure()) return e;
  if (auto e = expect_dtype(dy, "dy", &p.in); e.failure()) return e;
  auto gd = dy.dimensions();
  if (gd.size() < 2) return invalid("dy must have shape (..., n, k), got " + dims_str(gd));
  const int64_t problems = lead_count(dy, 2);
  p.n = gd[gd.size() - 2], p.k = gd[gd.size() - 1];
  DType x_dtype, w_dtype;
  if (auto e = expect_dtype(x, "x", &x_dtype, &p.in); e.failure()) return e;
  if (auto e = expect_dtype(w, "kernel", &w_dtype, &p.in); e.failure()) return e;
  auto xd = x.dimensions();
  if (xd.size() < 2) return invalid("x must have shape (..., n, c), got " + dims_str(xd));
  p.c = xd[xd.size() - 1];
  bool shared = false, w_shared = true, dw_shared = true, db_shared = true;
  if (auto e = expect_operand(x, "x", {p.n, p.c}, problems, &shared); e.failure()) return e;
  if (shared && problems != 1) return invalid("x's leading dims must match dy's");
  if (auto e = expect_operand(w, "kernel", {p.c, p.k}, problems, &w_shared); e.failure()) return e;
  if (p.activation != Activation::none) {
    if (auto e = expect_dtype(saved, "saved", &p.saved_dtype); e.failure()) return e;
    if (auto e = expect_operand(saved, "saved", {p.n, p.k}, problems, &shared); e.failure()) return e;
    if (shared && problems != 1) return invalid("saved's leading dims must match dy's");
  }
  const bool want_dx = dx->element_count() > 0, want_dw = dw->element_count() > 0,
             want_db = dbias->element_count() > 0;
  if (want_dx) {
    if (auto e = expect_dtype(*dx, "dx", &p.dx_dtype); e.failure()) return e;
    if (auto e = expect_operand(*dx, "dx", {p.n, p.c}, problems, &shared); e.failure()) return e;
    if (shared && problems != 1) return invalid("dx's leading dims must match dy's");
  }
  if (want_dw) {
    if (auto e = expect_dtype(*dw, "dw", &p.dw_dtype); e.failure()) return e;
    if (auto e = expect_operand(*dw, "dw", {p.c, p.k}, problems, &dw_shared); e.failure()) return e;
  }
  if (want_db) {
    if (auto e = expect_dtype(*dbias, "dbias", &p.dbias_dtype); e.failure()) return e;
    if (auto e = expect_operand(*dbias, "dbias", {p.k}, problems, &db_shared); e.failure()) return e;
  }

  prefer_huge_pages(dx, dw, dbias);
  // Shared weights whose gradients are summed over problems: one fold into the minibatch.
  const bool fold = w_shared && (!want_dw || dw_shared) && (!want_db || db_shared);
  const int64_t runs = fold ? 1 : problems;
  if (fold) p.n *= problems;
  const int64_t nk = p.n * p.k, nc = p.n * p.c, ck = p.c * p.k;
  for (int64_t i = 0; i < runs; ++i) {
    prim::DenseBackward q = p;
    q.dy = at(static_cast<const char*>(dy.untyped_data()), p.in, i * nk);
    q.x = at(static_cast<const char*>(x.untyped_data()), p.in, i * nc);
    q.w = at(static_cast<const char*>(w.untyped_data()), p.in, w_shared ? 0 : i * ck);
    q.saved = p.activation != Activation::none
                  ? at(static_cast<const char*>(saved.untyped_data()), p.saved_dtype, i * nk) : nullptr;
    q.dx = want_dx ? at(static_cast<char*>(dx->untyped_data()), p.dx_dtype, i * nc) : nullptr;
    q.dw = want_dw ? at(static_cast<char*>(dw->untyped_data()), p.dw_dtype, i * ck) : nullptr;
    q.dbias = want_db ? at(static_cast<char*>(dbias->untyped_data()), p.dbias_dtype, i * p.k) : nullptr;
    problems_out->push_back(q);
  }
  return ffi::Error::Success();
}

ffi::Future dense_bwd_impl(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer x,
                           ffi::AnyBuffer w, ffi::AnyBuffer saved, ffi::Result<ffi::AnyBuffer> dx,
                           ffi::Result<ffi::AnyBuffer> dw, ffi::Result<ffi::AnyBuffer> dbias,
                           std::string_view activation) {
  std::vector<prim::DenseBackward> problems;
  if (auto e = plan_backward(dy, x, w, saved, dx, dw, dbias, activation, &problems); e.failure())
    return finished(std::move(e));
  int64_t macs = 0;  // (dx and dkernel together)
  for (const prim::DenseBackward& q : problems) macs += q.n * q.c * q.k * ((q.dx != nullptr) + (q.dw != nullptr));
  // (A larger layer's dx and dkernel as two tasks, on half the threads each: the Flax MLP
  // step level once the small calls were tasks; docs/design.md, Threads.)
  return run_sized(pool, macs, [problems = std::move(problems)](const prim::Executor* executor) {
    for (const prim::DenseBackward& q : problems)
      if (std::string e = prim::dense_backward(q, executor); !e.empty()) return invalid(e);
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_dense_fwd, dense_fwd_impl,
                              signatures::dense_fwd(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
JBR_REGISTER_HANDLER("jax_brgemm_dense_fwd", jbr_dense_fwd);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_dense_bwd, dense_bwd_impl,
                              signatures::dense_bwd(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
JBR_REGISTER_HANDLER("jax_brgemm_dense_bwd", jbr_dense_bwd);

}  // namespace jbr::ffi_handlers
