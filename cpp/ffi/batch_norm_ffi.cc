// Handlers for jax_brgemm.nn.batch_norm: statistics, apply, and the backward's sums and
// apply. Activations x, y, dy (and residual, dx) have shape (G, R, C): G independent blocks
// (vmapped copies) of R rows (N*H*W) by C channels; per-channel vectors (G, C) float32.
// Optional operands (residual, the relu mask y, d_residual) are empty arrays when absent.
#include <new>
#include <string>
#include <vector>

#include "ffi/common.h"
#include "primitives/batch_norm.h"

namespace jbr::ffi_handlers {
namespace {


// The shape from x, which must be (G, R, C) float32 or bfloat16.
ffi::Error decode(const ffi::AnyBuffer& x, prim::BatchNormShape* s, DType* dtype) {
  if (auto e = kernel_dtype(x, "x", dtype); e.failure()) return e;
  const Dims d = dims_of(x);
  if (d.size() != 3) return invalid("x must have shape (G, R, C), got " + dims_str(x.dimensions()));
  s->groups = d[0], s->rows = d[1], s->channels = d[2];
  return ffi::Error::Success();
}

// A (G, R, C) activation of x's shape; `dtype` is set to its dtype, or checked against it
// where `must_match`.
ffi::Error activation(const ffi::AnyBuffer& b, const char* name, const prim::BatchNormShape& s,
                      DType* dtype, bool must_match) {
  DType got;
  if (auto e = kernel_dtype(b, name, &got); e.failure()) return e;
  if (must_match && got != *dtype) return invalid(std::string(name) + " has the wrong dtype");
  *dtype = got;
  if (dims_of(b) != Dims{s.groups, s.rows, s.channels})
    return invalid(std::string(name) + " must have x's shape " + dims_str(Dims{s.groups, s.rows, s.channels}) +
                   ", got " + dims_str(b.dimensions()));
  return ffi::Error::Success();
}

// A (G, C) float32 vector.
ffi::Error channels(const ffi::AnyBuffer& b, const char* name, const prim::BatchNormShape& s) {
  if (auto e = expect_f32(b, name); e.failure()) return e;
  if (dims_of(b) != Dims{s.groups, s.channels})
    return invalid(std::string(name) + " must have shape " + dims_str(Dims{s.groups, s.channels}) +
                   ", got " + dims_str(b.dimensions()));
  return ffi::Error::Success();
}

const float* f32(const ffi::AnyBuffer& b) { return static_cast<const float*>(b.untyped_data()); }
float* f32_out(ffi::Result<ffi::AnyBuffer>& b) { return static_cast<float*>(b->untyped_data()); }

// An optional activation operand: absent (null) when passed as a (0,) array, else checked
// like `activation` against `dtype`.
ffi::Error optional(const ffi::AnyBuffer& b, const char* name, const prim::BatchNormShape& s,
                    DType* dtype, const void** out) {
  *out = nullptr;
  if (b.dimensions().size() == 1 && b.element_count() == 0) return ffi::Error::Success();
  if (auto e = activation(b, name, s, dtype, true); e.failure()) return e;
  *out = b.untyped_data();
  return ffi::Error::Success();
}

// Batch norm calls sit between convolutions: keep the workers polling as those do
// (conv_ffi.cc, kConvLinger) so the next call finds its helper awake.
constexpr std::chrono::microseconds kLinger{150};

ffi::Error stats_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer shift,
                      ffi::Result<ffi::AnyBuffer> sum, ffi::Result<ffi::AnyBuffer> sumsq) {
  prim::BatchNormShape s;
  DType xt;
  if (auto e = decode(x, &s, &xt); e.failure()) return e;
  if (auto e = channels(shift, "shift", s); e.failure()) return e;
  if (auto e = channels(*sum, "sum", s); e.failure()) return e;
  if (auto e = channels(*sumsq, "sumsq", s); e.failure()) return e;
  Isa isa;
  if (auto e = current_isa(&isa); e.failure()) return e;
  prim::TeamCall executor = team_call(pool, kLinger);
  return run_primitive("batch_norm", [&] {
    return prim::batch_norm_stats(s, xt, x.untyped_data(), f32(shift), f32_out(sum), f32_out(sumsq), isa,
                                  &executor);
  });
}

ffi::Error apply_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer a, ffi::AnyBuffer b,
                      ffi::AnyBuffer residual, ffi::Result<ffi::AnyBuffer> y, std::string_view act_name) {
  prim::BatchNormShape s;
  DType xt, yt;
  if (auto e = decode(x, &s, &xt); e.failure()) return e;
  if (auto e = channels(a, "a", s); e.failure()) return e;
  if (auto e = channels(b, "b", s); e.failure()) return e;
  if (auto e = activation(*y, "y", s, &yt, false); e.failure()) return e;
  const void* res;
  if (auto e = optional(residual, "residual", s, &yt, &res); e.failure()) return e;
  Activation act;
  if (!parse_activation(act_name, &act) || (act != Activation::none && act != Activation::relu))
    return invalid("activation must be 'none' or 'relu', got '" + std::string(act_name) + "'");
  Isa isa;
  if (auto e = current_isa(&isa); e.failure()) return e;
  prefer_huge_pages(y);
  prim::TeamCall executor = team_call(pool, kLinger);
  return run_primitive("batch_norm", [&] {
    return prim::batch_norm_apply(s, xt, x.untyped_data(), f32(a), f32(b), yt, res, act == Activation::relu,
                                  y->untyped_data(), isa, &executor);
  });
}

ffi::Error backward_sums_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer y,
                              ffi::AnyBuffer shift, ffi::Result<ffi::AnyBuffer> sum_h,
                              ffi::Result<ffi::AnyBuffer> sum_hx) {
  prim::BatchNormShape s;
  DType xt, gt;
  if (auto e = decode(x, &s, &xt); e.failure()) return e;
  if (auto e = activation(dy, "dy", s, &gt, false); e.failure()) return e;
  const void* mask;
  if (auto e = optional(y, "y", s, &gt, &mask); e.failure()) return e;
  if (auto e = channels(shift, "shift", s); e.failure()) return e;
  if (auto e = channels(*sum_h, "sum_h", s); e.failure()) return e;
  if (auto e = channels(*sum_hx, "sum_hx", s); e.failure()) return e;
  Isa isa;
  if (auto e = current_isa(&isa); e.failure()) return e;
  prim::TeamCall executor = team_call(pool, kLinger);
  return run_primitive("batch_norm", [&] {
    return prim::batch_norm_backward_sums(s, xt, x.untyped_data(), gt, dy.untyped_data(), mask, f32(shift),
                                          f32_out(sum_h), f32_out(sum_hx), isa, &executor);
  });
}

ffi::Error backward_apply_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer y,
                               ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer c,
                               ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> d_residual) {
  prim::BatchNormShape s;
  DType xt, gt;
  if (auto e = decode(x, &s, &xt); e.failure()) return e;
  if (auto e = activation(dy, "dy", s, &gt, false); e.failure()) return e;
  const void* mask;
  if (auto e = optional(y, "y", s, &gt, &mask); e.failure()) return e;
  if (auto e = channels(a, "a", s); e.failure()) return e;
  if (auto e = channels(b, "b", s); e.failure()) return e;
  if (auto e = channels(c, "c", s); e.failure()) return e;
  if (auto e = activation(*dx, "dx", s, &xt, true); e.failure()) return e;
  const void* dres;
  if (auto e = optional(*d_residual, "d_residual", s, &gt, &dres); e.failure()) return e;
  Isa isa;
  if (auto e = current_isa(&isa); e.failure()) return e;
  prefer_huge_pages(dx, d_residual);
  prim::TeamCall executor = team_call(pool, kLinger);
  return run_primitive("batch_norm", [&] {
    return prim::batch_norm_backward_apply(s, xt, x.untyped_data(), gt, dy.untyped_data(), mask, f32(a), f32(b),
                                           f32(c), dx->untyped_data(), const_cast<void*>(dres), isa, &executor);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_batch_norm_stats, stats_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x (G, R, C)
                                  .Arg<ffi::AnyBuffer>()  // shift (G, C)
                                  .Ret<ffi::AnyBuffer>()  // sum (G, C)
                                  .Ret<ffi::AnyBuffer>());  // sumsq (G, C)
JBR_REGISTER_HANDLER("jax_brgemm_batch_norm_stats", jbr_batch_norm_stats);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_batch_norm_apply, apply_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // a (G, C)
                                  .Arg<ffi::AnyBuffer>()  // b (G, C)
                                  .Arg<ffi::AnyBuffer>()  // residual (y's dtype) or empty
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attr<std::string_view>("activation"));
JBR_REGISTER_HANDLER("jax_brgemm_batch_norm_apply", jbr_batch_norm_apply);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_batch_norm_backward_sums, backward_sums_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // y (relu's mask) or empty
                                  .Arg<ffi::AnyBuffer>()  // shift (G, C)
                                  .Ret<ffi::AnyBuffer>()  // sum_h (G, C)
                                  .Ret<ffi::AnyBuffer>());  // sum_hx (G, C)
JBR_REGISTER_HANDLER("jax_brgemm_batch_norm_backward_sums", jbr_batch_norm_backward_sums);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_batch_norm_backward_apply, backward_apply_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // y (relu's mask) or empty
                                  .Arg<ffi::AnyBuffer>()  // a (G, C)
                                  .Arg<ffi::AnyBuffer>()  // b (G, C)
                                  .Arg<ffi::AnyBuffer>()  // c (G, C)
                                  .Ret<ffi::AnyBuffer>()  // dx (x's dtype)
                                  .Ret<ffi::AnyBuffer>());  // d_residual (dy's dtype) or empty
JBR_REGISTER_HANDLER("jax_brgemm_batch_norm_backward_apply", jbr_batch_norm_backward_apply);

}  // namespace jbr::ffi_handlers
