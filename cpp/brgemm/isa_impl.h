// What each ISA's translation unit (isa_*.cc) hands to the dispatcher (dispatch.cc).
#pragma once

#include "brgemm.h"

namespace jbr::detail {

constexpr int kMaxVectorsPerBlock = 4;

// Register-block limits of one kernel family: a block is up to max_rows[v] rows of C by v
// "vectors" of vector_width columns each.
struct Blocking {
  int vector_width = 1;
  int max_vectors = 1;
  int max_rows[kMaxVectorsPerBlock + 1] = {};
};

// The row operations of brgemm.h (rows_max etc.), without the isa argument.
struct RowOps {
  void (*max)(const float* x, int64_t ld, int64_t rows, int64_t cols, float* max) = nullptr;
  void (*exp)(float* x, int64_t ld, int64_t rows, int64_t cols, float scale, const float* shift,
              float* sum, uint16_t* out, int64_t ld_out) = nullptr;
  void (*scale)(float* x, int64_t ld, int64_t rows, int64_t cols, const float* factor) = nullptr;
  void (*sub_mul)(float* x, int64_t ld, const float* y, int64_t ldy, int64_t rows, int64_t cols,
                  const float* sub, uint16_t* out, int64_t ld_out) = nullptr;
};

// The column operations of brgemm.h (cols_sums etc.), without the isa argument.
struct ColOps {
  void (*sums)(const void* x, DType x_dtype, int64_t ld, int64_t rows, int64_t cols,
               const float* shift, float* sum, float* sumsq) = nullptr;
  void (*masked_sums)(const void* g, const void* m, DType g_dtype, const void* x, DType x_dtype,
                      int64_t ld, int64_t rows, int64_t cols, const float* shift, float* sum,
                      float* dot) = nullptr;
  void (*affine)(const void* x, DType x_dtype, const float* a, const float* b, const void* add,
                 bool relu, void* y, DType y_dtype, int64_t ld, int64_t rows, int64_t cols) = nullptr;
  void (*masked_affine)(const void* g, const void* m, DType g_dtype, const void* x, DType x_dtype,
                        const float* a, const float* b, const float* c, void* z, void* h_out,
                        int64_t ld, int64_t rows, int64_t cols) = nullptr;
  void (*window_max)(const void* const* taps, int64_t count, DType dtype, int64_t pixels,
                     int64_t step, int64_t cols, void* y) = nullptr;
  void (*window_max_backward)(const void* const* taps, void* const* dx, int64_t count, DType dtype,
                              int64_t pixels, int64_t step, int64_t cols, const void* g) = nullptr;
};

struct IsaImpl {
  Blocking f32, bf16;    // blocking for float32 and bfloat16 inputs
  KernelFn run_f32 = nullptr;
  KernelFn run_bf16 = nullptr;
  // Optional: a kernel family for bfloat16 B in the pair layout (Desc::b_vnni) with its own
  // blocking (avx512bf16; amx reads that layout inside run_bf16 with fixed tile blocking).
  Blocking bf16_vnni;
  KernelFn run_bf16_vnni = nullptr;
  void (*activation)(Activation act, float* data, int64_t size) = nullptr;
  RowOps rows;  // set by make_impl, and by the avx512bf16 and amx paths (row_ops in dispatch.cc)
  ColOps cols;  // float32 math on float32 or bfloat16 elements (set by make_impl)
  double (*fma_peak_gflops)(double seconds) = nullptr;
  double (*bf16_peak_gflops)(double seconds) = nullptr;  // null: no native bf16 math
  // Optional: vectorised transposes (null: the portable loop in dispatch.cc).
  void (*transpose_f32)(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                        int64_t ldd) = nullptr;
  void (*transpose_bf16)(const uint16_t* src, int64_t lds, int64_t rows, int64_t cols,
                         uint16_t* dst, int64_t ldd) = nullptr;
};

// Epilogues a kernel can apply straight from its accumulators, with no per-vector call:
// C = alpha acc or C += alpha acc in float32, plus a bias and relu (the float32 tile
// kernel); plain: without alpha, bias or relu (the AMX kernel's direct-to-C path).
inline bool inline_f32_epilogue(const Desc& d) {
  return (d.beta == 0.0f || d.beta == 1.0f) && d.c_dtype == DType::f32 &&
         (d.activation == Activation::none || d.activation == Activation::relu);
}
inline bool plain_f32_epilogue(const Desc& d, float alpha) {
  return alpha == 1.0f && inline_f32_epilogue(d) && !d.has_bias &&
         d.activation == Activation::none;
}

extern const IsaImpl impl_ref;
#if defined(JBR_HAVE_X86_ISAS)
extern const IsaImpl impl_avx2;
extern const IsaImpl impl_avx512;
extern const IsaImpl impl_avx512bf16;
extern const IsaImpl impl_amx;
// True where the CPU has AMX-BF16 and the OS granted this process the tile state.
bool amx_usable();
// pack_b_vnni on AVX-512 (isa_avx512.cc), wherever AVX-512 runs; the amx kernel's plain-B
// path packs with it on every call.
void pack_vnni_avx512(const uint16_t* src, int64_t lds, int64_t k, int64_t n, uint16_t* dst, int64_t ld);
#endif

}  // namespace jbr::detail
