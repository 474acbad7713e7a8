"""Property-based tests: every op on random shapes and settings against a float64 reference.

Each example draws one op's shapes (sizes 1, small primes and powers of two), settings
(strides, padding, dilation, groups, activation, bias or not, ...) and dtype (float32 or
bfloat16), and checks under jit the values and the gradients (a vector-Jacobian product with
a random cotangent) against the same computation written with jnp / lax in float64. It then
checks one drawn transform the same way: vmap over random in_axes (values and gradients
through it), or vmap(grad) (per-example gradients). The reference is transformed by JAX
itself, so it stays the trusted side.

Tolerances: float32 a fixed 5e-5 relative error (a float32 sum in another order). bfloat16
from stock XLA on the same case: the same jnp / lax computation run in bfloat16 lies some
distance from the float64 reference, and ours may lie up to 3 times that plus 2**-10 (two
computations that round at different places; the floor covers a case that XLA happens to
get almost exact).

Each op runs on the default ISA and on `ref`. Examples are few and small, derandomized (the
same cases on every run), so the file takes well under a minute and a half on 2 cores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jax import lax

import jax_brgemm as jb
from conftest import rel_err

SIZES = st.sampled_from([1, 2, 3, 5, 7, 8, 13, 16])
SMALL = st.sampled_from([1, 2, 3, 5])
DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])
ACTS = st.sampled_from([None, "relu", "gelu", "sigmoid", "tanh"])
F32_TOL = 5e-5
BF16_FLOOR = 2.0**-10
EXAMPLES = 4

# Written here, not taken from the library, so that the reference is independent.
ACT_REF = {None: lambda z: z, "relu": jax.nn.relu, "gelu": functools.partial(jax.nn.gelu, approximate=True),
           "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh}

isas = pytest.mark.parametrize("isa_name", [None, "ref"], ids=["default", "ref"], indirect=True)
bounded = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture
def isa_name(request):
    jb.set_isa(request.param)
    yield request.param
    jb.set_isa(None)


class Case:
    """One op call: ours(*arrays) and ref(*arrays) (jnp / lax, any float dtype), the arrays
    (numpy, already representable in `dtype`) and which of them are differentiable."""

    def __init__(self, ours, ref, arrays, dtype, diff, rng):
        self.ours, self.ref, self.dtype, self.rng = ours, ref, np.dtype(dtype), rng
        self.arrays = [a if not np.issubdtype(a.dtype, np.floating) else
                       np.asarray(jnp.asarray(a, dtype), np.float32) for a in arrays]
        self.diff = tuple(diff)


def _cast(arrays, dtype):
    return [jnp.asarray(a, dtype) if np.issubdtype(np.asarray(a).dtype, np.floating) else jnp.asarray(a)
            for a in arrays]


def _compare(got, want, stock, what):
    """Leaf by leaf: got (ours) against want (float64); stock is the same reference run in
    bfloat16, or None for float32."""
    for path, g, w, s in zip(range(len(got)), got, want, stock or [None] * len(got)):
        tol = F32_TOL if s is None else 3 * rel_err(s, w) + BF16_FLOOR
        err = rel_err(g, w)
        assert err <= tol, f"{what}, leaf {path}: relative error {err:.3g} > {tol:.3g}"


def _run(fn, ref, arrays, dtype, argnums, rng, what):
    """fn's values and (argnums non-empty) gradients under jit against ref in float64."""
    leaves = jax.tree.leaves
    cots = [rng.standard_normal(s.shape).astype(np.float32)
            for s in leaves(jax.eval_shape(fn, *_cast(arrays, dtype)))]

    def with_grads(f):
        def go(*args):
            out = leaves(f(*args))
            if not argnums:
                return out, []
            return out, list(jax.grad(lambda *a: _dot(leaves(f(*a)), cots), argnums=argnums)(*args))
        return go

    got = jax.jit(with_grads(fn))(*_cast(arrays, dtype))
    with jax.enable_x64(True):
        want = jax.tree.map(np.asarray, jax.jit(with_grads(ref))(*_cast(arrays, jnp.float64)))
    stock = None
    if np.dtype(dtype) == jnp.bfloat16:
        stock = jax.jit(with_grads(ref))(*_cast(arrays, dtype))
    _compare(got[0], want[0], stock and stock[0], f"{what} value")
    _compare(got[1], want[1], stock and stock[1], f"{what} gradient")


def _dot(outs, cots):
    """sum(out * cot) in float32, or float64 where the outputs are (the reference)."""
    total = 0.0
    for o, c in zip(outs, cots):
        wide = jnp.promote_types(o.dtype, jnp.float32)
        total = total + jnp.sum(o.astype(wide) * jnp.asarray(c).astype(wide))
    return total


def _random_like(a, rng):
    if np.issubdtype(a.dtype, np.integer):
        return rng.integers(0, a.max() + 1 if a.size else 1, a.shape).astype(a.dtype)
    return rng.standard_normal(a.shape).astype(a.dtype)


def check(case, transform):
    """The case under jit, then under `transform`: 'vmap' or 'vmap_grad', over random
    in_axes (at least one array batched, size 2)."""
    rng, arrays = case.rng, case.arrays
    _run(case.ours, case.ref, arrays, case.dtype, case.diff, rng, "jit")
    axes = [None if rng.random() < 0.4 else int(rng.integers(0, a.ndim + 1)) for a in arrays]
    if all(ax is None for ax in axes):
        axes[int(rng.integers(len(arrays)))] = 0
    stacked = [a if ax is None else np.stack([a, _random_like(a, rng)], axis=ax) for a, ax in zip(arrays, axes)]
    stacked = Case(None, None, stacked, case.dtype, (), rng).arrays  # rounded to the dtype
    if transform == "vmap":
        _run(jax.vmap(case.ours, in_axes=axes), jax.vmap(case.ref, in_axes=axes), stacked,
             case.dtype, case.diff, rng, f"vmap {axes}")
        return
    out = jax.eval_shape(case.ours, *_cast(arrays, case.dtype))
    cots = [rng.standard_normal(s.shape).astype(np.float32) for s in jax.tree.leaves(out)]

    def per_example_grads(f):
        loss = lambda *a: _dot(jax.tree.leaves(f(*a)), cots)
        return jax.vmap(jax.grad(loss, argnums=case.diff), in_axes=axes)

    _run(per_example_grads(case.ours), per_example_grads(case.ref), stacked, case.dtype, (), rng,
         f"vmap(grad) {axes}")


def _rng(data):
    return np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))


TRANSFORMS = st.sampled_from(["vmap", "vmap_grad"])


# ------------------------------------------------------------------ brgemm, brgemm_indexed


def _epilogue(data, rng, m, n, lead, dtype):
    """Drawn epilogue settings: (kwargs, arrays, ref(z, *arrays) applying them)."""
    act = data.draw(ACTS, label="activation")
    alpha = data.draw(st.sampled_from([1.0, -0.5, 2.0]), label="alpha")
    beta = data.draw(st.sampled_from([None, 0.5, 1.0]), label="beta (None: no c)")
    has_bias = data.draw(st.booleans(), label="bias")
    arrays, names = [], []
    if beta is not None:
        arrays.append(rng.standard_normal(lead + (m, n)).astype(np.float32)), names.append("c")
    if has_bias:
        arrays.append(rng.standard_normal((n,)).astype(np.float32)), names.append("bias")

    def ref(z, *extra):
        given = dict(zip(names, extra))
        z = alpha * z
        if "c" in given:
            z = z + beta * given["c"]
        if "bias" in given:
            z = z + given["bias"]
        return ACT_REF[act](z)

    def kwargs(*extra):
        return dict(zip(names, extra), alpha=alpha, beta=beta or 0.0, activation=act)

    return kwargs, arrays, ref


@isas
@bounded
@given(data=st.data())
def test_brgemm(isa_name, data):
    rng = _rng(data)
    dtype = data.draw(DTYPES, label="dtype")
    lead = data.draw(st.sampled_from([(), (2,), (1, 3)]), label="lead")
    count, m, k, n = data.draw(SMALL), data.draw(SIZES), data.draw(SIZES), data.draw(SIZES)
    a = rng.standard_normal(lead + (count, m, k)).astype(np.float32)
    b = rng.standard_normal(lead + (count, k, n)).astype(np.float32)
    kwargs, extra, epilogue = _epilogue(data, rng, m, n, lead, dtype)
    ours = lambda a, b, *e: jb.brgemm(a, b, **kwargs(*e))
    ref = lambda a, b, *e: epilogue(jnp.einsum("...imk,...ikn->...mn", a, b), *e)
    check(Case(ours, ref, [a, b, *extra], dtype, range(2 + len(extra)), rng), data.draw(TRANSFORMS))


@isas
@bounded
@given(data=st.data())
def test_brgemm_indexed(isa_name, data):
    rng = _rng(data)
    dtype = data.draw(DTYPES, label="dtype")
    lead = data.draw(st.sampled_from([(1,), (3,), (2, 2)]), label="lead")
    count, m, k, n = data.draw(SMALL), data.draw(SIZES), data.draw(SIZES), data.draw(SIZES)
    pa, pb = data.draw(SMALL, label="Pa"), data.draw(SMALL, label="Pb")
    a = rng.standard_normal((pa, m, k)).astype(np.float32)
    b = rng.standard_normal((pb, k, n)).astype(np.float32)
    ia = rng.integers(0, pa, lead + (count,)).astype(np.int32)
    ib = rng.integers(0, pb, lead + (count,)).astype(np.int32)
    kwargs, extra, epilogue = _epilogue(data, rng, m, n, lead, dtype)
    ours = lambda a, b, ia, ib, *e: jb.brgemm_indexed(a, b, ia, ib, **kwargs(*e))
    ref = lambda a, b, ia, ib, *e: epilogue(jnp.einsum("...imk,...ikn->...mn", a[ia], b[ib]), *e)
    diff = (0, 1) + tuple(range(4, 4 + len(extra)))
    check(Case(ours, ref, [a, b, ia, ib, *extra], dtype, diff, rng), data.draw(TRANSFORMS))


# ------------------------------------------------------------------ dense


@isas
@bounded
@given(data=st.data())
def test_dense(isa_name, data):
    rng = _rng(data)
    dtype = data.draw(DTYPES, label="dtype")
    lead = data.draw(st.sampled_from([(1,), (5,), (2, 3), (17,)]), label="lead")
    cin, cout = data.draw(SIZES, label="in"), data.draw(SIZES, label="out")
    act = data.draw(ACTS, label="activation")
    x = rng.standard_normal(lead + (cin,)).astype(np.float32)
    w = rng.standard_normal((cin, cout)).astype(np.float32)
    if data.draw(st.booleans(), label="bias"):
        bias = rng.standard_normal((cout,)).astype(np.float32)
        ours = lambda x, w, b: jb.nn.dense(x, w, b, activation=act)
        ref = lambda x, w, b: ACT_REF[act](x @ w + b)
        case = Case(ours, ref, [x, w, bias], dtype, (0, 1, 2), rng)
    else:
        case = Case(lambda x, w: jb.nn.dense(x, w, activation=act), lambda x, w: ACT_REF[act](x @ w),
                    [x, w], dtype, (0, 1), rng)
    check(case, data.draw(TRANSFORMS))


# ------------------------------------------------------------------ conv2d, conv_transpose


def _conv_shapes(data):
    n = data.draw(st.sampled_from([1, 2]), label="N")
    h, w = data.draw(SIZES, label="H"), data.draw(SIZES, label="W")
    groups = data.draw(st.sampled_from([1, 1, 2, 3]), label="groups")
    cg, kg = data.draw(SMALL, label="C/groups"), data.draw(SMALL, label="K/groups")
    r, s = data.draw(st.sampled_from([1, 2, 3, 5]), label="R"), data.draw(st.sampled_from([1, 2, 3, 5]), label="S")
    dil = (data.draw(st.sampled_from([1, 2]), label="dil_h"), data.draw(st.sampled_from([1, 2]), label="dil_w"))
    return n, h, w, groups, cg, kg, r, s, dil


def _lax_conv(x, w, strides, padding, dil, groups, lhs_dil=(1, 1)):
    return lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dil, rhs_dilation=dil,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _with_bias_and_act(data, rng, k, conv_ours, conv_ref, x, w, dtype):
    act = data.draw(ACTS, label="activation")
    if data.draw(st.booleans(), label="bias"):
        bias = rng.standard_normal((k,)).astype(np.float32)
        return Case(lambda x, w, b: conv_ours(x, w, b, act), lambda x, w, b: ACT_REF[act](conv_ref(x, w) + b),
                    [x, w, bias], dtype, (0, 1, 2), rng)
    return Case(lambda x, w: conv_ours(x, w, None, act), lambda x, w: ACT_REF[act](conv_ref(x, w)),
                [x, w], dtype, (0, 1), rng)


@isas
@bounded
@given(data=st.data())
def test_conv2d(isa_name, data):
    rng = _rng(data)
    dtype = data.draw(DTYPES, label="dtype")
    n, h, w, groups, cg, kg, r, s, dil = _conv_shapes(data)
    strides = (data.draw(SMALL, label="stride_h"), data.draw(SMALL, label="stride_w"))
    padding = data.draw(st.one_of(st.sampled_from(["SAME", "VALID", 0, 1, 2]),
                                  st.tuples(st.tuples(st.integers(-1, 3), st.integers(-1, 3)),
                                            st.tuples(st.integers(-1, 3), st.integers(-1, 3)))),
                        label="padding")
    pads = padding if not isinstance(padding, int) else ((padding, padding),) * 2
    out = jax.eval_shape(lambda x, k: _lax_conv(x, k, strides, pads, dil, groups),
                         jax.ShapeDtypeStruct((n, h, w, cg * groups), jnp.float32),
                         jax.ShapeDtypeStruct((r, s, cg, kg * groups), jnp.float32)).shape
    if min(out) < 1:  # the kernel does not fit the padded input: an error, tested elsewhere
        return
    x = rng.standard_normal((n, h, w, cg * groups)).astype(np.float32)
    kernel = rng.standard_normal((r, s, cg, kg * groups)).astype(np.float32)
    ours = lambda x, k, b, act: jb.nn.conv2d(x, k, b, strides=strides, padding=padding, dilation=dil,
                                             feature_group_count=groups, activation=act)
    ref = lambda x, k: _lax_conv(x, k, strides, pads, dil, groups)
    check(_with_bias_and_act(data, rng, kg * groups, ours, ref, x, kernel, dtype), data.draw(TRANSFORMS))


@isas
@bounded
@given(data=st.data())
def test_conv_transpose(isa_name, data):
    rng = _rng(data)
    dtype = data.draw(DTYPES, label="dtype")
    n, h, w, groups, cg, kg, r, s, dil = _conv_shapes(data)
    lhs = (data.draw(SMALL, label="input_dilation_h"), data.draw(SMALL, label="input_dilation_w"))
    spans = (dil[0] * (r - 1), dil[1] * (s - 1))
    pads = tuple((data.draw(st.integers(0, span)), data.draw(st.integers(0, span))) for span in spans)
    x = rng.standard_normal((n, h, w, cg * groups)).astype(np.float32)
    kernel = rng.standard_normal((r, s, cg, kg * groups)).astype(np.float32)
    out_hw = [(size - 1) * d + 1 + lo + hi - span for size, d, (lo, hi), span in zip((h, w), lhs, pads, spans)]
    if min(out_hw) < 1:
        return
    ours = lambda x, k, b, act: jb.nn.conv_transpose(x, k, b, input_dilation=lhs, padding=pads, dilation=dil,
                                                     feature_group_count=groups, activation=act)
    ref = lambda x, k: _lax_conv(x, k, (1, 1), pads, dil, groups, lhs)
    check(_with_bias_and_act(data, rng, kg * groups, ours, ref, x, kernel, dtype), data.draw(TRANSFORMS))


@isas
@pytest.mark.parametrize("groups, cg, kg", [(2, 1, 1), (2, 2, 3), (3, 1, 2), (5, 1, 1)])
def test_tiny_grouped_bf16_sigmoid_conv(isa_name, groups, cg, kg):
    """The fuzzing's worst bfloat16 gradients (5x10 input, 5x5 kernel, VALID, stride (1, 2),
    grouped, sigmoid): a few per cent, and so are stock XLA's on the same case."""
    rng = np.random.default_rng(groups * 100 + cg * 10 + kg)
    x = rng.standard_normal((1, 5, 10, cg * groups)).astype(np.float32)
    kernel = rng.standard_normal((5, 5, cg, kg * groups)).astype(np.float32)
    ours = lambda x, k: jb.nn.conv2d(x, k, strides=(1, 2), padding="VALID", feature_group_count=groups,
                                     activation="sigmoid")
    ref = lambda x, k: jax.nn.sigmoid(_lax_conv(x, k, (1, 2), "VALID", (1, 1), groups))
    case = Case(ours, ref, [x, kernel], jnp.bfloat16, (0, 1), rng)
    _run(case.ours, case.ref, case.arrays, case.dtype, case.diff, rng, "jit")


# ------------------------------------------------------------------ lstm


def _lstm_ref(x, w_ih, w_hh, bias, h0, c0):
    k = w_hh.shape[0]

    def step(carry, x_t):
        c, h = carry
        z = x_t @ w_ih + h @ w_hh + bias
        i, f, g, o = (z[:, j * k:(j + 1) * k] for j in range(4))
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (c, h), h

    (c, h), hs = lax.scan(step, (c0, h0), jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(hs, 0, 1), (c, h)


@isas
@bounded
@given(data=st.data())
def test_lstm(isa_name, data):
    rng = _rng(data)
    dtype = data.draw(DTYPES, label="dtype")
    n, t = data.draw(st.sampled_from([1, 2, 3]), label="N"), data.draw(st.sampled_from([1, 2, 5]), label="T")
    c, k = data.draw(SIZES, label="C"), data.draw(SIZES, label="K")
    x = rng.standard_normal((n, t, c)).astype(np.float32)
    w_ih = (rng.standard_normal((c, 4 * k)) / np.sqrt(c)).astype(np.float32)
    w_hh = (rng.standard_normal((k, 4 * k)) / np.sqrt(k)).astype(np.float32)
    bias = rng.standard_normal((4 * k,)).astype(np.float32)
    h0, c0 = (rng.standard_normal((n, k)).astype(np.float32) for _ in range(2))
    ours = lambda x, w_ih, w_hh, bias, h0, c0: jb.nn.lstm(x, w_ih, w_hh, bias, h0, c0)
    # The library keeps c in float32 (documented); so does the reference, in any dtype.
    ref = lambda x, w_ih, w_hh, bias, h0, c0: _lstm_ref(x, w_ih, w_hh, bias, h0, c0)
    check(Case(ours, ref, [x, w_ih, w_hh, bias, h0, c0], dtype, range(6), rng), data.draw(TRANSFORMS))


# ------------------------------------------------------------------ dot_product_attention


def _attention_ref(q, k, v, causal):
    heads, kv_heads = q.shape[-2], k.shape[-2]
    k, v = (jnp.repeat(a, heads // kv_heads, axis=-2) for a in (k, v))
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1]).astype(q.dtype)
    if causal:
        t, s = logits.shape[-2:]
        logits = jnp.where(jnp.arange(s)[None, :] <= jnp.arange(t)[:, None], logits, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


@isas
@bounded
@given(data=st.data())
def test_dot_product_attention(isa_name, data):
    rng = _rng(data)
    dtype = data.draw(DTYPES, label="dtype")
    b, t, s = data.draw(st.sampled_from([1, 2])), data.draw(SIZES, label="T"), data.draw(SIZES, label="S")
    kv_heads, group = data.draw(st.sampled_from([1, 2])), data.draw(st.sampled_from([1, 3]))
    hd = data.draw(st.sampled_from([1, 4, 8, 16]), label="head_dim")
    causal = data.draw(st.booleans(), label="causal")
    q = rng.standard_normal((b, t, kv_heads * group, hd)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, kv_heads, hd)).astype(np.float32) for _ in range(2))
    ours = lambda q, k, v: jb.nn.dot_product_attention(q, k, v, is_causal=causal)
    check(Case(ours, lambda q, k, v: _attention_ref(q, k, v, causal), [q, k, v], dtype, (0, 1, 2), rng),
          data.draw(TRANSFORMS))
