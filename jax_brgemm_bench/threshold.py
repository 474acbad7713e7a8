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
    out += layout_records(rng, repeats)
    return out


def layout_records(rng, repeats):
    """A ResNet-sized 3x3 convolution written in NCHW / OIHW: XLA on NCHW, XLA on NHWC, and
    optimize (which transposes to NHWC around the call); and what a cached optimize call
    adds to a jitted one."""
    x = jnp.asarray(rng.standard_normal((8, 64, 56, 56)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((64, 64, 3, 3)), jnp.float32)
    nchw = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))  # noqa: E731
    nhwc = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    x_nhwc, k_hwio = jnp.transpose(x, (0, 2, 3, 1)), jnp.transpose(k, (2, 3, 1, 0))
    out = []
    for step in ("fwd", "fwdbwd"):
        pick = 0 if step == "fwd" else 1
        t_nchw = time_jax(_pair(nchw, x, k)[pick], x, k, repeats=repeats)
        t_nhwc = time_jax(_pair(nhwc, x_nhwc, k_hwio)[pick], x_nhwc, k_hwio, repeats=repeats)
        t_ours = time_jax(_pair(jb.optimize(nchw), x, k)[pick], x, k, repeats=repeats)
        out.append(dict(op=f"conv3x3 NCHW {step}", shape="8x64x56x56", macs=8 * 56 * 56 * 64 * 64 * 9,
                        xla_nchw_ms=1e3 * t_nchw, xla_nhwc_ms=1e3 * t_nhwc, ours_nchw_ms=1e3 * t_ours,
                        ratio_vs_xla_nchw=t_nchw / t_ours))
    small = jnp.ones((4, 4))
    jitted, optimized = jax.jit(lambda x: x * 2.0), jb.optimize(lambda x: x * 2.0)
    t_jit, t_opt = time_jax(jitted, small, repeats=repeats), time_jax(optimized, small, repeats=repeats)
    out.append(dict(op="call overhead", shape="4x4 elementwise", macs=0, jit_us=1e6 * t_jit,
                    optimize_us=1e6 * t_opt, added_us=1e6 * (t_opt - t_jit)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jax_brgemm bench threshold", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    recs = records(args.quick)
    columns = list(dict.fromkeys(c for r in recs for c in r))
    print_records(recs, columns, args.json,
                  "small products, XLA vs the kernel (optimize(min_macs=0)), median microseconds per call:")
