"""The CUDA kernels against cuBLAS / cuDNN (through XLA) on the same GPU and data.

    python -m jax_brgemm bench gpu [--json] [--quick] [--dtype bfloat16|float32|all]
                                   [--only brgemm,dense,conv] [--batch N]

Three tables, each measured side by side with its XLA peer:
- brgemm: brgemm-shaped problems (many small blocks, the reduction over count inside one call)
  and dense-shaped ones (count 1). Peer: ``einsum("pimk,pikn->pmn")`` (cuBLAS).
- dense: ``y = x @ w + bias`` through ``nn.dense`` (float32 or bfloat16). Peer:
  ``jnp.dot(x, w) + bias`` (cuBLAS).
- conv: ``nn.conv2d`` forward on the ResNet-50 v1 layers (conv.py's list).
  Peer: ``lax.conv_general_dilated`` (cuDNN).
Every peer accumulates in float32 (``preferred_element_type``); in float32 it runs at
precision HIGHEST (true float32, as our SIMT kernel; XLA's default may use TF32). The % of
peak column uses the card's nominal dense peak (spec sheet), when the card is known.
Needs a GPU and JAX's CUDA plugin.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_brgemm import _cuda
from jax_brgemm.nn import conv2d, dense
from .common import gflops, print_records, time_jax
from .conv import LAYERS as RESNET50_LAYERS

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
# Dense layers (rows n, in c, out k): an MLP block, a transformer FFN, a tall-skinny one.
DENSE_SHAPES = [(4096, 4096, 4096), (8192, 1024, 4096), (8192, 4096, 1024), (65536, 256, 256)]
QUICK_DENSE = [DENSE_SHAPES[0], DENSE_SHAPES[3]]
QUICK_LAYERS = [0, 3, 8, 12, 17, 19]

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


def _precision(dtype):
    return "highest" if dtype == "float32" else None


def _row(flops, ours, peer, args, peak, **fields):
    """Times ours and peer on args; GFLOP/s, % of peak, ratio and relative difference."""
    out, ref = ours(*args), peer(*args)
    out, ref = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
    diff = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    t_ours, t_peer = time_jax(ours, *args), time_jax(peer, *args)
    rate = gflops(flops, t_ours)
    return dict(fields, gflops=rate, pct_of_peak=None if peak is None else 100 * rate / peak,
                xla_gflops=gflops(flops, t_peer), vs_xla=t_peer / t_ours, rel_diff=f"{diff:.1e}")


def brgemm_records(shapes, dtypes, device, rng) -> list[dict]:
    ours = jax.jit(lambda a, b: _cuda.raw_brgemm(a, b))
    rows = []
    for dtype in dtypes:
        peer = jax.jit(lambda a, b, p=_precision(dtype): jnp.einsum(
            "pimk,pikn->pmn", a, b, precision=p, preferred_element_type=jnp.float32))
        for kind, p, count, m, k, n in shapes:
            a = jax.device_put(jnp.asarray(rng.standard_normal((p, count, m, k)), dtype), device)
            b = jax.device_put(jnp.asarray(rng.standard_normal((p, count, k, n)), dtype), device)
            rows.append(_row(2.0 * p * count * m * n * k, ours, peer, (a, b), nominal_peak_gflops(device, dtype),
                             kind=kind, shape=f"{p}x{count}x{m}x{k}x{n}", dtype=dtype))
    return rows


def dense_records(shapes, dtypes, device, rng) -> list[dict]:
    rows = []
    for dtype in dtypes:
        ours = jax.jit(lambda x, w, b: dense(x, w, b))  # float32 or bfloat16
        peer = jax.jit(lambda x, w, b, p=_precision(dtype): jnp.dot(
            x, w, precision=p, preferred_element_type=jnp.float32) + b)
        for n, c, k in shapes:
            x = jax.device_put(jnp.asarray(rng.standard_normal((n, c)), dtype), device)
            w = jax.device_put(jnp.asarray(rng.standard_normal((c, k)) / np.sqrt(c), dtype), device)
            b = jax.device_put(jnp.asarray(rng.standard_normal(k), jnp.float32), device)
            rows.append(_row(2.0 * n * c * k, ours, peer, (x, w, b), nominal_peak_gflops(device, dtype),
                             kind="dense", shape=f"{n}x{c}x{k}", dtype=dtype))
    return rows


def conv_records(layers, dtypes, device, rng, batch) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for index in layers:
            hw, c, k, r, pad, stride = RESNET50_LAYERS[index]
            pads = ((pad, pad), (pad, pad))
            ours = jax.jit(lambda x, w, s=stride, p=pads: conv2d(x, w, strides=s, padding=p,
                                                                 out_dtype=jnp.float32))
            peer = jax.jit(lambda x, w, s=stride, p=pads, pr=_precision(dtype): lax.conv_general_dilated(
                x, w, (s, s), p, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=pr,
                preferred_element_type=jnp.float32))
            x = jax.device_put(jnp.asarray(rng.standard_normal((batch, hw, hw, c)), dtype), device)
            w = jax.device_put(jnp.asarray(rng.standard_normal((r, r, c, k)) / np.sqrt(r * r * c), dtype), device)
            p_out = (hw + 2 * pad - r) // stride + 1
            flops = 2.0 * batch * p_out * p_out * k * c * r * r
            rows.append(_row(flops, ours, peer, (x, w), nominal_peak_gflops(device, dtype), kind="conv_fwd",
                             shape=f"L{index} {hw}x{hw} {c}->{k} {r}x{r}/{stride}", dtype=dtype))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m jax_brgemm bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="all", choices=["bfloat16", "float32", "all"])
    p.add_argument("--only", default="brgemm,dense,conv", help="comma-separated tables to run")
    p.add_argument("--batch", type=int, default=32, help="conv minibatch (default 32)")
    p.add_argument("--quick", action="store_true", help="a few shapes / layers per table")
    p.add_argument("--json", action="store_true", help="print one JSON list of records")
    args = p.parse_args(argv)
    if not _cuda.built:
        sys.exit(f"jax_brgemm was built without CUDA (no nvcc at build time): {_cuda.load_error}")
    if not _cuda.gpu_available():
        sys.exit("no CUDA GPU visible to JAX (is the jax CUDA plugin installed?); nothing to measure")
    dtypes = ["bfloat16", "float32"] if args.dtype == "all" else [args.dtype]
    tables = set(args.only.split(","))
    unknown = tables - {"brgemm", "dense", "conv"}
    if unknown:
        sys.exit(f"--only: unknown tables {sorted(unknown)}; choose from brgemm, dense, conv")
    device = jax.devices("cuda")[0]
    rng = np.random.default_rng(0)
    rows = []
    if "brgemm" in tables:
        rows += brgemm_records(QUICK_SHAPES if args.quick else SHAPES, dtypes, device, rng)
    if "dense" in tables:
        rows += dense_records(QUICK_DENSE if args.quick else DENSE_SHAPES, dtypes, device, rng)
    if "conv" in tables:
        layers = QUICK_LAYERS if args.quick else range(len(RESNET50_LAYERS))
        rows += conv_records(layers, dtypes, device, rng, args.batch)
    print_records(rows, ["kind", "shape", "dtype", "gflops", "pct_of_peak", "xla_gflops", "vs_xla", "rel_diff"],
                  args.json, f"jax_brgemm CUDA kernels vs XLA (cuBLAS / cuDNN), {device.device_kind}, "
                  f"jax {jax.__version__}; vs_xla > 1 means faster")


if __name__ == "__main__":
    main()
