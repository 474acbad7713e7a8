// The CUDA extension (_jax_brgemm_cuda): exports the CUDA FFI handler capsules, the number of
// visible GPUs, and the host-side planning (cuda/plan.h) for unit tests on machines without a
// GPU. The CUDA runtime is linked statically and only touched by device_count() and the
// handlers, so the module imports on a machine without a GPU or driver.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cuda_runtime_api.h>

#include <optional>

#include "cuda/plan.h"
#include "ffi/common.h"

namespace nb = nanobind;

namespace jbr::ffi_handlers {
std::vector<HandlerEntry>& handler_registry() {
  static std::vector<HandlerEntry> entries;
  return entries;
}
}  // namespace jbr::ffi_handlers

namespace jbr::cuda {
namespace {

void throw_if(const std::string& error) {
  if (!error.empty()) throw nb::value_error(error.c_str());
}

ElemType parse_type(const std::string& name) {
  for (ElemType t : {ElemType::f32, ElemType::bf16, ElemType::f16})
    if (name == elem_type_name(t)) return t;
  throw nb::value_error(("dtype: must be float32, bfloat16 or float16, got '" + name + "'").c_str());
}

nb::dict lead_dict(const LeadDims& lead) {
  nb::dict out;
  std::vector<int64_t> shape(lead.shape, lead.shape + lead.rank);
  nb::list strides;
  for (int op = 0; op < kNumOperands; ++op)
    strides.append(std::vector<int64_t>(lead.stride[op], lead.stride[op] + lead.rank));
  out["shape"] = shape;
  out["strides"] = strides;  // [a, b, c, bias]
  return out;
}

nb::dict decoded_dict(const Decoded& d) {
  nb::dict out = lead_dict(d.dims);
  out["lead"] = d.lead;
  out["m"] = d.m, out["n"] = d.n, out["k"] = d.k, out["count"] = d.count;
  out["problems"] = d.problems;
  out["a_blocks"] = d.a_blocks, out["b_blocks"] = d.b_blocks;
  // Each operand's element offset for every problem, as the kernels compute them.
  nb::list offsets;
  for (int op = 0; op < kNumOperands; ++op) {
    std::vector<int64_t> per_problem(d.problems);
    for (int64_t p = 0; p < d.problems; ++p) per_problem[p] = lead_offset(d.dims, op, p);
    offsets.append(per_problem);
  }
  out["offsets"] = offsets;
  return out;
}

const Dims* opt_ptr(const std::optional<Dims>& x) { return x.has_value() ? &*x : nullptr; }

}  // namespace
}  // namespace jbr::cuda

NB_MODULE(_jax_brgemm_cuda, m) {
  using namespace jbr::cuda;
  using jbr::ffi_handlers::HandlerEntry;
  m.def("registrations", [] {
    nb::dict targets;
    for (const HandlerEntry& entry : jbr::ffi_handlers::handler_registry())
      targets[entry.name.c_str()] = nb::capsule(entry.handler);
    return targets;
  }, "FFI target name -> CUDA handler capsule, for jax.ffi.register_ffi_target(platform='CUDA').");
  m.def("device_count", [] {
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
  }, "GPUs the CUDA runtime sees (0 without a driver or device).");
  m.def("plan_tiles", [](const std::string& dtype, int64_t m, int64_t n, int64_t problems,
                         int sm_count) {
    TilePlan plan;
    throw_if(plan_tiles(parse_type(dtype), m, n, problems, sm_count, &plan));
    nb::dict out;
    out["bm"] = plan.tile.bm, out["bn"] = plan.tile.bn, out["bk"] = plan.tile.bk;
    out["threads"] = plan.tile.threads;
    out["tiles_m"] = plan.tiles_m, out["tiles_n"] = plan.tiles_n;
    out["problems"] = plan.problems, out["blocks"] = plan.blocks;
    return out;
  }, nb::arg("dtype"), nb::arg("m"), nb::arg("n"), nb::arg("problems"), nb::arg("sm_count"));
  m.def("broadcast_strides", [](const Dims& dims, int block_rank, const Dims& lead) {
    std::vector<int64_t> strides;
    throw_if(broadcast_strides(dims, block_rank, lead, "x", &strides));
    return strides;
  }, nb::arg("dims"), nb::arg("block_rank"), nb::arg("lead"));
  m.def("fold_lead", [](const Dims& lead, const std::vector<Dims>& strides) {
    if (strides.size() != kNumOperands) throw nb::value_error("strides: need 4 lists (a, b, c, bias)");
    std::vector<int64_t> s[kNumOperands];
    for (int op = 0; op < kNumOperands; ++op) s[op] = strides[op];
    LeadDims folded;
    throw_if(fold_lead(lead, s, &folded));
    return lead_dict(folded);
  }, nb::arg("lead"), nb::arg("strides"));
  m.def("decode_stride_form", [](const Dims& a, const Dims& b, std::optional<Dims> c,
                                 std::optional<Dims> bias, const Dims& out) {
    Decoded d;
    throw_if(decode_stride_form(a, b, opt_ptr(c), opt_ptr(bias), out, &d));
    return decoded_dict(d);
  }, nb::arg("a"), nb::arg("b"), nb::arg("c").none(), nb::arg("bias").none(), nb::arg("out"));
  m.def("decode_offset_form", [](const Dims& a_blocks, const Dims& b_blocks, const Dims& a_index,
                                 const Dims& b_index, std::optional<Dims> c,
                                 std::optional<Dims> bias, const Dims& out) {
    Decoded d;
    throw_if(decode_offset_form(a_blocks, b_blocks, a_index, b_index, opt_ptr(c), opt_ptr(bias),
                                out, &d));
    return decoded_dict(d);
  }, nb::arg("a_blocks"), nb::arg("b_blocks"), nb::arg("a_index"), nb::arg("b_index"),
     nb::arg("c").none(), nb::arg("bias").none(), nb::arg("out"));
}
