"""Dense layer and MLP benchmark:
``python -m jax_brgemm bench dense [--json] [--quick] [--dtype float32|bfloat16|all]``.

Per shape and pass (forward, backward-data, weight-update, and the whole forward+backward of
a loss that depends on the output), relu, side by side in one run, in float32 (default)
and/or bfloat16 (x, kernel, bias and dy all bfloat16 for every implementation; %peak then of
the measured bfloat16 dot-product loop):
  ours:  jax_brgemm.nn.dense (the passes are its FFI calls, as its custom_vjp makes them)
  xla:   relu(x @ w + b) in jnp under jit, and the matching jnp backward expressions
  torch: nn.functional.linear + relu (oneDNN), and the matmuls its autograd runs
Then a 4-layer MLP (1024 wide, batch 256) optax training step, ours vs plain jnp (vs torch);
in bfloat16 as mixed precision: float32 params, bfloat16 activations (torch: autocast).
Timings are medians over interleaved rounds, so a noisy shared machine hits every column; the
"best vs" ratios compare each implementation's fastest round instead.
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_brgemm.nn import mlp, mlp_init
from jax_brgemm.nn.dense import _backward_call, _forward_call, dense
from .common import (gflops, machine_peak_gflops, median_cpu_seconds, median_seconds, num_cores,
                     print_records, torch_module)
from .kernel import machine_core_peak

BATCHES = (64, 256, 1024)
FEATURES = ((1024, 1024), (2048, 512), (512, 1024), (4096, 4096))
QUICK = [(256, 1024, 1024), (64, 512, 1024), (1024, 2048, 512)]


_CPU_TIME = False  # --cpu-time: process CPU seconds instead of wall seconds


def _cpu_core_peak(dtype="float32") -> float:
    """The packaged FMA loop's single-core GFLOP/s (for bfloat16, the best ISA's native
    dot-product loop where there is one), best of 3. The loops time themselves by the
    thread's CPU time already, matching --cpu-time measurements."""
    from jax_brgemm._ext import ext

    rates = [ext.testing.fma_peak_gflops("", 0.2) for _ in range(3)]
    if dtype == "bfloat16":
        rates += [ext.testing.bf16_peak_gflops(isa, 0.2) for isa in ext.supported_isas() for _ in range(3)]
    return max(rates)


def _machine_peak(dtype) -> float:
    """All cores, wall time: the FMA loop for float32, the bfloat16 dot-product loop."""
    return machine_peak_gflops() if dtype == "float32" else machine_core_peak(dtype) * num_cores()


def _interleaved(fns: dict, rounds: int) -> tuple[dict, dict]:
    """Median and best seconds of each zero-argument fn, measured in alternating rounds."""
    measure = median_cpu_seconds if _CPU_TIME else median_seconds
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if fn is not None:
                samples[name].append(measure(fn, repeats=3, min_seconds=0.03))
    return ({name: (statistics.median(s) if s else None) for name, s in samples.items()},
            {name: (min(s) if s else None) for name, s in samples.items()})


def _ready(fn, *args):
    return lambda: jax.block_until_ready(fn(*args))


def _layer_cases(n, c, k, torch, dtype="float32"):
    """{pass: {impl: fn}} for one shape, every array in `dtype`."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, c)), dtype)
    w = jnp.asarray(rng.standard_normal((c, k)) / np.sqrt(c), dtype)
    b = jnp.asarray(rng.standard_normal(k) * 0.1, dtype)
    dy = jnp.asarray(rng.standard_normal((n, k)), dtype)
    y = jax.nn.relu(x @ w + b)

    ours_fwd = jax.jit(lambda x, w, b: _forward_call("relu", x.dtype, True)(x, w, b)[0])
    ours_bwd_data = jax.jit(lambda dy, x, w, y: _backward_call(
        dy, x, w, y, "relu", want_dw=False, want_db=False)[0])
    ours_wu = jax.jit(lambda dy, x, w, y: _backward_call(dy, x, w, y, "relu", want_dx=False)[1:])
    xla_fwd = jax.jit(lambda x, w, b: jax.nn.relu(x @ w + b))
    xla_bwd_data = jax.jit(lambda dy, w, y: jnp.where(y > 0, dy, 0) @ w.T)
    xla_wu = jax.jit(lambda dy, x, y: (lambda dz: (x.T @ dz, dz.sum(0)))(jnp.where(y > 0, dy, 0)))

    def train_grad(layer):  # the output feeds the loss, so the forward cannot be skipped
        return jax.jit(jax.grad(lambda x, w, b: jnp.sum(layer(x, w, b) * dy), (0, 1, 2)))

    cases = {
        "forward": {"ours": _ready(ours_fwd, x, w, b), "xla": _ready(xla_fwd, x, w, b)},
        "backward-data": {"ours": _ready(ours_bwd_data, dy, x, w, y),
                          "xla": _ready(xla_bwd_data, dy, w, y)},
        "weight-update": {"ours": _ready(ours_wu, dy, x, w, y), "xla": _ready(xla_wu, dy, x, y)},
        "fwd+bwd": {"ours": _ready(train_grad(lambda x, w, b: dense(x, w, b, activation="relu")), x, w, b),
                    "xla": _ready(train_grad(lambda x, w, b: jax.nn.relu(x @ w + b)), x, w, b)},
    }
    if torch is not None:
        F = torch.nn.functional
        def tensor(v):  # the same values, in the same dtype
            return torch.from_numpy(np.asarray(v, np.float32)).to(getattr(torch, dtype)).contiguous()

        tx, tb, tdy, ty = (tensor(v) for v in (x, b, dy, y))
        tw = tensor(w.T)  # nn.Linear's (out, in) weight

        def t_fwd():
            with torch.no_grad():
                return F.relu(F.linear(tx, tw, tb))

        def t_bwd_data():  # what autograd runs for relu + linear's input gradient
            return torch.where(ty > 0, tdy, 0.0) @ tw

        def t_wu():
            dz = torch.where(ty > 0, tdy, 0.0)
            return dz.t() @ tx, dz.sum(0)

        px, pw, pb = (t.clone().requires_grad_(True) for t in (tx, tw, tb))

        def t_train():
            for p in (px, pw, pb):
                p.grad = None
            (F.relu(F.linear(px, pw, pb)) * tdy).sum().backward()

        for name, fn in (("forward", t_fwd), ("backward-data", t_bwd_data),
                         ("weight-update", t_wu), ("fwd+bwd", t_train)):
            cases[name]["torch"] = fn
    return cases


def _flops(name, n, c, k):
    return 2.0 * n * c * k * (3 if name == "fwd+bwd" else 1)


def layer_records(shapes, torch, rounds, peak, dtype="float32"):
    records = []
    for n, c, k in shapes:
        for name, fns in _layer_cases(n, c, k, torch, dtype).items():
            t, best = _interleaved(fns, rounds)
            flops = _flops(name, n, c, k)
            rec = {"N": n, "in": c, "out": k, "dtype": dtype, "pass": name,
                   "GFLOP/s": gflops(flops, t["ours"]),
                   "%peak": 100.0 * gflops(flops, t["ours"]) / peak,
                   "xla GFLOP/s": gflops(flops, t["xla"]),
                   "vs xla": t["xla"] / t["ours"], "best vs xla": best["xla"] / best["ours"]}
            if t.get("torch"):
                rec["torch GFLOP/s"] = gflops(flops, t["torch"])
                rec["vs torch"] = t["torch"] / t["ours"]
                rec["best vs torch"] = best["torch"] / best["ours"]
            records.append(rec)
            print_progress(rec)
    return records


def print_progress(rec):
    import sys
    print(f"# {rec['dtype']} {rec['N']} {rec['in']}x{rec['out']} {rec['pass']}: {rec['GFLOP/s']:.0f} GFLOP/s, "
          f"{rec['vs xla']:.2f}x xla", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ MLP training step


def mlp_train_step(forward, opt):
    """A jitted optax step of softmax cross-entropy for `forward(x, params)`."""

    def loss_fn(params, x, labels):
        logits = forward(x, params)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, state, x, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step


def plain_mlp(x, params):
    for i, (w, b) in enumerate(params):
        x = x @ w.astype(x.dtype) + b.astype(x.dtype)
        if i + 1 < len(params):
            x = jax.nn.relu(x)
    return x


def mlp_records(torch, rounds, peak, width=1024, depth=4, batch=256, dtype="float32"):
    """float32, or mixed precision: float32 params, `dtype` activations, float32 logits."""
    sizes = [width] * (depth + 1)
    params = mlp_init(jax.random.PRNGKey(0), sizes)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((batch, width)), dtype)
    labels = jnp.asarray(rng.integers(0, width, batch))
    opt = optax.sgd(1e-3, momentum=0.9)
    state = opt.init(params)
    ours = mlp_train_step(lambda x, p: mlp(x, p).astype(jnp.float32), opt)
    plain = mlp_train_step(lambda x, p: plain_mlp(x, p).astype(jnp.float32), opt)
    fns = {"ours": _ready(ours, params, state, x, labels),
           "xla": _ready(plain, params, state, x, labels)}
    if torch is not None:
        model = torch.nn.Sequential(*[m for i in range(depth) for m in (
            [torch.nn.Linear(width, width)] + ([torch.nn.ReLU()] if i + 1 < depth else []))])
        topt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        tx = torch.from_numpy(np.asarray(x, np.float32))
        tl = torch.from_numpy(np.asarray(labels)).long()
        autocast = dtype != "float32"

        def t_step():
            topt.zero_grad()
            with torch.autocast("cpu", dtype=getattr(torch, dtype), enabled=autocast):
                logits = model(tx.to(getattr(torch, dtype)))
            loss = torch.nn.functional.cross_entropy(logits.float(), tl)
            loss.backward()
            topt.step()
        fns["torch"] = t_step
    t, best = _interleaved(fns, rounds)
    flops = 3 * 2.0 * batch * width * width * depth
    rec = {"model": f"MLP {depth}x{width}, batch {batch}", "dtype": dtype,
           "GFLOP/s": gflops(flops, t["ours"]),
           "%peak": 100.0 * gflops(flops, t["ours"]) / peak, "ms": 1e3 * t["ours"],
           "xla ms": 1e3 * t["xla"], "vs xla": t["xla"] / t["ours"], "best vs xla": best["xla"] / best["ours"]}
    if t.get("torch"):
        rec["torch ms"] = 1e3 * t["torch"]
        rec["vs torch"] = t["torch"] / t["ours"]
        rec["best vs torch"] = best["torch"] / best["ours"]
    return [rec]


# `bench all` arguments (see __init__.py).
ALL_ARGS = ["--dtype", "all"]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jax_brgemm bench dense")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a few small shapes")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "all"],
                        help="of x, kernel, bias and dy (bfloat16: float32 accumulation; the "
                             "MLP keeps float32 params); default float32")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by process CPU seconds (run single-threaded: XLA_FLAGS="
                             "'--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'"
                             " taskset -c 0 ...); %%peak is then of one core")
    args = parser.parse_args(argv)
    global _CPU_TIME
    _CPU_TIME = args.cpu_time
    # Idle OpenMP threads must not spin on the cores XLA's pool runs on next.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch = None if args.no_torch else torch_module()
    rounds = args.rounds or (2 if args.quick else 3)
    shapes = QUICK if args.quick else [(n, c, k) for c, k in FEATURES for n in BATCHES]
    dtypes = ["float32", "bfloat16"] if args.dtype == "all" else [args.dtype]
    peaks = {d: _cpu_core_peak(d) if args.cpu_time else _machine_peak(d) for d in dtypes}
    results = {d: (layer_records(shapes, torch, rounds, peaks[d], d),
                   mlp_records(torch, rounds, peaks[d], dtype=d)) for d in dtypes}
    if args.json:
        print_records([r for d in dtypes for part in results[d] for r in part], [], True)
        return
    how = "1 core, CPU time" if args.cpu_time else "cores"
    loops = {"float32": "FMA loop", "bfloat16": "bfloat16 dot-product loop"}
    print("; ".join(f"{d} peak {peaks[d]:.0f} GFLOP/s (measured {loops[d]} x {how})" for d in dtypes)
          + f"; jax {jax.__version__}" + (f", torch {torch.__version__}" if torch else ""))
    for d in dtypes:
        layers, mlps = results[d]
        cols = ["N", "in", "out", "pass", "GFLOP/s", "%peak", "xla GFLOP/s", "vs xla"]
        if torch is not None:
            cols += ["torch GFLOP/s", "vs torch"]
        cols += ["best vs xla"] + (["best vs torch"] if torch is not None else [])
        print_records(layers, cols, False, f"dense layer ({d}, relu)")
        print()
        mcols = ["model", "ms", "GFLOP/s", "%peak", "xla ms", "vs xla"]
        if torch is not None:
            mcols += ["torch ms", "vs torch"]
        mcols += ["best vs xla"] + (["best vs torch"] if torch is not None else [])
        what = "" if d == "float32" else f", float32 params, {d} activations"
        print_records(mlps, mcols, False,
                      f"MLP training step (softmax cross-entropy, SGD momentum{what})")
        print()


if __name__ == "__main__":
    main()
