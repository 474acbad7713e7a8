// Times the dense primitives (cpp/primitives/dense.cc) without Python or XLA: the loop
// nests and the kernel alone, on the library's own worker team, in one process. Python
// dispatch (~10-20 us a call) and allocator effects hide differences of a few percent in
// `bench dense`; here two builds or two settings can be compared run against run.
//
//   cmake/pip build first (pip install --no-build-isolation -e .), then
//   B=build/cp311-cp311-linux_x86_64
//   g++ -O2 -std=c++17 -Icpp scripts/dense_timing.cc $B/libjbr_primitives.a $B/libjbr_kernel.a -lpthread -o /tmp/dense_timing
//   taskset -c 0 /tmp/dense_timing 128 512 512 bwd 1     # n c k pass threads
//   /tmp/dense_timing 128 512 512 all 2
//
// pass: fwd (with bias), dx, dw (with dbias), bwd (dx, dw, dbias) or all. Prints the best
// and the median of 40 rounds of ~10 ms.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "primitives/dense.h"
#include "timing.h"

using namespace jbr;
using timing::Floats;

namespace {

template <class F>
void report(const char* name, int64_t n, int64_t c, int64_t k, double flops, F run) {
  const timing::Times t = timing::time_calls(run, 20, 40, 0.01);
  std::printf("%ldx%ldx%ld %-3s best %8.1f us (%6.1f GFLOP/s)  median %8.1f us\n", (long)n, (long)c,
              (long)k, name, t.best * 1e6, flops / t.best * 1e-9, t.median * 1e6);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s n c k [fwd|dx|dw|bwd|all] [threads]\n", argv[0]);
    return 2;
  }
  const int64_t n = std::atoll(argv[1]), c = std::atoll(argv[2]), k = std::atoll(argv[3]);
  const char* pass = argc > 4 ? argv[4] : "all";
  const int threads = argc > 5 ? std::atoi(argv[5]) : 1;
  Floats x(n * c), w(c * k), dy(n * k), bias(k), y(n * k), dx(n * c), dw(c * k), db(k);
  for (auto* v : {&x, &w, &dy, &bias})
    for (float& e : *v) e = static_cast<float>(std::rand() % 1000) / 1000.0f - 0.5f;
  const Isa isa = active_isa();
  const double flops = 2.0 * n * c * k;
  auto want = [&](const char* name) { return !std::strcmp(pass, "all") || !std::strcmp(pass, name); };
  auto executor = [&](prim::TeamCall& team) { return threads > 1 ? &team : nullptr; };

  prim::DenseForward f;
  f.n = n, f.c = c, f.k = k, f.x = x.data(), f.w = w.data(), f.bias = bias.data(), f.y = y.data();
  f.isa = isa;
  if (want("fwd"))
    report("fwd", n, c, k, flops, [&] { prim::TeamCall team(threads); prim::dense_forward(f, executor(team)); });
  for (const char* name : {"dx", "dw", "bwd"}) {
    if (!want(name)) continue;
    prim::DenseBackward b;
    b.n = n, b.c = c, b.k = k, b.dy = dy.data(), b.x = x.data(), b.w = w.data(), b.isa = isa;
    const bool with_dx = std::strcmp(name, "dw") != 0, with_dw = std::strcmp(name, "dx") != 0;
    if (with_dx) b.dx = dx.data();
    if (with_dw) b.dw = dw.data(), b.dbias = db.data();
    report(name, n, c, k, flops * (with_dx && with_dw ? 2 : 1),
           [&] { prim::TeamCall team(threads); prim::dense_backward(b, executor(team)); });
  }
  return 0;
}
