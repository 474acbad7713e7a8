"""jax_brgemm.nn.batch_norm and fl.BatchNorm against a float64 reference and nnx.BatchNorm:
forward (training and eval), running averages, gradients (x, scale, bias, residual and
through the returned statistics), every ISA path, bfloat16, bad input, vmap, and data
parallelism over 4 host devices (in a fresh process)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_layers as fl
import jax_brgemm as jb
from conftest import rel_err

MOMENTUM, EPS = 0.9, 1e-5


def _inputs(rng, shape, offset=3.0):
    """x with a per-channel offset larger than its spread (where E[x^2] - E[x]^2 cancels)."""
    c = shape[-1]
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 2.0, c) + offset * rng.standard_normal(c)).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    mean = rng.standard_normal(c).astype(np.float32)
    var = rng.uniform(0.5, 2.0, c).astype(np.float32)
    return x, scale, bias, mean, var


def _reference(x, scale, bias, mean, var, residual, cts, train, relu):
    """float64 forward (y, new_mean, new_var) and its vjp to x, scale, bias, residual."""
    with jax.enable_x64(True):
        def f(x, scale, bias, residual):
            axes = tuple(range(x.ndim - 1))
            if train:
                m, v = x.mean(axes), x.var(axes)
                new_m, new_v = MOMENTUM * mean + (1 - MOMENTUM) * m, MOMENTUM * var + (1 - MOMENTUM) * v
            else:
                m, v, new_m, new_v = mean, var, mean, var
            y = (x - m) / jnp.sqrt(v + EPS) * scale + bias
            if residual is not None:
                y = y + residual
            return (jax.nn.relu(y) if relu else y), new_m, new_v

        f64 = lambda a: None if a is None else jnp.asarray(np.asarray(a, np.float64))
        mean, var = f64(mean), f64(var)
        out, vjp = jax.vjp(f, *map(f64, (x, scale, bias, residual)))
        grads = vjp(tuple(map(f64, cts)))
        return [np.asarray(o) for o in out], [None if g is None else np.asarray(g) for g in grads]


def _ours(x, scale, bias, mean, var, residual, cts, train, relu, dtype=jnp.float32):
    def f(x, scale, bias, residual):
        return jb.nn.batch_norm(x, scale, bias, mean, var, use_running_average=not train, momentum=MOMENTUM,
                                epsilon=EPS, activation="relu" if relu else None, residual=residual)

    @jax.jit
    def run(x, scale, bias, residual, cts):
        out, vjp = jax.vjp(f, x, scale, bias, residual)
        return out, vjp(cts)

    cast = lambda a: None if a is None else jnp.asarray(a, dtype)
    cts = (cast(cts[0]),) + tuple(jnp.asarray(c) for c in cts[1:])
    return run(cast(x), scale, bias, cast(residual), cts)


# (shape, relu, residual): odd channel counts leave vector tails; 576 and 243 rows span
# two chunks of rows (C=33: 512 rows a chunk, C=300: 218).
CASES = [((4, 12, 12, 33), False, False), ((3, 9, 9, 300), True, True), ((5, 7), True, False)]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,relu,res", CASES)
def test_matches_float64_reference(rng, isa, train, shape, relu, res):
    x, scale, bias, mean, var = _inputs(rng, shape)
    residual = rng.standard_normal(shape).astype(np.float32) if res else None
    cts = (rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape[-1]).astype(np.float32),
           rng.standard_normal(shape[-1]).astype(np.float32))
    (ry, rm, rv), rgrads = _reference(x, scale, bias, mean, var, residual, cts, train, relu)
    (y, m, v), grads = _ours(x, scale, bias, mean, var, residual, cts, train, relu)
    assert y.dtype == jnp.float32 and y.shape == shape
    assert rel_err(y, ry) < 1e-5
    assert rel_err(m, rm) < 1e-6 and rel_err(v, rv) < 1e-6
    for name, g, rg in zip(("x", "scale", "bias", "residual"), grads, rgrads):
        assert (g is None) == (rg is None), name
        if g is not None:
            assert rel_err(g, rg) < 2e-5, (name, rel_err(g, rg))


def test_eval_gradients_reach_the_running_statistics(rng):
    x, scale, bias, mean, var = _inputs(rng, (6, 5, 17))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    loss = lambda f: lambda m, v: jnp.vdot(f(m, v), dy)
    ours = lambda m, v: jb.nn.batch_norm(x, scale, bias, m, v, use_running_average=True, epsilon=EPS)[0]
    with jax.enable_x64(True):
        ref = lambda m, v: (x - m) / jnp.sqrt(v + EPS) * scale + bias
        rg = jax.grad(loss(ref), argnums=(0, 1))(np.float64(mean), np.float64(var))
    g = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(mean, var)
    for a, b in zip(g, rg):
        assert rel_err(a, b) < 1e-5


# ------------------------------------------------------------------ against nnx.BatchNorm


def _pair(c, **kw):
    return (nnx.BatchNorm(c, momentum=MOMENTUM, rngs=nnx.Rngs(0), **kw),
            fl.BatchNorm(c, momentum=MOMENTUM, rngs=nnx.Rngs(0), **kw))


def _randomise(rng, *modules):
    c = modules[0].num_features
    values = dict(scale=rng.uniform(0.5, 1.5, c), bias=rng.standard_normal(c))
    for m in modules:
        for name, v in values.items():
            getattr(m, name)[...] = jnp.asarray(v, jnp.float32)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "relu_add"])
def test_matches_nnx_batch_norm(rng, fused):
    stock = nnx.BatchNorm(48, momentum=MOMENTUM, rngs=nnx.Rngs(0))
    ours = fl.BatchNorm(48, momentum=MOMENTUM, activation="relu" if fused else None, rngs=nnx.Rngs(0))
    _randomise(rng, stock, ours)
    x = _inputs(rng, (4, 6, 6, 48), offset=1.0)[0]
    r = rng.standard_normal(x.shape).astype(np.float32) if fused else None
    dy = rng.standard_normal(x.shape).astype(np.float32)

    def stock_loss(m, x, r):
        y = m(x)
        return jnp.vdot(jax.nn.relu(y + r) if fused else y, dy)

    def our_loss(m, x, r):
        return jnp.vdot(m(x, residual=r) if fused else m(x), dy)

    for step in range(2):  # training steps: the running averages follow
        gs, gxs = nnx.grad(stock_loss, argnums=(0, 1))(stock, x, r)
        go, gxo = nnx.jit(nnx.grad(our_loss, argnums=(0, 1)))(ours, x, r)
        assert rel_err(gxo, gxs) < 1e-5
        for name in ("scale", "bias"):
            assert rel_err(getattr(go, name)[...], getattr(gs, name)[...]) < 1e-5, name
        for name in ("mean", "var"):
            assert rel_err(getattr(ours, name)[...], getattr(stock, name)[...]) < 1e-6, (step, name)
    stock.eval(), ours.eval()
    ys = jax.nn.relu(stock(x) + r) if fused else stock(x)
    yo = ours(x, residual=r) if fused else ours(x)
    assert rel_err(yo, ys) < 1e-6
    assert rel_err(ours(x, use_running_average=False, residual=r) if fused else ours(x, use_running_average=False),
                   jax.nn.relu(stock(x, use_running_average=False) + r) if fused
                   else stock(x, use_running_average=False)) < 1e-5


def test_state_and_fallbacks_are_the_stock_modules(rng):
    stock, ours = _pair(8, use_scale=False, use_running_average=True)
    assert jax.tree.map(jnp.shape, nnx.state(stock)) == jax.tree.map(jnp.shape, nnx.state(ours))
    x = _inputs(rng, (3, 5, 8))[0]
    assert rel_err(ours(x), stock(x)) < 1e-6
    # A feature axis other than the last runs the stock computation.
    s2, o2 = _pair(5, axis=1, use_running_average=False)
    assert rel_err(o2(x), s2(x)) < 1e-6
    with pytest.raises(ValueError, match="use_running_average"):
        fl.BatchNorm(8, rngs=nnx.Rngs(0), use_running_average=None)(x)


# ------------------------------------------------------------------ bfloat16


def _round(a):
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bfloat16_within_stock_xla_error(rng, isa_bf16, train):
    """bfloat16 x, residual and result, float32 parameters. The bound: stock nnx.BatchNorm
    (dtype=bfloat16) + relu + add in XLA on the same bfloat16 inputs, against the same
    float64 reference."""
    shape = (4, 7, 7, 36)  # vector tails on every ISA
    x, scale, bias, mean, var = _inputs(rng, shape, offset=1.0)
    x, residual = _round(x), _round(rng.standard_normal(shape))
    dy = _round(rng.standard_normal(shape))
    cts = (dy, np.zeros(36, np.float32), np.zeros(36, np.float32))
    (ry, rm, rv), rgrads = _reference(x, scale, bias, mean, var, residual, cts, train, True)
    (y, m, v), grads = _ours(x, scale, bias, mean, var, residual, cts, train, True, dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16

    def stock_f(scale, bias, x, r):
        bn = nnx.BatchNorm(36, momentum=MOMENTUM, dtype=jnp.bfloat16, use_running_average=not train,
                           rngs=nnx.Rngs(0))
        bn.scale[...], bn.bias[...], bn.mean[...], bn.var[...] = scale, bias, jnp.asarray(mean), jnp.asarray(var)
        return jax.nn.relu(bn(x) + r)

    bx, br = jnp.asarray(x, jnp.bfloat16), jnp.asarray(residual, jnp.bfloat16)
    sy, svjp = jax.vjp(stock_f, jnp.asarray(scale), jnp.asarray(bias), bx, br)
    sgrads = svjp(jnp.asarray(dy, jnp.bfloat16))
    s_err = dict(y=rel_err(sy, ry), x=rel_err(sgrads[2], rgrads[0]), residual=rel_err(sgrads[3], rgrads[3]),
                 scale=rel_err(sgrads[0], rgrads[1]), bias=rel_err(sgrads[1], rgrads[2]))
    o_err = dict(y=rel_err(y, ry), x=rel_err(grads[0], rgrads[0]), residual=rel_err(grads[3], rgrads[3]),
                 scale=rel_err(grads[1], rgrads[1]), bias=rel_err(grads[2], rgrads[2]))
    for name in o_err:
        assert o_err[name] <= 1.5 * s_err[name], (name, o_err[name], s_err[name])
    if train:
        assert rel_err(m, rm) < 1e-6 and rel_err(v, rv) < 1e-6


# ------------------------------------------------------------------ bad input


def test_bad_input_names_the_argument(rng):
    x, scale, bias, mean, var = _inputs(rng, (2, 3, 8))
    call = lambda **kw: jb.nn.batch_norm(**{**dict(x=x, scale=scale, bias=bias, mean=mean, var=var,
                                                    use_running_average=False), **kw})
    with pytest.raises(TypeError, match="x must be float32 or bfloat16"):
        call(x=x.astype(np.int32))
    with pytest.raises(ValueError, match=r"scale must have shape \(C,\)"):
        call(scale=scale[:4])
    with pytest.raises(ValueError, match="var must have shape"):
        call(var=np.ones((8, 1), np.float32))
    with pytest.raises(TypeError, match="bias must be float32"):
        call(bias=bias.astype(np.float16))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        call(residual=x[:1])
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        call(activation="gelu")
    with pytest.raises(TypeError, match="use_running_average must be a bool"):
        call(use_running_average=None)
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        call(epsilon=-1.0)
    with pytest.raises(TypeError, match="momentum must be a real number"):
        call(momentum="0.9")
    with pytest.raises(ValueError, match="x must have shape"):
        call(x=np.float32(1.0))
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        fl.BatchNorm(8, activation="tanh", rngs=nnx.Rngs(0))
    # The handlers check again: a per-channel vector of the wrong length is an error, not a crash.
    x3 = jnp.asarray(x.reshape(1, 6, 8))
    bad = jax.ffi.ffi_call("jax_brgemm_batch_norm_apply", jax.ShapeDtypeStruct(x3.shape, x3.dtype))
    with pytest.raises(Exception, match=r"b must have shape \(1, 8\)"):
        jax.block_until_ready(bad(x3, jnp.ones((1, 8)), jnp.ones((1, 7)), jnp.zeros((0,)), activation="relu"))


# ------------------------------------------------------------------ vmap


def test_vmap_gives_each_slice_its_own_statistics(rng):
    x, scale, bias, mean, var = _inputs(rng, (3, 4, 5, 24))
    scales = rng.uniform(0.5, 1.5, (3, 24)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)

    def one(x, scale):
        y, m, v = jb.nn.batch_norm(x, scale, bias, mean, var, use_running_average=False, activation="relu",
                                   momentum=MOMENTUM)
        return y, m, v

    def loss(f):
        return lambda x, s: jnp.vdot(f(x, s)[0], dy) + f(x, s)[2].sum()

    batched = jax.vmap(one)
    looped = lambda x, s: tuple(jnp.stack(o) for o in zip(*[one(x[i], s[i]) for i in range(3)]))
    for b_out, l_out in zip(jax.jit(batched)(x, scales), looped(x, scales)):
        assert rel_err(b_out, l_out) < 1e-6
    gb = jax.jit(jax.grad(loss(batched), argnums=(0, 1)))(x, scales)
    gl = jax.grad(loss(looped), argnums=(0, 1))(x, scales)
    for a, b in zip(gb, gl):
        assert rel_err(a, b) < 1e-6
    # Unbatched parameters, vmapped x and residual (eval: the rows of every slice).
    r = rng.standard_normal(x.shape).astype(np.float32)
    ev = jax.vmap(lambda x, r: jb.nn.batch_norm(x, scale, bias, mean, var, use_running_average=True,
                                                residual=r)[0])(x, r)
    ref = jb.nn.batch_norm(x, scale, bias, mean, var, use_running_average=True, residual=r)[0]
    assert rel_err(ev, ref) < 1e-7


# ------------------------------------------------------------------ data parallelism

WORKER = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flax import nnx
    import jax_brgemm as jb

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 6, 6, 32)) + 2.0).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    scale, bias = rng.uniform(0.5, 1.5, 32).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    mean, var = np.zeros(32, np.float32), np.ones(32, np.float32)

    def f(x, scale, bias, r):
        y, m, v = jb.nn.batch_norm(x, scale, bias, mean, var, use_running_average=False, activation="relu",
                                   residual=r, momentum=0.9)
        return jnp.vdot(y, dy) + m.sum() + v.sum(), (y, m, v)

    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
    (loss, (y, m, v)), grads = step(x, scale, bias, r)

    mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("batch")))
    (loss4, (y4, m4, v4)), grads4 = step(shard(x), scale, bias, shard(r))
    assert rel(y4, y) < 1e-6 and rel(m4, m) < 1e-6 and rel(v4, v) < 1e-6, "sharded forward differs"
    for g4, g in zip(grads4, grads):
        assert rel(g4, g) < 1e-5, "sharded gradient differs"
    assert y4.sharding.spec[0] == "batch", y4.sharding
    hlo = step.lower(shard(x), scale, bias, shard(r)).compile().as_text()
    assert "all-gather" not in hlo, "the batch is gathered"
    assert "all-reduce" in hlo, "no all-reduce of the statistics"
    print("jit ok")

    # shard_map with axis_name: the statistics (and dx) are the global batch's, as
    # nnx.BatchNorm(axis_name=...) gives; the parameter gradients are per device.
    def local(x, scale, bias, r, dy, use_ours):
        if use_ours:
            y, m, v = jb.nn.batch_norm(x, scale, bias, mean, var, use_running_average=False, activation="relu",
                                       residual=r, momentum=0.9, axis_name="batch")
            return y, m, v
        bn = nnx.BatchNorm(32, momentum=0.9, axis_name="batch", rngs=nnx.Rngs(0))
        bn.scale[...], bn.bias[...] = scale, bias
        y = jax.nn.relu(bn(x) + r)
        return y, bn.mean[...], bn.var[...]

    def grads_of(use_ours):
        def g(x, scale, bias, r, dy):
            out, vjp = jax.vjp(lambda *a: local(*a, dy, use_ours), x, scale, bias, r)
            return out, vjp((dy, jnp.zeros(32), jnp.zeros(32)))
        return jax.jit(jax.shard_map(g, mesh=mesh, in_specs=(P("batch"), P(), P(), P("batch"), P("batch")),
                                     out_specs=((P("batch"), P(), P()), (P("batch"), P("batch"), P("batch"),
                                                P("batch"))), check_vma=False))

    # per-device parameter gradients come back stacked along the batch spec
    mine, theirs = grads_of(True)(x, scale, bias, r, dy), grads_of(False)(x, scale, bias, r, dy)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs)):
        assert rel(a, b) < 1e-5, ("shard_map differs", rel(a, b))
    assert rel(mine[0][0], y) < 1e-6, "shard_map statistics are not the global batch's"
    print("shard_map ok")
""")


def test_four_devices_use_global_statistics():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "jit ok" in result.stdout and "shard_map ok" in result.stdout
