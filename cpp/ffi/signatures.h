// The operands, results and attributes of each FFI target both devices implement, in one
// place: a handler binds its device's contexts, then one of these (the CPU handlers in
// cpp/ffi/, the CUDA handlers in cpp/cuda/ffi/), so the two agree by construction.
//   XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl, signatures::dense_fwd(ffi::Ffi::Bind().Ctx<...>()));
#pragma once

#include <string_view>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jbr::signatures {

namespace ffi = xla::ffi;
using Buf = ffi::AnyBuffer;

// jax_brgemm_brgemm: a, b, c (empty: none), bias (empty: none) -> out.
template <typename B>
auto brgemm(B&& b) {
  return std::forward<B>(b)
      .template Arg<Buf>().template Arg<Buf>().template Arg<Buf>().template Arg<Buf>()
      .template Ret<Buf>()
      .template Attr<float>("alpha").template Attr<float>("beta")
      .template Attr<std::string_view>("activation");
}

// jax_brgemm_brgemm_indexed: a_blocks, b_blocks, a_index, b_index, c, bias -> out.
template <typename B>
auto brgemm_indexed(B&& b) {
  return brgemm(std::forward<B>(b).template Arg<Buf>().template Arg<Buf>());
}

// jax_brgemm_dense_fwd: x, kernel, bias (empty: none) -> y, pre-activation (empty: not kept).
template <typename B>
auto dense_fwd(B&& b) {
  return std::forward<B>(b)
      .template Arg<Buf>().template Arg<Buf>().template Arg<Buf>()
      .template Ret<Buf>().template Ret<Buf>()
      .template Attr<std::string_view>("activation");
}

// jax_brgemm_dense_bwd: dy, x, kernel, saved y or pre-activation -> dx, dkernel, dbias
// (each empty: skipped).
template <typename B>
auto dense_bwd(B&& b) {
  return std::forward<B>(b)
      .template Arg<Buf>().template Arg<Buf>().template Arg<Buf>().template Arg<Buf>()
      .template Ret<Buf>().template Ret<Buf>().template Ret<Buf>()
      .template Attr<std::string_view>("activation");
}

// jax_brgemm_conv2d_forward: x, kernel, bias (empty: none) -> y.
template <typename B>
auto conv2d_forward(B&& b) {
  return std::forward<B>(b)
      .template Arg<Buf>().template Arg<Buf>().template Arg<Buf>()
      .template Ret<Buf>()
      .template Attr<ffi::Span<const int64_t>>("geometry")
      .template Attr<std::string_view>("activation");
}

// jax_brgemm_conv2d_backward_data (dy, kernel -> dx) and jax_brgemm_conv2d_weight_update
// (x, dy -> dkernel): two inputs, one result, the geometry.
template <typename B>
auto conv2d_backward(B&& b) {
  return std::forward<B>(b)
      .template Arg<Buf>().template Arg<Buf>()
      .template Ret<Buf>()
      .template Attr<ffi::Span<const int64_t>>("geometry");
}

}  // namespace jbr::signatures
