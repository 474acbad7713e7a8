// Max pooling loop nests (pool.h). The forward takes one output row per item; the
// backward one band of input rows per item, which it alone writes (it runs every window
// that reaches into the band, and adds only to the band's own pixels), so threads never
// share a dx element and each element's adds come in output order, as XLA's.
#include "primitives/pool.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "primitives/elements.h"

namespace jbr::prim {
namespace {

// Input rows per backward item: a band this tall re-runs only the (kh - sh) / sh windows
// reaching in from the band above, and a 112-row image still gives 7 items.
constexpr int64_t kBandRows = 16;

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The output columns [lo, hi) whose windows lie inside the row (no padding column): they
// run as one call of `hi - lo` pixels; the rest one pixel at a time.
struct Interior {
  int64_t lo, hi;
};
Interior interior(const PoolShape& s) {
  const int64_t lo = (s.pl + s.sw - 1) / s.sw;
  const int64_t hi = std::min(s.out_w(), floor_div(s.w + s.pl - s.kw, s.sw) + 1);
  return {std::min(lo, s.out_w()), std::max(hi, std::min(lo, s.out_w()))};
}

// Calls run(ox, pixels) over the output columns of a row in order: border pixels one at a
// time, the interior as one run.
template <typename Run>
void over_columns(const PoolShape& s, Run run) {
  const Interior in = interior(s);
  for (int64_t ox = 0; ox < in.lo; ++ox) run(ox, 1);
  if (in.hi > in.lo) run(in.lo, in.hi - in.lo);
  for (int64_t ox = std::max(in.hi, in.lo); ox < s.out_w(); ++ox) run(ox, 1);
}

// The window taps of output pixel (oy, ox) of image `img` in window order: a pointer into
// x (of `dtype`), or null where the tap is padding.
void window_taps(const PoolShape& s, DType dtype, const void* x, int64_t img, int64_t oy,
                 int64_t ox, const void** taps) {
  const int64_t es = size_of(dtype);
  for (int64_t ky = 0; ky < s.kh; ++ky) {
    const int64_t iy = oy * s.sh - s.pt + ky;
    for (int64_t kx = 0; kx < s.kw; ++kx) {
      const int64_t ix = ox * s.sw - s.pl + kx;
      const bool inside = iy >= 0 && iy < s.h && ix >= 0 && ix < s.w;
      taps[ky * s.kw + kx] =
          inside ? static_cast<const char*>(x) + (((img * s.h + iy) * s.w + ix) * s.c) * es : nullptr;
    }
  }
}

}  // namespace

std::string pool_check(const PoolShape& s) {
  if (s.n < 0 || s.h < 0 || s.w < 0 || s.c < 0) return "max_pool: negative dimension";
  if (s.kh < 1 || s.kw < 1 || s.sh < 1 || s.sw < 1) return "max_pool: window and strides must be >= 1";
  if (s.pt < 0 || s.pb < 0 || s.pl < 0 || s.pr < 0) return "max_pool: negative padding";
  if (s.h + s.pt + s.pb < s.kh || s.w + s.pl + s.pr < s.kw) return "max_pool: window larger than the padded input";
  if (s.kh * s.kw >= (int64_t{1} << 24)) return "max_pool: window of 2^24 taps or more";
  return "";
}

std::string max_pool_forward(const PoolShape& s, DType dtype, const void* x, void* y, Isa isa,
                             const Executor* executor) {
  if (std::string e = pool_check(s); !e.empty()) return e;
  const int64_t oh = s.out_h(), ow = s.out_w(), es = size_of(dtype);
  if (s.n == 0 || s.c == 0) return "";
  parallel_for(executor, s.n * oh, [&](int64_t item) {
    const int64_t img = item / oh, oy = item % oh;
    std::vector<const void*> taps(s.kh * s.kw);
    over_columns(s, [&](int64_t ox, int64_t pixels) {
      window_taps(s, dtype, x, img, oy, ox, taps.data());
      void* out = static_cast<char*>(y) + (((img * oh + oy) * ow + ox) * s.c) * es;
      cols_window_max(taps.data(), s.kh * s.kw, dtype, pixels, s.sw * s.c, s.c, out, isa);
    });
  });
  return "";
}

std::string max_pool_backward(const PoolShape& s, DType dtype, const void* x, const void* dy,
                              void* dx, Isa isa, const Executor* executor) {
  if (std::string e = pool_check(s); !e.empty()) return e;
  const int64_t oh = s.out_h(), ow = s.out_w(), es = size_of(dtype);
  const int64_t bands = (s.h + kBandRows - 1) / kBandRows;
  const int64_t row = s.w * s.c;  // elements of one input row
  if (s.n == 0 || s.c == 0 || s.h == 0 || s.w == 0) return "";
  parallel_for(executor, s.n * bands, [&](int64_t item) {
    const int64_t img = item / bands, r0 = (item % bands) * kBandRows;
    const int64_t r1 = std::min(r0 + kBandRows, s.h);
    char* band = static_cast<char*>(dx) + (img * s.h + r0) * row * es;
    std::memset(band, 0, (r1 - r0) * row * es);  // zero bits: 0.0 in float32 and bfloat16
    // The output rows whose windows reach rows [r0, r1).
    const int64_t oy0 = std::max<int64_t>(0, floor_div(r0 + s.pt - s.kh, s.sh) + 1);
    const int64_t oy1 = std::min(oh, floor_div(r1 - 1 + s.pt, s.sh) + 1);
    const int64_t taps_n = s.kh * s.kw;
    std::vector<const void*> taps(taps_n);
    std::vector<void*> targets(taps_n);
    for (int64_t oy = oy0; oy < oy1; ++oy)
      over_columns(s, [&](int64_t ox, int64_t pixels) {
        window_taps(s, dtype, x, img, oy, ox, taps.data());
        for (int64_t ky = 0; ky < s.kh; ++ky) {
          const int64_t iy = oy * s.sh - s.pt + ky;
          for (int64_t kx = 0; kx < s.kw; ++kx) {
            const int64_t t = ky * s.kw + kx, ix = ox * s.sw - s.pl + kx;
            const bool own = taps[t] && iy >= r0 && iy < r1;
            targets[t] = own ? band + ((iy - r0) * row + ix * s.c) * es : nullptr;
          }
        }
        const void* g = static_cast<const char*>(dy) + (((img * oh + oy) * ow + ox) * s.c) * es;
        cols_window_max_backward(taps.data(), targets.data(), taps_n, dtype, pixels, s.sw * s.c, s.c, g,
                                 isa);
      });
  });
  return "";
}

}  // namespace jbr::prim
