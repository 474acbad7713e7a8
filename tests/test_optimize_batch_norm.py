"""jax_brgemm.optimize on training-mode batch norm as stock modules write it (nnx, linen,
Haiku): one nn.batch_norm call with relu and the residual add fused, the same output,
gradients and running averages as the unrewritten function (float64 reference for the
forward and the statistics), and the stock eqns kept where the pattern's intermediates are
read elsewhere."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import jax_brgemm as jb

RTOL = 3e-5


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def inputs(seed, shape=(4, 5, 6, 8), offset=2.0):
    """x with a per-channel offset (where E[x^2] - E[x]^2 loses digits), a residual."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.standard_normal(shape) * rng.uniform(0.5, 2.0, c) + offset * rng.standard_normal(c)
    return jnp.asarray(x, jnp.float32), jnp.asarray(rng.standard_normal(shape), jnp.float32)


def reference(x, scale, bias, mean, var, residual, momentum, epsilon, relu):
    """float64 (y, new running mean, new running var)."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    mu, v = x.mean(axes), x.var(axes)
    y = (x - mu) / np.sqrt(v + epsilon)
    y = y * (1.0 if scale is None else np.asarray(scale, np.float64))
    y = y + (0.0 if bias is None else np.asarray(bias, np.float64))
    if residual is not None:
        y = y + np.asarray(residual, np.float64)
    if relu:
        y = np.maximum(y, 0.0)
    return y, momentum * np.asarray(mean, np.float64) + (1 - momentum) * mu, \
        momentum * np.asarray(var, np.float64) + (1 - momentum) * v


def fresh(state):
    """New Variables with state's values (merge would share and update state's own)."""
    return jax.tree.map(lambda v: v, state)


def batch_norm_decisions(explanation):
    return [d for d in explanation.decisions if d.primitive == "batch_norm"]


VARIANTS = {  # name: (relu, residual)
    "bn": (False, False), "relu": (True, False), "add": (False, True), "relu(add)": (True, True),
}


def check_nnx(bn, x, r, relu, residual, fused, rtol=RTOL):
    """optimize(f) == f for one nnx.BatchNorm call (values, running averages, gradients of
    the parameters, x and the residual) and the float64 reference; the call is served."""
    graph, state = nnx.split(bn)

    def f(state, x, r):
        m = nnx.merge(graph, fresh(state))
        y = m(x)
        y = y + r if residual else y
        y = jax.nn.relu(y) if relu else y
        return y, nnx.state(m, nnx.BatchStat)

    opt = jb.optimize(f, min_macs=0)
    (y, stats), (y0, stats0) = opt(state, x, r), f(state, x, r)
    assert y.dtype == y0.dtype
    assert rel(y, y0) < rtol
    ref = reference(x, None if bn.scale is None else bn.scale[...], None if bn.bias is None else bn.bias[...],
                    bn.mean[...], bn.var[...], r if residual else None, bn.momentum, bn.epsilon, relu)
    assert rel(y, ref[0]) < rtol
    for got, want, exact in ((stats["mean"], ref[1], stats0["mean"]), (stats["var"], ref[2], stats0["var"])):
        assert rel(got[...], want) < 1e-6 and rel(got[...], exact[...]) < 1e-6
    params = nnx.state(nnx.merge(graph, fresh(state)), nnx.Param)
    rest = nnx.state(nnx.merge(graph, fresh(state)), nnx.BatchStat)

    def loss(fun):
        def g(params, x, r):
            y, _ = fun(nnx.merge_state(params, rest), x, r)
            return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)
        return g

    want = jax.grad(loss(f), (0, 1, 2))(params, x, r)
    got = jax.jit(jax.grad(loss(opt), (0, 1, 2)))(params, x, r)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert rel(g, w) < 10 * rtol
    (d,) = batch_norm_decisions(opt.explain(state, x, r))
    assert d.op == "nn.batch_norm" and d.fused == fused, d


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fast", [True, False])
def test_nnx_batch_norm_variants(variant, fast):
    relu, residual = VARIANTS[variant]
    x, r = inputs(0)
    bn = nnx.BatchNorm(8, use_running_average=False, use_fast_variance=fast, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 8), jnp.float32)
    bn.bias[...] = jnp.asarray(rng.standard_normal(8), jnp.float32)
    bn.mean[...] = jnp.asarray(rng.standard_normal(8), jnp.float32)
    fused = (("residual",) if residual else ()) + (("relu",) if relu else ())
    check_nnx(bn, x, r, relu, residual, fused)


@pytest.mark.parametrize("use_scale, use_bias", [(False, True), (True, False), (False, False)])
def test_nnx_without_scale_or_bias_any_epsilon_momentum(use_scale, use_bias):
    x, r = inputs(2, (6, 7, 16))
    bn = nnx.BatchNorm(16, use_running_average=False, use_scale=use_scale, use_bias=use_bias,
                       epsilon=1e-3, momentum=0.7, rngs=nnx.Rngs(0))
    check_nnx(bn, x, r, True, True, ("residual", "relu"))


def test_nnx_two_dimensional_input():
    x, r = inputs(3, (32, 24))
    bn = nnx.BatchNorm(24, use_running_average=False, rngs=nnx.Rngs(0))
    check_nnx(bn, x, r, True, False, ("relu",))


def test_nnx_bfloat16_input():
    """bfloat16 x with float32 parameters: nnx upcasts x; the op reads the bfloat16 data."""
    x, r = inputs(4)
    x = x.astype(jnp.bfloat16)
    bn = nnx.BatchNorm(8, use_running_average=False, rngs=nnx.Rngs(0))
    check_nnx(bn, x, r, True, True, ("residual", "relu"))
    graph, state = nnx.split(bn)
    f = lambda s, x: nnx.merge(graph, s)(x)  # noqa: E731
    (d,) = batch_norm_decisions(jb.explain(jb.optimize(f, min_macs=0), state, x))
    assert d.dtype == "bfloat16" and d.served


def test_nnx_computing_in_bfloat16():
    """dtype=bfloat16: nnx upcasts x twice (statistics, normalisation), rounds the parameters
    to bfloat16 and the result back; the call reads the bfloat16 x and returns bfloat16."""
    x, r = inputs(11)
    x, r = x.astype(jnp.bfloat16), r.astype(jnp.bfloat16)
    bn = nnx.BatchNorm(8, use_running_average=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    bn.scale[...] = jnp.linspace(0.5, 1.5, 8)
    graph, state = nnx.split(bn)

    def f(state, x, r):
        m = nnx.merge(graph, fresh(state))
        return jax.nn.relu(m(x) + r), nnx.state(m, nnx.BatchStat)

    opt = jb.optimize(f, min_macs=0)
    (y, stats), (y0, stats0) = opt(state, x, r), f(state, x, r)
    assert y.dtype == y0.dtype == jnp.bfloat16
    assert rel(y, y0) < 1e-2  # the stock rounds before the residual add, the call after
    for name in ("mean", "var"):
        assert rel(stats[name][...], stats0[name][...]) < 1e-5
    (d,) = batch_norm_decisions(opt.explain(state, x, r))
    assert d.served and d.dtype == "bfloat16" and d.fused == ("residual", "relu")
    assert "jax_brgemm_batch_norm_apply" in jax.jit(opt).lower(state, x, r).as_text()


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("use_scale", [True, False])
def test_linen_batch_norm_relu_residual(fast, use_scale):
    class Block(linen.Module):
        @linen.compact
        def __call__(self, x, r):
            bn = linen.BatchNorm(use_running_average=False, use_fast_variance=fast, use_scale=use_scale,
                                 momentum=0.9, epsilon=1e-4)
            return linen.relu(bn(x) + r)

    x, r = inputs(5)
    model = Block()
    variables = model.init(jax.random.key(0), x, r)
    params = jax.tree.map(lambda p: p + 0.3, variables["params"])

    def f(params, x, r):
        return model.apply({**variables, "params": params}, x, r, mutable=["batch_stats"])

    opt = jb.optimize(f, min_macs=0)
    (y, new), (y0, new0) = opt(params, x, r), f(params, x, r)
    bn_params = params["BatchNorm_0"]
    stats = variables["batch_stats"]["BatchNorm_0"]
    ref = reference(x, bn_params.get("scale"), bn_params["bias"], stats["mean"], stats["var"], r, 0.9, 1e-4, True)
    assert rel(y, y0) < RTOL and rel(y, ref[0]) < RTOL
    for name, want in (("mean", ref[1]), ("var", ref[2])):
        assert rel(new["batch_stats"]["BatchNorm_0"][name], want) < 1e-6
    loss = lambda fun: lambda p, x, r: jnp.sum(jnp.sin(fun(p, x, r)[0]))  # noqa: E731
    want = jax.grad(loss(f), (0, 1, 2))(params, x, r)
    got = jax.jit(jax.grad(loss(opt), (0, 1, 2)))(params, x, r)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert rel(g, w) < 10 * RTOL
    (d,) = batch_norm_decisions(opt.explain(params, x, r))
    assert d.served and d.fused == ("residual", "relu")


def test_haiku_batch_norm():
    hk = pytest.importorskip("haiku")  # a test extra
    x, _ = inputs(6)

    def net(x):
        return jax.nn.relu(hk.BatchNorm(True, True, 0.9, eps=1e-5)(x, is_training=True))

    t = hk.transform_with_state(net)
    params, state = t.init(jax.random.key(0), x)
    f = lambda p, s, x: t.apply(p, s, None, x)  # noqa: E731
    opt = jb.optimize(f, min_macs=0)
    (y, new), (y0, new0) = opt(params, state, x), f(params, state, x)
    assert rel(y, y0) < RTOL
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(new0)):
        assert rel(a, b) < 1e-5  # Haiku's own E[x^2] - E[x]^2 cancels
    loss = lambda fun: lambda p, x: jnp.sum(jnp.sin(fun(p, state, x)[0]))  # noqa: E731
    want = jax.grad(loss(f), (0, 1))(params, x)
    got = jax.jit(jax.grad(loss(opt), (0, 1)))(params, x)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert rel(g, w) < 10 * RTOL
    (d,) = batch_norm_decisions(opt.explain(params, state, x))
    assert d.served and d.fused == ("relu",)


def test_two_batch_norms_meeting_at_one_add():
    """relu(bn_a(x) + bn_b(z)), a projection shortcut's form: the first claims the add and
    the relu with the second's output as its residual; both running averages update."""
    class Join(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.BatchNorm(8, use_running_average=False, rngs=rngs)
            self.b = nnx.BatchNorm(8, use_running_average=False, use_fast_variance=False, rngs=rngs)

        def __call__(self, x, z):
            y = self.a(x)
            return jax.nn.relu(y + self.b(z))

    (x, z), join = inputs(12), Join(nnx.Rngs(0))
    graph, state = nnx.split(join)

    def f(state, x, z):
        m = nnx.merge(graph, fresh(state))
        return m(x, z), nnx.state(m, nnx.BatchStat)

    opt = jb.optimize(f, min_macs=0)
    for g, w in zip(jax.tree_util.tree_leaves(opt(state, x, z)), jax.tree_util.tree_leaves(f(state, x, z))):
        assert rel(g, w) < RTOL
    loss = lambda fun: lambda s, x, z: jnp.sum(jnp.sin(fun(s, x, z)[0]))  # noqa: E731
    got, want = jax.grad(loss(opt), (0, 1, 2))(state, x, z), jax.grad(loss(f), (0, 1, 2))(state, x, z)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert rel(g, w) < 10 * RTOL
    assert [d.fused for d in batch_norm_decisions(opt.explain(state, x, z))] == [("residual", "relu"), ()]


# ------------------------------------------------------------------ what stays in XLA


def hand_written(x, scale, bias, leak):
    """Batch norm as nnx writes it, with one intermediate also returned (`leak`)."""
    mu = x.mean((0, 1, 2))
    var = jnp.maximum(0.0, jnp.mean(jnp.square(x), (0, 1, 2)) - jnp.square(mu))
    inv = jax.lax.rsqrt(var + 1e-5)
    y = jax.nn.relu((x - mu) * (inv * scale) + bias)
    extra = {"none": 0.0, "mean": mu, "var": var, "inv": inv}[leak]
    return y, extra


@pytest.mark.parametrize("leak", ["none", "mean", "var", "inv"])
def test_statistics_read_elsewhere(leak):
    """The mean and variance may have other readers (the call provides them); a value only
    the stock eqns compute (here rsqrt(var + eps)) keeps the whole pattern in XLA."""
    x, _ = inputs(7)
    scale, bias = jnp.linspace(0.5, 1.5, 8), jnp.linspace(-1.0, 1.0, 8)
    f = lambda x, s, b: hand_written(x, s, b, leak)  # noqa: E731
    opt = jb.optimize(f, min_macs=0)
    for g, w in zip(opt(x, scale, bias), f(x, scale, bias)):
        assert rel(g, w) < RTOL
    loss = lambda fun: lambda *a: jnp.sum(jnp.sin(fun(*a)[0])) + jnp.sum(fun(*a)[1])  # noqa: E731
    for g, w in zip(jax.grad(loss(opt), (0, 1, 2))(x, scale, bias), jax.grad(loss(f), (0, 1, 2))(x, scale, bias)):
        assert rel(g, w) < 10 * RTOL
    (d,) = batch_norm_decisions(opt.explain(x, scale, bias))
    if leak == "inv":
        assert not d.served and "read elsewhere" in d.reason
        assert "jax_brgemm_batch_norm" not in jax.jit(opt).lower(x, scale, bias).as_text()
    else:
        assert d.served and d.fused == ("relu",)
        assert "jax_brgemm_batch_norm_stats" in jax.jit(opt).lower(x, scale, bias).as_text()


def test_residual_depending_on_the_statistics_is_refused():
    x, _ = inputs(8)

    def f(x):
        mu = x.mean((0, 1, 2))
        var = jnp.mean(jnp.square(x - mu), (0, 1, 2))
        y = (x - mu) * jax.lax.rsqrt(var + 1e-5)
        return y + x * mu  # the "residual" needs the statistics the call would produce

    opt = jb.optimize(f, min_macs=0)
    assert rel(opt(x), f(x)) < RTOL
    (d,) = batch_norm_decisions(opt.explain(x))
    assert not d.served and "depends on the statistics" in d.reason


def test_other_reductions_are_not_batch_norm():
    """Layer norm (over the channels) and a mean that nothing normalises by."""
    x, _ = inputs(9)
    layer_norm = lambda x: (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)  # noqa: E731
    for f in (layer_norm, lambda x: x - x.mean((0, 1, 2)), lambda x: x.sum((0, 1, 2))):
        assert not batch_norm_decisions(jb.explain(jb.optimize(f, min_macs=0), x))


def test_option_and_threshold():
    x, r = inputs(10)
    bn = nnx.BatchNorm(8, use_running_average=False, rngs=nnx.Rngs(0))
    graph, state = nnx.split(bn)
    f = lambda s, x: nnx.merge(graph, s)(x)  # noqa: E731
    (d,) = batch_norm_decisions(jb.explain(jb.optimize(f, batch_norm=False), state, x))
    assert d.reason == "batch_norm=False"
    (d,) = batch_norm_decisions(jb.explain(jb.optimize(f, min_macs=10 ** 9), state, x))
    assert "too small" in d.reason
    with pytest.raises(ValueError, match="batch_norm"):
        jb.optimize(f, batch_norm=1)


WORKER = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jax_brgemm as jb

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 6, 6, 16)) + 2.0).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    bn = nnx.BatchNorm(16, use_running_average=False, momentum=0.9, rngs=nnx.Rngs(0))
    graph, state = nnx.split(bn)

    def f(state, x, r):
        m = nnx.merge(graph, state)
        y = jax.nn.relu(m(x) + r)
        return jnp.sum(jnp.sin(y)), (y, nnx.state(m, nnx.BatchStat))

    stock = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
    ours = jax.jit(jax.value_and_grad(jb.optimize(f, min_macs=0), argnums=(0, 1, 2), has_aux=True))
    mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("batch")))
    want = stock(state, x, r)
    got = ours(state, shard(x), shard(r))
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert rel(g, w) < 3e-5, rel(g, w)
    hlo = ours.lower(state, shard(x), shard(r)).compile().as_text()
    assert "jax_brgemm_batch_norm_stats" in hlo and "all-gather" not in hlo
    print("sharded ok")
""")


def test_four_device_data_parallelism():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sharded ok" in result.stdout
