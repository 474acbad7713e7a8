"""Single-thread kernel speed on in-cache data, and the fixed cost of one call under jit.

    python -m jax_brgemm bench kernel [--json] [--m M --n N --k K --count C]
                                      [--variant stride|offset|address|all] [--isa ISA|all]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_brgemm._ext import ext
from .common import core_peak_gflops, median_seconds, print_records

# (m, n, k, count): the block shapes the paper's primitives use. A row of 28 or 56 output
# pixels times 64 output channels is a ResNet conv block.
PAPER_SHAPES = [(64, 64, 64, 16), (32, 32, 32, 16), (28, 64, 64, 36), (56, 64, 64, 9),
                (16, 16, 16, 32), (64, 64, 64, 1), (64, 128, 128, 8)]


def machine_core_peak(dtype: str = "float32") -> float:
    """This machine's measured single-core peak for `dtype`: the best ISA's FMA loop for
    float32; for bfloat16 its native dot-product loop where one exists (else the FMA loop,
    since bfloat16 is then converted and multiplied in float32)."""
    fma = max(core_peak_gflops(isa) for isa in ext.supported_isas())
    if dtype == "float32":
        return fma
    return max([fma] + [bf16_core_peak_gflops(isa) for isa in ext.supported_isas()])


@functools.lru_cache(maxsize=None)
def bf16_core_peak_gflops(isa: str) -> float:
    return max(ext.testing.bf16_peak_gflops(isa, 0.2) for _ in range(3))


def kernel_records(shapes, variants, isas, dtypes=("float32",), samples=7) -> list[dict]:
    records = []
    for dtype in dtypes:
        peak = machine_core_peak(dtype)
        for isa in isas:
            # Where bfloat16 kernels read B in the pair layout (avx512bf16, amx): B as the
            # primitives pass their weights (packed once, "vnni") and as a plain row-major
            # block that the kernel packs on every call.
            vnni = isa in ("avx512bf16", "amx") and dtype == "bfloat16"
            layouts = ["plain", "vnni"] if vnni else ["plain"]
            for m, n, k, count in shapes:
                for variant in variants:
                    for layout in layouts:
                        rate = ext.testing.bench_kernel(m, n, k, count, variant, isa, dtype, samples, layout == "vnni")
                        records.append(dict(m=m, n=n, k=k, count=count, variant=variant, dtype=dtype,
                                            isa=isa, b=layout, gflops=rate, pct_of_peak=100.0 * rate / peak))
    return records


def call_overhead_us(op: str = "brgemm", lengths=(1, 25, 50, 100)) -> tuple[float, float]:
    """(slope, intercept) in microseconds of the time of a jitted chain of n dependent 1x1x1
    calls against n: the fixed cost of one more call, and that of the jitted call itself."""
    import jax_brgemm as jb

    a = jnp.ones((1, 1, 1), jnp.float32)
    b = jnp.ones((1, 1, 1), jnp.float32)
    step = {
        "brgemm": lambda c: jb.brgemm(a, b, c, beta=0.5),
        "xla": lambda c: 0.5 * c + jnp.dot(a[0], b[0]),
    }[op]

    def chain(n):
        def f(c):
            for _ in range(n):
                c = step(c)
            return c
        return jax.jit(f)

    c0 = jnp.ones((1, 1), jnp.float32)
    times = []
    for n in lengths:
        f = chain(n)
        times.append(median_seconds(lambda: jax.block_until_ready(f(c0)), repeats=9))
    slope, intercept = np.polyfit(np.asarray(lengths, float), np.asarray(times), 1)
    return slope * 1e6, intercept * 1e6


# `bench all` arguments (see __init__.py): both dtypes; --quick measures one shape.
ALL_ARGS = ["--dtype", "all"]
QUICK_ARGS = ["--m", "64", "--n", "64", "--k", "64", "--count", "4"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m jax_brgemm bench kernel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int)
    p.add_argument("--n", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--count", type=int)
    p.add_argument("--variant", default="stride", choices=["stride", "offset", "address", "all"])
    p.add_argument("--isa", default="", help="ISA path (default: the active one), or 'all'")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "all"],
                   help="input dtype (bfloat16: float32 accumulation)")
    p.add_argument("--json", action="store_true", help="print one JSON list of records")
    p.add_argument("--no-overhead", action="store_true", help="skip the per-call overhead measurement")
    args = p.parse_args(argv)

    one = [args.m, args.n, args.k, args.count]
    if any(v is not None for v in one):
        if any(v is None for v in one):
            p.error("--m, --n, --k and --count go together")
        shapes = [tuple(one)]
    else:
        shapes = PAPER_SHAPES
    variants = ["stride", "offset", "address"] if args.variant == "all" else [args.variant]
    isas = ext.supported_isas() if args.isa == "all" else [args.isa or ext.active_isa()]
    dtypes = ["float32", "bfloat16"] if args.dtype == "all" else [args.dtype]
    records = kernel_records(shapes, variants, isas, dtypes)
    title = (f"brgemm kernel, single thread, in-cache data; measured peak per core: float32 FMA "
             f"{machine_core_peak():.1f} GFLOP/s, bfloat16 {machine_core_peak('bfloat16'):.1f}")
    print_records(records, ["m", "n", "k", "count", "variant", "dtype", "isa", "b", "gflops",
                            "pct_of_peak"], args.json, title)
    if not args.json and not args.no_overhead:
        per_call, dispatch = call_overhead_us("brgemm")
        xla_per_call, xla_dispatch = call_overhead_us("xla")
        print(f"\nfixed cost of one 1x1x1 brgemm call inside jit (slope over chains of 1..100 "
              f"dependent calls): {per_call:.2f} us; XLA dot + axpy: {xla_per_call:.2f} us "
              f"(XLA fuses them); dispatch of the whole jitted call: {dispatch:.1f} us "
              f"(XLA's: {xla_dispatch:.1f} us)")
