// Handlers for jax_brgemm.nn.max_pool: forward (x -> y) and backward (x, dy -> dx). x is
// (N, H, W, C) float32 or bfloat16, y and dy (N, Ho, Wo, C) of x's dtype; the geometry
// attribute is [kh, kw, sh, sw, pad_top, pad_bottom, pad_left, pad_right].
#include <new>
#include <string>

#include "ffi/common.h"
#include "primitives/pool.h"

namespace jbr::ffi_handlers {
namespace {

// Pooling sits between convolutions and batch norms: keep the workers polling as those do.
constexpr std::chrono::microseconds kLinger{150};

ffi::Error decode(const ffi::AnyBuffer& x, ffi::Span<const int64_t> geometry, prim::PoolShape* s,
                  DType* dtype) {
  if (auto e = kernel_dtype(x, "x", dtype); e.failure()) return e;
  const Dims d = dims_of(x);
  if (d.size() != 4) return invalid("x must have shape (N, H, W, C), got " + dims_str(x.dimensions()));
  if (geometry.size() != 8) return invalid("max_pool geometry must have 8 entries");
  const int64_t* g = geometry.begin();
  *s = prim::PoolShape{d[0], d[1], d[2], d[3], g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]};
  if (std::string e = prim::pool_check(*s); !e.empty()) return invalid(e);
  return ffi::Error::Success();
}

// A buffer of shape `dims` and x's dtype.
ffi::Error expect(const ffi::AnyBuffer& b, const char* name, const Dims& dims, DType dtype) {
  DType got;
  if (auto e = kernel_dtype(b, name, &got); e.failure()) return e;
  if (got != dtype) return invalid(std::string(name) + " must have x's dtype");
  if (dims_of(b) != dims)
    return invalid(std::string(name) + " must have shape " + dims_str(dims) + ", got " + dims_str(b.dimensions()));
  return ffi::Error::Success();
}

ffi::Error forward_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                        ffi::Span<const int64_t> geometry) {
  prim::PoolShape s;
  DType dt;
  if (auto e = decode(x, geometry, &s, &dt); e.failure()) return e;
  if (auto e = expect(*y, "result", Dims{s.n, s.out_h(), s.out_w(), s.c}, dt); e.failure()) return e;
  Isa isa;
  if (auto e = current_isa(&isa); e.failure()) return e;
  prefer_huge_pages(y);
  prim::TeamCall executor = team_call(pool, kLinger);
  return run_primitive("max_pool", [&] { return prim::max_pool_forward(s, dt, x.untyped_data(), y->untyped_data(), isa, &executor); });
}

ffi::Error backward_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                         ffi::Result<ffi::AnyBuffer> dx, ffi::Span<const int64_t> geometry) {
  prim::PoolShape s;
  DType dt;
  if (auto e = decode(x, geometry, &s, &dt); e.failure()) return e;
  if (auto e = expect(dy, "dy", Dims{s.n, s.out_h(), s.out_w(), s.c}, dt); e.failure()) return e;
  if (auto e = expect(*dx, "result", Dims{s.n, s.h, s.w, s.c}, dt); e.failure()) return e;
  Isa isa;
  if (auto e = current_isa(&isa); e.failure()) return e;
  prefer_huge_pages(dx);
  prim::TeamCall executor = team_call(pool, kLinger);
  return run_primitive("max_pool", [&] {
    return prim::max_pool_backward(s, dt, x.untyped_data(), dy.untyped_data(), dx->untyped_data(), isa, &executor);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_max_pool_forward, forward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x (N, H, W, C)
                                  .Ret<ffi::AnyBuffer>()  // y (N, Ho, Wo, C)
                                  .Attr<ffi::Span<const int64_t>>("geometry"));
JBR_REGISTER_HANDLER("jax_brgemm_max_pool_forward", jbr_max_pool_forward);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_max_pool_backward, backward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // dy (N, Ho, Wo, C)
                                  .Ret<ffi::AnyBuffer>()  // dx (x's shape)
                                  .Attr<ffi::Span<const int64_t>>("geometry"));
JBR_REGISTER_HANDLER("jax_brgemm_max_pool_backward", jbr_max_pool_backward);

}  // namespace jbr::ffi_handlers
