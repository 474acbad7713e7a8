"""Whole models, training and inference steps, four ways side by side in one run:

    python -m jax_brgemm bench models [--model NAME ...] [--quick] [--dtype float32|bfloat16] [--json]

- ``stock``: the model written with stock Flax NNX modules, jitted;
- ``optimize``: the same stock model with its loss (or forward) wrapped in
  ``jax_brgemm.optimize``, the one-line change;
- ``flax_layers``: the model built from ``flax_layers`` drop-ins;
- ``torch``: the same model in PyTorch (channels_last, oneDNN), where torch is installed.

Models: ResNet-18 and ResNet-50 (N=8, 224x224, BatchNorm, SGD with momentum), a 4-layer
ConvTranspose decoder (N=8, 8x8x256 to 128x128x32), the notebook MLP, CNN and character
LSTM, and a small transformer block (d=256, 4 heads, T=256, causal).
A training step is forward, backward and the optimizer update; inference is the eval-mode
forward. The variants run in alternating rounds (median of 5 for the ResNets, 7 otherwise),
so a change in the machine's load reaches all of them alike. FLOPs per step are XLA's count for the stock program (its cost analysis), so
``pct_of_peak`` is against this machine's measured float32 FMA peak on all cores.

``--dtype bfloat16`` is mixed precision: inputs, activations and the convolutions, dense
layers, batch norms and attention compute in bfloat16 (Flax modules with dtype=bfloat16,
the same for stock and flax_layers), master weights, optimizer and loss stay float32; the
torch peer runs its forward under ``torch.autocast("cpu", torch.bfloat16)``. (The LSTM
models stay float32: the stock cell is built by a lambda without a dtype.)
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flax_layers as fl
import jax_brgemm as jb

from .common import machine_peak_gflops, median_seconds_alternating, print_records, torch_module

LAYERS = {
    "stock": dict(conv=nnx.Conv, dense=nnx.Linear, bn=nnx.BatchNorm, lstm=lambda i, h, rngs: nnx.RNN(
        nnx.OptimizedLSTMCell(i, h, rngs=rngs)), attention=nnx.MultiHeadAttention,
                  conv_transpose=nnx.ConvTranspose, pool=nnx.max_pool),
    # fl.BatchNorm with relu and the residual add fused, as a user of flax_layers writes the blocks.
    "flax_layers": dict(conv=fl.Conv, dense=fl.Dense, bn=fl.BatchNorm, fused_bn=True,
                        lstm=fl.LSTM, attention=fl.MultiHeadAttention, conv_transpose=fl.ConvTranspose,
                        pool=fl.max_pool),
}
VARIANTS = ("stock", "optimize", "flax_layers", "torch")
# The layer-set entries that take a compute dtype (Flax's dtype=) under --dtype.
DTYPE_LAYERS = ("conv", "dense", "bn", "attention", "conv_transpose")


def with_dtype(L, dtype):
    """Layer set L with its DTYPE_LAYERS computing in `dtype` (parameters stay float32)."""
    if dtype == "float32":
        return L
    return {key: partial(make, dtype=jnp.dtype(dtype)) if key in DTYPE_LAYERS else make
            for key, make in L.items()}


# ------------------------------------------------------------------ Flax models


def _bn(L, channels, rngs, relu):
    """A BatchNorm; with the layer set's fused form, relu (and a residual) run inside it."""
    if L.get("fused_bn"):
        return L["bn"](channels, activation="relu" if relu else None, rngs=rngs)
    return L["bn"](channels, rngs=rngs)


def _bn_relu(fused, bn, y, residual=None):
    """relu(bn(y) [+ residual]), in one call where the BatchNorm fuses them."""
    if fused:
        return bn(y, residual=residual)
    y = bn(y)
    return nnx.relu(y if residual is None else y + residual)


class Bottleneck(nnx.Module):
    def __init__(self, L, cin, width, stride, rngs, expansion=4):
        cout = width * expansion
        self.fused = bool(L.get("fused_bn"))
        self.c1, self.b1 = L["conv"](cin, width, (1, 1), use_bias=False, rngs=rngs), _bn(L, width, rngs, True)
        self.c2 = L["conv"](width, width, (3, 3), strides=stride, use_bias=False, rngs=rngs)
        self.b2 = _bn(L, width, rngs, True)
        self.c3, self.b3 = L["conv"](width, cout, (1, 1), use_bias=False, rngs=rngs), _bn(L, cout, rngs, True)
        self.proj = self.pb = nnx.data(None)
        if stride != 1 or cin != cout:
            self.proj = nnx.data(L["conv"](cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs))
            self.pb = nnx.data(L["bn"](cout, rngs=rngs))

    def __call__(self, x):
        L = self.fused
        y = _bn_relu(L, self.b1, self.c1(x))
        y = _bn_relu(L, self.b2, self.c2(y))
        return _bn_relu(L, self.b3, self.c3(y), x if self.proj is None else self.pb(self.proj(x)))


class Basic(nnx.Module):
    def __init__(self, L, cin, width, stride, rngs):
        self.fused = bool(L.get("fused_bn"))
        self.c1 = L["conv"](cin, width, (3, 3), strides=stride, use_bias=False, rngs=rngs)
        self.b1 = _bn(L, width, rngs, True)
        self.c2, self.b2 = L["conv"](width, width, (3, 3), use_bias=False, rngs=rngs), _bn(L, width, rngs, True)
        self.proj = self.pb = nnx.data(None)
        if stride != 1 or cin != width:
            self.proj = nnx.data(L["conv"](cin, width, (1, 1), strides=stride, use_bias=False, rngs=rngs))
            self.pb = nnx.data(L["bn"](width, rngs=rngs))

    def __call__(self, x):
        L = self.fused
        y = _bn_relu(L, self.b1, self.c1(x))
        return _bn_relu(L, self.b2, self.c2(y), x if self.proj is None else self.pb(self.proj(x)))


class ResNet(nnx.Module):
    def __init__(self, L, depth, rngs, classes=1000):
        block, counts, expansion = {18: (Basic, (2, 2, 2, 2), 1), 50: (Bottleneck, (3, 4, 6, 3), 4)}[depth]
        self.fused = bool(L.get("fused_bn"))
        self.stem = L["conv"](3, 64, (7, 7), strides=2, use_bias=False, rngs=rngs)
        self.bn = _bn(L, 64, rngs, True)
        self.max_pool = L["pool"]
        blocks, cin = [], 64
        for stage, count in enumerate(counts):
            width = 64 * 2 ** stage
            for i in range(count):
                blocks.append(block(L, cin, width, 2 if i == 0 and stage > 0 else 1, rngs))
                cin = width * expansion
        self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks
        self.head = L["dense"](cin, classes, rngs=rngs)

    def __call__(self, x):
        x = _bn_relu(self.fused, self.bn, self.stem(x))
        x = self.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(axis=(1, 2)))


class MLP(nnx.Module):
    def __init__(self, L, rngs):
        self.l1, self.l2, self.l3 = (L["dense"](a, b, rngs=rngs) for a, b in ((64, 512), (512, 512), (512, 10)))

    def __call__(self, x):
        return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


class CNN(nnx.Module):
    def __init__(self, L, rngs):
        self.c1, self.c2 = L["conv"](1, 32, (3, 3), rngs=rngs), L["conv"](32, 64, (3, 3), rngs=rngs)
        self.d1, self.d2 = L["dense"](1024, 256, rngs=rngs), L["dense"](256, 10, rngs=rngs)

    def __call__(self, x):
        y = nnx.relu(self.c2(nnx.relu(self.c1(x))))
        y = nnx.avg_pool(y, (2, 2), strides=(2, 2))
        return self.d2(nnx.relu(self.d1(y.reshape(y.shape[0], -1))))


class CharLSTM(nnx.Module):
    def __init__(self, L, rngs, vocab=96):
        self.embed = nnx.Embed(vocab, 64, rngs=rngs)
        self.lstm = L["lstm"](64, 256, rngs=rngs)
        self.out = L["dense"](256, vocab, rngs=rngs)

    def __call__(self, tokens):
        return self.out(self.lstm(self.embed(tokens)))


class TransformerBlock(nnx.Module):
    """A pre-norm decoder block: causal self-attention and a gelu MLP, then a vocabulary head."""

    def __init__(self, L, rngs, d=256, heads=4, vocab=96):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.n1, self.n2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.attn = L["attention"](heads, d, decode=False, rngs=rngs)
        self.f1, self.f2 = L["dense"](d, 4 * d, rngs=rngs), L["dense"](4 * d, d, rngs=rngs)
        self.out = L["dense"](d, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        mask = nnx.make_causal_mask(tokens)
        x = x + self.attn(self.n1(x), mask=mask)
        x = x + self.f2(nnx.gelu(self.f1(self.n2(x))))
        return self.out(x)


class Decoder(nnx.Module):
    """Four ConvTranspose layers, 8x8x256 up to 128x128x32: a generator's or VAE decoder's
    shape, the convolutions XLA is slowest at on a CPU. The loss reads the 128x128 output."""

    def __init__(self, L, rngs):
        widths = (256, 128, 64, 32, 32)
        self.ups = nnx.List([L["conv_transpose"](a, b, (4, 4), strides=(2, 2), rngs=rngs)
                             for a, b in zip(widths[:-1], widths[1:])])
        self.out = L["dense"](32, 10, rngs=rngs)

    def __call__(self, z):
        for up in self.ups:
            z = nnx.relu(up(z))
        return self.out(z.mean(axis=(1, 2)))


def torch_decoder(torch):
    nn = torch.nn
    widths = (256, 128, 64, 32, 32)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):  # padding 1 with kernel 4, stride 2: Flax's SAME
        layers += [nn.ConvTranspose2d(a, b, 4, 2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def model_spec(name, quick):
    """(flax constructor(L, rngs), inputs, labels, torch constructor or None)."""
    rng = np.random.default_rng(0)
    if name in ("resnet18", "resnet50"):
        depth = int(name[6:])
        n, size = (2, 64) if quick else (8, 224)
        x = rng.standard_normal((n, size, size, 3)).astype(np.float32)
        return partial(ResNet, depth=depth), x, rng.integers(0, 1000, n), partial(torch_resnet, depth)
    if name == "decoder":
        n = 2 if quick else 8
        z = rng.standard_normal((n, 8, 8, 256)).astype(np.float32)
        return Decoder, z, rng.integers(0, 10, n), torch_decoder
    if name == "mlp":
        return MLP, rng.random((128, 64), np.float32), rng.integers(0, 10, 128), torch_mlp
    if name == "cnn":
        return CNN, rng.random((128, 8, 8, 1), np.float32), rng.integers(0, 10, 128), torch_cnn
    if name == "lstm":
        return CharLSTM, rng.integers(0, 96, (32, 64)), rng.integers(0, 96, (32, 64)), torch_lstm
    if name == "transformer":
        n, t = (2, 64) if quick else (8, 256)
        return TransformerBlock, rng.integers(0, 96, (n, t)), rng.integers(0, 96, (n, t)), torch_transformer
    raise ValueError(name)


# ------------------------------------------------------------------ JAX steps


def _loss(logits, labels):  # in float32 whatever the compute dtype
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def jax_train_step(make, L, wrap, x, labels):
    """(jitted step(params, rest, opt_state, x, labels), its arguments): forward, backward and
    SGD with momentum, the loss wrapped in `wrap` (jax_brgemm.optimize or nothing)."""
    model = make(L, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(0.01, momentum=0.9)

    def loss_fn(model, x, labels):
        return _loss(model(x), labels)

    loss_fn = wrap(loss_fn)

    @jax.jit
    def train(params, rest, opt_state, x, labels):
        model = nnx.merge(graphdef, params, rest)
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, labels)  # the canonical NNX step
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), nnx.state(model, nnx.Not(nnx.Param)), opt_state, loss

    return train, (params, rest, tx.init(params), jnp.asarray(x), jnp.asarray(labels))


def jax_runners(make, L, wrap, x, labels):
    """(train step runner, inference runner, stock-program FLOPs of each): each runner runs
    one step on fixed data and blocks until it is done."""
    train, (params, rest, opt_state, x, labels) = jax_train_step(make, L, wrap, x, labels)
    model = make(L, rngs=nnx.Rngs(0))
    graphdef = nnx.graphdef(model)
    model.eval()
    _, _, eval_rest = nnx.split(model, nnx.Param, ...)

    def forward(params, rest, x):
        return nnx.merge(graphdef, params, rest)(x)

    infer = jax.jit(wrap(forward))
    state = [params, rest, opt_state]

    def run_train():
        state[:3] = train(*state, x, labels)[:3]
        jax.block_until_ready(state[0])

    def run_infer():
        jax.block_until_ready(infer(state[0], eval_rest, x))

    flops = (_flops(train, *state, x, labels), _flops(infer, state[0], eval_rest, x))
    return run_train, run_infer, flops


def _flops(fn, *args):
    try:
        cost = fn.lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0))
    except Exception:  # cost analysis is best effort
        return 0.0


# ------------------------------------------------------------------ PyTorch peers


def torch_resnet(depth, torch):
    nn = torch.nn

    def bn(c):
        return nn.BatchNorm2d(c)

    class Block(nn.Module):
        def __init__(self, cin, width, stride, bottleneck):
            super().__init__()
            cout = width * (4 if bottleneck else 1)
            if bottleneck:
                self.body = nn.Sequential(nn.Conv2d(cin, width, 1, bias=False), bn(width), nn.ReLU(),
                                          nn.Conv2d(width, width, 3, stride, 1, bias=False), bn(width), nn.ReLU(),
                                          nn.Conv2d(width, cout, 1, bias=False), bn(cout))
            else:
                self.body = nn.Sequential(nn.Conv2d(cin, width, 3, stride, 1, bias=False), bn(width), nn.ReLU(),
                                          nn.Conv2d(width, width, 3, 1, 1, bias=False), bn(width))
            self.proj = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return torch.relu(self.body(x) + self.proj(x))

    bottleneck, counts = {18: (False, (2, 2, 2, 2)), 50: (True, (3, 4, 6, 3))}[depth]
    layers, cin = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), bn(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for stage, count in enumerate(counts):
        width = 64 * 2 ** stage
        for i in range(count):
            layers.append(Block(cin, width, 2 if i == 0 and stage > 0 else 1, bottleneck))
            cin = width * (4 if bottleneck else 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    return nn.Sequential(*layers)


def torch_mlp(torch):
    nn = torch.nn
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def torch_cnn(torch):
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10))


def torch_lstm(torch):
    nn = torch.nn

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.lstm, self.out = nn.Embedding(96, 64), nn.LSTM(64, 256, batch_first=True), nn.Linear(256, 96)

        def forward(self, tokens):
            return self.out(self.lstm(self.embed(tokens))[0])

    return Model()


def torch_transformer(torch):
    nn, F = torch.nn, torch.nn.functional

    class Model(nn.Module):
        def __init__(self, d=256, heads=4):
            super().__init__()
            self.heads = heads
            self.embed, self.n1, self.n2 = nn.Embedding(96, d), nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.f1, self.f2, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Linear(d, 96)

        def forward(self, tokens):
            x = self.embed(tokens)
            b, t, d = x.shape
            q, k, v = self.qkv(self.n1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj(a)
            x = x + self.f2(F.gelu(self.f1(self.n2(x))))
            return self.out(x)

    return Model()


def torch_runners(make, torch, x, labels, dtype="float32"):
    model = make(torch)
    # Mixed precision as torch users write it: the forward under autocast (weights stay
    # float32), the loss in float32.
    autocast = lambda: torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16")
    image = x.ndim == 4
    if image:
        model = model.to(memory_format=torch.channels_last)
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).contiguous(memory_format=torch.channels_last)
    else:
        x = torch.from_numpy(np.asarray(x))
    labels = torch.from_numpy(np.asarray(labels))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def run_train():
        model.train()
        opt.zero_grad()
        with autocast():
            logits = model(x)
        logits = logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        opt.step()

    def run_infer():
        model.eval()
        with torch.no_grad(), autocast():
            model(x)

    return run_train, run_infer


# ------------------------------------------------------------------ the table


def records(names, quick, variants=VARIANTS, dtype="float32"):
    torch = torch_module() if "torch" in variants else None
    peak = machine_peak_gflops()
    out = []
    for name in names:
        make, x, labels, make_torch = model_spec(name, quick)
        # (Token inputs stay integers; float inputs enter in the compute dtype.)
        jx = x.astype(jnp.dtype(dtype)) if np.issubdtype(x.dtype, np.floating) else x
        runners, flops, trace = {}, None, {}
        for variant in variants:
            if variant == "torch":
                if torch is not None:
                    runners["torch"] = torch_runners(make_torch, torch, x, labels, dtype)
                continue
            L = with_dtype(LAYERS["flax_layers" if variant == "flax_layers" else "stock"], dtype)
            wrap = jb.optimize if variant == "optimize" else (lambda f: f)
            start = time.perf_counter()
            train, infer, counted = jax_runners(make, L, wrap, jx, labels)
            train(), infer()  # compile (and for optimize: trace and rewrite)
            trace[variant] = time.perf_counter() - start
            runners[variant] = (train, infer)
            flops = counted if variant == "stock" else flops
        repeats = 3 if quick else 5 if name.startswith("resnet") else 7
        for step, index in (("train", 0), ("infer", 1)):
            t = median_seconds_alternating({v: r[index] for v, r in runners.items()}, repeats=repeats)
            rec = dict(model=name, step=step, batch=int(np.shape(x)[0]), dtype=dtype)
            for v in variants:
                rec[f"{v}_ms"] = 1e3 * t[v] if v in t else None
            rec["optimize_vs_stock"] = t["stock"] / t["optimize"] if "optimize" in t else None
            rec["optimize_vs_flax_layers"] = t["flax_layers"] / t["optimize"] if "optimize" in t and "flax_layers" in t else None
            rec["optimize_vs_torch"] = t["torch"] / t["optimize"] if "torch" in t else None
            rec["flax_layers_vs_torch"] = t["torch"] / t["flax_layers"] if "torch" in t and "flax_layers" in t else None
            best = min(t[v] for v in ("optimize", "flax_layers") if v in t)
            rec["pct_of_peak"] = 100 * flops[index] / best * 1e-9 / peak if flops and flops[index] else None
            rec["compile_s_optimize"] = trace.get("optimize")
            rec["compile_s_stock"] = trace.get("stock")
            out.append(rec)
    return out


MODELS = ("resnet18", "resnet50", "decoder", "mlp", "cnn", "lstm", "transformer")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jax_brgemm bench models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--quick", action="store_true", help="small images and sequences (a smoke run)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (bfloat16: mixed precision, float32 weights and loss)")
    p.add_argument("--json", action="store_true", help="print one JSON list of records")
    args = p.parse_args(argv)
    recs = records(args.model, args.quick, tuple(args.variants), args.dtype)
    print_records(recs, ["model", "step", "batch", "dtype", *[f"{v}_ms" for v in args.variants], "optimize_vs_stock",
                         "optimize_vs_flax_layers", "optimize_vs_torch", "flax_layers_vs_torch",
                         "pct_of_peak", "compile_s_stock", "compile_s_optimize"], args.json,
                  "whole models, median ms per step (stock Flax, optimize(stock), flax_layers, PyTorch):")
