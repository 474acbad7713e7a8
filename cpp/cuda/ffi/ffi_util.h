// Small pieces the CUDA FFI handlers share (brgemm_cuda_ffi.cc, nn_cuda_ffi.cc).
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "cuda/primitives/plan.h"
#include "ffi/common.h"
#include "ffi/signatures.h"

namespace jbr::cuda {

namespace ffi = xla::ffi;
using ffi_handlers::invalid;

// The contexts every CUDA handler binds first (then ffi/signatures.h's operands).
inline auto bind_stream_device() {
  return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>();
}

inline Dims dims_of(const ffi::AnyBuffer& x) {
  auto d = x.dimensions();
  return Dims(d.begin(), d.end());
}

// A planning message (empty: fine) as an ffi::Error.
inline ffi::Error checked(const std::string& error) {
  return error.empty() ? ffi::Error::Success() : invalid(error);
}

inline ffi::Error cuda_error(int code, const char* what) {
  if (code == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jax_brgemm: ") + what + ": " +
                              cudaGetErrorString(static_cast<cudaError_t>(code)));
}

inline ffi::Error sm_count(int32_t device, int* count) {
  return cuda_error(cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device),
                    "cudaDeviceGetAttribute");
}

// The buffer's element type among `allowed` (float32, bfloat16, float16), else an error
// naming the buffer and the allowed types.
inline ffi::Error elem_type(const ffi::AnyBuffer& x, const char* name, ElemType* t,
                            bool allow_f16 = true) {
  switch (x.element_type()) {
    case ffi::DataType::F32: *t = ElemType::f32; return ffi::Error::Success();
    case ffi::DataType::BF16: *t = ElemType::bf16; return ffi::Error::Success();
    case ffi::DataType::F16:
      if (allow_f16) {
        *t = ElemType::f16;
        return ffi::Error::Success();
      }
      break;
    default: break;
  }
  return invalid(std::string(name) + (allow_f16 ? " must be float32, bfloat16 or float16"
                                                 : " must be float32 or bfloat16"));
}

}  // namespace jbr::cuda
