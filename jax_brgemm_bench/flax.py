"""Training-step time of each notebook's model built from flax_layers against the same model
built from stock Flax NNX modules, side by side in one run.

    python -m jax_brgemm bench flax [--json] [--quick]

Models (shapes as in notebooks/): the digits MLP (64-512-512-10), the digits CNN (two 3x3
convs, 32 and 64 channels, on 8x8 images, then 256 and 10 dense units) and the character
LSTM language model (embedding 64, LSTM 512, sequences of 64 characters). One training step
is forward, backward and an optax Adam update in one jitted function (nnx.split / merge
around jax.jit). ``ours`` swaps only the modules (a drop-in); ``ours_fused`` also passes
``activation="relu"`` so the activation runs in the kernel's epilogue.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flax_layers as fl

from .common import median_cpu_seconds, median_seconds, print_records

VOCAB = 96


def stock_lstm(in_features, hidden, *, rngs):
    return nnx.RNN(nnx.OptimizedLSTMCell(in_features, hidden, rngs=rngs))


# The module sets a model is built from: the stock ones, ours as a drop-in, ours with the
# activation fused (the "act" entry names the activation the layer applies itself).
LAYERS = {
    "stock": dict(dense=nnx.Linear, conv=nnx.Conv, lstm=stock_lstm, fused=False),
    "ours": dict(dense=fl.Dense, conv=fl.Conv, lstm=fl.LSTM, fused=False),
    "ours_fused": dict(dense=fl.Dense, conv=fl.Conv, lstm=fl.LSTM, fused=True),
}


def _relu_layer(layers, make, *args, rngs):
    """make(*args) followed by relu: fused into our layer, or applied after it."""
    if layers["fused"]:
        return make(*args, activation="relu", rngs=rngs), lambda y: y
    return make(*args, rngs=rngs), nnx.relu


class MLP(nnx.Module):
    def __init__(self, layers, hidden=512, *, rngs):
        self.l1, self.a1 = _relu_layer(layers, layers["dense"], 64, hidden, rngs=rngs)
        self.l2, self.a2 = _relu_layer(layers, layers["dense"], hidden, hidden, rngs=rngs)
        self.out = layers["dense"](hidden, 10, rngs=rngs)

    def __call__(self, x):  # (N, 64)
        return self.out(self.a2(self.l2(self.a1(self.l1(x)))))


class CNN(nnx.Module):
    def __init__(self, layers, *, rngs):
        self.c1, self.a1 = _relu_layer(layers, layers["conv"], 1, 32, (3, 3), rngs=rngs)
        self.c2, self.a2 = _relu_layer(layers, layers["conv"], 32, 64, (3, 3), rngs=rngs)
        self.d1, self.a3 = _relu_layer(layers, layers["dense"], 4 * 4 * 64, 256, rngs=rngs)
        self.out = layers["dense"](256, 10, rngs=rngs)

    def __call__(self, x):  # (N, 8, 8, 1)
        y = self.a2(self.c2(self.a1(self.c1(x))))
        y = nnx.avg_pool(y, (2, 2), strides=(2, 2))
        return self.out(self.a3(self.d1(y.reshape(y.shape[0], -1))))


class CharLSTM(nnx.Module):
    def __init__(self, layers, vocab=VOCAB, embed=64, hidden=256, *, rngs):
        self.embed = nnx.Embed(vocab, embed, rngs=rngs)
        self.lstm = layers["lstm"](embed, hidden, rngs=rngs)
        self.out = layers["dense"](hidden, vocab, rngs=rngs)

    def __call__(self, tokens):  # (N, T) integers -> (N, T, vocab) logits
        return self.out(self.lstm(self.embed(tokens)))


def train_step(model, optimizer):
    """A jitted ``step(params, rest, opt_state, x, labels) -> (params, rest, opt_state, loss)``
    and its initial ``(params, rest, opt_state)``: forward, backward and the optax update.
    ``rest`` is the model's non-parameter state (e.g. nnx.RNN's rng counter)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(model, x, labels):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

    @jax.jit
    def step(params, rest, opt_state, x, labels):
        model = nnx.merge(graphdef, params, rest)
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), nnx.state(model, nnx.Not(nnx.Param)), opt_state, loss

    return step, (params, rest, optimizer.init(params))


def model_data(name, rng, batch=None):
    """(model class, inputs, labels, training FLOPs per step (forward + backward, the
    matmul / conv / LSTM work)) for the notebook model `name`."""
    if name == "mlp":
        n = batch or 128
        x = rng.random((n, 64), np.float32)
        flops = 2 * n * (64 * 512 + 512 * 512 + 512 * 10) * 3
        return MLP, x, rng.integers(0, 10, n), flops
    if name == "cnn":
        n = batch or 128
        x = rng.random((n, 8, 8, 1), np.float32)
        flops = 2 * n * (64 * 9 * 1 * 32 + 64 * 9 * 32 * 64 + 1024 * 256 + 256 * 10) * 3
        return CNN, x, rng.integers(0, 10, n), flops
    if name == "lstm":
        n, t = batch or 32, 64
        tokens = rng.integers(0, VOCAB, (n, t))
        flops = 2 * n * t * (64 * 1024 + 256 * 1024 + 256 * VOCAB) * 3
        return CharLSTM, tokens, rng.integers(0, VOCAB, (n, t)), flops
    raise ValueError(name)


def step_runner(model_cls, layers, x, labels):
    """A function running one training step of the model built from LAYERS[layers] (compiled
    once here) and blocking until it is done."""
    model = model_cls(LAYERS[layers], rngs=nnx.Rngs(0))
    step, (params, rest, opt_state) = train_step(model, optax.adam(1e-3))
    x, labels = jnp.asarray(x), jnp.asarray(labels)
    state = [params, rest, opt_state]

    def run():
        state[:3] = step(*state, x, labels)[:3]
        jax.block_until_ready(state[0])

    run()
    return run


def records(names, repeats, rounds, cpu_time=False) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for name in names:
        model_cls, x, labels, flops = model_data(name, rng)
        runners = {k: step_runner(model_cls, k, x, labels) for k in LAYERS}
        # Alternating rounds, median over all of them: the machine is shared and noisy.
        times = {k: [] for k in LAYERS}
        measure = median_cpu_seconds if cpu_time else median_seconds
        for _ in range(rounds):
            for k, run in runners.items():
                times[k].append(measure(run, repeats=repeats, min_seconds=0.02))
        t = {k: float(np.median(v)) for k, v in times.items()}
        out.append(dict(model=name, batch=int(x.shape[0]), stock_ms=1e3 * t["stock"],
                        ours_ms=1e3 * t["ours"], ours_fused_ms=1e3 * t["ours_fused"],
                        speedup=t["stock"] / t["ours"], speedup_fused=t["stock"] / t["ours_fused"],
                        stock_gflops=flops / t["stock"] * 1e-9, ours_gflops=flops / t["ours"] * 1e-9))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m jax_brgemm bench flax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON list of records")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    p.add_argument("--model", choices=["mlp", "cnn", "lstm", "all"], default="all")
    p.add_argument("--cpu-time", action="store_true",
                   help="time by process CPU seconds, steadier on a shared machine (run single-threaded: "
                        "XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1' "
                        "taskset -c 0 ...)")
    args = p.parse_args(argv)
    names = ["mlp", "cnn", "lstm"] if args.model == "all" else [args.model]
    recs = records(names, repeats=3 if args.quick else 5, rounds=2 if args.quick else 7, cpu_time=args.cpu_time)
    print_records(recs, ["model", "batch", "stock_ms", "ours_ms", "ours_fused_ms", "speedup",
                         "speedup_fused", "stock_gflops", "ours_gflops"], args.json,
                  "training step (forward + backward + Adam), flax_layers vs stock Flax NNX, median "
                  f"{'CPU' if args.cpu_time else 'wall'} ms per step:")
