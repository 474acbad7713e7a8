"""ResNet-50 v1 convolution layers: forward, backward-data and weight-update of
jax_brgemm.nn.conv2d against XLA's lax.conv_general_dilated (and PyTorch conv2d in
channels_last, i.e. oneDNN, when torch imports), float32 and bfloat16 (all three in the
same dtype), measured side by side.

    python -m jax_brgemm bench conv [--json] [--quick] [--batch N] [--layers 0,3,7]
                                    [--dtype float32|bfloat16|all]
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

from jax_brgemm.nn import conv as conv_mod
from . import common
from .kernel import machine_core_peak

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
    dtype = getattr(torch, str(x.dtype))

    def tensor(a, order):
        return torch.from_numpy(np.array(a, np.float32)).to(dtype).permute(*order).contiguous(memory_format=cl)

    tx, tw, tdy = tensor(x, (0, 3, 1, 2)), tensor(w, (3, 2, 0, 1)), tensor(dy, (0, 3, 1, 2))
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


def peaks(dtypes):
    """Machine peak (all cores) per dtype: the FMA loop for float32, the bfloat16 dot-product
    loop for bfloat16."""
    return {d: common.machine_peak_gflops() if d == "float32" else machine_core_peak(d) * common.num_cores()
            for d in dtypes}


def run(batch, layer_ids, dtypes=("float32",), rounds=3):
    """Every (layer, dtype, pass) timed for each implementation in turn, `rounds` times over;
    the median per implementation, so that load from other processes hits all of them alike,
    and each one's fastest round (the `best vs` ratios: what each reaches on a quiet spell)."""
    torch = common.torch_module()
    peak = peaks(dtypes)
    rng = np.random.default_rng(0)
    records = []
    for i, dtype in [(i, d) for i in layer_ids for d in dtypes]:
        hw, c, k, r, pad, stride = LAYERS[i]
        x = jnp.asarray(rng.standard_normal((batch, hw, hw, c), np.float32), dtype)
        w = jnp.asarray(rng.standard_normal((r, r, c, k), np.float32) / np.sqrt(r * r * c), dtype)
        p = (hw + 2 * pad - r) // stride + 1
        dy = jnp.asarray(rng.standard_normal((batch, p, p, k), np.float32), dtype)
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
            rec = {"layer": f"{i}:{hw}x{hw} {c}->{k} {r}x{r}/{stride}", "dtype": dtype, "pass": name,
                   "flops": flops}
            rec.update({key: statistics.median(t) for key, t in times.items()})
            rec.update({key + "_best": min(t) for key, t in times.items()})
            records.append(_derive(rec, peak))
    return records, peak


def _derive(rec, peak):
    f = rec["flops"]
    rec["GF/s"] = common.gflops(f, rec["ours_s"])
    rec["%peak"] = 100.0 * rec["GF/s"] / peak[rec["dtype"]]
    rec["XLA GF/s"] = common.gflops(f, rec["xla_s"])
    rec["vs XLA"] = rec["xla_s"] / rec["ours_s"]
    rec["best vs XLA"] = rec["xla_s_best"] / rec["ours_s_best"]
    if rec.get("torch_s"):
        rec["torch GF/s"] = common.gflops(f, rec["torch_s"])
        rec["vs torch"] = rec["torch_s"] / rec["ours_s"]
        rec["best vs torch"] = rec["torch_s_best"] / rec["ours_s_best"]
    return rec


def totals(records, peak):
    """FLOP-weighted totals (total FLOPs / total time) per pass and for all passes together."""
    out = []
    for dtype, name in [(d, n) for d in peak for n in PASSES + ("all",)]:
        rs = [r for r in records if name in ("all", r["pass"]) and r["dtype"] == dtype]
        if not rs:
            continue
        rec = {"layer": "TOTAL", "dtype": dtype, "pass": name, "flops": sum(r["flops"] for r in rs)}
        for key in ("ours_s", "xla_s", "torch_s", "ours_s_best", "xla_s_best", "torch_s_best"):
            rec[key] = sum(r[key] for r in rs) if all(r.get(key) for r in rs) else None
        out.append(_derive(rec, peak))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jax_brgemm bench conv", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="batch 1 and a few layers")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--layers", type=str, default=None, help="comma-separated layer indices")
    ap.add_argument("--dtype", default="all", choices=["float32", "bfloat16", "all"],
                    help="input dtype of all three (bfloat16: float32 accumulation; default both)")
    args = ap.parse_args(argv)
    batch = args.batch or (1 if args.quick else 8)
    ids = ([int(v) for v in args.layers.split(",")] if args.layers
           else QUICK_LAYERS if args.quick else list(range(len(LAYERS))))
    dtypes = ["float32", "bfloat16"] if args.dtype == "all" else [args.dtype]
    records, peak = run(batch, ids, dtypes, rounds=2 if args.quick else 3)
    records += totals(records, peak)
    columns = ["layer", "dtype", "pass", "GF/s", "%peak", "XLA GF/s", "vs XLA", "torch GF/s", "vs torch",
               "best vs XLA", "best vs torch"]
    peak_text = ", ".join(f"{d} {v:.0f}" for d, v in peak.items())
    title = (f"conv2d, batch {batch}, {common.num_cores()} cores, peak GFLOP/s {peak_text} "
             f"(measured FMA / bfloat16 dot-product loops), isa {jax_brgemm_isa()}")
    common.print_records(records, columns, args.json, title)


def jax_brgemm_isa():
    from jax_brgemm._ext import active_isa

    return active_isa()


if __name__ == "__main__":
    main(sys.argv[1:])
