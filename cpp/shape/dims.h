// Shape logic both devices' handlers share, in plain header-only C++ (no XLA, no CUDA
// headers): the CPU handlers (cpp/ffi/) and the CUDA handlers and planning (cpp/cuda/),
// which do not link the CPU code, include it. conv_shape.h beside it holds a convolution's.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace jbr::shape {

using Dims = std::vector<int64_t>;

// "(2, 3)", "(4,)": how every message words a shape.
template <typename Range>
std::string dims_str(const Range& dims) {
  std::string s = "(";
  size_t i = 0;
  for (int64_t d : dims) s += (i++ ? ", " : "") + std::to_string(d);
  return s + (i == 1 ? ",)" : ")");
}

// Element strides of an operand with dims `dims` whose last `block_rank` dims are its
// block, right-aligned against `lead` with NumPy broadcasting (a missing or size-1 dim gets
// stride 0). Empty on success, else a message naming `name`.
inline std::string broadcast_strides(const Dims& dims, int64_t block_rank, const Dims& lead,
                                     const char* name, std::vector<int64_t>* strides) {
  const int64_t op_lead = static_cast<int64_t>(dims.size()) - block_rank;
  const int64_t out_lead = static_cast<int64_t>(lead.size());
  if (op_lead < 0)
    return std::string(name) + " must have rank >= " + std::to_string(block_rank) + ", got " +
           dims_str(dims);
  if (op_lead > out_lead) return std::string(name) + " has more leading dims than the result";
  int64_t stride = 1;
  for (int64_t d = op_lead; d < static_cast<int64_t>(dims.size()); ++d) stride *= dims[d];
  strides->assign(out_lead, 0);
  for (int64_t d = op_lead - 1; d >= 0; --d) {
    const int64_t out_d = d + out_lead - op_lead;
    if (dims[d] != 1 && dims[d] != lead[out_d])
      return std::string(name) + " leading dims " + dims_str(dims) + " do not broadcast to " +
             dims_str(lead);
    (*strides)[out_d] = dims[d] == 1 ? 0 : stride;
    stride *= dims[d];
  }
  return "";
}

}  // namespace jbr::shape
