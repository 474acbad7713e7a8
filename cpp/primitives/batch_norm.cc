// Batch normalisation loop nests (batch_norm.h): every pass is one sweep over the data in
// chunks of rows, each chunk one task, its columns vectorised by the kernel layer's
// column operations (brgemm.h, cols_*).
#include "primitives/batch_norm.h"

#include <algorithm>

#include "primitives/elements.h"
#include "primitives/scratch.h"

namespace jbr::prim {
namespace {

// Rows per chunk: about 64K elements (a few hundred KB, ~50-100 us of memory traffic) per
// task, and at most 512 rows.
int64_t chunk_rows(const BatchNormShape& s) {
  return std::clamp<int64_t>((int64_t{1} << 16) / std::max<int64_t>(s.channels, 1), 1, 512);
}

struct Chunks {
  int64_t rows, per_group, total;
};
Chunks chunks_of(const BatchNormShape& s) {
  const int64_t rows = chunk_rows(s);
  const int64_t per_group = (s.rows + rows - 1) / rows;
  return {rows, per_group, per_group * s.groups};
}

// Element `i` of a float32 or bfloat16 array.
const void* at(const void* p, DType d, int64_t i) {
  return p ? static_cast<const char*>(p) + i * size_of(d) : nullptr;
}
void* at(void* p, DType d, int64_t i) {
  return p ? static_cast<char*>(p) + i * size_of(d) : nullptr;
}

std::string check(const BatchNormShape& s) {
  if (s.groups < 0 || s.rows < 0 || s.channels < 0) return "batch_norm: negative dimension";
  return "";
}

// Rows a float32 partial sum adds before it is added into float64: short enough that its
// rounding stays near one ulp, long enough that the float64 adds are a few % of the work.
constexpr int64_t kFloatRows = 32;

// Two sums per channel over every chunk of rows: `pass(g, r0, rows, out0, out1)` adds its
// rows' sums to out0/out1 (zeroed float32 arrays of the calling task). Each chunk adds
// those of kFloatRows rows at a time into its own float64 partials (no thread shares one),
// and the partials are added in a fixed order: the result does not depend on the threads.
template <typename Pass>
void reduce_chunks(const BatchNormShape& s, float* out0, float* out1, const Executor* executor,
                   Pass pass) {
  const Chunks ch = chunks_of(s);
  const int64_t c = s.channels;
  Buffer<double> partial = work_buffer<double>(ch.total * 2 * c);
  Buffer<float> scratch = work_buffer<float>(ch.total * 2 * c);
  parallel_for(executor, ch.total, [&](int64_t i) {
    const int64_t g = i / ch.per_group, first = (i % ch.per_group) * ch.rows;
    const int64_t last = std::min(first + ch.rows, s.rows);
    double* q = partial.get() + i * 2 * c;
    float* p = scratch.get() + i * 2 * c;
    std::fill_n(q, 2 * c, 0.0);
    for (int64_t r0 = first; r0 < last; r0 += kFloatRows) {
      std::fill_n(p, 2 * c, 0.0f);
      pass(g, r0, std::min(kFloatRows, last - r0), p, p + c);
      for (int64_t j = 0; j < 2 * c; ++j) q[j] += p[j];
    }
  });
  for (int64_t g = 0; g < s.groups; ++g) {
    double* t = partial.get() + g * ch.per_group * 2 * c;  // the group's first chunk collects
    for (int64_t k = 1; k < ch.per_group; ++k) {
      const double* q = t + k * 2 * c;
      for (int64_t j = 0; j < 2 * c; ++j) t[j] += q[j];
    }
    for (int64_t j = 0; j < c; ++j) {
      out0[g * c + j] = ch.per_group ? static_cast<float>(t[j]) : 0.0f;
      out1[g * c + j] = ch.per_group ? static_cast<float>(t[c + j]) : 0.0f;
    }
  }
}

// `pass(g, r0, rows)` on every chunk.
template <typename Pass>
void map_chunks(const BatchNormShape& s, const Executor* executor, Pass pass) {
  const Chunks ch = chunks_of(s);
  parallel_for(executor, ch.total, [&](int64_t i) {
    const int64_t g = i / ch.per_group, r0 = (i % ch.per_group) * ch.rows;
    pass(g, r0, std::min(ch.rows, s.rows - r0));
  });
}

}  // namespace

std::string batch_norm_stats(const BatchNormShape& s, DType x_dtype, const void* x,
                             const float* shift, float* sum, float* sumsq, Isa isa,
                             const Executor* executor) {
  if (std::string e = check(s); !e.empty()) return e;
  const int64_t c = s.channels;
  reduce_chunks(s, sum, sumsq, executor, [&](int64_t g, int64_t r0, int64_t rows, float* p0, float* p1) {
    cols_sums(at(x, x_dtype, (g * s.rows + r0) * c), x_dtype, c, rows, c, shift ? shift + g * c : nullptr,
              p0, p1, isa);
  });
  return "";
}

std::string batch_norm_apply(const BatchNormShape& s, DType x_dtype, const void* x, const float* a,
                             const float* b, DType y_dtype, const void* residual, bool relu, void* y,
                             Isa isa, const Executor* executor) {
  if (std::string e = check(s); !e.empty()) return e;
  const int64_t c = s.channels;
  map_chunks(s, executor, [&](int64_t g, int64_t r0, int64_t rows) {
    const int64_t o = (g * s.rows + r0) * c;
    cols_affine(at(x, x_dtype, o), x_dtype, a + g * c, b + g * c, at(residual, y_dtype, o), relu,
                at(y, y_dtype, o), y_dtype, c, rows, c, isa);
  });
  return "";
}

std::string batch_norm_backward_sums(const BatchNormShape& s, DType x_dtype, const void* x,
                                     DType dy_dtype, const void* dy, const void* y,
                                     const float* shift, float* sum_h, float* sum_hx, Isa isa,
                                     const Executor* executor) {
  if (std::string e = check(s); !e.empty()) return e;
  const int64_t c = s.channels;
  reduce_chunks(s, sum_h, sum_hx, executor, [&](int64_t g, int64_t r0, int64_t rows, float* p0, float* p1) {
    const int64_t o = (g * s.rows + r0) * c;
    cols_masked_sums(at(dy, dy_dtype, o), at(y, dy_dtype, o), dy_dtype, at(x, x_dtype, o), x_dtype, c,
                     rows, c, shift ? shift + g * c : nullptr, p0, p1, isa);
  });
  return "";
}

std::string batch_norm_backward_apply(const BatchNormShape& s, DType x_dtype, const void* x,
                                      DType dy_dtype, const void* dy, const void* y, const float* a,
                                      const float* b, const float* c_, void* dx, void* d_residual,
                                      Isa isa, const Executor* executor) {
  if (std::string e = check(s); !e.empty()) return e;
  const int64_t c = s.channels;
  map_chunks(s, executor, [&](int64_t g, int64_t r0, int64_t rows) {
    const int64_t o = (g * s.rows + r0) * c;
    cols_masked_affine(at(dy, dy_dtype, o), at(y, dy_dtype, o), dy_dtype, at(x, x_dtype, o), x_dtype,
                       a + g * c, b + g * c, c_ + g * c, at(dx, x_dtype, o), at(d_residual, dy_dtype, o),
                       c, rows, c, isa);
  });
  return "";
}

}  // namespace jbr::prim
