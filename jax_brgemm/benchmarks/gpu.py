"""The CUDA brgemm kernels against cuBLAS (XLA's dot / einsum) on the same GPU and data.

    python -m jax_brgemm bench gpu [--json] [--quick] [--dtype bfloat16|float32|all]

Brgemm-shaped problems (many small blocks, the reduction over count inside one call) and
dense-shaped ones (count 1, one big GEMM). The peer for (problems, count, m, k, n) is
``einsum("pimk,pikn->pmn")`` with float32 accumulation (``preferred_element_type``), and for
float32 at precision HIGHEST (true float32, as our SIMT kernel; XLA's default may use TF32).
The % of peak column uses the card's nominal dense peak (spec sheet), when the card is known.
Needs a GPU and JAX's CUDA plugin; the CUDA kernels reach the op layer as float32 only for
now, so this calls the FFI target directly (jax_brgemm._cuda.raw_brgemm).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from .. import _cuda
from .common import gflops, print_records, time_jax

# (kind, problems, count, m, k, n)
SHAPES = [
    ("brgemm", 64, 16, 64, 64, 64),
    ("brgemm", 32, 8, 128, 128, 128),
    ("brgemm", 8, 16, 256, 256, 256),
    ("brgemm", 224, 9, 56, 64, 64),   # a ResNet 3x3 conv row block: 56 pixels, 64 -> 64 channels
    ("dense", 1, 1, 2048, 2048, 2048),
    ("dense", 1, 1, 4096, 4096, 4096),
    ("dense", 1, 1, 8192, 1024, 4096),
]
QUICK_SHAPES = [SHAPES[0], SHAPES[3], SHAPES[5]]

# Nominal dense peaks in TFLOP/s (bfloat16 tensor cores, float32 CUDA cores), by device name.
NOMINAL_PEAK_TFLOPS = [
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 51.2}),
    ("H100", {"bfloat16": 989.4, "float32": 66.9}),   # SXM
    ("H200", {"bfloat16": 989.4, "float32": 66.9}),
    ("A100", {"bfloat16": 312.0, "float32": 19.5}),
]


def nominal_peak_gflops(device, dtype: str) -> float | None:
    for name, peaks in NOMINAL_PEAK_TFLOPS:
        if name in device.device_kind:
            return peaks[dtype] * 1e3
    return None


def records(shapes, dtypes) -> list[dict]:
    device = jax.devices("cuda")[0]
    rng = np.random.default_rng(0)
    ours = jax.jit(lambda a, b: _cuda.raw_brgemm(a, b))
    rows = []
    for dtype in dtypes:
        precision = "highest" if dtype == "float32" else None
        peer = jax.jit(lambda a, b: jnp.einsum("pimk,pikn->pmn", a, b, precision=precision,
                                               preferred_element_type=jnp.float32))
        peak = nominal_peak_gflops(device, dtype)
        for kind, p, count, m, k, n in shapes:
            a = jax.device_put(jnp.asarray(rng.standard_normal((p, count, m, k)), dtype), device)
            b = jax.device_put(jnp.asarray(rng.standard_normal((p, count, k, n)), dtype), device)
            flops = 2.0 * p * count * m * n * k
            out, ref = ours(a, b), peer(a, b)
            diff = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            t_ours, t_peer = time_jax(ours, a, b), time_jax(peer, a, b)
            rate = gflops(flops, t_ours)
            rows.append(dict(kind=kind, problems=p, count=count, m=m, k=k, n=n, dtype=dtype,
                             gflops=rate, pct_of_peak=None if peak is None else 100 * rate / peak,
                             cublas_gflops=gflops(flops, t_peer), vs_cublas=t_peer / t_ours,
                             rel_diff=f"{diff:.1e}"))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m jax_brgemm bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="all", choices=["bfloat16", "float32", "all"])
    p.add_argument("--quick", action="store_true", help="three shapes only")
    p.add_argument("--json", action="store_true", help="print one JSON list of records")
    args = p.parse_args(argv)
    if not _cuda.built:
        sys.exit(f"jax_brgemm was built without CUDA (no nvcc at build time): {_cuda.load_error}")
    if not _cuda.gpu_available():
        sys.exit("no CUDA GPU visible to JAX (is the jax CUDA plugin installed?); nothing to measure")
    dtypes = ["bfloat16", "float32"] if args.dtype == "all" else [args.dtype]
    rows = records(QUICK_SHAPES if args.quick else SHAPES, dtypes)
    device = jax.devices("cuda")[0]
    print_records(rows, ["kind", "problems", "count", "m", "k", "n", "dtype", "gflops", "pct_of_peak",
                         "cublas_gflops", "vs_cublas", "rel_diff"], args.json,
                  f"brgemm CUDA kernels vs cuBLAS (XLA einsum), {device.device_kind}, "
                  f"jax {jax.__version__}; vs_cublas > 1 means faster")
