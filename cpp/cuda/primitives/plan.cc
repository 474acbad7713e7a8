#include "cuda/primitives/plan.h"

#include <algorithm>
#include <limits>

namespace jbr::cuda {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

std::string fold_lead(const std::vector<int64_t>& lead,
                      const std::vector<int64_t> (&strides)[kNumOperands], LeadDims* out) {
  for (int op = 0; op < kNumOperands; ++op)
    if (!strides[op].empty() && strides[op].size() != lead.size())
      return "internal: operand " + std::to_string(op) + " has " +
             std::to_string(strides[op].size()) + " lead strides for " +
             std::to_string(lead.size()) + " lead dims";
  auto stride_of = [&](int op, size_t d) { return strides[op].empty() ? 0 : strides[op][d]; };
  // Walk outer to inner, keeping dims of size > 1; merge into the previous kept dim when
  // every operand's outer stride equals its inner stride times the inner size.
  std::vector<int64_t> shape;
  std::vector<int64_t> kept[kNumOperands];
  for (size_t d = 0; d < lead.size(); ++d) {
    if (lead[d] == 1) continue;
    bool merge = !shape.empty();
    for (int op = 0; merge && op < kNumOperands; ++op)
      merge = kept[op].back() == stride_of(op, d) * lead[d];
    if (merge) {
      shape.back() *= lead[d];
      for (int op = 0; op < kNumOperands; ++op) kept[op].back() = stride_of(op, d);
    } else {
      shape.push_back(lead[d]);
      for (int op = 0; op < kNumOperands; ++op) kept[op].push_back(stride_of(op, d));
    }
  }
  if (shape.size() > static_cast<size_t>(kMaxLeadRank))
    return "the leading dims " + dims_str(lead) + " fold to " + std::to_string(shape.size()) +
           " dims; the CUDA kernels handle at most " + std::to_string(kMaxLeadRank);
  *out = LeadDims{};
  out->rank = static_cast<int>(shape.size());
  for (int d = 0; d < out->rank; ++d) {
    out->shape[d] = shape[d];
    for (int op = 0; op < kNumOperands; ++op) out->stride[op][d] = kept[op][d];
  }
  return "";
}

namespace {

// out, c and bias: the parts both forms share. Fills lead, m, n and the c/bias strides.
std::string decode_common(const Dims* c, const Dims* bias, const Dims& out, Decoded* d,
                          std::vector<int64_t> (&strides)[kNumOperands]) {
  if (out.size() < 2) return "result must have rank >= 2, got " + dims_str(out);
  d->lead.assign(out.begin(), out.end() - 2);
  d->m = out[out.size() - 2], d->n = out[out.size() - 1];
  d->problems = 1;
  for (int64_t x : d->lead) d->problems *= x;
  if (c != nullptr) {
    if (c->size() < 2 || (*c)[c->size() - 2] != d->m || (*c)[c->size() - 1] != d->n)
      return "c must end in (m, n) = (" + std::to_string(d->m) + ", " + std::to_string(d->n) +
             "), got " + dims_str(*c);
    if (auto e = broadcast_strides(*c, 2, d->lead, "c", &strides[kC]); !e.empty()) return e;
  }
  if (bias != nullptr) {
    if (bias->empty() || bias->back() != d->n)
      return "bias must have shape (n,) = (" + std::to_string(d->n) + ",), got " + dims_str(*bias);
    if (auto e = broadcast_strides(*bias, 1, d->lead, "bias", &strides[kBias]); !e.empty()) return e;
  }
  return "";
}

}  // namespace

std::string decode_stride_form(const Dims& a, const Dims& b, const Dims* c, const Dims* bias,
                               const Dims& out, Decoded* d) {
  std::vector<int64_t> strides[kNumOperands];
  if (auto e = decode_common(c, bias, out, d, strides); !e.empty()) return e;
  if (a.size() < 3 || b.size() < 3)
    return "a and b must have rank >= 3, got a " + dims_str(a) + ", b " + dims_str(b);
  d->count = a[a.size() - 3], d->k = a[a.size() - 1];
  if (a[a.size() - 2] != d->m)
    return "a's m (" + std::to_string(a[a.size() - 2]) + ") does not match the result's (" +
           std::to_string(d->m) + ")";
  if (b[b.size() - 3] != d->count || b[b.size() - 2] != d->k || b[b.size() - 1] != d->n)
    return "b must end in (count, k, n), got " + dims_str(b) + " for a " + dims_str(a);
  if (auto e = broadcast_strides(a, 3, d->lead, "a", &strides[kA]); !e.empty()) return e;
  if (auto e = broadcast_strides(b, 3, d->lead, "b", &strides[kB]); !e.empty()) return e;
  return fold_lead(d->lead, strides, &d->dims);
}

std::string decode_offset_form(const Dims& a_blocks, const Dims& b_blocks, const Dims& a_index,
                               const Dims& b_index, const Dims* c, const Dims* bias,
                               const Dims& out, Decoded* d) {
  std::vector<int64_t> strides[kNumOperands];
  if (auto e = decode_common(c, bias, out, d, strides); !e.empty()) return e;
  if (a_blocks.size() != 3 || b_blocks.size() != 3)
    return "a_blocks and b_blocks must have rank 3, got " + dims_str(a_blocks) + " and " +
           dims_str(b_blocks);
  d->a_blocks = a_blocks[0], d->b_blocks = b_blocks[0], d->k = a_blocks[2];
  if (a_blocks[1] != d->m || b_blocks[1] != d->k || b_blocks[2] != d->n)
    return "a_blocks " + dims_str(a_blocks) + " and b_blocks " + dims_str(b_blocks) +
           " do not match a result ending in " + std::to_string(d->m) + " x " +
           std::to_string(d->n);
  Dims want = d->lead;
  want.push_back(a_index.empty() ? 0 : a_index.back());
  if (a_index != want || b_index != want)
    return "a_index and b_index must have shape (..., count) with the result's leading dims " +
           dims_str(d->lead) + ", got " + dims_str(a_index) + " and " + dims_str(b_index);
  d->count = want.back();
  return fold_lead(d->lead, strides, &d->dims);
}

std::string plan_tiles(ElemType t, int64_t m, int64_t n, int64_t problems, int sm_count,
                       TilePlan* plan) {
  if (m <= 0 || n <= 0 || problems <= 0)
    return "plan_tiles needs m, n and problems >= 1, got m=" + std::to_string(m) +
           ", n=" + std::to_string(n) + ", problems=" + std::to_string(problems);
  TilePlan p;
  if (t == ElemType::f32) {
    p.tile = kTileF32;
  } else {
    const TileShape large = kTile16Large;
    const int64_t large_blocks = ceil_div(m, large.bm) * ceil_div(n, large.bn) * problems;
    const bool fills_large = m >= large.bm && n >= large.bn;
    p.tile = fills_large && large_blocks >= sm_count ? large : kTile16Small;
  }
  p.tiles_m = ceil_div(m, p.tile.bm);
  p.tiles_n = ceil_div(n, p.tile.bn);
  p.problems = problems;
  const int64_t limit = std::numeric_limits<int32_t>::max();
  if (p.tiles_m * p.tiles_n > limit || problems > limit / (p.tiles_m * p.tiles_n))
    return "too many output tiles for one CUDA grid: " + std::to_string(problems) +
           " problems of " + std::to_string(p.tiles_m) + " x " + std::to_string(p.tiles_n) +
           " tiles";
  p.blocks = p.tiles_m * p.tiles_n * problems;
  *plan = p;
  return "";
}

std::string plan_splits(int64_t steps, int sm_count, TilePlan* plan) {
  if (plan->blocks <= 0 || plan->splits != 1) return "plan_splits needs a fresh plan from plan_tiles";
  if (plan->blocks >= sm_count || steps < 2 * kMinStepsPerSplit) return "";
  int64_t splits = std::min(ceil_div(2 * static_cast<int64_t>(sm_count), plan->blocks),
                            steps / kMinStepsPerSplit);
  // plan->blocks < sm_count, so blocks * splits < 2 * sm_count + blocks: far below 2^31.
  plan->splits = std::max<int64_t>(splits, 1);
  plan->blocks *= plan->splits;
  return "";
}

}  // namespace jbr::cuda
