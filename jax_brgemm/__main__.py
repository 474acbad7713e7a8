"""python -m jax_brgemm                 what this machine has, a correctness check, a short benchmark
python -m jax_brgemm bench NAME [...]  one benchmark (kernel, dense, conv, lstm, ...; --help each)
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time


def available_benchmarks() -> list[str]:
    from . import benchmarks

    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name != "common")


def overview() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_brgemm as jb
    from .benchmarks import common, kernel

    print(f"jax_brgemm {jb.__version__}, jax {jax.__version__}, devices {jax.devices()}")
    print(f"ISA in use: {jb.active_isa()}  (supported here: {', '.join(jb.supported_isas())}; "
          f"force one with JAX_BRGEMM_ISA)")
    print(f"cores: {common.num_cores()}, measured peak per core: float32 FMA "
          f"{kernel.machine_core_peak():.1f} GFLOP/s, bfloat16 {kernel.machine_core_peak('bfloat16'):.1f}")

    print("\ncorrectness check against a float64 NumPy reference:")
    rng = np.random.default_rng(int(time.time()))
    ok = True
    op = jax.jit(lambda a, b: jb.brgemm(a, b, epilogue="tanh", out_dtype=jnp.float32))
    for isa in jb.supported_isas():
        jb.set_isa(isa)
        for dtype in (jnp.float32, jnp.bfloat16):
            worst = 0.0
            for m, n, k, count in [(1, 1, 1, 1), (17, 33, 7, 5), (64, 64, 64, 16), (100, 31, 129, 3)]:
                a = rng.standard_normal((2, count, m, k)).astype(dtype)
                b = rng.standard_normal((2, count, k, n)).astype(dtype)
                out = np.asarray(op(a, b))
                # float64 products of the same (rounded) inputs: only accumulation error remains
                ref = np.tanh(np.einsum("pimk,pikn->pmn", a.astype(np.float64), b.astype(np.float64)))
                worst = max(worst, np.linalg.norm(out - ref) / np.linalg.norm(ref))
            ok &= worst < 1e-5
            print(f"  {isa:10s} {np.dtype(dtype).name:8s} worst relative error {worst:.1e}  "
                  f"{'ok' if worst < 1e-5 else 'FAILED'}")
    jb.set_isa(None)

    print()
    records = kernel.kernel_records(kernel.PAPER_SHAPES, ["stride"], [jb.active_isa()],
                                    ("float32", "bfloat16"), samples=3)
    common.print_records(records, ["m", "n", "k", "count", "dtype", "isa", "b", "gflops", "pct_of_peak"], False,
                         "kernel, single thread, in-cache blocks (python -m jax_brgemm bench kernel):")

    print("\nbatched brgemm op under jit, all cores, against XLA's einsum on the same data:")
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        peak = kernel.machine_core_peak(np.dtype(dtype).name) * common.num_cores()
        for p_, count, m, n, k in [(64, 16, 64, 64, 64), (8, 9, 56, 64, 64), (256, 8, 32, 32, 32)]:
            a = jnp.asarray(rng.standard_normal((p_, count, m, k)), dtype)
            b = jnp.asarray(rng.standard_normal((p_, count, k, n)), dtype)
            flops = 2.0 * p_ * count * m * n * k
            t_ours = common.time_jax(jax.jit(jb.brgemm), a, b)
            t_xla = common.time_jax(jax.jit(lambda a, b: jnp.einsum("pimk,pikn->pmn", a, b)), a, b)
            rows.append(dict(dtype=np.dtype(dtype).name, problems=p_, count=count, m=m, n=n, k=k,
                             gflops=common.gflops(flops, t_ours),
                             pct_of_peak=100 * common.gflops(flops, t_ours) / peak,
                             xla_gflops=common.gflops(flops, t_xla), speedup_vs_xla=t_xla / t_ours))
    common.print_records(rows, list(rows[0]), False)
    if not ok:
        sys.exit(1)


def main(argv: list[str]) -> None:
    if not argv:
        overview()
        return
    if argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    if argv[0] != "bench" or len(argv) < 2:
        sys.exit(f"usage: {__doc__}")
    name = argv[1]
    if name not in available_benchmarks():
        sys.exit(f"unknown benchmark {name!r}; available: {', '.join(available_benchmarks())}")
    importlib.import_module(f"jax_brgemm.benchmarks.{name}").main(argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
