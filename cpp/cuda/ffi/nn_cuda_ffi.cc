// XLA FFI handlers for platform CUDA of jax_brgemm.nn.dense and nn.conv2d, under the CPU
// handlers' target names, operands, results and attributes (cpp/ffi/dense_ffi.cc,
// cpp/ffi/conv_ffi.cc), so jax.ffi.ffi_call runs these when the inputs live on a GPU.
// Decode (cuda/primitives/nn_plan.h), validate, plan (cuda/primitives/plan.h), launch
// (cuda/primitives/nn_kernels.h).
#include <cuda_runtime_api.h>

#include <optional>
#include <string>
#include <vector>

#include "cuda/ffi/ffi_util.h"
#include "ffi/signatures.h"
#include "cuda/primitives/nn_kernels.h"
#include "cuda/primitives/nn_plan.h"

namespace jbr::cuda {
namespace {

// Empty (0,) buffers stand for absent optional operands and unwanted results.
std::optional<Dims> optional_dims(const ffi::AnyBuffer& x) {
  if (x.element_count() == 0) return std::nullopt;
  return dims_of(x);
}
const Dims* ptr(const std::optional<Dims>& d) { return d.has_value() ? &*d : nullptr; }

// A float32 or bfloat16 buffer as a Buf (absent: an empty Buf).
ffi::Error buf(const ffi::AnyBuffer& x, const char* name, Buf* out) {
  *out = Buf{};
  if (x.element_count() == 0) return ffi::Error::Success();
  out->p = x.untyped_data();
  return elem_type(x, name, &out->t, /*allow_f16=*/false);
}

// The two inputs of a pass: float32 or bfloat16, alike.
ffi::Error input_types(const ffi::AnyBuffer& a, const char* a_name, const ffi::AnyBuffer& b,
                       const char* b_name, ElemType* t) {
  ElemType tb;
  if (auto e = elem_type(a, a_name, t, false); e.failure()) return e;
  if (auto e = elem_type(b, b_name, &tb, false); e.failure()) return e;
  if (*t != tb) return invalid(std::string(a_name) + " and " + b_name + " must have the same dtype");
  return ffi::Error::Success();
}

ffi::Error activation_of(std::string_view name, Act* act) {
  if (!parse_activation(name, act)) return invalid("unknown activation '" + std::string(name) + "'");
  return ffi::Error::Success();
}

// Plans and launches one pass. `splittable`: the output is float32 and a plain sum, so a
// grid too small for the GPU may split the reduction (the output is zeroed first, `bytes`
// long, and the blocks add their partial sums atomically).
template <class Offsets>
ffi::Error run_gemm(NnGemm<Offsets> g, bool splittable, size_t bytes, cudaStream_t stream,
                    int32_t device) {
  const GemmShape& s = g.off.shape;
  if (s.m == 0 || s.n == 0 || s.problems == 0) return ffi::Error::Success();
  int sms = 0;
  if (auto e = sm_count(device, &sms); e.failure()) return e;
  TilePlan plan;
  if (auto e = checked(plan_tiles(g.in, s.m, s.n, s.problems, sms, &plan)); e.failure()) return e;
  if (splittable) {
    const int64_t steps = s.count * ((s.k + plan.tile.bk - 1) / plan.tile.bk);
    if (auto e = checked(plan_splits(steps, sms, &plan)); e.failure()) return e;
  }
  g.ep.accumulate = plan.splits > 1;
  if (g.ep.accumulate)
    if (auto e = cuda_error(cudaMemsetAsync(g.ep.out.p, 0, bytes, stream), "cudaMemsetAsync"); e.failure())
      return e;
  return cuda_error(launch_nn(g, plan, stream), "kernel launch");
}

// ---------------------------------------------------------------- dense

ffi::Error dense_fwd_impl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer w,
                          ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                          ffi::Result<ffi::AnyBuffer> preact, std::string_view activation) {
  NnGemm<StridedOffsets> g;
  if (auto e = activation_of(activation, &g.ep.act); e.failure()) return e;
  if (auto e = input_types(x, "x", w, "kernel", &g.in); e.failure()) return e;
  if (auto e = buf(bias, "bias", &g.ep.bias); e.failure()) return e;
  if (auto e = buf(*y, "y", &g.ep.out); e.failure()) return e;
  if (auto e = buf(*preact, "preact", &g.ep.preact); e.failure()) return e;
  DenseDims d;
  const auto bias_dims = optional_dims(bias), preact_dims = optional_dims(*preact);
  if (auto e = checked(decode_dense_forward(dims_of(x), dims_of(w), ptr(bias_dims), dims_of(*y),
                                            ptr(preact_dims), &d));
      e.failure())
    return e;
  if (y->element_count() == 0) return ffi::Error::Success();
  g.a = x.untyped_data(), g.b = w.untyped_data();
  g.off = dense_offsets(Pass::forward, d);
  return run_gemm(g, false, 0, stream, device);
}

ffi::Error dense_bwd_impl(cudaStream_t stream, int32_t device, ffi::ScratchAllocator scratch,
                          ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer w,
                          ffi::AnyBuffer saved, ffi::Result<ffi::AnyBuffer> dx,
                          ffi::Result<ffi::AnyBuffer> dw, ffi::Result<ffi::AnyBuffer> dbias,
                          std::string_view activation) {
  Act act;
  if (auto e = activation_of(activation, &act); e.failure()) return e;
  ElemType in;
  if (auto e = input_types(x, "x", w, "kernel", &in); e.failure()) return e;
  Buf dy_buf, saved_buf, dx_buf, dw_buf, db_buf;
  if (auto e = buf(dy, "dy", &dy_buf); e.failure()) return e;
  if (act != Act::none)
    if (auto e = buf(saved, "saved", &saved_buf); e.failure()) return e;
  if (auto e = buf(*dx, "dx", &dx_buf); e.failure()) return e;
  if (auto e = buf(*dw, "dw", &dw_buf); e.failure()) return e;
  if (auto e = buf(*dbias, "dbias", &db_buf); e.failure()) return e;
  DenseDims d;
  const auto saved_dims = optional_dims(saved), dx_dims = optional_dims(*dx),
             dw_dims = optional_dims(*dw), db_dims = optional_dims(*dbias);
  if (auto e = checked(decode_dense_backward(dims_of(dy), dims_of(x), dims_of(w), ptr(saved_dims),
                                             act != Act::none, ptr(dx_dims), ptr(dw_dims),
                                             ptr(db_dims), &d));
      e.failure())
    return e;
  const int64_t nk = d.problems * d.n * d.k;

  if (d.want_dbias) {  // float32 sums of dy * act'(saved), straight from dy
    const int64_t sums = d.dbias_shared ? 1 : d.problems;
    const int64_t rows = d.dbias_shared ? d.problems * d.n : d.n;
    if (sums > 65535) return invalid("dbias: more than 65535 separate bias gradients");
    if (auto e = cuda_error(launch_bias_grad(act, dy_buf, saved_buf, db_buf, sums, rows, d.k, stream),
                            "kernel launch");
        e.failure())
      return e;
  }
  if (!d.want_dx && !d.want_dw) return ffi::Error::Success();

  // dz = dy * act'(saved) in the inputs' dtype (dy itself when that is already it).
  const void* dz = dy.untyped_data();
  if (act != Act::none || dy_buf.t != in) {
    const size_t bytes = static_cast<size_t>(nk) * (in == ElemType::f32 ? 4 : 2);
    std::optional<void*> mem = scratch.Allocate(std::max<size_t>(bytes, 1), 16);
    if (!mem.has_value()) return ffi::Error::Internal("jax_brgemm: no scratch memory for dense's dz");
    if (auto e = cuda_error(launch_activation_grad(act, dy_buf, saved_buf, Buf{*mem, in}, nk, stream),
                            "kernel launch");
        e.failure())
      return e;
    dz = *mem;
  }
  if (d.want_dx) {
    NnGemm<StridedOffsets> g;
    g.in = in, g.a = dz, g.b = w.untyped_data(), g.ep.out = dx_buf;
    g.off = dense_offsets(Pass::backward_data, d);
    if (auto e = run_gemm(g, false, 0, stream, device); e.failure()) return e;
  }
  if (d.want_dw) {
    NnGemm<StridedOffsets> g;
    g.in = in, g.a = x.untyped_data(), g.b = dz, g.ep.out = dw_buf;
    g.off = dense_offsets(Pass::weight_update, d);
    const bool f32 = dw_buf.t == ElemType::f32;
    if (auto e = run_gemm(g, f32, dw->element_count() * sizeof(float), stream, device); e.failure())
      return e;
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- conv2d

ffi::Error conv_decode(const ffi::AnyBuffer& x, const char* x_name, const ffi::AnyBuffer& w,
                       const char* w_name, const ffi::AnyBuffer& y, const char* y_name,
                       ffi::Span<const int64_t> geometry, ConvGeom* g) {
  return checked(decode_conv(dims_of(x), x_name, dims_of(w), w_name, dims_of(y), y_name,
                             std::vector<int64_t>(geometry.begin(), geometry.end()), g));
}

ffi::Error conv_forward_impl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                             ffi::AnyBuffer w, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                             ffi::Span<const int64_t> geometry, std::string_view activation) {
  NnGemm<ConvForwardOffsets> g;
  if (auto e = input_types(x, "x", w, "kernel", &g.in); e.failure()) return e;
  if (auto e = buf(*y, "result", &g.ep.out); e.failure()) return e;
  ConvGeom geom;
  if (auto e = conv_decode(x, "x", w, "kernel", *y, "result", geometry, &geom); e.failure()) return e;
  if (bias.element_count() > 0) {
    if (auto e = ffi_handlers::expect_f32(bias, "bias"); e.failure()) return e;
    if (bias.dimensions().size() != 1 || bias.dimensions()[0] != geom.out_c)
      return invalid("bias must have shape (" + std::to_string(geom.out_c) + ",), got " +
                     dims_str(dims_of(bias)));
    g.ep.bias = Buf{bias.untyped_data(), ElemType::f32};
  }
  if (auto e = activation_of(activation, &g.ep.act); e.failure()) return e;
  g.a = x.untyped_data(), g.b = w.untyped_data();
  g.off = conv_forward_offsets(geom);
  return run_gemm(g, false, 0, stream, device);
}

ffi::Error conv_backward_data_impl(cudaStream_t stream, int32_t device, ffi::AnyBuffer dy,
                                   ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                                   ffi::Span<const int64_t> geometry) {
  NnGemm<ConvBackwardDataOffsets> g;
  if (auto e = input_types(dy, "dy", w, "kernel", &g.in); e.failure()) return e;
  if (auto e = buf(*dx, "result", &g.ep.out); e.failure()) return e;
  ConvGeom geom;
  if (auto e = conv_decode(*dx, "result", w, "kernel", dy, "dy", geometry, &geom); e.failure()) return e;
  g.a = dy.untyped_data(), g.b = w.untyped_data();
  g.off = conv_backward_data_offsets(geom);
  return run_gemm(g, false, 0, stream, device);
}

ffi::Error conv_weight_update_impl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                                   ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                                   ffi::Span<const int64_t> geometry) {
  NnGemm<ConvWeightUpdateOffsets> g;
  if (auto e = input_types(x, "x", dy, "dy", &g.in); e.failure()) return e;
  ConvGeom geom;
  if (auto e = conv_decode(x, "x", *dw, "result", dy, "dy", geometry, &geom); e.failure()) return e;
  if (auto e = ffi_handlers::expect_f32(*dw, "result"); e.failure()) return e;
  g.ep.out = Buf{dw->untyped_data(), ElemType::f32};
  g.a = x.untyped_data(), g.b = dy.untyped_data();
  g.off = conv_weight_update_offsets(geom);
  return run_gemm(g, true, dw->element_count() * sizeof(float), stream, device);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_cuda_dense_fwd, dense_fwd_impl,
                              signatures::dense_fwd(bind_stream_device()));
JBR_REGISTER_HANDLER("jax_brgemm_dense_fwd", jbr_cuda_dense_fwd);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_cuda_dense_bwd, dense_bwd_impl,
                              signatures::dense_bwd(
                                  bind_stream_device().Ctx<ffi::ScratchAllocator>()));
JBR_REGISTER_HANDLER("jax_brgemm_dense_bwd", jbr_cuda_dense_bwd);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_cuda_conv2d_forward, conv_forward_impl,
                              signatures::conv2d_forward(bind_stream_device()));
JBR_REGISTER_HANDLER("jax_brgemm_conv2d_forward", jbr_cuda_conv2d_forward);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_cuda_conv2d_backward_data, conv_backward_data_impl,
                              signatures::conv2d_backward(bind_stream_device()));
JBR_REGISTER_HANDLER("jax_brgemm_conv2d_backward_data", jbr_cuda_conv2d_backward_data);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_cuda_conv2d_weight_update, conv_weight_update_impl,
                              signatures::conv2d_backward(bind_stream_device()));
JBR_REGISTER_HANDLER("jax_brgemm_conv2d_weight_update", jbr_cuda_conv2d_weight_update);

}  // namespace jbr::cuda
