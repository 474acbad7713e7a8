// XLA FFI handlers for platform CUDA, under the same target names as the CPU handlers
// (jax_brgemm_brgemm, jax_brgemm_brgemm_indexed), so jax.ffi.ffi_call runs these when the
// inputs live on a GPU. Decode (cuda/primitives/plan.h), validate, launch (cuda/brgemm/kernels.h).
#include <cuda_runtime_api.h>

#include <string>

#include "cuda/ffi/ffi_util.h"
#include "ffi/signatures.h"
#include "cuda/brgemm/kernels.h"
#include "cuda/primitives/plan.h"

namespace jbr::cuda {
namespace {

// a and b (or their pools) share one element type.
ffi::Error input_type(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b, const char* a_name,
                      const char* b_name, Problem* pr) {
  ElemType tb;
  if (auto e = elem_type(a, a_name, &pr->type); e.failure()) return e;
  if (auto e = elem_type(b, b_name, &tb); e.failure()) return e;
  if (tb != pr->type)
    return invalid(std::string(b_name) + " is " + elem_type_name(tb) + " but " + a_name +
                   " is " + elem_type_name(pr->type) + "; they must match");
  return ffi::Error::Success();
}

// The dims of the optional operands; null pointers for an absent one (passed as (0,)).
struct Optionals {
  Dims c, bias;
  const Dims* c_dims = nullptr;
  const Dims* bias_dims = nullptr;
};

// Everything but a and b: c, bias, out (all float32), the attributes.
ffi::Error common_setup(const ffi::AnyBuffer& c, const ffi::AnyBuffer& bias,
                        const ffi::AnyBuffer& out, float alpha, float beta,
                        std::string_view activation, Problem* pr, Optionals* opt) {
  if (auto e = ffi_handlers::expect_f32(out, "out"); e.failure()) return e;
  pr->out = static_cast<float*>(out.untyped_data());
  if (c.element_count() > 0) {
    if (auto e = ffi_handlers::expect_f32(c, "c"); e.failure()) return e;
    opt->c = dims_of(c), opt->c_dims = &opt->c;
    pr->c = static_cast<const float*>(c.untyped_data());
  }
  if (bias.element_count() > 0) {
    if (auto e = ffi_handlers::expect_f32(bias, "bias"); e.failure()) return e;
    opt->bias = dims_of(bias), opt->bias_dims = &opt->bias;
    pr->bias = static_cast<const float*>(bias.untyped_data());
  }
  if (!parse_activation(activation, &pr->act))
    return invalid("unknown activation '" + std::string(activation) + "'");
  pr->alpha = alpha;
  pr->beta = pr->c != nullptr ? beta : 0.0f;  // no c: nothing to scale, never read
  return ffi::Error::Success();
}

ffi::Error launch(const Decoded& d, Problem* pr, cudaStream_t stream, int32_t device) {
  pr->m = d.m, pr->n = d.n, pr->k = d.k, pr->count = d.count, pr->lead = d.dims;
  pr->a_blocks = d.a_blocks, pr->b_blocks = d.b_blocks;
  int sms = 0;
  if (auto e = sm_count(device, &sms); e.failure()) return e;
  TilePlan plan;
  if (auto e = checked(plan_tiles(pr->type, d.m, d.n, d.problems, sms, &plan)); e.failure())
    return e;
  return cuda_error(launch_brgemm(*pr, plan, stream), "kernel launch");
}

ffi::Error brgemm_impl(cudaStream_t stream, int32_t device, ffi::AnyBuffer a, ffi::AnyBuffer b,
                       ffi::AnyBuffer c, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> out, float alpha,
                       float beta, std::string_view activation) {
  Problem pr;
  Optionals opt;
  if (auto e = common_setup(c, bias, *out, alpha, beta, activation, &pr, &opt); e.failure())
    return e;
  if (auto e = input_type(a, b, "a", "b", &pr); e.failure()) return e;
  Decoded d;
  if (auto e = checked(decode_stride_form(dims_of(a), dims_of(b), opt.c_dims, opt.bias_dims,
                                          dims_of(*out), &d));
      e.failure())
    return e;
  if (out->element_count() == 0) return ffi::Error::Success();
  pr.a = a.untyped_data(), pr.b = b.untyped_data();
  return launch(d, &pr, stream, device);
}

// Out-of-range indices are found by the kernel itself (it skips them, never reading outside
// the pools) and reported through a small device buffer; reading it back synchronises the
// stream once per call, the price of returning an error instead of garbage.
ffi::Error brgemm_indexed_impl(cudaStream_t stream, int32_t device, ffi::ScratchAllocator scratch,
                               ffi::AnyBuffer a_blocks, ffi::AnyBuffer b_blocks,
                               ffi::AnyBuffer a_index, ffi::AnyBuffer b_index, ffi::AnyBuffer c,
                               ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> out, float alpha,
                               float beta, std::string_view activation) {
  Problem pr;
  Optionals opt;
  if (auto e = common_setup(c, bias, *out, alpha, beta, activation, &pr, &opt); e.failure())
    return e;
  if (auto e = input_type(a_blocks, b_blocks, "a_blocks", "b_blocks", &pr); e.failure()) return e;
  const auto it = a_index.element_type();
  if ((it != ffi::DataType::S32 && it != ffi::DataType::S64) || b_index.element_type() != it)
    return invalid("a_index and b_index must both be int32 or both int64");
  Decoded d;
  if (auto e = checked(decode_offset_form(dims_of(a_blocks), dims_of(b_blocks), dims_of(a_index),
                                          dims_of(b_index), opt.c_dims, opt.bias_dims, dims_of(*out), &d));
      e.failure())
    return e;
  if (out->element_count() == 0) return ffi::Error::Success();
  pr.a = a_blocks.untyped_data(), pr.b = b_blocks.untyped_data();
  pr.a_index = a_index.untyped_data(), pr.b_index = b_index.untyped_data();
  pr.index_is_64 = it == ffi::DataType::S64;
  constexpr size_t kErrorBytes = 3 * sizeof(int64_t);
  std::optional<void*> error = scratch.Allocate(kErrorBytes, alignof(int64_t));
  if (!error.has_value())
    return ffi::Error::Internal("jax_brgemm: no scratch memory for the index check");
  pr.error = static_cast<int64_t*>(*error);
  if (auto e = cuda_error(cudaMemsetAsync(pr.error, 0, kErrorBytes, stream), "cudaMemsetAsync");
      e.failure())
    return e;
  if (auto e = launch(d, &pr, stream, device); e.failure()) {
    cudaStreamSynchronize(stream);  // the memset may be pending; the scratch is freed on return
    return e;
  }
  int64_t found[3] = {0, 0, 0};
  if (auto e = cuda_error(
          cudaMemcpyAsync(found, pr.error, kErrorBytes, cudaMemcpyDeviceToHost, stream),
          "cudaMemcpyAsync");
      e.failure())
    return e;
  if (auto e = cuda_error(cudaStreamSynchronize(stream), "cudaStreamSynchronize"); e.failure())
    return e;
  // The CPU handler's wording (it names the first bad value; this names one of them).
  for (int which = 0; which < 2; ++which)
    if (found[0] & (1 << which))
      return invalid(std::string(which == 0 ? "a_index" : "b_index") + " holds " +
                     std::to_string(found[1 + which]) + ", outside [0, " +
                     std::to_string(which == 0 ? d.a_blocks : d.b_blocks) + ")");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_cuda_brgemm, brgemm_impl,
                              signatures::brgemm(bind_stream_device()));
JBR_REGISTER_HANDLER("jax_brgemm_brgemm", jbr_cuda_brgemm);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_cuda_brgemm_indexed, brgemm_indexed_impl,
                              signatures::brgemm_indexed(
                                  bind_stream_device().Ctx<ffi::ScratchAllocator>()));
JBR_REGISTER_HANDLER("jax_brgemm_brgemm_indexed", jbr_cuda_brgemm_indexed);

}  // namespace jbr::cuda
