// The CUDA extension (_jax_brgemm_cuda): exports the CUDA FFI handler capsules, the number of
// visible GPUs, and the host-side planning (cuda/primitives/plan.h) for unit tests on machines without a
// GPU. The CUDA runtime is linked statically and only touched by device_count() and the
// handlers, so the module imports on a machine without a GPU or driver.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cuda_runtime_api.h>

#include <optional>

#include "cuda/primitives/nn_plan.h"
#include "cuda/primitives/plan.h"
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

template <class Offsets>
bool contig_a(const Offsets& off) { return off.a_contig(); }
template <class Offsets>
bool contig_b(const Offsets& off) { return off.b_contig(); }

// The GEMM the kernels run for `off`, in double on the host, through the same offset
// functions: out[out_offset(p, row, col)] = sum_{i, kk} a[a_offset] * b[b_offset] (+ bias).
// Also checks what the kernels rely on: every offset inside its array, every output element
// written exactly once, and the contiguity the kernels assume (kAContig / kBContig).
template <class Offsets>
std::vector<double> emulate(const Offsets& off, const std::vector<double>& a,
                            const std::vector<double>& b, const std::optional<std::vector<double>>& bias,
                            size_t out_size) {
  const GemmShape& s = off.shape;
  auto inside = [](int64_t o, size_t size, const char* what) {
    if (o < -1 || o >= static_cast<int64_t>(size))
      throw nb::value_error((std::string(what) + " offset " + std::to_string(o) + " outside [0, " +
                             std::to_string(size) + ")").c_str());
  };
  std::vector<double> out(out_size, 0.0);
  std::vector<int> written(out_size, 0);
  for (int64_t p = 0; p < s.problems; ++p)
    for (int64_t row = 0; row < s.m; ++row)
      for (int64_t col = 0; col < s.n; ++col) {
        double acc = 0.0;
        for (int64_t i = 0; i < s.count; ++i)
          for (int64_t kk = 0; kk < s.k; ++kk) {
            const int64_t ao = off.a_offset(p, i, row, kk), bo = off.b_offset(p, i, kk, col);
            inside(ao, a.size(), "A"), inside(bo, b.size(), "B");
            if (kk > 0 && contig_a(off)) {
              const int64_t prev = off.a_offset(p, i, row, kk - 1);
              if ((prev < 0) != (ao < 0) || (ao >= 0 && ao != prev + 1))
                throw nb::value_error("A is not contiguous along k as the kernel assumes");
            }
            if (col > 0 && contig_b(off)) {
              const int64_t prev = off.b_offset(p, i, kk, col - 1);
              if ((prev < 0) != (bo < 0) || (bo >= 0 && bo != prev + 1))
                throw nb::value_error("B is not contiguous along n as the kernel assumes");
            }
            if (ao >= 0 && bo >= 0) acc += a[ao] * b[bo];
          }
        if (bias.has_value()) {
          const int64_t bo = off.bias_offset(p, col);
          inside(bo, bias->size(), "bias");
          acc += (*bias)[bo];
        }
        const int64_t oo = off.out_offset(p, row, col);
        inside(oo, out_size, "out");
        if (oo < 0) throw nb::value_error("negative output offset");
        out[oo] += acc;
        written[oo] += 1;
      }
  for (size_t e = 0; e < out_size; ++e)
    if (written[e] != 1)
      throw nb::value_error(("output element " + std::to_string(e) + " written " +
                             std::to_string(written[e]) + " times").c_str());
  return out;
}

nb::dict shape_dict(const GemmShape& s) {
  nb::dict out;
  out["m"] = s.m, out["n"] = s.n, out["k"] = s.k, out["count"] = s.count, out["problems"] = s.problems;
  return out;
}

nb::dict dense_dict(const DenseDims& d) {
  nb::dict out;
  out["problems"] = d.problems, out["n"] = d.n, out["c"] = d.c, out["k"] = d.k;
  out["w_shared"] = d.w_shared, out["bias_shared"] = d.bias_shared;
  out["dw_shared"] = d.dw_shared, out["dbias_shared"] = d.dbias_shared;
  return out;
}

Pass parse_pass(const std::string& name) {
  if (name == "forward") return Pass::forward;
  if (name == "backward_data") return Pass::backward_data;
  if (name == "weight_update") return Pass::weight_update;
  throw nb::value_error(("pass: must be forward, backward_data or weight_update, got '" + name + "'").c_str());
}

ConvGeom conv_geom(const Dims& x, const Dims& w, const Dims& y, const Dims& geometry) {
  ConvGeom g;
  throw_if(decode_conv(x, "x", w, "kernel", y, "result", geometry, &g));
  return g;
}

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
  m.def("decode_dense_forward", [](const Dims& x, const Dims& w, std::optional<Dims> bias,
                                   const Dims& y, std::optional<Dims> preact) {
    DenseDims d;
    throw_if(decode_dense_forward(x, w, opt_ptr(bias), y, opt_ptr(preact), &d));
    return dense_dict(d);
  }, nb::arg("x"), nb::arg("w"), nb::arg("bias").none(), nb::arg("y"), nb::arg("preact").none());
  m.def("decode_dense_backward", [](const Dims& dy, const Dims& x, const Dims& w,
                                    std::optional<Dims> saved, bool needs_saved,
                                    std::optional<Dims> dx, std::optional<Dims> dw,
                                    std::optional<Dims> dbias) {
    DenseDims d;
    throw_if(decode_dense_backward(dy, x, w, opt_ptr(saved), needs_saved, opt_ptr(dx), opt_ptr(dw),
                                   opt_ptr(dbias), &d));
    return dense_dict(d);
  }, nb::arg("dy"), nb::arg("x"), nb::arg("w"), nb::arg("saved").none(), nb::arg("needs_saved"),
     nb::arg("dx").none(), nb::arg("dw").none(), nb::arg("dbias").none());
  // Dense's GEMM for `pass` run on the host (see emulate): forward a = x, b = w (+ bias);
  // backward_data a = dz, b = w; weight_update a = x, b = dz. Returns (out, gemm shape).
  m.def("emulate_dense", [](const std::string& pass, int64_t problems, int64_t n, int64_t c,
                            int64_t k, bool w_shared, bool bias_shared, bool dw_shared,
                            const std::vector<double>& a, const std::vector<double>& b,
                            std::optional<std::vector<double>> bias) {
    DenseDims d;
    d.problems = problems, d.n = n, d.c = c, d.k = k, d.w_shared = w_shared;
    d.has_bias = bias.has_value(), d.bias_shared = bias_shared, d.dw_shared = dw_shared;
    const Pass ps = parse_pass(pass);
    const StridedOffsets off = dense_offsets(ps, d);
    const int64_t size = ps == Pass::forward ? problems * n * k
                         : ps == Pass::backward_data ? problems * n * c
                                                     : (dw_shared ? 1 : problems) * c * k;
    return nb::make_tuple(emulate(off, a, b, bias, size), shape_dict(off.shape));
  }, nb::arg("pass"), nb::arg("problems"), nb::arg("n"), nb::arg("c"), nb::arg("k"),
     nb::arg("w_shared"), nb::arg("bias_shared"), nb::arg("dw_shared"), nb::arg("a"), nb::arg("b"),
     nb::arg("bias").none());
  m.def("decode_conv", [](const Dims& x, const Dims& w, const Dims& y, const Dims& geometry) {
    const ConvGeom g = conv_geom(x, w, y, geometry);
    nb::dict out;
    out["batch"] = g.batch, out["in_h"] = g.in_h, out["in_w"] = g.in_w, out["in_c"] = g.in_c;
    out["out_h"] = g.out_h, out["out_w"] = g.out_w, out["out_c"] = g.out_c;
    out["taps_h"] = g.taps_h, out["taps_w"] = g.taps_w, out["groups"] = g.groups;
    out["forward"] = shape_dict(conv_forward_offsets(g).shape);
    out["backward_data"] = shape_dict(conv_backward_data_offsets(g).shape);
    out["weight_update"] = shape_dict(conv_weight_update_offsets(g).shape);
    return out;
  }, nb::arg("x"), nb::arg("w"), nb::arg("y"), nb::arg("geometry"));
  // A conv pass's GEMM run on the host (see emulate), x (N, H, W, C), w (R, S, C/G, K),
  // y (N, P, Q, K) dims: forward a = x, b = w (+ bias) -> y; backward_data a = dy, b = w
  // -> dx; weight_update a = x, b = dy -> dw. All flat, row-major.
  m.def("emulate_conv", [](const std::string& pass, const Dims& x, const Dims& w, const Dims& y,
                           const Dims& geometry, const std::vector<double>& a,
                           const std::vector<double>& b, std::optional<std::vector<double>> bias) {
    const ConvGeom g = conv_geom(x, w, y, geometry);
    auto size = [](const Dims& d) { int64_t s = 1; for (int64_t v : d) s *= v; return static_cast<size_t>(s); };
    switch (parse_pass(pass)) {
      case Pass::forward: return emulate(conv_forward_offsets(g), a, b, bias, size(y));
      case Pass::backward_data: return emulate(conv_backward_data_offsets(g), a, b, bias, size(x));
      case Pass::weight_update: return emulate(conv_weight_update_offsets(g), a, b, bias, size(w));
    }
    return std::vector<double>{};
  }, nb::arg("pass"), nb::arg("x"), nb::arg("w"), nb::arg("y"), nb::arg("geometry"), nb::arg("a"),
     nb::arg("b"), nb::arg("bias").none());
  m.def("plan_splits", [](const std::string& dtype, int64_t m, int64_t n, int64_t problems,
                          int64_t steps, int sm_count) {
    TilePlan plan;
    throw_if(plan_tiles(parse_type(dtype), m, n, problems, sm_count, &plan));
    throw_if(plan_splits(steps, sm_count, &plan));
    nb::dict out;
    out["splits"] = plan.splits, out["blocks"] = plan.blocks;
    return out;
  }, nb::arg("dtype"), nb::arg("m"), nb::arg("n"), nb::arg("problems"), nb::arg("steps"),
     nb::arg("sm_count"));
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
