"""The command line behind ``python -m jax_brgemm``:

    python -m jax_brgemm                      what this machine has, a correctness check, a short benchmark
    python -m jax_brgemm bench NAME [...]     one benchmark (--help each)
    python -m jax_brgemm bench all [--quick] [--only a,b] [--json-dir DIR] [--markdown]
                                              every benchmark in its own process, each one's --json
                                              output and a stamp into DIR; --markdown prints the tables
    python -m jax_brgemm bench report --json-dir DIR [--json-dir DIR2 ...] > BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import shlex
import subprocess
import sys
import time

from . import report

# Modules of this package that are not benchmarks.
NOT_BENCHES = {"common", "cli", "report"}
# What `bench all` passes a benchmark that sets no ALL_ARGS / QUICK_ARGS.
DEFAULT_ALL_ARGS: list[str] = []
DEFAULT_QUICK_ARGS = ["--quick"]


def available_benchmarks() -> list[str]:
    from . import __path__ as package_path

    return sorted(m.name for m in pkgutil.iter_modules(package_path) if m.name not in NOT_BENCHES)


def bench_module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def overview() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_brgemm as jb
    from . import common, kernel

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



def bench_command(name: str, quick: bool) -> list[str]:
    """The arguments `bench all` runs benchmark `name` with (after ``bench NAME --json``)."""
    module = bench_module(name)
    if quick:
        return list(getattr(module, "QUICK_ARGS", DEFAULT_QUICK_ARGS))
    return list(getattr(module, "ALL_ARGS", DEFAULT_ALL_ARGS))


def run_all(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m jax_brgemm bench all",
                                description="Run every benchmark, each in its own process, writing "
                                "DIR/NAME.json (its --json output) and DIR/NAME.meta.json (date, commit, "
                                "CPU, versions, command).")
    p.add_argument("--quick", action="store_true", help="each benchmark's smoke run (not for figures)")
    p.add_argument("--only", default="", help="comma-separated benchmarks (default: all)")
    p.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    p.add_argument("--json-dir", default="bench_json", help="where the results go (default bench_json)")
    p.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md tables at the end")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or [
        n for n in available_benchmarks() if getattr(bench_module(n), "IN_ALL", True)]
    unknown = set(names) - set(available_benchmarks())
    if unknown:
        sys.exit(f"--only: unknown benchmarks {sorted(unknown)}; available: {', '.join(available_benchmarks())}")
    names = [n for n in names if n not in set(args.skip.split(","))]
    os.makedirs(args.json_dir, exist_ok=True)
    env = report.environment()
    for name in names:
        extra = bench_command(name, args.quick)
        shown = ["python", "-m", "jax_brgemm", "bench", name, "--json", *extra]
        print(f"[bench all] {shlex.join(shown)}", file=sys.stderr, flush=True)
        start = time.time()
        done = subprocess.run([sys.executable, "-m", "jax_brgemm", "bench", name, "--json", *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sys.stderr.write(done.stderr[-2000:] if done.returncode else "")
        meta = dict(env, bench=name, title=report.module_title(bench_module(name)),
                    command=shlex.join(shown), quick=args.quick, date=report.utc_now(),
                    seconds=round(time.time() - start, 1), returncode=done.returncode,
                    error=done.stderr.strip().splitlines()[-1] if done.returncode and done.stderr.strip() else "")
        with open(os.path.join(args.json_dir, f"{name}.meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if done.returncode == 0:
            with open(os.path.join(args.json_dir, f"{name}.json"), "w") as f:
                f.write(done.stdout)
    if args.markdown:
        print(report.markdown([args.json_dir]), end="")


def main(argv: list[str]) -> None:
    if not argv:
        overview()
        return
    if argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    if argv[0] != "bench" or len(argv) < 2:
        sys.exit(f"usage: {__doc__}")
    name, rest = argv[1], argv[2:]
    if name == "all":
        run_all(rest)
    elif name == "report":
        report.main(rest)
    elif name in available_benchmarks():
        bench_module(name).main(rest)
    else:
        sys.exit(f"unknown benchmark {name!r}; available: {', '.join(available_benchmarks())}, all, report")
