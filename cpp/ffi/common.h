// Shared pieces of the XLA FFI handlers: handler registration, the thread-pool adapter and
// buffer checks. Handlers decode and validate; the math lives in cpp/primitives/.
#pragma once

#include <cstdint>
#include <functional>
#include <new>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "brgemm/brgemm.h"
#include "primitives/parallel.h"
#include "primitives/parallel_policy.h"
#include "primitives/scratch.h"
#include "shape/dims.h"
#include "xla/ffi/api/ffi.h"

namespace jbr::ffi_handlers {

namespace ffi = xla::ffi;

// Every handler adds itself here at load time; the nanobind module exports the list.
struct HandlerEntry {
  std::string name;
  void* handler;
};
std::vector<HandlerEntry>& handler_registry();
struct RegisterHandler {
  RegisterHandler(const char* name, XLA_FFI_Handler* handler) {
    handler_registry().push_back({name, reinterpret_cast<void*>(handler)});
  }
};
#define JBR_REGISTER_HANDLER(target_name, symbol) \
  static ::jbr::ffi_handlers::RegisterHandler symbol##_registration(target_name, symbol)

// XLA hands large results over as freshly mapped memory, and first-touching it one 4 KB
// page at a time costs about 1 us a page here: ~20 ms for a 64 MB weight gradient, twice
// the GEMM that fills it. Transparent huge pages (THP "madvise" mode, the common default)
// make that 32 faults of 2 MB. Only a hint: a no-op where THP is off or the pages exist.
template <typename... Results>
void prefer_huge_pages(Results&... results) {
  (prim::advise_huge_pages(results->untyped_data(), results->size_bytes()), ...);
}

inline ffi::Error invalid(std::string message) {
  return ffi::Error::InvalidArgument("jax_brgemm: " + std::move(message));
}

// Runs a primitive; its message, or a failed allocation of its work buffers, becomes an error.
template <typename Run>
ffi::Error run_primitive(const char* primitive, Run run) {
  try {
    const std::string error = run();
    return error.empty() ? ffi::Error::Success() : invalid(error);
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      std::string("jax_brgemm: ") + primitive + " work buffers do not fit in memory");
  }
}

using shape::dims_str;  // "(2, 3)": how every message words a shape
using shape::Dims;

inline Dims dims_of(const ffi::AnyBuffer& b) {
  auto d = b.dimensions();
  return Dims(d.begin(), d.end());
}

inline ffi::Error expect_f32(const ffi::AnyBuffer& buffer, const char* name) {
  if (buffer.element_type() != ffi::DataType::F32)
    return invalid(std::string(name) + " must be float32");
  return ffi::Error::Success();
}

// The kernel's dtype for a float32 or bfloat16 buffer, or an error naming it.
inline ffi::Error kernel_dtype(const ffi::AnyBuffer& buffer, const char* name, DType* dtype) {
  switch (buffer.element_type()) {
    case ffi::DataType::F32: *dtype = DType::f32; return ffi::Error::Success();
    case ffi::DataType::BF16: *dtype = DType::bf16; return ffi::Error::Success();
    default: return invalid(std::string(name) + " must be float32 or bfloat16");
  }
}

// The ISA the kernels use now (JAX_BRGEMM_ISA or CPUID), or an error naming the bad value.
inline ffi::Error current_isa(Isa* isa) {
  if (std::string error = active_isa_error(); !error.empty()) return invalid(error);
  *isa = active_isa();
  return ffi::Error::Success();
}

// The executor of one handler call: the library's worker team, with every task also
// offered to XLA's intra-op pool (prim::TeamCall says why).
inline prim::TeamCall team_call(ffi::ThreadPool& pool,
                                std::chrono::microseconds linger = std::chrono::microseconds(0)) {
  return prim::TeamCall(pool.num_threads(),
                        [&pool](std::function<void()> task) { pool.Schedule(std::move(task)); }, linger);
}

// Completes `promise` with the outcome of a call (an error where it failed).
inline void settle(ffi::Promise& promise, ffi::Error error) {
  if (error.failure()) promise.SetError(std::move(error));
  else promise.SetAvailable();
}

// A future that is already complete (with `error` when it failed).
inline ffi::Future finished(ffi::Error error) {
  ffi::Promise promise;
  settle(promise, std::move(error));
  return ffi::Future(promise);
}

// Runs `work(executor)` (returning ffi::Error) and returns its future: on the team and XLA's
// pool (team_call) here, or, where prim::runs_as_task says so (primitives/parallel_policy.h
// says why), as a single-threaded task on XLA's pool while the handler returns at once.
// `work` must own what it uses: it may run after the handler returns, when `pool` is no
// longer valid.
template <typename Work>
ffi::Future run_sized(ffi::ThreadPool& pool, int64_t macs, Work work) {
  if (!prim::runs_as_task(macs)) {
    prim::TeamCall executor = team_call(pool);
    return finished(work(&executor));
  }
  ffi::Promise promise;
  ffi::Future future(promise);
  pool.Schedule([work = std::move(work), promise]() mutable { settle(promise, work(nullptr)); });
  return future;
}

}  // namespace jbr::ffi_handlers
