// Times the attention primitives (cpp/primitives/attention.cc) without Python or XLA: the
// loop nests and the kernel alone, on the library's own worker team, in one process.
//
//   pip install --no-build-isolation -e .   (builds the static libraries), then
//   B=build/cp311-cp311-linux_x86_64
//   g++ -O2 -std=c++17 -Icpp scripts/attention_timing.cc $B/libjbr_primitives.a $B/libjbr_kernel.a -lpthread -o /tmp/attention_timing
//   /tmp/attention_timing 1024 64 0 f32 2        # T H causal dtype threads [batch heads pass]
//
// pass: fwd, bwd or all; batch 4 and 8 heads unless given. GFLOP/s count the forward's two
// products (4 B N T^2 H, halved where causal) and the backward's five (2.5 times that).
// Prints the best and the median of 9 rounds of ~0.2 s.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include "primitives/attention.h"
#include "timing.h"

using namespace jbr;
using timing::Floats;

namespace {

double process_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Wall-clock times, and the process's CPU time per call divided by the threads: on a
// machine other jobs share, the second is what the code would take with the cores to itself.
template <class F>
void report(const char* name, double flops, int threads, F run) {
  const double cpu0 = process_cpu_seconds();
  int calls = 0;
  const timing::Times t = timing::time_calls([&] { run(), ++calls; }, 2, 9, 0.2);
  const double cpu = (process_cpu_seconds() - cpu0) / calls / threads;
  std::printf("%-3s best %9.2f ms (%6.1f GFLOP/s)  median %9.2f ms (%6.1f GFLOP/s)  cpu/thread %9.2f ms (%6.1f GFLOP/s)\n",
              name, t.best * 1e3, flops / t.best * 1e-9, t.median * 1e3, flops / t.median * 1e-9,
              cpu * 1e3, flops / cpu * 1e-9);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s T H causal f32|bf16 threads [batch heads fwd|bwd|all]\n", argv[0]);
    return 2;
  }
  const int64_t T = std::atoll(argv[1]), H = std::atoll(argv[2]);
  const bool causal = std::atoi(argv[3]) != 0;
  const bool bf16 = !std::strcmp(argv[4], "bf16");
  const int threads = std::atoi(argv[5]);
  const int64_t B = argc > 6 ? std::atoll(argv[6]) : 4, N = argc > 7 ? std::atoll(argv[7]) : 8;
  const char* pass = argc > 8 ? argv[8] : "all";
  prim::AttentionShape s;
  s.batch = B, s.q_len = s.kv_len = T, s.heads = s.kv_heads = N, s.head_dim = H;
  prim::AttentionMasks m;
  m.scale = 1.0f / std::sqrt(static_cast<float>(H));
  m.causal = causal;
  const int64_t size = B * T * N * H;
  std::vector<Floats> f32(8, Floats(size));
  for (int i = 0; i < 4; ++i)
    for (float& e : f32[i]) e = static_cast<float>(std::rand() % 2000) / 1000.0f - 1.0f;
  std::vector<std::vector<uint16_t>> h16(8, std::vector<uint16_t>(size));
  for (int i = 0; i < 4; ++i)
    for (int64_t j = 0; j < size; ++j) h16[i][j] = round_to_bf16(f32[i][j]);
  auto buf = [&](int i) -> void* { return bf16 ? static_cast<void*>(h16[i].data()) : f32[i].data(); };
  Floats lse(B * N * T);
  const Isa isa = active_isa();
  auto check = [](const std::string& error) {
    if (error.empty()) return;
    std::fprintf(stderr, "%s\n", error.c_str());
    std::exit(1);
  };
  prim::AttentionForward f;
  f.shape = s, f.masks = m, f.dtype = bf16 ? DType::bf16 : DType::f32, f.isa = isa;
  f.q = buf(0), f.k = buf(1), f.v = buf(2), f.out = buf(4), f.lse = lse.data();
  prim::AttentionBackward b;
  b.shape = s, b.masks = m, b.dtype = f.dtype, b.isa = isa;
  b.q = buf(0), b.k = buf(1), b.v = buf(2), b.out = buf(4), b.d_out = buf(3), b.lse = lse.data();
  b.dq = buf(5), b.dk = buf(6), b.dv = buf(7);
  const double fwd_flops = 4.0 * B * N * T * T * H * (causal ? 0.5 : 1.0);
  auto executor = [&](prim::TeamCall& team) { return threads > 1 ? &team : nullptr; };
  std::printf("T=%lld H=%lld causal=%d %s threads=%d B=%lld N=%lld isa=%s\n", (long long)T,
              (long long)H, causal, bf16 ? "bf16" : "f32", threads, (long long)B, (long long)N,
              isa_name(isa));
  const bool all = !std::strcmp(pass, "all");
  {
    prim::TeamCall team(threads);
    check(prim::attention_forward(f, executor(team)));  // lse and out for the backward
  }
  if (all || !std::strcmp(pass, "fwd"))
    report("fwd", fwd_flops, threads, [&] {
      prim::TeamCall team(threads);
      check(prim::attention_forward(f, executor(team)));
    });
  if (all || !std::strcmp(pass, "bwd"))
    report("bwd", 2.5 * fwd_flops, threads, [&] {
      prim::TeamCall team(threads);
      check(prim::attention_backward(b, executor(team)));
    });
  return 0;
}
