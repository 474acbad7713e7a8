"""Run in a fresh process (device count and jax.distributed must be set before JAX starts).

    python sharding_worker.py devices N         N host devices: sharded == unsharded, no all-gather,
                                                under Auto and under Explicit mesh axes
    python sharding_worker.py process I N PORT  process I of N on localhost; prints the loss
"""

import contextlib
import os
import sys

mode = sys.argv[1]
if mode == "devices":
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[2]}"
else:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

if mode == "process":
    process_id, num_processes, port = map(int, sys.argv[2:5])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)

import jax_brgemm as jb  # noqa: E402

BATCH = 8


def data():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((BATCH, 3, 16, 32)).astype(np.float32)
    b = rng.standard_normal((3, 32, 24)).astype(np.float32) * 0.2
    bias = rng.standard_normal(24).astype(np.float32)
    return a, b, bias


def loss(a, b, bias):
    return jnp.mean(jb.brgemm(a, b, epilogue="tanh", bias=bias) ** 2)


def rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(x - y) / np.linalg.norm(y)


def check_devices():
    a, b, bias = data()
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    a_sharded = jax.device_put(a, NamedSharding(mesh, P("batch")))
    forward = jax.jit(lambda a, b: jb.brgemm(a, b, epilogue="relu"))
    out = forward(a_sharded, b)
    assert rel(out, forward(a, b)) < 1e-6, "sharded forward differs"
    assert out.sharding.spec[0] == "batch", f"output not batch-sharded: {out.sharding}"
    hlo = forward.lower(a_sharded, b).compile().as_text()
    assert "all-gather" not in hlo, "forward gathers the batch"

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    (value, grads), (ref_value, ref_grads) = step(a_sharded, b, bias), step(a, b, bias)
    assert rel(value, ref_value) < 1e-6
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < 1e-5, "sharded gradient differs"
    hlo = step.lower(a_sharded, b, bias).compile().as_text()
    assert "all-gather" not in hlo, "training step gathers the batch"
    assert "all-reduce" in hlo, "weight gradients are not reduced across shards"

    check_layers(mesh)
    check_explicit()
    check_attention_heads()

    # Inside shard_map the op sees local shards and needs nothing special.
    local = jax.jit(jax.shard_map(lambda a: jb.brgemm(a, b), mesh=mesh, in_specs=P("batch"),
                                  out_specs=P("batch")))
    assert rel(local(a_sharded), forward(a, b) * 0 + jb.brgemm(a, b)) < 1e-6
    print("devices ok")


LAYERS = {}  # name -> (init(rng) -> (x, params), apply(x, params))


def layer(name):
    def register(fn):
        LAYERS[name] = fn
        return fn
    return register


@layer("brgemm")
def brgemm_case(rng):
    x = rng.standard_normal((BATCH, 3, 4, 10)).astype(np.float32)
    params = (0.3 * rng.standard_normal((3, 10, 6)).astype(np.float32),
              rng.standard_normal(6).astype(np.float32))
    apply = lambda x, p: jb.brgemm(x, p[0], bias=p[1], epilogue="sigmoid")
    return x, params, apply


@layer("conv2d")
def conv_case(rng):
    x = rng.standard_normal((BATCH, 9, 9, 5)).astype(np.float32)
    params = (0.3 * rng.standard_normal((3, 3, 5, 7)).astype(np.float32),
              rng.standard_normal(7).astype(np.float32))
    apply = lambda x, p: jb.nn.conv2d(x, p[0], p[1], strides=2, activation="relu")
    return x, params, apply


@layer("dense")
def dense_case(rng):
    x = rng.standard_normal((BATCH, 3, 20)).astype(np.float32)
    params = (0.3 * rng.standard_normal((20, 33)).astype(np.float32),
              rng.standard_normal(33).astype(np.float32))
    apply = lambda x, p: jb.nn.dense(x, p[0], p[1], activation="gelu")
    return x, params, apply


@layer("lstm")
def lstm_case(rng):
    x = rng.standard_normal((BATCH, 5, 6)).astype(np.float32)
    params = tuple(0.3 * rng.standard_normal(s).astype(np.float32) for s in [(6, 28), (7, 28), (28,)])
    apply = lambda x, p: jb.nn.lstm(x, *p)[0]
    return x, params, apply


@layer("lstm time-major")
def lstm_time_major_case(rng):
    # The batch is dim 1 of a time-major sequence: transposed inside, so dim 0 of the
    # argument the test shards is still the batch.
    x, params, _ = lstm_case(rng)
    apply = lambda x, p: jnp.swapaxes(jb.nn.lstm(jnp.swapaxes(x, 0, 1), *p, time_major=True)[0], 0, 1)
    return x, params, apply


def check_layers(mesh):
    """Each layer op: sharded forward and training step equal the unsharded ones, and the
    compiled HLO gathers no activations (weights are replicated, their gradients reduced)."""
    rng = np.random.default_rng(1)
    for name, case in LAYERS.items():
        x, params, apply = case(rng)
        x_sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))
        forward = jax.jit(apply)
        out = forward(x_sharded, params)
        assert rel(out, forward(x, params)) < 1e-5, f"{name}: forward differs"
        assert out.sharding.spec[0] == "batch", f"{name}: output not batch-sharded: {out.sharding}"
        assert "all-gather" not in forward.lower(x_sharded, params).compile().as_text(), \
            f"{name}: forward gathers the batch"
        step = jax.jit(jax.value_and_grad(lambda p, x: jnp.mean(apply(x, p) ** 2)))
        (value, grads), (ref_value, ref_grads) = step(params, x_sharded), step(params, x)
        assert rel(value, ref_value) < 1e-5, f"{name}: loss differs"
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert rel(g, r) < 1e-5, f"{name}: gradient differs"
        hlo = step.lower(params, x_sharded).compile().as_text()
        assert "all-gather" not in hlo, f"{name}: training step gathers the batch"
        assert "all-reduce" in hlo, f"{name}: weight gradients are not reduced"
        print(f"{name} ok")


def check_explicit():
    """Under a mesh with Explicit axes (jax.make_mesh's default), where shardings are part of
    the types: the same checks, and the gradients come back typed like their inputs."""
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.sharding.use_mesh(mesh) if not hasattr(jax, "set_mesh") else jax.set_mesh(mesh):
        check_layers(mesh)
        x, params, apply = brgemm_case(np.random.default_rng(2))
        x_sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))
        grads = jax.jit(jax.grad(lambda x, p: jnp.sum(apply(x, p)), argnums=(0, 1)))(x_sharded, params)
        assert jax.typeof(grads[0]).sharding.spec[0] == "batch", jax.typeof(grads[0])
        assert all(s is None for s in jax.typeof(grads[1][0]).sharding.spec), jax.typeof(grads[1][0])
        # An addend whose type is not split (a replicated c) beside a split batch: its
        # gradient keeps c's type, and the values match the unsharded op's.
        c = np.random.default_rng(3).standard_normal((BATCH, 4, 6)).astype(np.float32)
        f = lambda x, c: jnp.sum(jnp.sin(jb.brgemm(x, params[0], c, beta=0.5)))  # noqa: E731
        grad = jax.jit(jax.grad(f, argnums=(0, 1)))
        g_sharded, g_plain = grad(x_sharded, c), jax.grad(f, argnums=(0, 1))(x, c)
        types = grad.trace(x_sharded, c).jaxpr.out_avals  # what custom_vjp checks
        assert types[0].sharding.spec[0] == "batch", types
        assert all(s is None for s in types[1].sharding.spec), types
        assert rel(g_sharded[0], g_plain[0]) < 1e-5 and rel(g_sharded[1], g_plain[1]) < 1e-5
    # Arrays put on an Explicit mesh without a mesh context: the types alone carry the mesh.
    rng = np.random.default_rng(4)
    for name in ("dense", "lstm"):
        x, params, apply = LAYERS[name](rng)
        x_sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))
        step = jax.jit(jax.grad(lambda p, x: jnp.mean(apply(x, p) ** 2)))
        for g, r in zip(jax.tree.leaves(step(params, x_sharded)), jax.tree.leaves(step(params, x))):
            assert rel(g, r) < 1e-5, f"{name} without a mesh context: gradient differs"
    print("explicit ok")


def attention_case(rng, kv_heads):
    """Batch 4, 16 queries and 12 keys, 4 query heads of 8 over `kv_heads` K/V heads, a bias
    broadcast over the batch (its gradient a sum over the batch shards)."""
    q = rng.standard_normal((4, 16, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((4, 12, kv_heads, 8)).astype(np.float32) for _ in range(2))
    bias = rng.standard_normal((1, 4, 16, 12)).astype(np.float32)
    return q, k, v, bias


def check_attention_heads():
    """Attention split along the batch and the heads (tensor parallelism) on a 2 x 2 mesh,
    Auto and Explicit: values and gradients equal the unsharded op's, outputs keep both
    splits, nothing is gathered, and the bias gradient is reduced over the batch. K/V
    heads that the split does not divide (one head: replicated; three: not split)."""
    f = lambda q, k, v, b: jb.nn.dot_product_attention(q, k, v, bias=b, is_causal=True)  # noqa: E731
    loss = lambda *a: jnp.mean(f(*a) ** 2)  # noqa: E731  (no cancellation in the sum)
    rng = np.random.default_rng(5)
    for axis_type in (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit):
        mesh = jax.make_mesh((2, 2), ("batch", "heads"), axis_types=(axis_type,) * 2)
        put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
        qkv_spec = P("batch", None, "heads", None)
        in_context = lambda: (jax.set_mesh(mesh) if axis_type == jax.sharding.AxisType.Explicit  # noqa: E731
                              else contextlib.nullcontext())
        with in_context():
            for kv_heads in (4, 2, 1):
                q, k, v, bias = attention_case(rng, kv_heads)
                kv_spec = qkv_spec if kv_heads > 1 else P("batch")
                args = (put(q, qkv_spec), put(k, kv_spec), put(v, kv_spec), put(bias, P(None, "heads")))
                forward, step = jax.jit(f), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
                out = forward(*args)
                assert rel(out, f(q, k, v, bias)) < 1e-5, f"K={kv_heads} {axis_type}: sharded attention differs"
                assert tuple(out.sharding.spec)[:3] == ("batch", None, "heads"), out.sharding
                (value, grads), (ref_value, ref_grads) = step(*args), step(q, k, v, bias)
                assert rel(value, ref_value) < 1e-5, f"K={kv_heads} {axis_type}: loss {value} != {ref_value}"
                for g, r in zip(grads, ref_grads):
                    assert rel(g, r) < 1e-5, f"K={kv_heads} {axis_type}: sharded gradient differs"
                hlo = step.lower(*args).compile().as_text()
                assert "all-gather" not in hlo, f"K={kv_heads} {axis_type}: the step gathers"
                assert "all-reduce" in hlo, "the bias gradient is not reduced over the batch"
            # Three K/V heads do not split two ways: the heads stay whole, the values right.
            q6 = rng.standard_normal((4, 16, 6, 8)).astype(np.float32)
            k3, v3 = (rng.standard_normal((4, 12, 3, 8)).astype(np.float32) for _ in range(2))
            plain = lambda q, k, v: jb.nn.dot_product_attention(q, k, v)  # noqa: E731
            out = jax.jit(plain)(put(q6, qkv_spec), put(k3, P("batch")), put(v3, P("batch")))
            assert rel(out, plain(q6, k3, v3)) < 1e-5, f"{axis_type}: uneven K/V heads differ"
    print("attention heads ok")


def run_process():
    a, b, bias = data()
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("batch"))
    per_process = BATCH // jax.process_count()
    local = a[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
    a_global = jax.make_array_from_process_local_data(sharding, local, a.shape)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=1))(a_global, b, bias)
    grad_norm = float(jnp.linalg.norm(grads))
    print(f"loss {float(value):.7f} grad_norm {grad_norm:.7f}")
    jax.distributed.shutdown()


if __name__ == "__main__":
    check_devices() if mode == "devices" else run_process()
