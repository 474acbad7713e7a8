"""jax_brgemm.optimize on plain lax / jnp programs: every form it serves equals the
unrewritten function (values and gradients), what it cannot serve stays as it was, and the
explain table says which is which."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jax_brgemm as jb

RTOL = 2e-5  # float32 reassociation


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def randn(rng, shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def custom_calls(fun, *args):
    text = jax.jit(fun).lower(*args).as_text()
    return sorted(set(re.findall(r"jax_brgemm_\w+", text)))


def check_same(fun, args, argnums=None, rtol=RTOL, served=None):
    """optimize(fun) equals fun in value, and in gradient where argnums is given; returns
    the explanation. `served`: how many ops it must put on the kernel."""
    opt = jb.optimize(fun, min_macs=0)  # the shapes here are small
    want, got = fun(*args), opt(*args)
    for w, g in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel(g, w) < rtol
    if argnums is not None:
        loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
        gw = jax.grad(loss(fun), argnums)(*args)
        gg = jax.jit(jax.grad(loss(opt), argnums))(*args)
        for w, g in zip(gw, gg):
            assert rel(g, w) < rtol * 5
    explanation = opt.explain(*args)
    if served is not None:
        assert len(explanation.served) == served, str(explanation)
    return explanation


CONV_CASES = [
    # (x shape, kernel shape, dimension_numbers, strides, padding, rhs_dilation, groups)
    ((2, 9, 10, 8), (3, 3, 8, 16), ("NHWC", "HWIO", "NHWC"), (1, 1), "SAME", (1, 1), 1),
    ((2, 9, 10, 8), (3, 3, 8, 16), ("NHWC", "HWIO", "NHWC"), (2, 2), "VALID", (1, 1), 1),
    ((2, 8, 9, 10), (16, 8, 3, 3), ("NCHW", "OIHW", "NCHW"), (1, 2), ((1, 2), (0, 1)), (1, 1), 1),
    ((2, 11, 11, 8), (3, 2, 8, 12), ("NHWC", "HWIO", "NHWC"), (1, 1), "SAME", (2, 3), 1),
    ((2, 9, 9, 8), (3, 3, 2, 12), ("NHWC", "HWIO", "NHWC"), (1, 1), "SAME", (1, 1), 4),
    ((2, 9, 9, 16), (3, 3, 1, 16), ("NHWC", "HWIO", "NHWC"), (2, 2), "SAME", (1, 1), 16),
    ((2, 7, 8, 8), (3, 3, 8, 12), ("NHWC", "HWIO", "NCHW"), (1, 1), "SAME", (1, 1), 1),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_forms_equal_lax(case):
    xs, ks, dn, strides, padding, dil, groups = case
    rng = np.random.default_rng(0)
    x, k = randn(rng, xs), randn(rng, ks, scale=0.3)

    def f(x, k):
        return lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=dil,
                                        dimension_numbers=dn, feature_group_count=groups)

    check_same(f, (x, k), argnums=(0, 1), served=1)
    assert "jax_brgemm_conv2d_forward" in custom_calls(jb.optimize(f, min_macs=0), x, k)


def test_conv_1d_equals_lax():
    rng = np.random.default_rng(1)
    x, k = randn(rng, (3, 40, 8)), randn(rng, (5, 8, 16), scale=0.3)
    f = lambda x, k: lax.conv_general_dilated(x, k, (2,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))  # noqa: E731
    check_same(f, (x, k), argnums=(0, 1), served=1)
    g = lambda x, k: lax.conv_general_dilated(x, k, (1,), ((2, 1),), rhs_dilation=(2,),  # noqa: E731
                                              dimension_numbers=("NCW", "OIW", "NCW"))
    check_same(g, (jnp.swapaxes(x, 1, 2), jnp.transpose(k, (2, 1, 0))), argnums=(0, 1), served=1)


@pytest.mark.parametrize("strides,padding,dil,groups", [
    ((2, 2), "SAME", (1, 1), 1), ((3, 2), "VALID", (1, 1), 1), ((2, 2), ((1, 2), (2, 0)), (2, 1), 2),
])
def test_transposed_conv_equals_lax(strides, padding, dil, groups):
    rng = np.random.default_rng(2)
    x, k = randn(rng, (2, 6, 7, 8)), randn(rng, (3, 3, 8 // groups, 6), scale=0.3)

    def f(x, k):
        if isinstance(padding, str):
            return lax.conv_transpose(x, k, strides, padding, rhs_dilation=dil,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return lax.conv_general_dilated(x, k, (1, 1), padding, lhs_dilation=strides, rhs_dilation=dil,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)

    e = check_same(f, (x, k), argnums=(0, 1), served=1)
    assert e.served[0].op == "nn.conv_transpose"
    opt = jb.optimize(f, min_macs=0)
    # The forward is conv2d's backward-data pass; the gradients its forward and weight update.
    assert custom_calls(opt, x, k) == ["jax_brgemm_conv2d_backward_data"]
    assert custom_calls(jax.grad(lambda x, k: opt(x, k).sum(), (0, 1)), x, k) == [
        "jax_brgemm_conv2d_forward", "jax_brgemm_conv2d_weight_update"]


DOT_CASES = [
    ("mk,kn->mn", (64, 48), (48, 40)),
    ("bsk,kn->bsn", (4, 16, 48), (48, 40)),
    ("mk,nk->mn", (64, 48), (40, 48)),          # x @ W.T
    ("nk,mk->nm", (40, 48), (64, 48)),          # W @ x, as an Equinox Linear under vmap
    ("km,kn->mn", (48, 64), (48, 40)),          # x.T @ W
    ("bij,bjk->bik", (6, 32, 24), (6, 24, 40)),
    ("bthd,bshd->bhts", (2, 24, 3, 16), (2, 20, 3, 16)),
    ("bhts,bshd->bthd", (2, 3, 24, 20), (2, 20, 3, 16)),
]


@pytest.mark.parametrize("spec,ls,rs", DOT_CASES)
def test_dot_forms_equal_jnp(spec, ls, rs):
    rng = np.random.default_rng(3)
    a, b = randn(rng, ls), randn(rng, rs, scale=0.2)
    f = lambda a, b: jnp.einsum(spec, a, b)  # noqa: E731
    e = check_same(f, (a, b), argnums=(0, 1), served=1)
    batched = "b" in spec.split("->")[0].split(",")[1] and spec[0] == "b" and "bsk" not in spec
    assert e.served[0].op == ("jb.brgemm" if batched else "nn.dense")


def test_bfloat16_conv_and_dense():
    rng = np.random.default_rng(4)
    x, k = randn(rng, (2, 9, 9, 16), jnp.bfloat16), randn(rng, (3, 3, 16, 32), jnp.bfloat16, 0.2)
    f = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    g = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),  # noqa: E731
                                              preferred_element_type=jnp.float32)
    ref = lax.conv_general_dilated(x.astype(jnp.float32), k.astype(jnp.float32), (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    for fun, dtype, tol in ((f, jnp.bfloat16, 1e-2), (g, jnp.float32, 1e-5)):
        opt = jb.optimize(fun, min_macs=0)
        out = opt(x, k)
        assert out.dtype == dtype and rel(out, ref) < tol
        assert len(opt.explain(x, k).served) == 1
    a, w = randn(rng, (32, 64), jnp.bfloat16), randn(rng, (64, 48), jnp.bfloat16, 0.2)
    out = jb.optimize(jnp.matmul, min_macs=0)(a, w)
    assert out.dtype == jnp.bfloat16
    assert rel(out, a.astype(jnp.float32) @ w.astype(jnp.float32)) < 1e-2


def test_fused_epilogue_bias_activation():
    rng = np.random.default_rng(5)
    x, k, b = randn(rng, (2, 8, 8, 8)), randn(rng, (3, 3, 8, 16), scale=0.3), randn(rng, (16,))
    w, c = randn(rng, (16, 24), scale=0.3), randn(rng, (24,))

    def f(x, k, b, w, c):
        y = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = jax.nn.relu(y + b)
        z = jnp.maximum(y @ w + c, 0.0)
        t = jnp.tanh(z @ w.T)
        return jax.nn.sigmoid(jnp.einsum("bhwc,cd->bhwd", t, w) + c)

    e = check_same(f, (x, k, b, w, c), argnums=(0, 1, 2, 3, 4), served=4)
    assert [d.fused for d in e.served] == [("bias", "relu"), ("bias", "relu"), ("tanh",), ("bias", "sigmoid")]


def test_shared_intermediate_is_not_fused():
    rng = np.random.default_rng(6)
    x, w, b = randn(rng, (32, 64)), randn(rng, (64, 48), scale=0.2), randn(rng, (48,))

    def f(x, w, b):
        y = x @ w
        return jax.nn.relu(y + b) + y  # y is read twice: the bias add cannot be fused

    e = check_same(f, (x, w, b), argnums=(0, 1, 2), served=1)
    assert e.served[0].fused == ()


def test_eval_batchnorm_folds_into_conv():
    rng = np.random.default_rng(7)
    x, k = randn(rng, (2, 8, 8, 8)), randn(rng, (3, 3, 8, 16), scale=0.3)
    mean, var = randn(rng, (16,)), jnp.abs(randn(rng, (16,))) + 0.5
    gamma, beta = randn(rng, (16,)), randn(rng, (16,))

    def f(x, k):
        y = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = (y - mean) * (gamma * lax.rsqrt(var + 1e-5)) + beta
        return jax.nn.relu(y)

    e = check_same(f, (x, k), argnums=(0, 1), served=1)
    assert e.served[0].fused == ("bias", "scale", "bias", "relu")
    text = jax.jit(jb.optimize(f)).lower(x, k).as_text()
    assert text.count("jax_brgemm_conv2d_forward") == 1


def test_training_batchnorm_is_not_folded():
    rng = np.random.default_rng(8)
    x, k = randn(rng, (2, 8, 8, 8)), randn(rng, (3, 3, 8, 16), scale=0.3)

    def f(x, k):
        y = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        mean = y.mean(axis=(0, 1, 2))
        return (y - mean) * lax.rsqrt(y.var(axis=(0, 1, 2)) + 1e-5)

    e = check_same(f, (x, k), argnums=(0, 1), served=1)
    assert e.served[0].fused == ()


def test_kept_ops_and_reasons():
    rng = np.random.default_rng(9)
    small = (randn(rng, (4, 8)), randn(rng, (8, 4)))
    half = (randn(rng, (64, 64), jnp.float16), randn(rng, (64, 64), jnp.float16))
    ints = (jnp.ones((64, 64), jnp.int32), jnp.ones((64, 64), jnp.int32))
    x3, k3 = randn(rng, (1, 6, 6, 6, 4)), randn(rng, (3, 3, 3, 4, 8))
    conv3 = lambda x, k: lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))  # noqa: E731
    for fun, args, reason in ((jnp.matmul, small, "too small"), (jnp.matmul, half, "float16"),
                              (jnp.matmul, ints, "int32"), (conv3, (x3, k3), "3-D convolution")):
        e = jb.explain(fun, *args)
        assert len(e.decisions) == 1 and not e.decisions[0].served
        assert reason in e.decisions[0].reason
        assert reason in str(e)
        np.testing.assert_array_equal(jb.optimize(fun)(*args), jax.jit(fun)(*args))
    e = jb.explain(jb.optimize(jnp.matmul, min_macs=0), *small)
    assert len(e.served) == 1


def test_nested_jaxprs_are_rewritten():
    rng = np.random.default_rng(10)
    x, w = randn(rng, (32, 48)), randn(rng, (48, 48), scale=0.15)

    @jax.jit
    def inner(x, w):
        return jnp.tanh(x @ w)

    @jax.custom_vjp
    def custom(x, w):
        return x @ w

    custom.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))

    def f(x, w):
        y = inner(x, w)
        y = jax.checkpoint(lambda y: jax.nn.relu(y @ w))(y)
        y, _ = lax.scan(lambda c, _: (jnp.tanh(c @ w), None), y, None, length=3)
        y = lax.cond(y.sum() > 0, lambda y: y @ w, lambda y: -(y @ w), y)
        return custom(y, w)

    e = check_same(f, (x, w), argnums=(0, 1), served=6)
    # Nested jits are inlined; the other nested jaxprs keep their place.
    assert {d.where.split("[")[0] for d in e.decisions} == {"", "remat2", "scan", "cond", "custom_vjp_call"}

    def loop(x, w):  # while_loop has no reverse-mode derivative: values only
        return lax.while_loop(lambda c: c[1] < 2, lambda c: (jnp.tanh(c[0] @ w), c[1] + 1), (x, 0))[0]

    e = check_same(loop, (x, w), served=1)
    assert e.served[0].where == "while"


def test_composes_with_transforms():
    rng = np.random.default_rng(11)
    x, w, b = randn(rng, (5, 16, 32)), randn(rng, (32, 24), scale=0.2), randn(rng, (24,))
    f = lambda x, w, b: jax.nn.relu(x @ w + b)  # noqa: E731
    opt = jb.optimize(f, min_macs=0)
    want = jax.vmap(f, in_axes=(0, None, None))(x, w, b)
    assert rel(jax.vmap(opt, in_axes=(0, None, None))(x, w, b), want) < RTOL
    assert rel(jax.jit(opt)(x, w, b), want) < RTOL
    v, g = jax.value_and_grad(lambda w: jnp.sum(opt(x, w, b) ** 2))(w)
    v0, g0 = jax.value_and_grad(lambda w: jnp.sum(f(x, w, b) ** 2))(w)
    assert rel(v, v0) < RTOL and rel(g, g0) < RTOL * 5


def test_decorator_cache_and_static_leaves():
    traces = []

    @jb.optimize(min_macs=0)
    def f(params, x):
        traces.append(1)
        return params["act"](x @ params["w"]) * params["scale"]

    rng = np.random.default_rng(12)
    p = {"w": randn(rng, (8, 8)), "act": jnp.tanh, "scale": 2}
    x = randn(rng, (4, 8))
    want = jnp.tanh(x @ p["w"]) * 2
    assert rel(f(p, x), want) < RTOL
    assert rel(f(p, x + 1.0), jnp.tanh((x + 1.0) @ p["w"]) * 2) < RTOL
    assert len(traces) == 1  # same signature: traced once
    f(p, randn(rng, (6, 8)))
    assert len(traces) == 2  # a new shape traces again
    f({**p, "scale": 3}, x)
    assert len(traces) == 3  # a new static leaf too


def test_bad_options_and_untraceable_functions():
    with pytest.raises(ValueError, match="unknown option 'min_mac'"):
        jb.optimize(jnp.matmul, min_mac=3)
    with pytest.raises(ValueError, match="min_macs"):
        jb.optimize(jnp.matmul, min_macs=-1)
    with pytest.raises(ValueError, match="fuse"):
        jb.optimize(fuse="yes")
    with pytest.raises(TypeError, match="callable"):
        jb.optimize(3)

    def branchy(x):
        return x if x.sum() > 0 else -x  # not traceable, as under jax.jit

    x = jnp.ones(3)
    with pytest.raises(jax.errors.TracerBoolConversionError):
        jax.jit(branchy)(x)
    with pytest.raises(jax.errors.TracerBoolConversionError):
        jb.optimize(branchy)(x)


# ------------------------------------------------------------------ attention


def attention_inputs(rng, b=2, t=40, s=36, n=4, kv=4, h=16, dtype=jnp.float32):
    return (randn(rng, (b, t, n, h), dtype), randn(rng, (b, s, kv, h), dtype), randn(rng, (b, s, kv, h), dtype))


def einsum_attention(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def attention_config(fun, *args):
    """The attributes of the attention FFI calls in fun's lowering."""
    text = jax.jit(fun).lower(*args).as_text()
    return re.findall(r"jax_brgemm_attention_forward.*?causal = (\d)", text)


@pytest.mark.parametrize("name,fun,kv,s", [
    ("einsum", einsum_attention, 4, 36),
    ("jax.nn", jax.nn.dot_product_attention, 4, 36),
    ("grouped", jax.nn.dot_product_attention, 2, 36),
    ("causal", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True), 4, 40),
    ("causal grouped", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True), 1, 40),
])
def test_attention_patterns_become_one_op(name, fun, kv, s):
    rng = np.random.default_rng(20)
    args = attention_inputs(rng, kv=kv, s=s)
    e = check_same(fun, args, argnums=(0, 1, 2), served=1)
    assert [d.op for d in e.decisions] == ["nn.dot_product_attention"]
    opt = jb.optimize(fun, min_macs=0)
    causal = attention_config(opt, *args)
    # A causal mask built from iotas runs as is_causal (blocks above the diagonal skipped),
    # except under grouped-query flattening, where the query rows interleave the groups.
    assert causal == (["1"] if name == "causal" else ["0"])
    assert not re.search(r"dot_general", jax.jit(opt).lower(*args).as_text())


def test_attention_with_bias_and_mask():
    rng = np.random.default_rng(21)
    q, k, v = attention_inputs(rng)
    bias = randn(rng, (1, 4, 40, 36))
    mask = jnp.asarray(rng.random((2, 1, 40, 36)) > 0.3)
    fun = lambda q, k, v, bias: jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)  # noqa: E731
    check_same(fun, (q, k, v, bias), argnums=(0, 1, 2, 3), served=1)


def test_attention_bfloat16():
    rng = np.random.default_rng(22)
    args = attention_inputs(rng, dtype=jnp.bfloat16)
    ref = jax.nn.dot_product_attention(*(a.astype(jnp.float32) for a in args))
    out = jb.optimize(jax.nn.dot_product_attention, min_macs=0)(*args)
    assert out.dtype == jnp.bfloat16
    stock_error = rel(jax.nn.dot_product_attention(*args), ref)
    assert rel(out, ref) <= 2 * stock_error + 1e-3


def test_attention_not_matched_when_weights_are_read_or_fill_is_infinite():
    rng = np.random.default_rng(23)
    q, k, v = attention_inputs(rng)

    def with_weights(q, k, v):  # the probabilities are an output too: nothing to fuse away
        p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v), p

    mask = jnp.asarray(rng.random((2, 1, 40, 36)) > 0.3)

    def inf_fill(q, k, v):  # a fully masked row is NaN here, a mean in the op: kept as it is
        s = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k), -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

    for fun in (with_weights, inf_fill):
        e = check_same(fun, (q, k, v), argnums=None)
        assert "nn.dot_product_attention" not in [d.op for d in e.decisions]
        assert len(e.served) == 2  # the two matmuls, each on its own


def test_nnx_multi_head_attention_with_causal_mask():
    from flax import nnx

    rng = np.random.default_rng(24)
    module = nnx.MultiHeadAttention(4, 64, decode=False, rngs=nnx.Rngs(0))
    x = randn(rng, (2, 48, 64))

    def f(module, x):
        return module(x, mask=nnx.make_causal_mask(jnp.ones(x.shape[:2])))

    opt = jb.optimize(f, min_macs=0)
    assert rel(opt(module, x), f(module, x)) < RTOL
    assert [d.op for d in opt.explain(module, x).decisions] == ["nn.dense"] * 3 + ["nn.dot_product_attention", "nn.dense"]
    assert attention_config(opt, module, x) == ["1"]


POOL_CASES = [
    # (x shape, window dims, strides, padding): NHWC as flax traces it, and NCHW
    ((2, 9, 10, 8), (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))),
    ((2, 9, 10, 8), (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
    ((2, 8, 9, 10), (1, 1, 3, 3), (1, 1, 2, 1), ((0, 0), (0, 0), (1, 2), (0, 1))),
]


@pytest.mark.parametrize("shape,window,strides,padding", POOL_CASES)
def test_max_pool_forms_equal_lax(shape, window, strides, padding):
    rng = np.random.default_rng(20)
    x = jnp.maximum(randn(rng, shape), 0.0)  # relu outputs: ties in most windows
    fun = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding)  # noqa: E731
    e = check_same(fun, (x,), argnums=0, served=1)
    assert e.decisions[0].primitive == "reduce_window_max" and e.decisions[0].op == "nn.max_pool"
    assert "jax_brgemm_max_pool_forward" in custom_calls(jb.optimize(fun, min_macs=0), x)
    # The gradient is XLA's to the bit, ties included.
    loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x)))  # noqa: E731
    np.testing.assert_array_equal(jax.jit(jax.grad(loss(jb.optimize(fun, min_macs=0))))(x),
                                  jax.jit(jax.grad(loss(fun)))(x))


def test_flax_max_pool_in_a_model_is_served():
    from flax import linen
    rng = np.random.default_rng(21)
    x, k = randn(rng, (2, 16, 16, 3)), randn(rng, (3, 3, 3, 8))
    fun = lambda x, k: linen.max_pool(jax.nn.relu(lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))), (3, 3), (2, 2), "SAME")
    e = check_same(fun, (x, k), argnums=(0, 1), served=2)
    assert [d.op for d in e.decisions] == ["nn.conv2d", "nn.max_pool"]


def test_max_pool_kept_ops_and_reasons():
    rng = np.random.default_rng(22)
    x = randn(rng, (2, 8, 8, 4))
    pool = lambda window, strides=(1, 1, 1, 1), dil=(1, 1, 1, 1): lambda x: lax.reduce_window(  # noqa: E731
        x, -jnp.inf, lax.max, window, strides, "VALID", window_dilation=dil)
    for fun, args, reason in ((pool((1, 2, 2, 2)), (x,), "window over dims"),
                              (pool((1, 2, 2, 1), dil=(1, 2, 2, 1)), (x,), "dilated"),
                              (pool((1, 2, 2, 1)), (x.astype(jnp.float16),), "float16"),
                              (lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (2, 2), (1, 1), "VALID"),
                               (x[0, :, :, 0],), "2-D operand")):
        e = jb.explain(jb.optimize(fun, min_macs=0), *args)
        assert len(e.decisions) == 1 and not e.decisions[0].served, str(e)
        assert reason in e.decisions[0].reason
        np.testing.assert_array_equal(jb.optimize(fun, min_macs=0)(*args), jax.jit(fun)(*args))
    e = jb.explain(jb.optimize(pool((1, 2, 2, 1)), pool=False), x)
    assert not e.decisions[0].served and "pool=False" in e.decisions[0].reason
    e = jb.explain(pool((1, 2, 2, 1)), x)  # 2*7*7*4*4 taps: under the default threshold
    assert "too small" in e.decisions[0].reason
