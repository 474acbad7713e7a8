// The activation set, defined once. X(name) for each activation, in enum order; "none" is
// first. Everything else expands this list: the Activation enum below, the names the FFI
// handlers parse and Python reads (ext.activation_names(), which a test compares with
// jax_brgemm/_checks.py), and every kernel's switch (CPU kernel_impl.h, CUDA gemm.cuh and
// nn_kernels.cu), which calls one function per name: adding an entry here without its
// implementation in a kernel fails to compile there.
//
// Plain C++17 with no intrinsics, so both the CPU kernels and nvcc include it.
#pragma once

#include <cstddef>
#include <string_view>

#define JBR_ACTIVATIONS(X) X(none) X(relu) X(gelu) X(sigmoid) X(tanh)

namespace jbr {

enum class Activation : int {
#define JBR_ACTIVATION_ENUM(name) name,
  JBR_ACTIVATIONS(JBR_ACTIVATION_ENUM)
#undef JBR_ACTIVATION_ENUM
};

// The activations' names, indexed by the enum's value.
inline constexpr std::string_view kActivationNames[] = {
#define JBR_ACTIVATION_NAME(name) #name,
    JBR_ACTIVATIONS(JBR_ACTIVATION_NAME)
#undef JBR_ACTIVATION_NAME
};
inline constexpr std::size_t kActivationCount = sizeof(kActivationNames) / sizeof(kActivationNames[0]);

// Parses "none", "relu", ...; returns false for an unknown name.
inline bool parse_activation(std::string_view name, Activation* act) {
  for (std::size_t i = 0; i < kActivationCount; ++i)
    if (kActivationNames[i] == name) return *act = static_cast<Activation>(i), true;
  return false;
}

}  // namespace jbr
