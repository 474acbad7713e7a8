// Portable C++ path: the same micro-kernel over a one-float "vector".
#define JBR_VEC_SCALAR
#define JBR_ISA_NS ref
#define JBR_MAX_VECTORS 4
#define JBR_MAX_ROWS {0, 4, 4, 4, 4}
#define JBR_MAX_ROWS_BF16 {0, 4, 4, 4, 4}
#include "kernel_impl.h"

namespace jbr::detail {
const IsaImpl impl_ref = ref::make_impl();
}  // namespace jbr::detail
