// The nanobind extension _jax_brgemm: exports the FFI handler capsules, the activation
// names and ISA control; the test and benchmark hooks are its submodule `testing`
// (testing.cc).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "ffi/common.h"

namespace nb = nanobind;

namespace jbr::ffi_handlers {

std::vector<HandlerEntry>& handler_registry() {
  static std::vector<HandlerEntry> entries;
  return entries;
}

void add_testing_module(nb::module_& m);  // testing.cc

}  // namespace jbr::ffi_handlers

NB_MODULE(_jax_brgemm, m) {
  using namespace jbr;
  using namespace jbr::ffi_handlers;
  m.def("registrations", [] {
    nb::dict targets;
    for (const HandlerEntry& entry : handler_registry())
      targets[entry.name.c_str()] = nb::capsule(entry.handler);
    return targets;
  }, "FFI target name -> handler capsule, for jax.ffi.register_ffi_target.");
  m.def("activation_names", [] {
    std::vector<std::string> names;
    for (std::string_view n : kActivationNames) names.emplace_back(n);
    return names;
  }, "The activations the kernels implement, in enum order (cpp/brgemm/activation.h).");
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); });
  m.def("isa_env_error", [] { return active_isa_error(); },
        "Why JAX_BRGEMM_ISA was rejected, or '' when it is unset or valid.");
  m.def("wait_env_error", [] { return prim::wait_env_error(); },
        "Why JAX_BRGEMM_SPIN_US or JAX_BRGEMM_LINGER_US was rejected, or ''.");
  m.def("supported_isas", [] {
    std::vector<std::string> names;
    for (Isa isa : {Isa::ref, Isa::avx2, Isa::avx512, Isa::avx512bf16, Isa::amx})
      if (isa_supported(isa)) names.push_back(isa_name(isa));
    return names;
  });
  m.def("set_isa", [](const std::string& name) {
    if (std::string error = set_active_isa(name); !error.empty()) throw nb::value_error(error.c_str());
  }, nb::arg("name"), "Force an ISA for this process ('' restores JAX_BRGEMM_ISA / CPUID).");
  add_testing_module(m);
}
