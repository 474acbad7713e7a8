// Handlers for jax_brgemm.nn.dot_product_attention: forward (output and per-row
// log-sum-exp) and backward (dq, dk, dv and the bias gradient).
//
// Optional operands (bias, mask, sequence lengths) are passed as empty arrays when absent.
#include <algorithm>
#include <string>
#include <vector>

#include "ffi/common.h"
#include "primitives/attention.h"

namespace jbr::ffi_handlers {
namespace {


ffi::Error expect(const ffi::AnyBuffer& b, const char* name, const Dims& want, DType dtype) {
  DType got;
  if (auto e = kernel_dtype(b, name, &got); e.failure()) return e;
  if (got != dtype) return invalid(std::string(name) + " must have the dtype of query");
  if (dims_of(b) != want)
    return invalid(std::string(name) + " must have shape " + dims_str(want) + ", got " +
                   dims_str(b.dimensions()));
  return ffi::Error::Success();
}

// B, Tq, N, H from q and Tk, K from k; k and v must agree.
ffi::Error decode_shape(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                        prim::AttentionShape* s, DType* dtype) {
  if (auto e = kernel_dtype(q, "query", dtype); e.failure()) return e;
  const Dims qd = dims_of(q), kd = dims_of(k);
  if (qd.size() != 4) return invalid("query must have shape (B, T, N, H), got " + dims_str(q.dimensions()));
  if (kd.size() != 4 || kd[0] != qd[0] || kd[3] != qd[3])
    return invalid("key must have shape (B, S, K, H) with B, H of query, got " + dims_str(k.dimensions()));
  if (auto e = expect(k, "key", kd, *dtype); e.failure()) return e;
  if (auto e = expect(v, "value", kd, *dtype); e.failure()) return e;
  s->batch = qd[0], s->q_len = qd[1], s->heads = qd[2], s->head_dim = qd[3];
  s->kv_len = kd[1], s->kv_heads = kd[2];
  if (s->kv_heads < 1 || s->heads % s->kv_heads != 0)
    return invalid("key's heads must divide query's heads, got " + std::to_string(s->kv_heads) +
                   " and " + std::to_string(s->heads));
  return ffi::Error::Success();
}

// A 4-D operand broadcast to (B, N, Tq, Tk): its element strides, 0 along size-1 dims.
ffi::Error broadcast_strides(const ffi::AnyBuffer& b, const char* name, const prim::AttentionShape& s,
                             int64_t strides[4]) {
  const Dims d = dims_of(b);
  const Dims full = {s.batch, s.heads, s.q_len, s.kv_len};
  if (d.size() != 4) return invalid(std::string(name) + " must have rank 4, got " + dims_str(b.dimensions()));
  int64_t stride = 1;
  for (int i = 3; i >= 0; --i) {
    if (d[i] != 1 && d[i] != full[i])
      return invalid(std::string(name) + " must broadcast to " + dims_str(full) + ", got " +
                     dims_str(b.dimensions()));
    strides[i] = d[i] == 1 ? 0 : stride;
    stride *= d[i];
  }
  return ffi::Error::Success();
}

ffi::Error lengths(const ffi::AnyBuffer& b, const char* name, int64_t batch, const int32_t** out) {
  if (b.element_count() == 0) return *out = nullptr, ffi::Error::Success();
  if (b.element_type() != ffi::DataType::S32 || dims_of(b) != Dims{batch})
    return invalid(std::string(name) + " must be int32 of shape (" + std::to_string(batch) + ",)");
  *out = static_cast<const int32_t*>(b.untyped_data());
  return ffi::Error::Success();
}

ffi::Error decode_masks(const prim::AttentionShape& s, const ffi::AnyBuffer& bias,
                        const ffi::AnyBuffer& mask, const ffi::AnyBuffer& q_lengths,
                        const ffi::AnyBuffer& kv_lengths, float scale, int32_t causal,
                        int64_t window_left, int64_t window_right, prim::AttentionMasks* m) {
  m->scale = scale, m->causal = causal != 0;
  // A window past the sequence is the whole sequence: bounded so that i - left and
  // i + right + 1 (primitives/attention.cc, range) cannot overflow; < 0 stays "no window".
  m->window_left = std::min(window_left, s.q_len), m->window_right = std::min(window_right, s.kv_len);
  if (bias.element_count() > 0) {
    if (auto e = expect_f32(bias, "bias"); e.failure()) return e;
    if (auto e = broadcast_strides(bias, "bias", s, m->bias_strides); e.failure()) return e;
    m->bias = static_cast<const float*>(bias.untyped_data());
  }
  if (mask.element_count() > 0) {
    if (mask.element_type() != ffi::DataType::PRED) return invalid("mask must be boolean");
    if (auto e = broadcast_strides(mask, "mask", s, m->mask_strides); e.failure()) return e;
    m->mask = static_cast<const uint8_t*>(mask.untyped_data());
  }
  if (auto e = lengths(q_lengths, "query_seq_lengths", s.batch, &m->q_lengths); e.failure()) return e;
  return lengths(kv_lengths, "key_value_seq_lengths", s.batch, &m->kv_lengths);
}

ffi::Error forward_impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer bias, ffi::AnyBuffer mask, ffi::AnyBuffer q_lengths,
                        ffi::AnyBuffer kv_lengths, ffi::Result<ffi::AnyBuffer> out,
                        ffi::Result<ffi::AnyBuffer> lse, float scale, int32_t causal,
                        int64_t window_left, int64_t window_right) {
  prim::AttentionForward p;
  if (auto e = decode_shape(q, k, v, &p.shape, &p.dtype); e.failure()) return e;
  const prim::AttentionShape& s = p.shape;
  if (auto e = decode_masks(s, bias, mask, q_lengths, kv_lengths, scale, causal, window_left,
                            window_right, &p.masks);
      e.failure())
    return e;
  if (auto e = expect(*out, "out", dims_of(q), p.dtype); e.failure()) return e;
  if (auto e = expect_f32(*lse, "lse"); e.failure()) return e;
  if (dims_of(*lse) != Dims{s.batch, s.heads, s.q_len}) return invalid("lse must have shape (B, N, T)");
  p.q = q.untyped_data(), p.k = k.untyped_data(), p.v = v.untyped_data();
  p.out = out->untyped_data(), p.lse = static_cast<float*>(lse->untyped_data());
  if (auto e = current_isa(&p.isa); e.failure()) return e;
  prim::TeamCall executor = team_call(pool);
  if (std::string error = prim::attention_forward(p, &executor); !error.empty()) return invalid(error);
  return ffi::Error::Success();
}

ffi::Error backward_impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                         ffi::AnyBuffer bias, ffi::AnyBuffer mask, ffi::AnyBuffer q_lengths,
                         ffi::AnyBuffer kv_lengths, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                         ffi::AnyBuffer d_out, ffi::Result<ffi::AnyBuffer> dq,
                         ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                         ffi::Result<ffi::AnyBuffer> dbias, float scale, int32_t causal,
                         int64_t window_left, int64_t window_right) {
  prim::AttentionBackward p;
  if (auto e = decode_shape(q, k, v, &p.shape, &p.dtype); e.failure()) return e;
  const prim::AttentionShape& s = p.shape;
  if (auto e = decode_masks(s, bias, mask, q_lengths, kv_lengths, scale, causal, window_left,
                            window_right, &p.masks);
      e.failure())
    return e;
  const Dims qd = dims_of(q), kd = dims_of(k);
  if (auto e = expect(out, "out", qd, p.dtype); e.failure()) return e;
  if (auto e = expect(d_out, "d_out", qd, p.dtype); e.failure()) return e;
  if (auto e = expect_f32(lse, "lse"); e.failure()) return e;
  if (dims_of(lse) != Dims{s.batch, s.heads, s.q_len}) return invalid("lse must have shape (B, N, T)");
  if (auto e = expect(*dq, "dq", qd, p.dtype); e.failure()) return e;
  if (auto e = expect(*dk, "dk", kd, p.dtype); e.failure()) return e;
  if (auto e = expect(*dv, "dv", kd, p.dtype); e.failure()) return e;
  if (dbias->element_count() > 0) {
    if (!p.masks.bias || dims_of(*dbias) != dims_of(bias))
      return invalid("dbias must be empty or have the shape of bias");
    if (auto e = expect_f32(*dbias, "dbias"); e.failure()) return e;
    p.dbias = static_cast<float*>(dbias->untyped_data());
    p.bias_size = static_cast<int64_t>(dbias->element_count());
  }
  p.q = q.untyped_data(), p.k = k.untyped_data(), p.v = v.untyped_data();
  p.out = out.untyped_data(), p.d_out = d_out.untyped_data();
  p.lse = static_cast<const float*>(lse.untyped_data());
  p.dq = dq->untyped_data(), p.dk = dk->untyped_data(), p.dv = dv->untyped_data();
  if (auto e = current_isa(&p.isa); e.failure()) return e;
  prefer_huge_pages(dq, dk, dv);
  prim::TeamCall executor = team_call(pool);
  if (std::string error = prim::attention_backward(p, &executor); !error.empty()) return invalid(error);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_attention_forward, forward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // query
                                  .Arg<ffi::AnyBuffer>()  // key
                                  .Arg<ffi::AnyBuffer>()  // value
                                  .Arg<ffi::AnyBuffer>()  // bias (float32) or empty
                                  .Arg<ffi::AnyBuffer>()  // mask (bool) or empty
                                  .Arg<ffi::AnyBuffer>()  // query_seq_lengths or empty
                                  .Arg<ffi::AnyBuffer>()  // key_value_seq_lengths or empty
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse (B, N, T) float32
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal")
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right"));
JBR_REGISTER_HANDLER("jax_brgemm_attention_forward", jbr_attention_forward);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_attention_backward, backward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // query
                                  .Arg<ffi::AnyBuffer>()  // key
                                  .Arg<ffi::AnyBuffer>()  // value
                                  .Arg<ffi::AnyBuffer>()  // bias or empty
                                  .Arg<ffi::AnyBuffer>()  // mask or empty
                                  .Arg<ffi::AnyBuffer>()  // query_seq_lengths or empty
                                  .Arg<ffi::AnyBuffer>()  // key_value_seq_lengths or empty
                                  .Arg<ffi::AnyBuffer>()  // out
                                  .Arg<ffi::AnyBuffer>()  // lse
                                  .Arg<ffi::AnyBuffer>()  // d_out
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<ffi::AnyBuffer>()  // dbias (bias's shape) or empty
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal")
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right"));
JBR_REGISTER_HANDLER("jax_brgemm_attention_backward", jbr_attention_backward);

}  // namespace jbr::ffi_handlers
