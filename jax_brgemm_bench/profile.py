"""Where a model's training step spends its time, ours and PyTorch's, by kind of work.

    python -m jax_brgemm bench profile [--model resnet50] [--variants stock optimize flax_layers torch]
                                       [--steps 3] [--quick] [--json]

JAX: the jitted step runs under `jax.profiler.trace`; every XLA:CPU thunk's time is summed
by the HLO instruction it runs (named in the compiled module's text), sorted into kinds:
our kernel calls by target (convolution forward, backward-data, weight update, dense,
attention, ...), XLA's convolutions and dots, reductions (BatchNorm statistics, pooling),
elementwise fusions (normalisation, relu, adds, the optimizer), copies and transposes.
PyTorch: `torch.profiler` over the same steps, its top-level aten ops sorted the same way.
Each row: milliseconds per step summed over the threads that ran it, and its share of all
accounted time; the last row of each variant gives the step's wall time as well.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import shutil
import tempfile

import jax
import numpy as np

import jax_brgemm as jb

from . import models
from .common import median_seconds, print_records, torch_module

_OURS = {
    "conv2d_forward": "conv forward (ours)", "conv2d_backward_data": "conv backward-data (ours)",
    "conv2d_weight_update": "conv weight update (ours)", "dense_fwd": "dense (ours)", "dense_bwd": "dense (ours)",
    "brgemm": "brgemm (ours)", "attention": "attention (ours)", "batch_norm": "batch norm (ours)",
    "lstm": "lstm (ours)", "max_pool": "pooling (ours)",
}


def _kind_of_instruction(line: str) -> str:
    if "custom_call_target=" in line:
        target = re.search(r'custom_call_target="([^"]+)"', line).group(1)
        name = target.removeprefix("jax_brgemm_")  # every target's prefix: match on the rest
        for key, kind in _OURS.items():
            if key in name:
                return kind
        return f"custom call {target}"
    opcode = re.search(r"=\s*[^ ]+\s+([a-z\-]+)\(", line)
    op = opcode.group(1) if opcode else ""
    if op == "convolution" or "convolution" in line.split("=")[0]:
        return "conv (XLA)"
    if op in ("dot",) or "ynn" in line.split("=")[0] or "dot" in line.split("=")[0]:
        return "dot (XLA)"
    if op in ("reduce", "reduce-window", "select-and-scatter") or "reduce" in line.split("=")[0]:
        return "reductions, pooling (XLA)"
    if op in ("copy", "transpose") or "copy" in line.split("=")[0] or "transpose" in line.split("=")[0]:
        return "copies, transposes (XLA)"
    if op == "fusion":
        return "elementwise fusions (XLA)"
    return f"other (XLA {op or 'op'})"


def _instruction_kinds(hlo_text: str) -> dict:
    kinds = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
        if m:
            kinds[m.group(1)] = _kind_of_instruction(line)
    return kinds


def jax_split(step, args, steps):
    """{kind: ms per step} from the thunks of `steps` runs of the jitted `step`."""
    compiled = step.lower(*args).compile()
    kinds = _instruction_kinds(compiled.as_text())
    jax.block_until_ready(step(*args))
    folder = tempfile.mkdtemp(prefix="jbr_profile_")
    try:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(steps):
                jax.block_until_ready(step(*args))
        (path,) = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
        trace = json.load(gzip.open(path))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in kinds:
            total[kinds[e["name"]]] += e.get("dur", 0.0) / 1e3 / steps
    wall = median_seconds(lambda: jax.block_until_ready(step(*args)), repeats=steps, min_seconds=0.0) * 1e3
    return total, wall


def _torch_kind(name: str) -> str:
    n = name.lower()
    if "conv" in n and "backward" in n:
        return "conv backward (oneDNN)"
    if "conv" in n:
        return "conv forward (oneDNN)"
    if "batch_norm" in n or "batchnorm" in n:
        return "batch norm (oneDNN/aten)"
    if any(k in n for k in ("addmm", "matmul", "mm", "linear", "bmm")) and "backward" not in n:
        return "dense (oneDNN)"
    if "pool" in n:
        return "pooling (aten)"
    if any(k in n for k in ("threshold", "relu", "add", "mul", "sgd", "foreach", "zero_", "copy_")):
        return "elementwise, optimizer (aten)"
    return "other (aten)"


def torch_split(run, steps, torch):
    wall = median_seconds(run, repeats=steps, min_seconds=0.0) * 1e3
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    total = collections.Counter()
    for evt in prof.events():
        if evt.cpu_parent is None or evt.cpu_parent.name.startswith("ProfilerStep"):  # top-level ops
            total[_torch_kind(evt.name)] += evt.cpu_time_total / 1e3 / steps
    return total, wall


def records(model, variants, steps, quick):
    make, x, labels, make_torch = models.model_spec(model, quick)
    out = []
    for variant in variants:
        if variant == "torch":
            torch = torch_module()
            if torch is None:
                continue
            train, _ = models.torch_runners(make_torch, torch, x, labels)
            split, wall = torch_split(train, steps, torch)
        else:
            L = models.LAYERS["flax_layers" if variant == "flax_layers" else "stock"]
            wrap = jb.optimize if variant == "optimize" else (lambda f: f)
            step, args = models.jax_train_step(make, L, wrap, x, labels)
            split, wall = jax_split(step, args, steps)
        accounted = sum(split.values())
        for kind, ms in sorted(split.items(), key=lambda kv: -kv[1]):
            out.append(dict(model=model, variant=variant, kind=kind, ms_per_step=ms,
                            share=100 * ms / accounted if accounted else None))
        out.append(dict(model=model, variant=variant, kind="total (sum of the above)", ms_per_step=accounted,
                        share=100.0, step_wall_ms=wall))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jax_brgemm bench profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=models.MODELS, default="resnet50")
    p.add_argument("--variants", nargs="+", choices=models.VARIANTS, default=list(models.VARIANTS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    recs = records(args.model, args.variants, args.steps, args.quick)
    print_records(recs, ["model", "variant", "kind", "ms_per_step", "share", "step_wall_ms"], args.json,
                  f"{args.model} training step by kind of work (ms per step; share of the accounted time):")
