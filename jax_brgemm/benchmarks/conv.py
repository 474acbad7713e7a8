"""ResNet-50 v1 convolution layers: forward, backward-data and weight-update of
jax_brgemm.nn.conv2d against XLA's lax.conv_general_dilated (and PyTorch conv2d in
channels_last, i.e. oneDNN, when torch imports), float32, measured side by side.

    python -m jax_brgemm bench conv [--json] [--quick] [--batch N] [--layers 0,3,7]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..nn import conv as conv_mod
from . import common

# (H=W, C, K, R=S, pad, stride)
LAYERS = [
    (224, 3, 64, 7, 3, 2), (56, 64, 256, 1, 0, 1), (56, 64, 64, 1, 0, 1), (56, 64, 64, 3, 1, 1),
    (56, 256, 64, 1, 0, 1), (56, 256, 512, 1, 0, 2), (56, 256, 128, 1, 0, 2), (28, 128, 128, 3, 1, 1),
    (28, 128, 512, 1, 0, 1), (28, 512, 128, 1, 0, 1), (28, 512, 1024, 1, 0, 2), (28, 512, 256, 1, 0, 2),
    (14, 256, 256, 3, 1, 1), (14, 256, 1024, 1, 0, 1), (14, 1024, 256, 1, 0, 1), (14, 1024, 2048, 1, 0, 2),
    (14, 1024, 512, 1, 0, 2), (7, 512, 512, 3, 1, 1), (7, 512, 2048, 1, 0, 1), (7, 2048, 512, 1, 0, 1),
]
QUICK_LAYERS = [0, 3, 8, 12, 17, 19]
PASSES = ("fwd", "bwd_data", "wu")
_DN = ("NHWC", "HWIO", "NHWC")


def _ours(x, w, stride, pad):
    geom = conv_mod._Geometry((stride, stride), (1, 1), ((pad, pad), (pad, pad)), 1)
    fwd = jax.jit(lambda x, w: conv_mod.conv2d(x, w, strides=stride, padding=geom.pads))
    bwd = jax.jit(lambda dy, w: conv_mod._backward_data_call(geom, x.shape[1:3])(dy, w))
    wu = jax.jit(lambda x, dy: conv_mod._weight_update_call(geom, w.shape[:2])(x, dy))
    return fwd, bwd, wu


def _xla(x, w, stride, pad):
    def conv(x, w):
        return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=_DN)

    fwd = jax.jit(conv)
    bwd = jax.jit(lambda dy, w: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
    wu = jax.jit(lambda x, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
    return fwd, bwd, wu


def _torch_fns(torch, x, w, dy, stride, pad):
    cl = torch.channels_last
    tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(memory_format=cl)
    tw = torch.from_numpy(np.array(w)).permute(3, 2, 0, 1).contiguous(memory_format=cl)
    tdy = torch.from_numpy(np.array(dy)).permute(0, 3, 1, 2).contiguous(memory_format=cl)
    args = ([stride] * 2, [pad] * 2, [1] * 2, False, [0, 0], 1)

    def fwd():
        with torch.no_grad():
            return torch.nn.functional.conv2d(tx, tw, None, stride, pad)

    def bwd(mask):
        def run():
            with torch.no_grad():
                return torch.ops.aten.convolution_backward(tdy, tx, tw, None, *args, mask)
        return run

    return fwd, bwd([True, False, False]), bwd([False, True, False])


def run(batch, layer_ids, rounds=3):
    """Every (layer, pass) timed for each implementation in turn, `rounds` times over; the
    median per implementation, so that load from other processes hits all of them alike."""
    torch = common.torch_module()
    peak = common.machine_peak_gflops()
    rng = np.random.default_rng(0)
    records = []
    for i in layer_ids:
        hw, c, k, r, pad, stride = LAYERS[i]
        x = jnp.asarray(rng.standard_normal((batch, hw, hw, c), np.float32))
        w = jnp.asarray(rng.standard_normal((r, r, c, k), np.float32) / np.sqrt(r * r * c))
        p = (hw + 2 * pad - r) // stride + 1
        dy = jnp.asarray(rng.standard_normal((batch, p, p, k), np.float32))
        flops = 2.0 * batch * p * p * k * c * r * r
        inputs = ((x, w), (dy, w), (x, dy))
        impls = {"ours_s": [functools.partial(f, *a) for f, a in zip(_ours(x, w, stride, pad), inputs)],
                 "xla_s": [functools.partial(f, *a) for f, a in zip(_xla(x, w, stride, pad), inputs)]}
        if torch:
            impls["torch_s"] = list(_torch_fns(torch, x, w, dy, stride, pad))
        for j, name in enumerate(PASSES):
            times = {key: [] for key in impls}
            for _ in range(rounds):
                for key, fns in impls.items():
                    fn = fns[j]
                    times[key].append(common.median_seconds(lambda: jax.block_until_ready(fn()), repeats=3,
                                                            min_seconds=0.03))
            rec = {"layer": f"{i}:{hw}x{hw} {c}->{k} {r}x{r}/{stride}", "pass": name, "flops": flops}
            rec.update({key: statistics.median(t) for key, t in times.items()})
            records.append(_derive(rec, peak))
    return records, peak


def _derive(rec, peak):
    f = rec["flops"]
    rec["GF/s"] = common.gflops(f, rec["ours_s"])
    rec["%peak"] = 100.0 * rec["GF/s"] / peak
    rec["XLA GF/s"] = common.gflops(f, rec["xla_s"])
    rec["vs XLA"] = rec["xla_s"] / rec["ours_s"]
    if rec.get("torch_s"):
        rec["torch GF/s"] = common.gflops(f, rec["torch_s"])
        rec["vs torch"] = rec["torch_s"] / rec["ours_s"]
    return rec


def totals(records, peak):
    """FLOP-weighted totals (total FLOPs / total time) per pass and for all passes together."""
    out = []
    for name in PASSES + ("all",):
        rs = [r for r in records if name in ("all", r["pass"])]
        rec = {"layer": "TOTAL", "pass": name, "flops": sum(r["flops"] for r in rs)}
        for key in ("ours_s", "xla_s", "torch_s"):
            rec[key] = sum(r[key] for r in rs) if all(r.get(key) for r in rs) else None
        out.append(_derive(rec, peak))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jax_brgemm bench conv", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="batch 1 and a few layers")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--layers", type=str, default=None, help="comma-separated layer indices")
    args = ap.parse_args(argv)
    batch = args.batch or (1 if args.quick else 8)
    ids = ([int(v) for v in args.layers.split(",")] if args.layers
           else QUICK_LAYERS if args.quick else list(range(len(LAYERS))))
    records, peak = run(batch, ids, rounds=2 if args.quick else 3)
    records += totals(records, peak)
    columns = ["layer", "pass", "GF/s", "%peak", "XLA GF/s", "vs XLA", "torch GF/s", "vs torch"]
    title = (f"conv2d float32, batch {batch}, {common.num_cores()} cores, "
             f"peak {peak:.0f} GFLOP/s (measured FMA loop), isa {jax_brgemm_isa()}")
    common.print_records(records, columns, args.json, title)


def jax_brgemm_isa():
    from .._ext import active_isa

    return active_isa()


if __name__ == "__main__":
    main(sys.argv[1:])
