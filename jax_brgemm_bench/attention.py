"""python -m jax_brgemm bench attention [--quick] [--json] [--memory] [--peer-max-t T]

jax_brgemm.nn.dot_product_attention against jax.nn.dot_product_attention (XLA) and, where
torch is installed, torch's scaled_dot_product_attention, side by side in one process:
forward and forward+backward over T in {256, 1024, 4096}, causal and not, float32 and
bfloat16, head dims 64 and 128, B=4 and 8 heads (T_q = T_k = T).

FLOPs: forward 4 B N T^2 H (the two products), forward+backward 3.5 times that (the
FlashAttention convention: the backward's four products plus recomputing S), halved
where causal. % peak: of this machine's measured peak for the dtype (kernel bench: FMA
loop for float32, the native bfloat16 dot loop where one exists, times the cores).

--memory: the peak working memory of each implementation for forward+backward, one fresh
subprocess per case: its peak resident set (ru_maxrss) minus its resident set just before
the call (imports done, inputs made, the call compiled ahead, and for JAX one trivial
program run first to pay the runtime's start-up), so compiled code and inputs are left out and
what the call allocates (XLA's logits, our scratch, torch's buffers) is counted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from .common import gflops, num_cores, print_records, torch_module

IMPLS = ("ours", "xla", "torch")


def flops(B, N, T, H, causal, backward):
    f = 4.0 * B * N * T * T * H * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f


def _inputs(B, T, N, H, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, T, N, H)).astype(np.float32) for _ in range(4)]


def jax_runner(impl, B, T, N, H, dtype, causal, backward):
    """A function running one call (blocking), for impl "ours" or "xla"."""
    import jax
    import jax.numpy as jnp

    import jax_brgemm as jb

    fn = jb.nn.dot_product_attention if impl == "ours" else jax.nn.dot_product_attention
    q, k, v, g = (jnp.asarray(a, dtype) for a in _inputs(B, T, N, H, dtype))
    attn = lambda q, k, v: fn(q, k, v, is_causal=causal)
    # Compiled ahead, so that a first call (the memory child's only one) runs no compiler.
    if backward:
        run = jax.jit(lambda q, k, v, g: jax.vjp(attn, q, k, v)[1](g)).lower(q, k, v, g).compile()
        return lambda: jax.block_until_ready(run(q, k, v, g))
    run = jax.jit(attn).lower(q, k, v).compile()
    return lambda: jax.block_until_ready(run(q, k, v))


def torch_runner(B, T, N, H, dtype, causal, backward):
    torch = torch_module()
    tdtype = torch.float32 if dtype == "float32" else torch.bfloat16
    # torch's layout is (B, N, T, H)
    q, k, v, g = (torch.from_numpy(a).to(tdtype).transpose(1, 2).contiguous()
                  for a in _inputs(B, T, N, H, dtype))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if backward:
        for t in (q, k, v):
            t.requires_grad_(True)

        def run():
            q.grad = k.grad = v.grad = None
            sdpa(q, k, v, is_causal=causal).backward(g)
        return run

    def run_fwd():
        with torch.no_grad():
            sdpa(q, k, v, is_causal=causal)
    return run_fwd


def runner(impl, *case):
    return torch_runner(*case) if impl == "torch" else jax_runner(impl, *case)


def _peak(dtype):
    from .kernel import machine_core_peak
    return machine_core_peak(dtype) * num_cores()


def measure(cases, impls, peer_max_t, repeats):
    records = []
    for (T, causal, dtype, H, backward) in cases:
        B, N = 4, 8
        rec = {"pass": "fwd+bwd" if backward else "fwd", "T": T, "causal": causal,
               "dtype": dtype, "H": H}
        f = flops(B, N, T, H, causal, backward)
        run = {impl: runner(impl, B, T, N, H, dtype, causal, backward) for impl in impls
               if impl == "ours" or T <= peer_max_t}
        times = interleaved_medians(run, repeats)
        rec["ms"] = times["ours"] * 1e3
        rec["GFLOP/s"] = gflops(f, times["ours"])
        rec["%peak"] = 100 * rec["GFLOP/s"] / _peak(dtype)
        for impl in ("xla", "torch"):
            if impl in times:
                rec[f"{impl} ms"] = times[impl] * 1e3
                rec[f"x {impl}"] = times[impl] / times["ours"]
        records.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
    return records


def interleaved_medians(run, repeats):
    """Median seconds per call of each runner, timed in turns (ours, xla, torch, ours, ...)
    after one warm-up call each, so that load from other tenants of a shared machine falls
    on all of them alike and their ratios hold."""
    samples = {impl: [] for impl in run}
    for fn in run.values():
        fn()
    for _ in range(repeats):
        for impl, fn in run.items():
            start = time.perf_counter()
            fn()
            samples[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(t) for impl, t in samples.items()}


def _child(impl, T, H, dtype, causal):
    """Runs one forward+backward case and prints its working memory in MB."""
    run = runner(impl, 4, T, 8, H, dtype, causal, True)
    if impl != "torch":  # the runtime's one-time start-up (~120 MB at the first execution)
        import jax
        import jax.numpy as jnp
        jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones(8)))
    before = _rss_mb()
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"MB": peak - before}))


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory(Ts, impls, peer_max_t):
    records = []
    for T in Ts:
        rec = {"T": T, "H": 64, "dtype": "float32", "causal": False}
        for impl in impls:
            if impl != "ours" and T > peer_max_t:
                continue
            out = subprocess.run([sys.executable, "-m", "jax_brgemm_bench.attention", "--child",
                                  impl, str(T), "64", "float32", "0"], capture_output=True, text=True)
            lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
            rec[f"{impl} MB"] = json.loads(lines[-1])["MB"] if lines else None
        records.append(rec)
    return records


ALL_ARGS = ["--repeats", "3"]  # bench all: the full matrix, 3 rounds (T=4096 is long)


def main(argv):
    ap = argparse.ArgumentParser(prog="python -m jax_brgemm bench attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T in {256, 1024}, float32, H=64 only")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--memory", action="store_true", help="peak working memory per case (subprocesses)")
    ap.add_argument("--peer-max-t", type=int, default=1024,
                    help="longest T the peers run (XLA's float32 logits alone are 2 GB at 4096)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        impl, T, H, dtype, causal = args.child
        return _child(impl, int(T), int(H), dtype, causal == "1")
    impls = ["ours", "xla"] + (["torch"] if torch_module() is not None else [])
    Ts = (256, 1024) if args.quick else (256, 1024, 4096)
    dtypes = ("float32",) if args.quick else ("float32", "bfloat16")
    heads = (64,) if args.quick else (64, 128)
    if args.memory:
        records = memory(Ts, impls, args.peer_max_t)
        cols = ["T", "H", "dtype"] + [f"{i} MB" for i in impls]
    else:
        cases = [(T, c, d, H, bwd) for bwd in (False, True) for d in dtypes for H in heads
                 for T in Ts for c in (False, True)]
        records = measure(cases, impls, args.peer_max_t, args.repeats)
        cols = ["pass", "T", "causal", "dtype", "H", "ms", "GFLOP/s", "%peak", "x xla", "x torch"]
    import platform
    title = (f"bench attention: B=4, 8 heads, {num_cores()} cores, {platform.processor() or platform.machine()}; "
             "x xla / x torch: their time / ours (same run)")
    print_records(records, cols, args.json, title)


if __name__ == "__main__":
    main(sys.argv[1:])
