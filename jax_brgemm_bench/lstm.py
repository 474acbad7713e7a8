"""LSTM benchmark: jax_brgemm.nn.lstm vs the same LSTM in lax.scan + jnp (jit) and PyTorch
nn.LSTM (oneDNN), forward and forward+backward, N = 64, T = 25, float32 and/or bfloat16 (every input in
that dtype, for all three).

    python -m jax_brgemm bench lstm [--json] [--quick] [--dtype float32|bfloat16|all]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_brgemm.nn import lstm

from .common import gflops, machine_peak_gflops, num_cores, print_records, torch_module
from .kernel import machine_core_peak

N, T = 64, 25
SHAPES = [(256, 256), (512, 512), (1024, 1024), (512, 1024), (2048, 2048)]


def scan_lstm(x, w_ih, w_hh, bias, hoist):
    """The peer: a plain lax.scan LSTM (batch-major x). hoist: the input products of all
    steps as one matmul before the scan (usually faster in XLA) instead of one per step."""
    K = w_hh.shape[0]
    xs = jnp.swapaxes(x, 0, 1)
    if hoist:
        xs = xs @ w_ih + bias

    def step(carry, xt):
        h, c = carry
        z = (xt if hoist else xt @ w_ih + bias) + h @ w_hh
        i, f, o = (jax.nn.sigmoid(z[:, j * K:(j + 1) * K]) for j in (0, 1, 3))
        c = f * c + i * jnp.tanh(z[:, 2 * K:3 * K])
        h = o * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((x.shape[0], K), x.dtype)
    (h, c), hs = jax.lax.scan(step, (zeros, zeros), xs)
    return jnp.swapaxes(hs, 0, 1), (c, h)


def _loss(fn):
    def loss(x, w_ih, w_hh, bias):
        hs, (c, h) = fn(x, w_ih, w_hh, bias)
        return jnp.sum(hs) + jnp.sum(c)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def _torch_runs(torch, C, K, x_np, dtype):
    """PyTorch nn.LSTM forward (inference mode) and forward+backward, as callables."""
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = torch.nn.LSTM(C, K, batch_first=True).to(torch_dtype)
    x = torch.from_numpy(x_np).to(torch_dtype)
    xg = x.clone().requires_grad_(True)

    def fwd():
        with torch.inference_mode():
            model(x)

    def fwdbwd():
        hs, (h, c) = model(xg)
        (hs.sum() + c.sum()).backward()

    return fwd, fwdbwd


def interleaved_times(runs: dict, repeats: int, min_seconds: float = 0.05) -> dict:
    """Seconds per call of each blocking callable as (median, best) over `repeats` rounds,
    measured round-robin (one timed batch of each per round) so that load from other
    processes hits every peer alike. The best round estimates the uncontended time."""
    inner = {}
    for name, fn in runs.items():
        fn()  # compile / warm up
        start, n = time.perf_counter(), 1
        fn()
        while (time.perf_counter() - start) * n < min_seconds and n < 1 << 12:
            n *= 2
        inner[name] = n
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            fn()  # untimed: the previous runner's threads have gone quiet, caches are warm
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: (statistics.median(v), min(v)) for name, v in samples.items()}


def peak_gflops(dtype: str) -> float:
    """Measured peak of all cores: the FMA loop for float32, VDPBF16PS for bfloat16."""
    return machine_peak_gflops() if dtype == "float32" else machine_core_peak(dtype) * num_cores()


def measure(C, K, dtype, repeats, torch, rng) -> list[dict]:
    """The fwd and fwd+bwd records of one shape in one dtype, every peer side by side."""
    peak = peak_gflops(dtype)
    x = rng.standard_normal((N, T, C)).astype(np.float32)
    w_ih = (rng.standard_normal((C, 4 * K)) / np.sqrt(C)).astype(np.float32)
    w_hh = (rng.standard_normal((K, 4 * K)) / np.sqrt(K)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(4 * K)).astype(np.float32)
    operands = tuple(jnp.asarray(a, dtype) for a in (x, w_ih, w_hh, bias))
    flops = 2.0 * T * N * (C + K) * 4 * K  # forward; backward is twice that
    fns = {"ours": lstm, "xla": lambda *a: scan_lstm(*a, hoist=False),
           "xla_hoisted": lambda *a: scan_lstm(*a, hoist=True)}
    torch_runs = _torch_runs(torch, C, K, x, dtype) if torch is not None else None
    records = []
    for pass_name, factor in (("fwd", 1.0), ("fwdbwd", 3.0)):
        wrap = jax.jit if pass_name == "fwd" else _loss
        runs = {name: (lambda f: lambda: jax.block_until_ready(f(*operands)))(wrap(fn))
                for name, fn in fns.items()}
        times = interleaved_times(runs, repeats)
        if torch_runs is not None:  # its own rounds: its OpenMP threads spin after a call
            times["torch"] = interleaved_times({"torch": torch_runs[pass_name == "fwdbwd"]},
                                               repeats)["torch"]
        t = {name: med for name, (med, _) in times.items()}
        best = {name: low for name, (_, low) in times.items()}
        xla = min(t["xla"], t["xla_hoisted"])  # the faster of the two scan formulations
        rate = gflops(factor * flops, t["ours"])
        records.append({
            "dtype": dtype, "C": C, "K": K, "pass": pass_name,
            "ours_gflops": rate, "pct_peak": 100.0 * rate / peak,
            "xla_gflops": gflops(factor * flops, xla), "vs_xla": xla / t["ours"],
            "torch_gflops": gflops(factor * flops, t["torch"]) if "torch" in t else None,
            "vs_torch": t["torch"] / t["ours"] if "torch" in t else None,
            "ours_ms": 1e3 * t["ours"],
            "best_vs_xla": min(best["xla"], best["xla_hoisted"]) / best["ours"],
            "best_vs_torch": best["torch"] / best["ours"] if "torch" in best else None,
        })
    return records


# `bench all` arguments (see __init__.py).
ALL_ARGS = ["--dtype", "all"]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jax_brgemm bench lstm")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="first two shapes only")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "all"), default="float32")
    args = parser.parse_args(argv)
    dtypes = ("float32", "bfloat16") if args.dtype == "all" else (args.dtype,)
    torch = torch_module()
    rng = np.random.default_rng(0)
    shapes = SHAPES[:2] if args.quick else SHAPES
    records = {d: [r for C, K in shapes for r in measure(C, K, d, args.repeats, torch, rng)]
               for d in dtypes}
    if args.json:
        print_records([r for d in dtypes for r in records[d]], [], True)
        return
    columns = ["C", "K", "pass", "ours_gflops", "pct_peak", "xla_gflops", "vs_xla",
               "torch_gflops", "vs_torch", "ours_ms", "best_vs_xla", "best_vs_torch"]
    for d in dtypes:
        peak = peak_gflops(d)
        print_records(records[d], columns, False,
                      f"LSTM N={N} T={T} {d}, peak {peak:.0f} GFLOP/s; vs_*: peer time / ours (>1: ours "
                      "faster), medians; best_vs_*: the same from each one's fastest round")


if __name__ == "__main__":
    main()
