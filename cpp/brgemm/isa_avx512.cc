// AVX-512 path (compiled with -mavx512f -mavx512dq ...): 32 zmm registers, so up to 28
// accumulators plus the B vectors (the A value is a broadcast operand of the FMA).
#define JBR_VEC_AVX512
#define JBR_ISA_NS avx512
#define JBR_MAX_VECTORS 4
#define JBR_MAX_ROWS {0, 16, 14, 9, 7}
#define JBR_MAX_ROWS_BF16 {0, 16, 13, 8, 6}
#include "kernel_impl.h"

namespace jbr::detail {
const IsaImpl impl_avx512 = avx512::make_impl();
}  // namespace jbr::detail
