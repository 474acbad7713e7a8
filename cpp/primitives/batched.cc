#include "primitives/batched.h"

#include <algorithm>
#include <cstring>

namespace jbr::prim {
namespace {

int64_t lead_offset(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides,
                    int64_t problem) {
  int64_t offset = 0;
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    offset += (problem % shape[d]) * strides[d];
    problem /= shape[d];
  }
  return offset;
}

}  // namespace

std::string run_batched_brgemm(const BatchedBrgemm& pb, const Executor* executor) {
  int64_t problems = 1;
  for (int64_t s : pb.lead_shape) problems *= s;
  if (problems == 0) return "";

  Desc desc;
  desc.a_dtype = desc.b_dtype = pb.in_dtype;
  desc.c_dtype = pb.out_dtype;
  desc.n = pb.n, desc.k = pb.k;
  desc.lda = pb.k, desc.ldb = pb.n, desc.ldc = pb.n;
  desc.beta = pb.c != nullptr ? pb.beta : 0.0f;
  desc.activation = pb.activation;
  desc.has_bias = pb.bias != nullptr;
  desc.isa = pb.isa;

  // Split rows into panels so that small batches of big problems still use every thread.
  desc.m = pb.m;
  if (std::string error = validate(desc); !error.empty()) return error;
  const int64_t block_rows = get_kernel(desc).rows_per_block;
  const int64_t threads = executor ? executor->num_workers() + 1 : 1;
  const int64_t max_panels = (pb.m + block_rows - 1) / block_rows;
  const int64_t panels = std::clamp<int64_t>((4 * threads + problems - 1) / problems, 1, max_panels);
  const int64_t panel_rows = (max_panels + panels - 1) / panels * block_rows;
  const int64_t panel_count = (pb.m + panel_rows - 1) / panel_rows;
  desc.m = std::min(panel_rows, pb.m);
  const Kernel& full = get_kernel(desc);
  desc.m = pb.m - (panel_count - 1) * panel_rows;
  const Kernel& last = get_kernel(desc);

  const int64_t in_size = pb.in_dtype == DType::bf16 ? 2 : 4;
  const int64_t out_size = pb.out_dtype == DType::bf16 ? 2 : 4;
  parallel_for(executor, problems * panel_count, [&](int64_t item) {
    const int64_t p = item / panel_count, panel = item % panel_count;
    const int64_t row0 = panel * panel_rows;
    const Kernel& kernel = panel + 1 == panel_count ? last : full;
    char* out = static_cast<char*>(pb.out) + (p * pb.m * pb.n + row0 * pb.n) * out_size;
    if (kernel.desc.beta != 0.0f) {
      const int64_t c_offset = lead_offset(pb.lead_shape, pb.c_lead_strides, p) + row0 * pb.n;
      std::memcpy(out, static_cast<const char*>(pb.c) + c_offset * out_size,
                  out_size * kernel.desc.m * pb.n);
    }
    const float* bias =
        pb.bias ? pb.bias + lead_offset(pb.lead_shape, pb.bias_lead_strides, p) : nullptr;
    const char* a_rows = static_cast<const char*>(pb.a) + row0 * pb.k * in_size;
    if (pb.offs_a != nullptr) {
      const int64_t* offs_a = pb.offs_a + p * pb.count;
      const int64_t* offs_b = pb.offs_b + p * pb.count;
      kernel(Batch::offsets(a_rows, offs_a, pb.b, offs_b, pb.count), out, pb.alpha, bias);
    } else {
      const char* a = a_rows + lead_offset(pb.lead_shape, pb.a_lead_strides, p) * in_size;
      const char* b = static_cast<const char*>(pb.b) +
                      lead_offset(pb.lead_shape, pb.b_lead_strides, p) * in_size;
      kernel(Batch::strided(a, pb.m * pb.k, b, pb.k * pb.n, pb.count), out, pb.alpha, bias);
    }
  });
  return "";
}

}  // namespace jbr::prim
