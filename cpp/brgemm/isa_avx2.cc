// AVX2 + FMA path (compiled with -mavx2 -mfma): 16 ymm registers, so at most 12
// accumulators plus the B vectors and the broadcast A value.
#define JBR_VEC_AVX2
#define JBR_ISA_NS avx2
#define JBR_MAX_VECTORS 3
#define JBR_MAX_ROWS {0, 12, 6, 4, 0}
#define JBR_MAX_ROWS_BF16 {0, 10, 5, 3, 0}
#include "kernel_impl.h"

namespace jbr::detail {
const IsaImpl impl_avx2 = avx2::make_impl();
}  // namespace jbr::detail
