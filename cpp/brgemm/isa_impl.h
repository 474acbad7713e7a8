// What each ISA's translation unit (isa_*.cc) hands to the dispatcher (dispatch.cc).
#pragma once

#include "brgemm.h"

namespace jbr::detail {

constexpr int kMaxVectorsPerBlock = 4;

struct IsaImpl {
  int vector_width;                             // floats per vector
  int max_vectors;                              // <= kMaxVectorsPerBlock
  int max_rows[kMaxVectorsPerBlock + 1];        // register-block height limit per width
  KernelFn run_f32;                             // any m, n, k within the kernel's blocks
  void (*activation)(Activation act, float* data, int64_t size);
  double (*fma_peak_gflops)(double seconds);
};

extern const IsaImpl impl_ref;
#if defined(JBR_HAVE_X86_ISAS)
extern const IsaImpl impl_avx2;
extern const IsaImpl impl_avx512;
#endif

}  // namespace jbr::detail
