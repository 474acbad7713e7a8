"""python -m jax_brgemm bench batch_norm [--quick] [--json] [--dtype float32|bfloat16]

Training-mode batch normalisation with relu (and the residual add where ResNet-50 has one),
``relu(bn(x) + shortcut)``, on ResNet-50's activation shapes at N=8: fl.BatchNorm (the fused
jax_brgemm.nn.batch_norm) against stock nnx.BatchNorm + relu + add in XLA, side by side in
one process (the two alternate, round by round, so a noisy neighbour hits both alike).
Forward, and forward+backward (gradients to x, the shortcut, scale and bias). GB/s: the
bytes the fused passes must move at the least (forward: x read twice, the shortcut read
and y written once; backward: x, y and dy read twice, dx and the shortcut's gradient written).

Then the layer after the stem's batch norm, ResNet's 3x3 stride-2 SAME max pool on
N x 112 x 112 x 64: fl.max_pool against nnx.max_pool (XLA's reduce-window and, backward, its
select-and-scatter), the same way. GB/s: x read and y written (forward); x read twice, dy
read, dx written (fwd+bwd).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from .common import median_seconds_alternating, print_records

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


def _pool_runners(n, dtype):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import flax_layers as fl

    rng = np.random.default_rng(0)
    x = jax.nn.relu(jnp.asarray(rng.standard_normal((n, 112, 112, 64)), dtype))  # ties, as after relu
    g = jnp.asarray(rng.standard_normal((n, 56, 56, 64)), dtype)
    runs = {}
    for name, pool in (("ours", fl.max_pool), ("xla", nnx.max_pool)):
        f = lambda x, pool=pool: pool(x, (3, 3), strides=(2, 2), padding="SAME")  # noqa: E731
        fwd = jax.jit(f).lower(x).compile()
        both = jax.jit(lambda x, g, f=f: jax.vjp(f, x)[1](g)[0]).lower(x, g).compile()
        runs[name] = (lambda fwd=fwd: jax.block_until_ready(fwd(x)),
                      lambda both=both: jax.block_until_ready(both(x, g)))
    return runs


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
            t = median_seconds_alternating({k: v[idx] for k, v in runs.items()})
            records.append(dict(shape=f"{args.batch}x{hw}x{hw}x{c}", add=residual, pass_=mode,
                                ours_ms=t["ours"] * 1e3, xla_ms=t["xla"] * 1e3,
                                ours_GBs=traffic / t["ours"] * 1e-9, speedup=t["xla"] / t["ours"]))
    runs = _pool_runners(args.batch, dtype)
    elems, size = args.batch * 112 * 112 * 64, dtype.itemsize
    for mode, idx, traffic in (("fwd", 0, elems * 5 // 4 * size), ("fwd+bwd", 1, elems * 13 // 4 * size)):
        t = median_seconds_alternating({k: v[idx] for k, v in runs.items()})
        records.append(dict(shape=f"{args.batch}x112x112x64 max_pool 3x3/2", add=False, pass_=mode,
                            ours_ms=t["ours"] * 1e3, xla_ms=t["xla"] * 1e3,
                            ours_GBs=traffic / t["ours"] * 1e-9, speedup=t["xla"] / t["ours"]))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print_records(records, ["shape", "add", "pass_", "ours_ms", "xla_ms", "ours_GBs", "speedup"], args.json,
                  title=f"BatchNorm + relu (+ add), training mode, and the stem's max pool, {args.dtype} (load average {load:.1f})")
