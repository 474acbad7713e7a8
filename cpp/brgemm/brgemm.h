// The batch-reduce GEMM kernel: the one building block of jax_brgemm.
//
//   C = act(beta * C + alpha * sum_{i<count} A_i @ B_i + bias)      (row-major)
//
// A_i is m x k (leading dimension lda), B_i is k x n (ldb), C is m x n (ldc), all in
// elements. The C block is read at most once, every product of the batch is accumulated
// in registers, and the block is written once. beta == 0 never reads C.
//
// This layer knows nothing about layers, images or gates: callers (cpp/primitives/) name
// blocks through a Batch and get a Kernel specialised for a Desc once, then call it often.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "activation.h"

namespace jbr {

enum class Isa : int { ref = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3, amx = 4 };
enum class DType : int { f32 = 0, bf16 = 1 };

const char* isa_name(Isa isa);
// Parses "ref", "avx2", ...; returns false for an unknown name.
bool parse_isa(const std::string& name, Isa* isa);
// True where this CPU (and OS) can run `isa`.
bool isa_supported(Isa isa);
// The ISA used when a Desc asks for Isa::ref..amx by default: JAX_BRGEMM_ISA if set
// (an unsupported or unknown value is reported by active_isa_error()), else the best
// path CPUID offers (avx512bf16 where present: its float32 kernels are the AVX-512 ones).
Isa active_isa();
// Empty when JAX_BRGEMM_ISA is unset or valid, else why it was rejected.
std::string active_isa_error();
// Overrides the environment for the rest of the process ("" restores it); returns an
// error message for an unknown or unsupported name and changes nothing then.
std::string set_active_isa(const std::string& name);

// What a specialised kernel is built for. Everything here is fixed per kernel; the
// pointers, count, alpha and bias values are given per call.
struct Desc {
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldc = 0;  // elements; lda >= k (m if a_transposed), ldb, ldc >= n
  DType a_dtype = DType::f32, b_dtype = DType::f32, c_dtype = DType::f32;
  float beta = 0.0f;  // 0 (C is not read), 1 and other values are specialised apart
  Activation activation = Activation::none;
  bool has_bias = false;  // add bias[0..n) to every row before the activation
  // C is large and not read again soon: store C with non-temporal stores where its rows
  // allow (each vector store aligned: ldc a multiple of the vector width), so the writes
  // skip the read-for-ownership of every line (a 25 MB convolution output: ~25 % faster).
  bool stream_c = false;
  // A_i is stored transposed, element (r, p) at a[p * lda + r]: a weight-update reads
  // its x^T (pixels x channels in memory) in place instead of transposing it first.
  // Float32 inputs only (the bfloat16 dot kernels pair adjacent elements of A's rows).
  bool a_transposed = false;
  // B_i is stored in the pair-interleaved layout that AMX's tiles and VDPBF16PS read
  // (pack_b_vnni), so a primitive packs weights it reuses once instead of the kernel packing
  // or shuffling them every call.
  // bfloat16 on avx512bf16 and amx only (wants_vnni_b); ldb is then the distance between
  // 16-column tiles (pack_b_vnni).
  bool b_vnni = false;
  Isa isa = Isa::ref;

  bool operator==(const Desc& o) const;
};

// Empty when `d` describes a kernel that can be built, else the reason (names the field).
std::string validate(const Desc& d);

// How the count blocks of A and B are named (see DESIGN.md). Offsets and strides are in
// elements; element i of the batch is A_i = a + offs_a[i] (offset form) etc.
struct Batch {
  enum class Form { stride, offset, address };
  Form form = Form::stride;
  int64_t count = 1;
  const void* a = nullptr;  // stride and offset forms
  const void* b = nullptr;
  int64_t stride_a = 0, stride_b = 0;                     // stride form
  const int64_t* offs_a = nullptr;                        // offset form
  const int64_t* offs_b = nullptr;
  const void* const* ptrs_a = nullptr;                    // address form
  const void* const* ptrs_b = nullptr;

  static Batch strided(const void* a, int64_t stride_a, const void* b, int64_t stride_b,
                       int64_t count);
  static Batch offsets(const void* a, const int64_t* offs_a, const void* b,
                       const int64_t* offs_b, int64_t count);
  static Batch addresses(const void* const* ptrs_a, const void* const* ptrs_b,
                         int64_t count);
};

class Kernel;
using KernelFn = void (*)(const Kernel& kernel, const Batch& batch, void* c, float alpha,
                          const float* bias);

// A kernel specialised for one Desc: register blocking chosen for (m, n), the input dtype
// and the ISA. bfloat16 inputs (a and b alike, stored as uint16_t) are multiplied with
// float32 accumulation: natively on avx512bf16, by conversion elsewhere. C is float32 or
// bfloat16 (rounded to nearest even once, at the store).
class Kernel {
 public:
  Desc desc;
  int rows_per_block = 1;    // register block height (rows of C)
  int vectors_per_block = 1; // register block width, in vectors of the ISA
  KernelFn fn = nullptr;

  // count >= 1; c has the Desc's layout; bias is read only if desc.has_bias.
  void operator()(const Batch& batch, void* c, float alpha = 1.0f,
                  const float* bias = nullptr) const {
    fn(*this, batch, c, alpha, bias);
  }
};

// The cached kernel for `d` (built on first use; thread-safe; the reference stays valid
// for the life of the process). `d` must pass validate().
const Kernel& get_kernel(const Desc& d);

// Elementwise activation on a contiguous float32 array, vectorised with the same code the
// epilogue uses, so primitives that apply activations outside a brgemm call agree with it.
void apply_activation(Activation act, float* data, int64_t size, Isa isa);

// Row operations on a row-major float32 block x (rows x cols, leading dimension ld),
// vectorised like the epilogue: what a running normalisation of long rows taken one block
// of columns at a time needs (a softmax over blocks: max, shifted exponentials and their
// sums, rescaling). Where `out` is given, the results are also stored there rounded to
// bfloat16 (leading dimension ld_out), ready to be a kernel operand (on avx512bf16 and amx
// by the one-instruction conversion, which flushes subnormal results to zero).
//   rows_max:     max[r] = max(max[r], x[r, 0..cols))         (NaN elements may be skipped)
//   rows_exp:     x[r, j] = exp(scale * x[r, j] - shift[r]); sum[r] = sum_j x[r, j] (sum may
//                 be null); the scale rides in the FMA that subtracts the shift
//   rows_scale:   x[r, j] *= factor[r]
//   rows_sub_mul: x[r, j] = y[r, j] * (x[r, j] - sub[r])      (y: leading dimension ldy)
void rows_max(const float* x, int64_t ld, int64_t rows, int64_t cols, float* max, Isa isa);
void rows_exp(float* x, int64_t ld, int64_t rows, int64_t cols, float scale, const float* shift,
              float* sum, uint16_t* out, int64_t ld_out, Isa isa);
void rows_scale(float* x, int64_t ld, int64_t rows, int64_t cols, const float* factor, Isa isa);
void rows_sub_mul(float* x, int64_t ld, const float* y, int64_t ldy, int64_t rows, int64_t cols,
                  const float* sub, uint16_t* out, int64_t ld_out, Isa isa);

// Column operations on row-major blocks (rows x cols, every operand with leading dimension
// ld) of float32 or bfloat16 elements (as their DType says), float32 math, vectorised along
// the columns: per-column sums (accumulated into the caller's float32 arrays, which a
// caller zeroes first) and per-column affine maps. In h below, g counts only where m > 0
// (m null: everywhere); shift, add, m and h_out may be null (0 / absent).
//   cols_sums:          sum[j] += sum_r d, sumsq[j] += sum_r d^2, d = x[r, j] - shift[j]
//   cols_masked_sums:   sum[j] += sum_r h, dot[j] += sum_r h (x[r, j] - shift[j]),
//                       h = m[r, j] > 0 ? g[r, j] : 0 (g and m: g_dtype)
//   cols_affine:        y[r, j] = f(x[r, j] a[j] + b[j] + add[r, j]), f relu or identity
//                       (add and y: y_dtype)
//   cols_masked_affine: z[r, j] = h a[j] + x[r, j] b[j] + c[j] (z: x_dtype), and
//                       h_out[r, j] = h (g_dtype)
void cols_sums(const void* x, DType x_dtype, int64_t ld, int64_t rows, int64_t cols,
               const float* shift, float* sum, float* sumsq, Isa isa);
void cols_masked_sums(const void* g, const void* m, DType g_dtype, const void* x, DType x_dtype,
                      int64_t ld, int64_t rows, int64_t cols, const float* shift, float* sum,
                      float* dot, Isa isa);
void cols_affine(const void* x, DType x_dtype, const float* a, const float* b, const void* add,
                 bool relu, void* y, DType y_dtype, int64_t ld, int64_t rows, int64_t cols, Isa isa);
void cols_masked_affine(const void* g, const void* m, DType g_dtype, const void* x, DType x_dtype,
                        const float* a, const float* b, const float* c, void* z, void* h_out,
                        int64_t ld, int64_t rows, int64_t cols, Isa isa);

// Window operations: a max over `count` taps, each a row of `cols` float32 or bfloat16
// elements (`dtype`) named by a pointer (null: a padding tap, worth -inf), for `pixels`
// windows whose taps lie `step` elements further on each (tap t of window p starts at
// taps[t] + p * step); window p's row of y or g starts at p * cols.
//   cols_window_max:          y = max over the taps, NaN where any is (XLA's max), -inf
//                             for no taps (y: dtype)
//   cols_window_max_backward: per column, the tap XLA's select_and_scatter picks (the first
//                             tap, replaced by each later one that the current winner is
//                             not >= to: ties go to the first), then dx[t] += g for the
//                             winner t; the dx[t] rows (dtype) lie like the taps (null: not
//                             written). Windows are taken in order, so overlapping windows
//                             add in XLA's order; bfloat16 rounds after each add, as XLA's
//                             bfloat16 scatter-add. g: dtype.
void cols_window_max(const void* const* taps, int64_t count, DType dtype, int64_t pixels,
                     int64_t step, int64_t cols, void* y, Isa isa);
void cols_window_max_backward(const void* const* taps, void* const* dx, int64_t count,
                              DType dtype, int64_t pixels, int64_t step, int64_t cols,
                              const void* g, Isa isa);

// dst (cols x rows, leading dimension ldd) = src (rows x cols, lds) transposed, float32:
// dst[j * ldd + i] = src[i * lds + j]. In-register 16 x 16 transposes on AVX-512, so the
// primitives' re-layouts (packing A^T or B^T panels) run at memory speed.
void transpose_f32(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                   int64_t ldd, Isa isa);
// The same for bfloat16 bit patterns (any 16-bit elements).
void transpose_bf16(const uint16_t* src, int64_t lds, int64_t rows, int64_t cols,
                    uint16_t* dst, int64_t ldd, Isa isa);

// The pair-interleaved ("VNNI") layout of a bfloat16 B block (k x n), as AMX's TDPBF16PS
// reads it (and VDPBF16PS, one 16-column pair-row per zmm): columns in tiles of 16, each tile its vnni_rows(k) / 2 pair-rows of 16 pairs
// (64 bytes) back to back, tiles ld elements apart (ld >= vnni_tile_ld(k)): element (p, j)
// at dst[(j / 16) * ld + (p / 2) * 32 + 2 * (j % 16) + p % 2]. vnni_rows(k) is k rounded up
// to 32; everything past k rows or n columns is zero, so whole tiles can be read. A tile's
// rows back to back let the hardware prefetchers follow it along k (single thread, B
// packed once: +5 % on 56x64x64x9, +15 % on 64x64x576 against pair-rows n wide).
int64_t vnni_rows(int64_t k);
inline int64_t vnni_tile_ld(int64_t k) { return vnni_rows(k) * 16; }
// Elements of a packed k x n block (tiles vnni_tile_ld(k) apart).
inline int64_t vnni_elements(int64_t k, int64_t n) { return (n + 15) / 16 * vnni_tile_ld(k); }
// Where row p (even) of a B block starts: p * ldb for a plain one, p * 16 in the pair layout.
inline int64_t b_row_offset(int64_t p, int64_t ldb, bool vnni) { return vnni ? p * 16 : p * ldb; }
// Whether kernels for `isa` and `dtype` read B in that layout (Desc::b_vnni): a primitive
// that reuses a B operand across calls packs it so once (pack_b_vnni) instead of the
// kernel packing it on every call.
inline bool wants_vnni_b(Isa isa, DType dtype) {
  return (isa == Isa::amx || isa == Isa::avx512bf16) && dtype == DType::bf16;
}
// Whether kernels for `isa` and `dtype` run on the AMX tiles (16 x 16 blocks of C per
// instruction): loop-nest choices measured for the tiles (not for the register kernels,
// which also read the pair layout) ask this rather than wants_vnni_b.
inline bool uses_amx_tiles(Isa isa, DType dtype) { return isa == Isa::amx && dtype == DType::bf16; }
// dst (tiles ld_dst apart) = src (k x n, row-major, leading dimension lds).
void pack_b_vnni(const uint16_t* src, int64_t lds, int64_t k, int64_t n, uint16_t* dst,
                 int64_t ld_dst);

// float32 -> bfloat16 bits, rounded to nearest even; NaN stays a quiet NaN. The scalar
// conversion every path shares (vector paths round the same way in registers). Inline and
// branch-free, so loops over rows in the primitives vectorise.
inline uint16_t round_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
  return static_cast<uint16_t>((bits & 0x7FFFFFFF) > 0x7F800000 ? (bits >> 16) | 0x40 : rounded);
}

// bfloat16 bits -> float32 (exact: bfloat16 is the top half of a float32).
inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = uint32_t{h} << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// CPU time of the calling thread, in seconds: single-thread measurements use it so that time
// the thread spends descheduled on a shared machine does not count against the kernel.
double thread_cpu_seconds();

// Measured peak: single-thread float32 GFLOP/s of a register-resident FMA loop on `isa`.
double measure_fma_peak_gflops(Isa isa, double seconds = 0.2);
// The same for the ISA's native bfloat16 dot-product instruction (0 where it has none).
double measure_bf16_peak_gflops(Isa isa, double seconds = 0.2);

}  // namespace jbr
