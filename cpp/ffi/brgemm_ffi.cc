// Handlers for jax_brgemm.brgemm (stride form) and jax_brgemm.brgemm_indexed (offset form).
#include <string>

#include "ffi/common.h"
#include "ffi/signatures.h"
#include "primitives/batched.h"

namespace jbr::ffi_handlers {
namespace {

// Element strides of `operand`'s leading dims (all but its last `block_rank`) against
// `lead` (shape/dims.h, which the CUDA handlers share).
ffi::Error broadcast_strides(const ffi::AnyBuffer& operand, int64_t block_rank,
                             const std::vector<int64_t>& lead, const char* name,
                             std::vector<int64_t>* strides) {
  auto dims = operand.dimensions();
  const std::string error = shape::broadcast_strides(shape::Dims(dims.begin(), dims.end()), block_rank, lead,
                                                     name, strides);
  return error.empty() ? ffi::Error::Success() : invalid(error);
}

// Decodes what both forms share: out shape, optional c and bias, alpha/beta/activation.
ffi::Error common_setup(const ffi::AnyBuffer& c, const ffi::AnyBuffer& bias,
                        const ffi::AnyBuffer& out, float alpha, float beta,
                        std::string_view activation, prim::BatchedBrgemm* pb) {
  if (auto e = kernel_dtype(out, "out", &pb->out_dtype); e.failure()) return e;
  auto od = out.dimensions();
  if (od.size() < 2) return invalid("result must have rank >= 2");
  pb->lead_shape.assign(od.begin(), od.end() - 2);
  pb->m = od[od.size() - 2], pb->n = od[od.size() - 1];
  pb->out = out.untyped_data();
  if (c.element_count() > 0) {
    if (c.element_type() != out.element_type()) return invalid("c must have the result's dtype");
    auto cd = c.dimensions();
    if (cd.size() < 2 || cd[cd.size() - 2] != pb->m || cd[cd.size() - 1] != pb->n)
      return invalid("c must end in (m, n) = (" + std::to_string(pb->m) + ", " +
                     std::to_string(pb->n) + "), got " + dims_str(cd));
    if (auto e = broadcast_strides(c, 2, pb->lead_shape, "c", &pb->c_lead_strides); e.failure())
      return e;
    pb->c = c.untyped_data();
  }
  if (bias.element_count() > 0) {
    // (n,) from users; vmap adds leading dims, which broadcast like c's.
    if (auto e = expect_f32(bias, "bias"); e.failure()) return e;
    auto bd = bias.dimensions();
    if (bd.size() < 1 || bd[bd.size() - 1] != pb->n)
      return invalid("bias must have shape (n,) = (" + std::to_string(pb->n) + ",), got " + dims_str(bd));
    if (auto e = broadcast_strides(bias, 1, pb->lead_shape, "bias", &pb->bias_lead_strides); e.failure())
      return e;
    pb->bias = static_cast<const float*>(bias.untyped_data());
  }
  if (!parse_activation(activation, &pb->activation))
    return invalid("unknown activation '" + std::string(activation) + "'");
  pb->alpha = alpha, pb->beta = beta;
  return current_isa(&pb->isa);
}

ffi::Error run(const prim::BatchedBrgemm& pb, ffi::ThreadPool pool) {
  prim::TeamCall executor = team_call(pool);
  if (std::string error = prim::run_batched_brgemm(pb, &executor); !error.empty())
    return invalid(error);
  return ffi::Error::Success();
}

ffi::Error brgemm_impl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                       ffi::AnyBuffer c, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> out,
                       float alpha, float beta, std::string_view activation) {
  prim::BatchedBrgemm pb;
  if (auto e = common_setup(c, bias, *out, alpha, beta, activation, &pb); e.failure()) return e;
  if (auto e = kernel_dtype(a, "a", &pb.in_dtype); e.failure()) return e;
  if (b.element_type() != a.element_type()) return invalid("b must have a's dtype");
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() < 3 || bd.size() < 3) return invalid("a and b must have rank >= 3");
  pb.count = ad[ad.size() - 3], pb.k = ad[ad.size() - 1];
  if (ad[ad.size() - 2] != pb.m) return invalid("a's m does not match the result");
  if (bd[bd.size() - 3] != pb.count || bd[bd.size() - 2] != pb.k || bd[bd.size() - 1] != pb.n)
    return invalid("b must end in (count, k, n), got " + dims_str(bd) + " for a " + dims_str(ad));
  if (auto e = broadcast_strides(a, 3, pb.lead_shape, "a", &pb.a_lead_strides); e.failure()) return e;
  if (auto e = broadcast_strides(b, 3, pb.lead_shape, "b", &pb.b_lead_strides); e.failure()) return e;
  pb.a = a.untyped_data();
  pb.b = b.untyped_data();
  prefer_huge_pages(out);
  return run(pb, std::move(pool));
}

// Block indices (int32 or int64) to element offsets, refusing any outside [0, blocks).
// Problem p (of the result's leading dims) reads its own pool, which starts pool_offsets[p]
// elements into the buffer: a pool with leading dims (vmap) holds one pool per problem.
ffi::Error index_offsets(const ffi::AnyBuffer& index, int64_t blocks, int64_t block_size,
                         const std::vector<int64_t>& pool_offsets, const char* name,
                         std::vector<int64_t>* offsets) {
  const int64_t size = static_cast<int64_t>(index.element_count());
  const int64_t count = pool_offsets.empty() ? 0 : size / static_cast<int64_t>(pool_offsets.size());
  offsets->resize(size);
  auto convert = [&](auto* data) -> ffi::Error {
    for (int64_t i = 0; i < size; ++i) {
      const int64_t v = static_cast<int64_t>(data[i]);
      if (v < 0 || v >= blocks)
        return invalid(std::string(name) + " holds " + std::to_string(v) +
                       ", outside [0, " + std::to_string(blocks) + ")");
      (*offsets)[i] = pool_offsets[i / count] + v * block_size;
    }
    return ffi::Error::Success();
  };
  switch (index.element_type()) {
    case ffi::DataType::S32: return convert(static_cast<const int32_t*>(index.untyped_data()));
    case ffi::DataType::S64: return convert(static_cast<const int64_t*>(index.untyped_data()));
    default: return invalid(std::string(name) + " must be int32 or int64");
  }
}

// A block pool (lead..., P, r, s) whose leading dims broadcast against the result's: its
// pool size P and, per problem, where that problem's pool starts (in elements).
ffi::Error pool_offsets(const ffi::AnyBuffer& pool, const std::vector<int64_t>& lead,
                        const char* name, int64_t* blocks, std::vector<int64_t>* offsets) {
  auto d = pool.dimensions();
  if (d.size() < 3) return invalid(std::string(name) + " must have shape (..., P, rows, cols)");
  *blocks = d[d.size() - 3];
  std::vector<int64_t> strides;
  if (auto e = broadcast_strides(pool, 3, lead, name, &strides); e.failure()) return e;
  int64_t problems = 1;
  for (int64_t s : lead) problems *= s;
  offsets->assign(problems, 0);
  for (int64_t p = 0; p < problems; ++p) {
    int64_t rest = p;
    for (int64_t i = static_cast<int64_t>(lead.size()) - 1; i >= 0; --i) {
      (*offsets)[p] += (rest % lead[i]) * strides[i];
      rest /= lead[i];
    }
  }
  return ffi::Error::Success();
}

ffi::Error brgemm_indexed_impl(ffi::ThreadPool pool, ffi::AnyBuffer a_blocks,
                               ffi::AnyBuffer b_blocks, ffi::AnyBuffer a_index,
                               ffi::AnyBuffer b_index, ffi::AnyBuffer c, ffi::AnyBuffer bias,
                               ffi::Result<ffi::AnyBuffer> out, float alpha, float beta,
                               std::string_view activation) {
  prim::BatchedBrgemm pb;
  if (auto e = common_setup(c, bias, *out, alpha, beta, activation, &pb); e.failure()) return e;
  if (auto e = kernel_dtype(a_blocks, "a_blocks", &pb.in_dtype); e.failure()) return e;
  if (b_blocks.element_type() != a_blocks.element_type())
    return invalid("b_blocks must have a_blocks' dtype");
  auto ad = a_blocks.dimensions(), bd = b_blocks.dimensions();
  if (ad.size() < 3 || bd.size() < 3) return invalid("a_blocks and b_blocks must have rank >= 3");
  pb.k = ad[ad.size() - 1];
  if (ad[ad.size() - 2] != pb.m || bd[bd.size() - 2] != pb.k || bd[bd.size() - 1] != pb.n)
    return invalid("a_blocks " + dims_str(ad) + " and b_blocks " + dims_str(bd) +
                   " do not match a result ending in " + std::to_string(pb.m) + " x " +
                   std::to_string(pb.n));
  auto id = a_index.dimensions();
  if (id.size() != pb.lead_shape.size() + 1 || b_index.dimensions().size() != id.size())
    return invalid("a_index and b_index must have shape (..., count) matching the result");
  for (size_t d = 0; d < pb.lead_shape.size(); ++d)
    if (id[d] != pb.lead_shape[d] || b_index.dimensions()[d] != pb.lead_shape[d])
      return invalid("a_index and b_index leading dims must equal the result's");
  pb.count = id[id.size() - 1];
  if (b_index.dimensions()[id.size() - 1] != pb.count)
    return invalid("a_index and b_index must have the same count");
  int64_t a_pool = 0, b_pool = 0;
  std::vector<int64_t> a_starts, b_starts, offs_a, offs_b;
  if (auto e = pool_offsets(a_blocks, pb.lead_shape, "a_blocks", &a_pool, &a_starts); e.failure()) return e;
  if (auto e = pool_offsets(b_blocks, pb.lead_shape, "b_blocks", &b_pool, &b_starts); e.failure()) return e;
  if (auto e = index_offsets(a_index, a_pool, pb.m * pb.k, a_starts, "a_index", &offs_a); e.failure())
    return e;
  if (auto e = index_offsets(b_index, b_pool, pb.k * pb.n, b_starts, "b_index", &offs_b); e.failure())
    return e;
  pb.a = a_blocks.untyped_data();
  pb.b = b_blocks.untyped_data();
  pb.offs_a = offs_a.data(), pb.offs_b = offs_b.data();
  prefer_huge_pages(out);
  return run(pb, std::move(pool));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_brgemm, brgemm_impl,
                              signatures::brgemm(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
JBR_REGISTER_HANDLER("jax_brgemm_brgemm", jbr_brgemm);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jbr_brgemm_indexed, brgemm_indexed_impl,
                              signatures::brgemm_indexed(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
JBR_REGISTER_HANDLER("jax_brgemm_brgemm_indexed", jbr_brgemm_indexed);

}  // namespace jbr::ffi_handlers
