// ISA detection and selection, descriptor validation, register-block choice and the
// thread-safe cache of specialised kernels.
#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <unordered_map>

#include "brgemm.h"
#include "isa_impl.h"

namespace jbr {
namespace {

// The implementation that runs inputs of `dtype` on `isa`: float32 on avx512bf16 and amx
// is the AVX-512 kernel; null where there is none.
const detail::IsaImpl* impl_for(Isa isa, DType dtype = DType::f32) {
  switch (isa) {
#if defined(JBR_HAVE_X86_ISAS)
    case Isa::amx:
      return dtype == DType::bf16 ? &detail::impl_amx : &detail::impl_avx512;
    case Isa::avx512bf16:
      return dtype == DType::bf16 ? &detail::impl_avx512bf16 : &detail::impl_avx512;
    case Isa::avx512: return &detail::impl_avx512;
    case Isa::avx2: return &detail::impl_avx2;
#endif
    case Isa::ref: return &detail::impl_ref;
    default: return nullptr;
  }
}

Isa best_isa() {
  if (isa_supported(Isa::amx)) return Isa::amx;
  if (isa_supported(Isa::avx512bf16)) return Isa::avx512bf16;
  if (isa_supported(Isa::avx512)) return Isa::avx512;
  if (isa_supported(Isa::avx2)) return Isa::avx2;
  return Isa::ref;
}

struct IsaChoice {
  Isa isa;
  std::string error;
};

IsaChoice choose_from_env() {
  const char* forced = std::getenv("JAX_BRGEMM_ISA");
  if (forced == nullptr || *forced == '\0') return {best_isa(), ""};
  Isa isa;
  if (!parse_isa(forced, &isa))
    return {best_isa(), std::string("JAX_BRGEMM_ISA=") + forced +
                            " is not one of ref, avx2, avx512, avx512bf16, amx"};
  if (!isa_supported(isa))
    return {best_isa(), std::string("JAX_BRGEMM_ISA=") + forced + " is not supported by this CPU"};
  return {isa, ""};
}

const IsaChoice& env_choice() {
  static const IsaChoice choice = choose_from_env();
  return choice;
}

// Estimated cost of covering an m x n block with rows x vectors register blocks, in units
// of vector FMAs per step of the reduction: each tile costs its accumulators, but no less
// than the 8 independent chains that hide FMA latency, plus a fixed loop overhead.
double block_cost(int64_t m, int64_t n, int rows, int vectors, int width) {
  const int64_t block_cols = int64_t{vectors} * width;
  double cost = 0.0;
  for (int64_t col0 = 0; col0 < n; col0 += block_cols) {
    const int64_t nv = (std::min(block_cols, n - col0) + width - 1) / width;
    for (int64_t row0 = 0; row0 < m; row0 += rows) {
      const int64_t r = std::min<int64_t>(rows, m - row0);
      // Loads (r broadcasts + nv vectors) share two ports: a small tie-breaker.
      cost += std::max<double>(double(r * nv), 8.0) + 1.0 + 0.05 * double(r + nv);
    }
  }
  return cost;
}

void choose_blocking(const detail::Blocking& blocking, Kernel* k) {
  double best = -1.0;
  const int width = blocking.vector_width;
  const int64_t max_nv = std::min<int64_t>(blocking.max_vectors, (k->desc.n + width - 1) / width);
  for (int nv = 1; nv <= max_nv; ++nv) {
    const int max_rows = static_cast<int>(std::min<int64_t>(blocking.max_rows[nv], k->desc.m));
    for (int rows = 1; rows <= max_rows; ++rows) {
      const double cost = block_cost(k->desc.m, k->desc.n, rows, nv, width);
      if (best < 0.0 || cost < best) {
        best = cost;
        k->rows_per_block = rows;
        k->vectors_per_block = nv;
      }
    }
  }
}

struct DescHash {
  size_t operator()(const Desc& d) const {
    size_t h = 0;
    auto mix = [&h](int64_t v) { h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
    for (int64_t v : {d.m, d.n, d.k, d.lda, d.ldb, d.ldc}) mix(v);
    mix(static_cast<int64_t>(d.a_dtype) | static_cast<int64_t>(d.b_dtype) << 4 |
        static_cast<int64_t>(d.c_dtype) << 8 | static_cast<int64_t>(d.activation) << 12 |
        static_cast<int64_t>(d.isa) << 16 | static_cast<int64_t>(d.has_bias) << 20 | static_cast<int64_t>(d.stream_c) << 21 |
        static_cast<int64_t>(d.a_transposed) << 22 | static_cast<int64_t>(d.b_vnni) << 23);
    uint32_t beta_bits;
    static_assert(sizeof(beta_bits) == sizeof(d.beta));
    std::memcpy(&beta_bits, &d.beta, sizeof beta_bits);
    mix(beta_bits);
    return h;
  }
};

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::ref: return "ref";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::avx512bf16: return "avx512bf16";
    case Isa::amx: return "amx";
  }
  return "unknown";
}

bool parse_isa(const std::string& name, Isa* isa) {
  for (Isa candidate : {Isa::ref, Isa::avx2, Isa::avx512, Isa::avx512bf16, Isa::amx}) {
    if (name == isa_name(candidate)) {
      *isa = candidate;
      return true;
    }
  }
  return false;
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::ref: return true;
#if defined(JBR_HAVE_X86_ISAS)
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    case Isa::avx512bf16:
      return isa_supported(Isa::avx512) && __builtin_cpu_supports("avx512bf16");
    case Isa::amx:  // (every AMX CPU has AVX512-BF16; its row operations use it)
      return isa_supported(Isa::avx512bf16) && detail::amx_usable();
#endif
    default: return false;
  }
}

namespace {
std::atomic<int> isa_override{-1};  // set_active_isa(); -1: use the environment
}

Isa active_isa() {
  const int forced = isa_override.load(std::memory_order_relaxed);
  return forced >= 0 ? static_cast<Isa>(forced) : env_choice().isa;
}

std::string active_isa_error() { return env_choice().error; }

std::string set_active_isa(const std::string& name) {
  if (name.empty()) {
    isa_override.store(-1);
    return "";
  }
  Isa isa;
  if (!parse_isa(name, &isa)) return "isa '" + name + "' is not one of ref, avx2, avx512, avx512bf16, amx";
  if (!isa_supported(isa)) return "isa '" + name + "' is not supported by this CPU";
  isa_override.store(static_cast<int>(isa));
  return "";
}

bool Desc::operator==(const Desc& o) const {
  return m == o.m && n == o.n && k == o.k && lda == o.lda && ldb == o.ldb && ldc == o.ldc &&
         a_dtype == o.a_dtype && b_dtype == o.b_dtype && c_dtype == o.c_dtype &&
         beta == o.beta && activation == o.activation && has_bias == o.has_bias && stream_c == o.stream_c &&
         a_transposed == o.a_transposed && b_vnni == o.b_vnni && isa == o.isa;
}

std::string validate(const Desc& d) {
  auto positive = [](const char* name, int64_t v) {
    return v >= 1 ? std::string() : std::string(name) + " must be >= 1, got " + std::to_string(v);
  };
  for (auto [name, v] : {std::pair{"m", d.m}, {"n", d.n}, {"k", d.k}})
    if (auto e = positive(name, v); !e.empty()) return e;
  if (d.a_transposed && d.lda < d.m)
    return "lda must be >= m (" + std::to_string(d.m) + ") for a transposed A, got " + std::to_string(d.lda);
  // A's rows may overlap (lda < k; A is only read): the widened convolution reads runs of
  // adjacent pixels in place, one row per output pixel, sw * C apart.
  if (!d.a_transposed && d.lda < 1) return "lda must be >= 1, got " + std::to_string(d.lda);
  if (d.a_transposed && d.a_dtype != DType::f32) return "a_transposed needs float32 inputs";
  if (d.b_vnni && !wants_vnni_b(d.isa, d.b_dtype))
    return "b_vnni needs bfloat16 inputs on the avx512bf16 or amx path";
  if (d.b_vnni && d.ldb < vnni_tile_ld(d.k))
    return "ldb must be >= vnni_tile_ld(k) (" + std::to_string(vnni_tile_ld(d.k)) +
           ") for a VNNI B, got " + std::to_string(d.ldb);
  if (!d.b_vnni && d.ldb < d.n) return "ldb must be >= n (" + std::to_string(d.n) + "), got " + std::to_string(d.ldb);
  if (d.ldc < d.n) return "ldc must be >= n (" + std::to_string(d.n) + "), got " + std::to_string(d.ldc);
  if (d.a_dtype != d.b_dtype) return "a and b must have the same dtype";
  if (!isa_supported(d.isa)) return std::string("isa ") + isa_name(d.isa) + " is not supported by this CPU";
  if (impl_for(d.isa, d.a_dtype) == nullptr)
    return std::string("isa ") + isa_name(d.isa) + " has no kernel in this build";
  return "";
}

namespace {
using KernelCache = std::unordered_map<Desc, std::unique_ptr<Kernel>, DescHash>;

// The process-wide cache's kernel for `d`, built on first use.
const Kernel& cached_kernel(const Desc& d) {
  static std::shared_mutex mutex;
  static KernelCache cache;
  {
    std::shared_lock lock(mutex);
    auto it = cache.find(d);
    if (it != cache.end()) return *it->second;
  }
  auto kernel = std::make_unique<Kernel>();
  kernel->desc = d;
  const detail::IsaImpl& impl = *impl_for(d.isa, d.a_dtype);
  const bool bf16 = d.a_dtype == DType::bf16;
  if (bf16 && d.isa == Isa::amx) {  // 2 x 2 tiles of 16 x 16 (isa_amx.cc)
    kernel->rows_per_block = static_cast<int>(std::min<int64_t>(d.m, 32));
    kernel->vectors_per_block = 2;
    kernel->fn = impl.run_bf16;
  } else if (bf16 && d.b_vnni) {  // (validate() admits b_vnni only where a kernel reads it)
    choose_blocking(impl.bf16_vnni, kernel.get());
    kernel->fn = impl.run_bf16_vnni;
  } else {
    choose_blocking(bf16 ? impl.bf16 : impl.f32, kernel.get());
    kernel->fn = bf16 ? impl.run_bf16 : impl.run_f32;
  }
  std::unique_lock lock(mutex);
  auto [it, inserted] = cache.emplace(d, std::move(kernel));
  return *it->second;
}
}  // namespace

const Kernel& get_kernel(const Desc& d) {
  // Each thread first looks among the kernels it used last: loop nests ask for the same
  // few descriptors call after call, and the shared cache's lock is an atomic on a line
  // every core writes.
  constexpr int kRecent = 16;
  thread_local const Kernel* recent[kRecent] = {};
  thread_local int next = 0;
  for (const Kernel* k : recent)
    if (k && k->desc == d) return *k;
  const Kernel& found = cached_kernel(d);
  recent[next] = &found;
  next = (next + 1) % kRecent;
  return found;
}

void apply_activation(Activation act, float* data, int64_t size, Isa isa) {
  const detail::IsaImpl* impl = impl_for(isa);
  (impl ? impl : &detail::impl_ref)->activation(act, data, size);
}

// The row operations of `isa`: its bfloat16 implementation's where it has its own (avx512bf16
// and amx: the AVX-512 code compiled with AVX512-BF16, for the conversion of their copies).
const detail::RowOps& row_ops(Isa isa) {
  const detail::IsaImpl* impl = impl_for(isa, DType::bf16);
  if (impl && impl->rows.exp) return impl->rows;
  impl = impl_for(isa);
  return (impl ? impl : &detail::impl_ref)->rows;
}

void rows_max(const float* x, int64_t ld, int64_t rows, int64_t cols, float* max, Isa isa) {
  row_ops(isa).max(x, ld, rows, cols, max);
}
void rows_exp(float* x, int64_t ld, int64_t rows, int64_t cols, float scale, const float* shift,
              float* sum, uint16_t* out, int64_t ld_out, Isa isa) {
  row_ops(isa).exp(x, ld, rows, cols, scale, shift, sum, out, ld_out);
}
void rows_scale(float* x, int64_t ld, int64_t rows, int64_t cols, const float* factor, Isa isa) {
  row_ops(isa).scale(x, ld, rows, cols, factor);
}
void rows_sub_mul(float* x, int64_t ld, const float* y, int64_t ldy, int64_t rows, int64_t cols,
                  const float* sub, uint16_t* out, int64_t ld_out, Isa isa) {
  row_ops(isa).sub_mul(x, ld, y, ldy, rows, cols, sub, out, ld_out);
}

// The column operations: float32 math on either element type, so the float32 implementation.
const detail::ColOps& col_ops(Isa isa) {
  const detail::IsaImpl* impl = impl_for(isa);
  return (impl ? impl : &detail::impl_ref)->cols;
}

void cols_sums(const void* x, DType x_dtype, int64_t ld, int64_t rows, int64_t cols,
               const float* shift, float* sum, float* sumsq, Isa isa) {
  col_ops(isa).sums(x, x_dtype, ld, rows, cols, shift, sum, sumsq);
}
void cols_masked_sums(const void* g, const void* m, DType g_dtype, const void* x, DType x_dtype,
                      int64_t ld, int64_t rows, int64_t cols, const float* shift, float* sum,
                      float* dot, Isa isa) {
  col_ops(isa).masked_sums(g, m, g_dtype, x, x_dtype, ld, rows, cols, shift, sum, dot);
}
void cols_affine(const void* x, DType x_dtype, const float* a, const float* b, const void* add,
                 bool relu, void* y, DType y_dtype, int64_t ld, int64_t rows, int64_t cols, Isa isa) {
  col_ops(isa).affine(x, x_dtype, a, b, add, relu, y, y_dtype, ld, rows, cols);
}
void cols_masked_affine(const void* g, const void* m, DType g_dtype, const void* x, DType x_dtype,
                        const float* a, const float* b, const float* c, void* z, void* h_out,
                        int64_t ld, int64_t rows, int64_t cols, Isa isa) {
  col_ops(isa).masked_affine(g, m, g_dtype, x, x_dtype, a, b, c, z, h_out, ld, rows, cols);
}

void cols_window_max(const void* const* taps, int64_t count, DType dtype, int64_t pixels,
                     int64_t step, int64_t cols, void* y, Isa isa) {
  col_ops(isa).window_max(taps, count, dtype, pixels, step, cols, y);
}
void cols_window_max_backward(const void* const* taps, void* const* dx, int64_t count,
                              DType dtype, int64_t pixels, int64_t step, int64_t cols,
                              const void* g, Isa isa) {
  col_ops(isa).window_max_backward(taps, dx, count, dtype, pixels, step, cols, g);
}

namespace {
// The portable transpose, in 16 x 16 tiles so few destination lines are in flight.
template <class T>
void transpose_tiles(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile)
    for (int64_t j0 = 0; j0 < cols; j0 += kTile)
      for (int64_t j = j0; j < std::min(cols, j0 + kTile); ++j)
        for (int64_t i = i0; i < std::min(rows, i0 + kTile); ++i) dst[j * ldd + i] = src[i * lds + j];
}
}  // namespace

// avx512bf16 uses the AVX-512 transposes: impl_for(isa) is its float32 implementation.
void transpose_f32(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                   int64_t ldd, Isa isa) {
  const detail::IsaImpl* impl = impl_for(isa);
  if (impl && impl->transpose_f32) return impl->transpose_f32(src, lds, rows, cols, dst, ldd);
  transpose_tiles(src, lds, rows, cols, dst, ldd);
}

void transpose_bf16(const uint16_t* src, int64_t lds, int64_t rows, int64_t cols,
                    uint16_t* dst, int64_t ldd, Isa isa) {
  const detail::IsaImpl* impl = impl_for(isa);
  if (impl && impl->transpose_bf16) return impl->transpose_bf16(src, lds, rows, cols, dst, ldd);
  transpose_tiles(src, lds, rows, cols, dst, ldd);
}

int64_t vnni_rows(int64_t k) { return (k + 31) / 32 * 32; }

void pack_b_vnni(const uint16_t* src, int64_t lds, int64_t k, int64_t n, uint16_t* dst,
                 int64_t ld_dst) {
#if defined(JBR_HAVE_X86_ISAS)
  if (isa_supported(Isa::avx512)) return detail::pack_vnni_avx512(src, lds, k, n, dst, ld_dst);
#endif
  for (int64_t t = 0; t < (n + 15) / 16; ++t) std::fill_n(dst + t * ld_dst, vnni_tile_ld(k), uint16_t{0});
  for (int64_t p = 0; p < k; ++p)
    for (int64_t j = 0; j < n; ++j) dst[(j / 16) * ld_dst + (p / 2) * 32 + 2 * (j % 16) + p % 2] = src[p * lds + j];
}

double thread_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

double measure_fma_peak_gflops(Isa isa, double seconds) {
  const detail::IsaImpl* impl = impl_for(isa);
  return impl ? impl->fma_peak_gflops(seconds) : 0.0;
}

double measure_bf16_peak_gflops(Isa isa, double seconds) {
  const detail::IsaImpl* impl = impl_for(isa, DType::bf16);
  return impl && impl->bf16_peak_gflops ? impl->bf16_peak_gflops(seconds) : 0.0;
}

Batch Batch::strided(const void* a, int64_t stride_a, const void* b, int64_t stride_b,
                     int64_t count) {
  Batch batch;
  batch.form = Form::stride;
  batch.a = a, batch.b = b, batch.stride_a = stride_a, batch.stride_b = stride_b;
  batch.count = count;
  return batch;
}

Batch Batch::offsets(const void* a, const int64_t* offs_a, const void* b,
                     const int64_t* offs_b, int64_t count) {
  Batch batch;
  batch.form = Form::offset;
  batch.a = a, batch.b = b, batch.offs_a = offs_a, batch.offs_b = offs_b;
  batch.count = count;
  return batch;
}

Batch Batch::addresses(const void* const* ptrs_a, const void* const* ptrs_b, int64_t count) {
  Batch batch;
  batch.form = Form::address;
  batch.ptrs_a = ptrs_a, batch.ptrs_b = ptrs_b;
  batch.count = count;
  return batch;
}

}  // namespace jbr
