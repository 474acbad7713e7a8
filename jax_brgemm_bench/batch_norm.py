"""python -m jax_brgemm bench batch_norm [--quick] [--json] [--dtype float32|bfloat16]

Training-mode batch normalisation with relu (and the residual add where ResNet-50 has one),
``relu(bn(x) + shortcut)``, on ResNet-50's activation shapes at N=8: fl.BatchNorm (the fused
jax_brgemm.nn.batch_norm) against stock nnx.BatchNorm + relu + add in XLA, side by side in
one process (the two alternate, round by round, so a noisy neighbour hits both alike).
Forward, and forward+backward (gradients to x, the shortcut, scale and bias). GB/s: the
bytes the fused passes must move at the least (forward: x read twice, the shortcut read
and y written once; backward: x, y and dy read twice, dx and the shortcut's gradient written).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from .common import print_records

# (H=W, C, residual add): ResNet-50's BatchNorm outputs at 224x224 input.
SHAPES = [(56, 64, False), (56, 256, True), (28, 512, True), (14, 1024, True), (7, 2048, True)]
QUICK = [(56, 256, True), (7, 2048, True)]


def _runners(n, hw, c, residual, dtype):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import flax_layers as fl

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, hw, hw, c)) + 0.5, dtype)
    r = jnp.asarray(rng.standard_normal(x.shape), dtype) if residual else None
    g = jnp.asarray(rng.standard_normal(x.shape), dtype)
    scale, bias = jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32)
    kw = dict(momentum=0.9, dtype=dtype)

    def stock(scale, bias, x, r):
        bn = nnx.BatchNorm(c, rngs=nnx.Rngs(0), **kw)
        bn.scale[...], bn.bias[...] = scale, bias
        y = bn(x)
        return jax.nn.relu(y if r is None else y + r), bn.mean[...]

    def ours(scale, bias, x, r):
        bn = fl.BatchNorm(c, activation="relu", rngs=nnx.Rngs(0), **kw)
        bn.scale[...], bn.bias[...] = scale, bias
        return bn(x, residual=r), bn.mean[...]

    runs = {}
    for name, f in (("ours", ours), ("xla", stock)):
        fwd = jax.jit(f).lower(scale, bias, x, r).compile()
        both = jax.jit(lambda s, b, x, r, g, f=f: jax.vjp(lambda *a: f(*a)[0], s, b, x, r)[1](g))
        both = both.lower(scale, bias, x, r, g).compile()
        runs[name] = (lambda fwd=fwd: jax.block_until_ready(fwd(scale, bias, x, r)),
                      lambda both=both: jax.block_until_ready(both(scale, bias, x, r, g)))
    return runs


def _side_by_side(fns, rounds=7, min_seconds=0.05):
    """Median seconds per call of each fn, the fns alternating round by round."""
    inner = {}
    for k, fn in fns.items():
        fn()
        count, start = 1, time.perf_counter()
        while True:
            for _ in range(count):
                fn()
            if time.perf_counter() - start >= min_seconds or count >= 1 << 14:
                break
            count *= 2
            start = time.perf_counter()
        inner[k] = count
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[k]):
                fn()
            samples[k].append((time.perf_counter() - start) / inner[k])
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m jax_brgemm bench batch_norm")
    parser.add_argument("--quick", action="store_true", help="56x56x256 and 7x7x2048 only")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    import jax.numpy as jnp

    dtype = jnp.dtype(args.dtype)
    records = []
    for hw, c, residual in (QUICK if args.quick else SHAPES):
        runs = _runners(args.batch, hw, c, residual, dtype)
        elems = args.batch * hw * hw * c
        size = dtype.itemsize
        for mode, idx, traffic in (("fwd", 0, (3 + residual) * elems * size),
                                   ("fwd+bwd", 1, (3 + residual + 6 + 1 + residual) * elems * size)):
            t = _side_by_side({k: v[idx] for k, v in runs.items()})
            records.append(dict(shape=f"{args.batch}x{hw}x{hw}x{c}", add=residual, pass_=mode,
                                ours_ms=t["ours"] * 1e3, xla_ms=t["xla"] * 1e3,
                                ours_GBs=traffic / t["ours"] * 1e-9, speedup=t["xla"] / t["ours"]))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print_records(records, ["shape", "add", "pass_", "ours_ms", "xla_ms", "ours_GBs", "speedup"], args.json,
                  title=f"BatchNorm + relu (+ add), training mode, {args.dtype} (load average {load:.1f})")
