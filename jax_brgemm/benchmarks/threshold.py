"""Where the kernel starts to beat XLA on small products: the evidence behind
`jax_brgemm.optimize`'s ``min_macs`` default.

    python -m jax_brgemm bench threshold [--json] [--quick]

Times a jitted matmul ``x (m, k) @ w (k, n)`` and a 3x3 convolution, forward and
forward+backward, through XLA and through ``optimize(min_macs=0)``, over sizes from a few
hundred to a few million multiply-adds, side by side in one run. ``ratio`` > 1: the kernel
is faster.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jax_brgemm as jb

from .common import print_records, time_jax

DENSE = [(8, 8, 8), (16, 16, 16), (32, 32, 32), (32, 64, 32), (64, 64, 64), (64, 128, 64),
         (128, 128, 128), (128, 256, 256), (256, 256, 256)]
CONV = [(1, 4, 4, 4), (1, 8, 8, 8), (2, 8, 8, 16), (2, 16, 16, 16), (4, 16, 16, 32)]  # (n, h, w, c), c -> c


def _pair(fn, *args):
    f = jax.jit(fn)
    g = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=tuple(range(len(args)))))
    return f, g


def records(quick):
    rng = np.random.default_rng(0)
    out = []
    repeats = 3 if quick else 7
    cases = []
    for m, k, n in DENSE:
        x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((m, k), (k, n)))
        cases.append(("dense", f"{m}x{k}x{n}", m * k * n, jnp.matmul, (x, w)))
    for n, h, w_, c in CONV:
        x = jnp.asarray(rng.standard_normal((n, h, w_, c)), jnp.float32)
        kern = jnp.asarray(rng.standard_normal((3, 3, c, c)), jnp.float32)
        conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME",  # noqa: E731
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        cases.append(("conv3x3", f"{n}x{h}x{w_}x{c}", n * h * w_ * c * c * 9, conv, (x, kern)))
    for op, shape, macs, fn, args in cases:
        xla_f, xla_g = _pair(fn, *args)
        our_f, our_g = _pair(jb.optimize(fn, min_macs=0), *args)
        t = {name: time_jax(f, *args, repeats=repeats) for name, f in
             (("xla_fwd", xla_f), ("ours_fwd", our_f), ("xla_fwdbwd", xla_g), ("ours_fwdbwd", our_g))}
        out.append(dict(op=op, shape=shape, macs=macs, xla_fwd_us=1e6 * t["xla_fwd"], ours_fwd_us=1e6 * t["ours_fwd"],
                        ratio_fwd=t["xla_fwd"] / t["ours_fwd"], xla_fwdbwd_us=1e6 * t["xla_fwdbwd"],
                        ours_fwdbwd_us=1e6 * t["ours_fwdbwd"], ratio_fwdbwd=t["xla_fwdbwd"] / t["ours_fwdbwd"]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jax_brgemm bench threshold", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    recs = records(args.quick)
    print_records(recs, list(recs[0]), args.json,
                  "small products, XLA vs the kernel (optimize(min_macs=0)), median microseconds per call:")
