"""Data-parallel training of a Flax model built from flax_layers, with JAX's own sharding.

One machine, N host devices (one per core, say):
    python examples/data_parallel.py --devices 2 --model cnn
Several processes (here two on localhost, each with one device):
    python examples/data_parallel.py --num-processes 2 --process-id 0 --coordinator 127.0.0.1:7777 &
    python examples/data_parallel.py --num-processes 2 --process-id 1 --coordinator 127.0.0.1:7777

The global batch is sharded along a "batch" mesh axis; parameters are replicated. The
jax_brgemm custom calls run on each device's shard and their weight gradients are
all-reduced (see jax_brgemm/_sharding.py), so the step below is ordinary jitted JAX.
--stock swaps in the stock Flax modules, sharded the same way, for comparison.
"""

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=0, help="host devices to create in this process")
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--batch", type=int, default=256, help="global batch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--stock", action="store_true", help="stock flax.nnx layers instead of flax_layers")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--coordinator", default="127.0.0.1:7777")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={ARGS.devices}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

if ARGS.num_processes > 1:
    jax.distributed.initialize(ARGS.coordinator, num_processes=ARGS.num_processes,
                               process_id=ARGS.process_id)

import flax_layers  # noqa: E402


def layers_module(stock):
    return nnx if stock else flax_layers


class MLP(nnx.Module):
    def __init__(self, stock, rngs):
        L = layers_module(stock)
        linear = L.Linear if stock else L.Dense
        self.layers = nnx.List([linear(64, 512, rngs=rngs), linear(512, 512, rngs=rngs),
                                linear(512, 10, rngs=rngs)])

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


class CNN(nnx.Module):
    def __init__(self, stock, rngs):
        L = layers_module(stock)
        self.conv1 = L.Conv(1, 32, (3, 3), rngs=rngs)
        self.conv2 = L.Conv(32, 64, (3, 3), rngs=rngs)
        self.head = (L.Linear if stock else L.Dense)(64 * 8 * 8, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        return self.head(x.reshape(x.shape[0], -1))


def digits(batch, seed=0):
    """scikit-learn's 8x8 digits (shipped with the package), repeated to fill the batch."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    idx = np.random.default_rng(seed).integers(0, len(y), batch)
    return x[idx], y[idx]


def main():
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    model = (CNN if ARGS.model == "cnn" else MLP)(ARGS.stock, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    optimizer = optax.sgd(0.1, momentum=0.9)
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(optimizer.init(params), replicated)

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # Each process contributes its slice of the global batch.
    x, y = digits(ARGS.batch)
    per = ARGS.batch // jax.process_count()
    lo = jax.process_index() * per
    x = jax.make_array_from_process_local_data(sharded, x[lo:lo + per], x.shape)
    y = jax.make_array_from_process_local_data(sharded, y[lo:lo + per], y.shape)

    times = []
    for i in range(ARGS.steps):
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, x, y)
        loss = float(loss)
        times.append(time.perf_counter() - start)
        if jax.process_index() == 0:
            print(f"step {i:3d} loss {loss:.6f}")
    if jax.process_index() == 0:
        median_ms = 1e3 * float(np.median(times[1:])) if len(times) > 1 else float("nan")
        print(f"devices {jax.device_count()} processes {jax.process_count()} "
              f"model {ARGS.model} {'stock' if ARGS.stock else 'flax_layers'} "
              f"step_ms {median_ms:.3f} final_loss {loss:.6f}")
    if ARGS.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
