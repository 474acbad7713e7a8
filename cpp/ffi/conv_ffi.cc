// Handlers for jax_brgemm.nn.conv2d: forward, backward-data and weight-update.
// Shapes: x (N, H, W, C), w (R, S, C/groups, K), y (N, P, Q, K). Every handler gets the
// geometry attribute [stride_h, stride_w, dil_h, dil_w, pad_top, pad_left, groups]. Inputs
// are float32 or bfloat16 (all alike); results float32 or bfloat16, the weight-update's float32.
#include <new>
#include <string>

#include "ffi/common.h"
#include "ffi/signatures.h"
#include "primitives/conv.h"

namespace jbr::ffi_handlers {
namespace {

ffi::Error rank4(const ffi::AnyBuffer& buffer, const char* name, const char* layout, DType* dtype) {
  if (auto e = kernel_dtype(buffer, name, dtype); e.failure()) return e;
  if (buffer.dimensions().size() != 4)
    return invalid(std::string(name) + " must have shape " + layout + ", got " +
                   dims_str(buffer.dimensions()));
  return ffi::Error::Success();
}

// The convolution's shape from its three tensors (x, w, y or their gradients), and their
// dtypes in that order.
ffi::Error decode(const ffi::AnyBuffer& x, const char* x_name, const ffi::AnyBuffer& w,
                  const char* w_name, const ffi::AnyBuffer& y, const char* y_name,
                  ffi::Span<const int64_t> geometry, prim::ConvShape* s, DType dtypes[3]) {
  if (auto e = rank4(x, x_name, "(N, H, W, C)", &dtypes[0]); e.failure()) return e;
  if (auto e = rank4(w, w_name, "(R, S, C/groups, K)", &dtypes[1]); e.failure()) return e;
  if (auto e = rank4(y, y_name, "(N, P, Q, K)", &dtypes[2]); e.failure()) return e;
  const std::string error =
      prim::decode_conv_shape(x.dimensions().begin(), x_name, w.dimensions().begin(), w_name,
                              y.dimensions().begin(), y_name, geometry.begin(), geometry.size(), s);
  return error.empty() ? ffi::Error::Success() : invalid(error);
}

// The two inputs of a pass must share a dtype.
ffi::Error same_dtype(DType a, const char* a_name, DType b, const char* b_name) {
  if (a == b) return ffi::Error::Success();
  return invalid(std::string(a_name) + " and " + b_name + " must have the same dtype");
}

ffi::Error forward_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                        ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                        ffi::Span<const int64_t> geometry, std::string_view activation) {
  prim::ConvShape s;
  DType dt[3];
  if (auto e = decode(x, "x", w, "kernel", *y, "result", geometry, &s, dt); e.failure()) return e;
  if (auto e = same_dtype(dt[0], "x", dt[1], "kernel"); e.failure()) return e;
  const float* bias_ptr = nullptr;
  if (bias.element_count() > 0) {
    if (auto e = expect_f32(bias, "bias"); e.failure()) return e;
    if (bias.dimensions().size() != 1 || bias.dimensions()[0] != s.out_c)
      return invalid("bias must have shape (" + std::to_string(s.out_c) + ",), got " +
                     dims_str(bias.dimensions()));
    bias_ptr = static_cast<const float*>(bias.untyped_data());
  }
  Activation act;
  if (!parse_activation(activation, &act))
    return invalid("unknown activation '" + std::string(activation) + "'");
  Isa isa;
  if (auto e = current_isa(&isa); e.failure()) return e;
  prefer_huge_pages(y);
  prim::TeamCall executor = team_call(pool, prim::kConvLinger);
  return run_primitive("conv2d", [&] {
    return prim::conv2d_forward(s, dt[0], x.untyped_data(), w.untyped_data(), bias_ptr, act, dt[2],
                                y->untyped_data(), isa, &executor);
  });
}

ffi::Error backward_data_impl(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer w,
                              ffi::Result<ffi::AnyBuffer> dx, ffi::Span<const int64_t> geometry) {
  prim::ConvShape s;
  DType dt[3];
  if (auto e = decode(*dx, "result", w, "kernel", dy, "dy", geometry, &s, dt); e.failure()) return e;
  if (auto e = same_dtype(dt[2], "dy", dt[1], "kernel"); e.failure()) return e;
  Isa isa;
  if (auto e = current_isa(&isa); e.failure()) return e;
  prefer_huge_pages(dx);
  prim::TeamCall executor = team_call(pool, prim::kConvLinger);
  return run_primitive("conv2d", [&] {
    return prim::conv2d_backward_data(s, dt[2], dy.untyped_data(), w.untyped_data(), dt[0],
                                      dx->untyped_data(), isa, &executor);
  });
}

ffi::Error weight_update_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                              ffi::Result<ffi::AnyBuffer> dw, ffi::Span<const int64_t> geometry) {
  prim::ConvShape s;
  DType dt[3];
  if (auto e = decode(x, "x", *dw, "result", dy, "dy", geometry, &s, dt); e.failure()) return e;
  if (auto e = same_dtype(dt[0], "x", dt[2], "dy"); e.failure()) return e;
  if (auto e = expect_f32(*dw, "result"); e.failure()) return e;
  Isa isa;
  if (auto e = current_isa(&isa); e.failure()) return e;
  prefer_huge_pages(dw);
  prim::TeamCall executor = team_call(pool, prim::kConvLinger);
  return run_primitive("conv2d", [&] {
    return prim::conv2d_weight_update(s, dt[0], x.untyped_data(), dy.untyped_data(),
                                      static_cast<float*>(dw->untyped_data()), isa, &executor);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_conv2d_forward, forward_impl,
                              signatures::conv2d_forward(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
JBR_REGISTER_HANDLER("jax_brgemm_conv2d_forward", jbr_conv2d_forward);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_conv2d_backward_data, backward_data_impl,
                              signatures::conv2d_backward(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
JBR_REGISTER_HANDLER("jax_brgemm_conv2d_backward_data", jbr_conv2d_backward_data);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_conv2d_weight_update, weight_update_impl,
                              signatures::conv2d_backward(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
JBR_REGISTER_HANDLER("jax_brgemm_conv2d_weight_update", jbr_conv2d_weight_update);

}  // namespace jbr::ffi_handlers
