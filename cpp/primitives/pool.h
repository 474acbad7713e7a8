// Max pooling over channels-last images: x (N, H, W, C), y (N, Ho, Wo, C), a kh x kw window
// moved by (sh, sw) over x padded with -inf (pt/pb rows above/below, pl/pr columns left/
// right). float32 or bfloat16; the result of flax's max_pool and the gradient of jax.grad
// of it, ties and NaN included (kernel layer: cols_window_*).
#pragma once

#include <cstdint>
#include <string>

#include "brgemm/brgemm.h"
#include "primitives/parallel.h"

namespace jbr::prim {

struct PoolShape {
  int64_t n = 0, h = 0, w = 0, c = 0;
  int64_t kh = 1, kw = 1, sh = 1, sw = 1;
  int64_t pt = 0, pb = 0, pl = 0, pr = 0;
  int64_t out_h() const { return (h + pt + pb - kh) / sh + 1; }
  int64_t out_w() const { return (w + pl + pr - kw) / sw + 1; }
};

// Empty when `s` is a pooling this nest runs, else why not.
std::string pool_check(const PoolShape& s);

// y = the max over each window (NaN where any tap is NaN).
std::string max_pool_forward(const PoolShape& s, DType dtype, const void* x, void* y, Isa isa,
                             const Executor* executor);

// dx = the sum of dy over the windows each input pixel wins (x's dtype, added in XLA's
// order; bfloat16 rounded after each add, as XLA's scatter-add). Recomputes the winners from x: no argmax kept.
std::string max_pool_backward(const PoolShape& s, DType dtype, const void* x, const void* dy,
                              void* dx, Isa isa, const Executor* executor);

}  // namespace jbr::prim
