// Times the convolution primitives (cpp/primitives/conv.cc, conv_weight_update.cc) without Python or XLA: the loop
// nests and the kernel alone, on the library's own worker team, in one process, float32.
// The JAX-level `bench conv` adds dispatch, XLA's buffers and wake-ups of parked threads
// (5-15 % on the calls under 1 ms); here two builds or settings compare run against run.
//
//   cmake/pip build first (pip install --no-build-isolation -e .), then
//   B=build/cp311-cp311-linux_x86_64
//   g++ -O2 -std=c++17 -Icpp scripts/conv_timing.cc $B/libjbr_primitives.a $B/libjbr_kernel.a -lpthread -o /tmp/conv_timing
//   /tmp/conv_timing 56 64 64 3 1 1 all 2      # H=W C K RxS pad stride, pass, threads [batch]
//
// pass: fwd, dx (backward-data), wu (weight-update) or all. Batch 8 unless given. Prints
// the best and the median of 15 rounds of ~30 ms.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "primitives/conv.h"
#include "timing.h"

using namespace jbr;
using timing::Floats;

namespace {

template <class F>
void report(const char* name, double flops, F run) {
  const timing::Times t = timing::time_calls(run, 3, 15, 0.03);
  std::printf("%-3s best %8.1f us (%6.1f GFLOP/s)  median %8.1f us (%6.1f GFLOP/s)\n", name, t.best * 1e6,
              flops / t.best * 1e-9, t.median * 1e6, flops / t.median * 1e-9);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s hw c k taps pad stride [fwd|dx|wu|all] [threads] [batch]\n", argv[0]);
    return 2;
  }
  const int64_t hw = std::atoll(argv[1]), c = std::atoll(argv[2]), k = std::atoll(argv[3]);
  const int64_t taps = std::atoll(argv[4]), pad = std::atoll(argv[5]), stride = std::atoll(argv[6]);
  const char* pass = argc > 7 ? argv[7] : "all";
  const int threads = argc > 8 ? std::atoi(argv[8]) : 1;
  const int64_t batch = argc > 9 ? std::atoll(argv[9]) : 8;
  prim::ConvShape s;
  s.batch = batch, s.in_h = s.in_w = hw, s.in_c = c, s.taps_h = s.taps_w = taps, s.out_c = k;
  s.stride_h = s.stride_w = stride, s.pad_top = s.pad_left = pad;
  s.out_h = s.out_w = (hw + 2 * pad - taps) / stride + 1;
  const int64_t out = s.out_h;
  Floats x(batch * hw * hw * c), w(taps * taps * c * k), dy(batch * out * out * k);
  Floats y(dy.size()), dx(x.size()), dw(w.size());
  for (auto* v : {&x, &w, &dy})
    for (float& e : *v) e = static_cast<float>(std::rand() % 1000) / 1000.0f - 0.5f;
  const Isa isa = active_isa();
  const double flops = 2.0 * batch * out * out * k * c * taps * taps;
  auto want = [&](const char* name) { return !std::strcmp(pass, "all") || !std::strcmp(pass, name); };
  auto executor = [&](prim::TeamCall& team) { return threads > 1 ? &team : nullptr; };
  auto check = [](const std::string& error) {
    if (error.empty()) return;
    std::fprintf(stderr, "%s\n", error.c_str());
    std::exit(1);
  };
  constexpr DType f32 = DType::f32;
  if (want("fwd"))
    report("fwd", flops, [&] {
      prim::TeamCall team(threads);
      check(prim::conv2d_forward(s, f32, x.data(), w.data(), nullptr, Activation::none, f32, y.data(), isa,
                                 executor(team)));
    });
  if (want("dx"))
    report("dx", flops, [&] {
      prim::TeamCall team(threads);
      check(prim::conv2d_backward_data(s, f32, dy.data(), w.data(), f32, dx.data(), isa, executor(team)));
    });
  if (want("wu"))
    report("wu", flops, [&] {
      prim::TeamCall team(threads);
      check(prim::conv2d_weight_update(s, f32, x.data(), dy.data(), dw.data(), isa, executor(team)));
    });
  return 0;
}
