// Handlers for jax_brgemm.nn.lstm: the whole sequence forward, and backward through time.
#include <string>
#include <tuple>

#include "ffi/common.h"
#include "primitives/lstm.h"

namespace jbr::ffi_handlers {
namespace {


const char* dtype_name(DType d) { return d == DType::bf16 ? "bfloat16" : "float32"; }

ffi::Error expect_dtype(const ffi::AnyBuffer& buffer, const char* name, DType dtype) {
  DType got;
  if (auto e = kernel_dtype(buffer, name, &got); e.failure()) return e;
  if (got != dtype) return invalid(std::string(name) + " must be " + dtype_name(dtype));
  return ffi::Error::Success();
}

// A buffer of the given shape and dtype, or an error naming it.
ffi::Error expect_shape(const ffi::AnyBuffer& buffer, const char* name, const Dims& want,
                        DType dtype) {
  if (auto e = expect_dtype(buffer, name, dtype); e.failure()) return e;
  auto d = buffer.dimensions();
  if (Dims(d.begin(), d.end()) != want)
    return invalid(std::string(name) + " must have shape " + dims_str(want) + ", got " +
                   dims_str(d));
  return ffi::Error::Success();
}

// T, N, C, K from x and w_ih, and the GEMM operands' dtype from x; then every other
// buffer's shape and dtype is checked against them.
ffi::Error decode_shape(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w_ih, int32_t time_major,
                        prim::LstmShape* s, DType* dtype) {
  if (auto e = kernel_dtype(x, "x", dtype); e.failure()) return e;
  if (auto e = expect_dtype(w_ih, "w_ih", *dtype); e.failure()) return e;
  auto xd = x.dimensions(), wd = w_ih.dimensions();
  if (xd.size() != 3) return invalid("x must have rank 3, got " + dims_str(xd));
  if (wd.size() != 2 || wd[1] % 4 != 0 || wd[1] == 0)
    return invalid("w_ih must have shape (C, 4K) with K >= 1, got " + dims_str(wd));
  s->time_major = time_major != 0;
  s->steps = s->time_major ? xd[0] : xd[1];
  s->batch = s->time_major ? xd[1] : xd[0];
  s->in = xd[2], s->hidden = wd[1] / 4;
  if (s->steps < 1 || s->batch < 1 || s->in < 1)
    return invalid("x must have at least one step, batch row and feature, got " + dims_str(xd));
  if (wd[0] != s->in)
    return invalid("w_ih must have shape (C, 4K) with C = " + std::to_string(s->in) + ", got " +
                   dims_str(wd));
  return ffi::Error::Success();
}

Dims seq_dims(const prim::LstmShape& s, int64_t width) {
  return s.time_major ? Dims{s.steps, s.batch, width} : Dims{s.batch, s.steps, width};
}

template <class T>
const float* f32(const T& buffer) { return static_cast<const float*>(buffer.untyped_data()); }
template <class T>
float* f32_out(T& buffer) { return static_cast<float*>(buffer->untyped_data()); }

using Check = std::pair<const ffi::AnyBuffer*, std::tuple<const char*, Dims, DType>>;
template <size_t n>
ffi::Error check_all(const Check (&checks)[n]) {
  for (const auto& [buffer, what] : checks)
    if (auto e = expect_shape(*buffer, std::get<0>(what), std::get<1>(what), std::get<2>(what));
        e.failure())
      return e;
  return ffi::Error::Success();
}

ffi::Error lstm_forward_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_ih,
                             ffi::AnyBuffer w_hh, ffi::AnyBuffer bias, ffi::AnyBuffer h0,
                             ffi::AnyBuffer c0, ffi::Result<ffi::AnyBuffer> hs,
                             ffi::Result<ffi::AnyBuffer> cs, ffi::Result<ffi::AnyBuffer> gates,
                             int32_t time_major) {
  prim::LstmForward p;
  if (auto e = decode_shape(x, w_ih, time_major, &p.shape, &p.dtype); e.failure()) return e;
  const prim::LstmShape& s = p.shape;
  const int64_t N = s.batch, K = s.hidden;
  const DType dt = p.dtype, f = DType::f32;
  const Check checks[] = {
      {&w_hh, {"w_hh", {K, 4 * K}, dt}},       {&bias, {"bias", {4 * K}, f}},
      {&h0, {"h0", {N, K}, dt}},               {&c0, {"c0", {N, K}, f}},
      {&*hs, {"hs", seq_dims(s, K), dt}},      {&*cs, {"cs", seq_dims(s, K), f}},
      {&*gates, {"gates", seq_dims(s, 4 * K), f}}};
  if (auto e = check_all(checks); e.failure()) return e;
  p.x = x.untyped_data(), p.w_ih = w_ih.untyped_data(), p.w_hh = w_hh.untyped_data();
  p.bias = f32(bias), p.h0 = h0.untyped_data(), p.c0 = f32(c0);
  p.hs = hs->untyped_data(), p.cs = f32_out(cs), p.gates = f32_out(gates);
  if (auto e = current_isa(&p.isa); e.failure()) return e;
  prefer_huge_pages(hs, cs, gates);
  prim::TeamCall executor = team_call(pool);
  if (std::string error = prim::lstm_forward(p, &executor); !error.empty()) return invalid(error);
  return ffi::Error::Success();
}

ffi::Error lstm_backward_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_ih,
                              ffi::AnyBuffer w_hh, ffi::AnyBuffer h0, ffi::AnyBuffer c0,
                              ffi::AnyBuffer hs, ffi::AnyBuffer cs, ffi::AnyBuffer gates,
                              ffi::AnyBuffer d_hs, ffi::AnyBuffer d_cT,
                              ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dw_ih,
                              ffi::Result<ffi::AnyBuffer> dw_hh, ffi::Result<ffi::AnyBuffer> dbias,
                              ffi::Result<ffi::AnyBuffer> dh0, ffi::Result<ffi::AnyBuffer> dc0,
                              int32_t time_major) {
  prim::LstmBackward p;
  if (auto e = decode_shape(x, w_ih, time_major, &p.shape, &p.dtype); e.failure()) return e;
  const prim::LstmShape& s = p.shape;
  const int64_t N = s.batch, C = s.in, K = s.hidden;
  const DType dt = p.dtype, f = DType::f32;
  const Check checks[] = {
      {&w_hh, {"w_hh", {K, 4 * K}, dt}},          {&h0, {"h0", {N, K}, dt}},
      {&c0, {"c0", {N, K}, f}},                   {&hs, {"hs", seq_dims(s, K), dt}},
      {&cs, {"cs", seq_dims(s, K), f}},           {&gates, {"gates", seq_dims(s, 4 * K), f}},
      {&d_hs, {"d_hs", seq_dims(s, K), f}},       {&d_cT, {"d_cT", {N, K}, f}},
      {&*dx, {"dx", seq_dims(s, C), f}},          {&*dw_ih, {"dw_ih", {C, 4 * K}, f}},
      {&*dw_hh, {"dw_hh", {K, 4 * K}, f}},        {&*dbias, {"dbias", {4 * K}, f}},
      {&*dh0, {"dh0", {N, K}, f}},                {&*dc0, {"dc0", {N, K}, f}}};
  if (auto e = check_all(checks); e.failure()) return e;
  p.x = x.untyped_data(), p.w_ih = w_ih.untyped_data(), p.w_hh = w_hh.untyped_data();
  p.h0 = h0.untyped_data(), p.hs = hs.untyped_data(), p.c0 = f32(c0);
  p.cs = f32(cs), p.gates = f32(gates), p.d_hs = f32(d_hs), p.d_cT = f32(d_cT);
  p.dx = f32_out(dx), p.dw_ih = f32_out(dw_ih), p.dw_hh = f32_out(dw_hh);
  p.dbias = f32_out(dbias), p.dh0 = f32_out(dh0), p.dc0 = f32_out(dc0);
  if (auto e = current_isa(&p.isa); e.failure()) return e;
  prefer_huge_pages(dx, dw_ih, dw_hh, dbias, dh0, dc0);
  prim::TeamCall executor = team_call(pool);
  if (std::string error = prim::lstm_backward(p, &executor); !error.empty()) return invalid(error);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_lstm_forward, lstm_forward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // w_ih
                                  .Arg<ffi::AnyBuffer>()  // w_hh
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Arg<ffi::AnyBuffer>()  // h0
                                  .Arg<ffi::AnyBuffer>()  // c0
                                  .Ret<ffi::AnyBuffer>()  // hs
                                  .Ret<ffi::AnyBuffer>()  // cs
                                  .Ret<ffi::AnyBuffer>()  // gates (activated)
                                  .Attr<int32_t>("time_major"));
JBR_REGISTER_HANDLER("jax_brgemm_lstm_forward", jbr_lstm_forward);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_lstm_backward, lstm_backward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // w_ih
                                  .Arg<ffi::AnyBuffer>()  // w_hh
                                  .Arg<ffi::AnyBuffer>()  // h0
                                  .Arg<ffi::AnyBuffer>()  // c0
                                  .Arg<ffi::AnyBuffer>()  // hs
                                  .Arg<ffi::AnyBuffer>()  // cs
                                  .Arg<ffi::AnyBuffer>()  // gates
                                  .Arg<ffi::AnyBuffer>()  // d_hs
                                  .Arg<ffi::AnyBuffer>()  // d_cT
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Ret<ffi::AnyBuffer>()  // dw_ih
                                  .Ret<ffi::AnyBuffer>()  // dw_hh
                                  .Ret<ffi::AnyBuffer>()  // dbias
                                  .Ret<ffi::AnyBuffer>()  // dh0
                                  .Ret<ffi::AnyBuffer>()  // dc0
                                  .Attr<int32_t>("time_major"));
JBR_REGISTER_HANDLER("jax_brgemm_lstm_backward", jbr_lstm_backward);

}  // namespace jbr::ffi_handlers
