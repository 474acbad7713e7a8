"""vmap over every argument of every op, against the same transformation of a float64
jnp/lax reference: values, vmap(grad), jacrev, vmap(vmap), per-example gradients, and the
cases the fuzzing found failing (a vmapped kernel or bias alone in dense, a vmapped bias
alone in brgemm)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import rel_err
import jax_brgemm as jb
from jax_brgemm import nn

B = 3  # the vmapped axis
TOL = 2e-5
GELU = lambda z: jax.nn.gelu(z, approximate=True)  # noqa: E731


def _in_axes(n):
    """Every combination of batched (0) / unbatched (None) over n arguments, but all None."""
    return [axes for axes in itertools.product((None, 0), repeat=n) if any(a == 0 for a in axes)]


def _args(per_element, batched_arrays, in_axes):
    return [b if ax == 0 else a for a, b, ax in zip(per_element, batched_arrays, in_axes)]


def _compare(transform, op, ref, args, tol=TOL):
    """transform(op)(*args) in float32 against transform(ref) on the same values in float64."""
    out = transform(op)(*[jnp.asarray(a) for a in args])
    with jax.enable_x64(True):
        want = transform(ref)(*[jnp.asarray(np.asarray(a, np.float64)) if np.asarray(a).dtype.kind == "f"
                                else jnp.asarray(a) for a in args])
    for o, w in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
        assert o.shape == w.shape
        assert rel_err(o, w) < tol


def _loss(f, cot):
    """sum(f(...) * cot), cot in the arguments' precision (a fixed random cotangent)."""
    def loss(*args):
        y = f(*args)
        return jnp.sum(y * jnp.asarray(cot, y.dtype))
    return loss


def _vmapped_grad(in_axes, argnums, cot):
    return lambda f: jax.vmap(jax.grad(_loss(f, cot), argnums), in_axes=in_axes)


def _r(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------ dense


def _dense_inputs(rng, n=5, c=4, k=6):
    one = (_r(rng, n, c), _r(rng, c, k) / 2, _r(rng, k))
    many = (_r(rng, B, n, c), _r(rng, B, c, k) / 2, _r(rng, B, k))
    return one, many, _r(rng, n, k)


@pytest.mark.parametrize("act", [None, "gelu", "tanh"])
@pytest.mark.parametrize("in_axes", _in_axes(3))
def test_dense_every_in_axes(rng, act, in_axes):
    one, many, cot = _dense_inputs(rng)
    op = lambda x, k, b: nn.dense(x, k, b, activation=act)  # noqa: E731
    ref = lambda x, k, b: {None: lambda z: z, "gelu": GELU, "tanh": jnp.tanh}[act](x @ k + b)  # noqa: E731
    args = _args(one, many, in_axes)
    _compare(lambda f: jax.vmap(f, in_axes=in_axes), op, ref, args)
    _compare(_vmapped_grad(in_axes, (0, 1, 2), cot), op, ref, args)


def test_dense_issue_cases(rng):
    """The patterns that failed at run time: ensembles, jacrev, per-example gradients
    (DP-SGD), vmap(vmap), and a vmapped axis that is not the first."""
    (x, k, b), (xs, ks, bs), _ = _dense_inputs(rng)
    ref = lambda x, k, b=b: x @ k + b  # noqa: E731
    op = lambda x, k, b=b: nn.dense(x, k, b)  # noqa: E731
    _compare(lambda f: jax.vmap(lambda k: f(x, k)), op, ref, [ks])
    _compare(lambda f: jax.vmap(lambda b: f(x, k, b)), op, ref, [bs])
    _compare(lambda f: jax.jacrev(lambda x: f(x, k)), op, ref, [x])
    _compare(lambda f: jax.jacrev(lambda k: f(x, k)), op, ref, [k])
    per_example = lambda f: jax.vmap(jax.grad(lambda k, xi: jnp.sum(f(xi, k) ** 2)), in_axes=(None, 0))  # noqa: E731
    _compare(per_example, op, ref, [k, xs[:, 0]])  # examples of one row (x of shape (in,))
    _compare(per_example, op, ref, [k, xs])
    _compare(lambda f: jax.vmap(jax.vmap(f, in_axes=(0, None, None)), in_axes=(None, 0, 0)), op, ref, [xs, ks, bs])
    _compare(lambda f: jax.vmap(jax.vmap(f, in_axes=(None, 0, None)), in_axes=(0, None, 0)), op, ref, [xs, ks, bs])
    _compare(lambda f: jax.vmap(f, in_axes=(1, 2, None)), op, ref,
             [np.moveaxis(xs, 0, 1), np.moveaxis(ks, 0, 2), b])
    nested_grad = lambda f: jax.vmap(jax.vmap(jax.grad(lambda x, k: jnp.sum(f(x, k) ** 2), (0, 1)),  # noqa: E731
                                              in_axes=(0, None)), in_axes=(None, 0))
    _compare(nested_grad, op, ref, [xs, ks])


# ------------------------------------------------------------------ brgemm


@pytest.mark.parametrize("in_axes", _in_axes(4))
def test_brgemm_every_in_axes(rng, in_axes):
    one = (_r(rng, 2, 5, 4), _r(rng, 2, 4, 6), _r(rng, 5, 6), _r(rng, 6))
    many = (_r(rng, B, 2, 5, 4), _r(rng, B, 2, 4, 6), _r(rng, B, 5, 6), _r(rng, B, 6))
    op = lambda a, b, c, bias: jb.brgemm(a, b, c, alpha=0.5, beta=0.5, bias=bias, epilogue="gelu")  # noqa: E731
    ref = lambda a, b, c, bias: GELU(0.5 * c + 0.5 * jnp.einsum("imk,ikn->mn", a, b) + bias)  # noqa: E731
    args = _args(one, many, in_axes)
    _compare(lambda f: jax.vmap(f, in_axes=in_axes), op, ref, args)
    _compare(_vmapped_grad(in_axes, (0, 1, 2, 3), _r(rng, 5, 6)), op, ref, args)


def test_brgemm_bias_alone_and_nested(rng):
    a, b, bias = _r(rng, 2, 5, 4), _r(rng, 2, 4, 6), _r(rng, B, 6)
    op = lambda bias, a=a: jb.brgemm(a, b, bias=bias, epilogue="tanh")  # noqa: E731
    ref = lambda bias, a=a: jnp.tanh(jnp.einsum("imk,ikn->mn", a, b) + bias)  # noqa: E731
    _compare(jax.vmap, op, ref, [bias])
    _compare(lambda f: jax.jacrev(f), op, ref, [bias[0]])
    _compare(lambda f: jax.vmap(jax.vmap(f, in_axes=(None, 0)), in_axes=(0, None)), op, ref,
             [bias, _r(rng, 4, 2, 5, 4)])


# ------------------------------------------------------------------ brgemm_indexed


@pytest.mark.parametrize("in_axes", _in_axes(5))
def test_brgemm_indexed_every_in_axes(rng, in_axes):
    pa, pb = _r(rng, 4, 5, 3), _r(rng, 3, 3, 6)
    one = (pa, pb, rng.integers(0, 4, (2, 3)), rng.integers(0, 3, (2, 3)), _r(rng, 6))
    many = (_r(rng, B, 4, 5, 3), _r(rng, B, 3, 3, 6), rng.integers(0, 4, (B, 2, 3)),
            rng.integers(0, 3, (B, 2, 3)), _r(rng, B, 6))
    op = lambda pa, pb, ia, ib, bias: jb.brgemm_indexed(pa, pb, ia, ib, bias=bias, epilogue="tanh")  # noqa: E731
    ref = lambda pa, pb, ia, ib, bias: jnp.tanh(jnp.einsum("...imk,...ikn->...mn", pa[ia], pb[ib]) + bias)  # noqa: E731
    args = _args(one, many, in_axes)
    _compare(lambda f: jax.vmap(f, in_axes=in_axes), op, ref, args)
    _compare(_vmapped_grad(in_axes, (0, 1, 4), _r(rng, 2, 5, 6)), op, ref, args)


# ------------------------------------------------------------------ conv2d


def _conv_ref(x, k, b):
    z = lax.conv_general_dilated(x, k, (2, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 feature_group_count=2)
    return GELU(z + b)


def _conv_op(x, k, b):
    return nn.conv2d(x, k, b, strides=(2, 1), feature_group_count=2, activation="gelu")


@pytest.mark.parametrize("in_axes", _in_axes(3))
def test_conv2d_every_in_axes(rng, in_axes):
    one = (_r(rng, 2, 6, 5, 4), _r(rng, 3, 3, 2, 6) / 2, _r(rng, 6))
    many = (_r(rng, B, 2, 6, 5, 4), _r(rng, B, 3, 3, 2, 6) / 2, _r(rng, B, 6))
    args = _args(one, many, in_axes)
    _compare(lambda f: jax.vmap(f, in_axes=in_axes), _conv_op, _conv_ref, args)
    _compare(_vmapped_grad(in_axes, (0, 1, 2), _r(rng, 2, 3, 5, 6)), _conv_op, _conv_ref, args)


def test_conv2d_per_example_jacrev_nested(rng):
    x, k, b = _r(rng, 6, 5, 4), _r(rng, 3, 3, 2, 6) / 2, _r(rng, 6)
    xs, ks = _r(rng, B, 6, 5, 4), _r(rng, B, 3, 3, 2, 6) / 2
    per_example = lambda f: jax.vmap(jax.grad(lambda k, xi, b: jnp.sum(f(xi[None], k, b) ** 2)),  # noqa: E731
                                     in_axes=(None, 0, None))
    _compare(per_example, _conv_op, _conv_ref, [k, xs, b])
    _compare(lambda f: jax.jacrev(lambda k, x, b: f(x[None], k, b)), _conv_op, _conv_ref, [k, x, b])
    nested = lambda f: jax.vmap(jax.vmap(jax.grad(lambda x, k, b: jnp.sum(f(x[None], k, b) ** 2), (0, 1)),  # noqa: E731
                                         in_axes=(0, None, None)), in_axes=(None, 0, None))
    _compare(nested, _conv_op, _conv_ref, [xs, ks, b])


# ------------------------------------------------------------------ lstm


def _lstm_ref(x, w_ih, w_hh, bias):
    K = w_hh.shape[0]

    def step(carry, xt):
        h, c = carry
        z = xt @ w_ih + h @ w_hh + bias
        i, f, o = (jax.nn.sigmoid(z[:, j * K:(j + 1) * K]) for j in (0, 1, 3))
        c = f * c + i * jnp.tanh(z[:, 2 * K:3 * K])
        h = o * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((x.shape[0], K), x.dtype)
    _, hs = lax.scan(step, (zeros, zeros), jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(hs, 0, 1)


def _lstm_op(x, w_ih, w_hh, bias):
    return nn.lstm(x, w_ih, w_hh, bias)[0]


@pytest.mark.parametrize("in_axes", _in_axes(4))
def test_lstm_every_in_axes(rng, in_axes):
    n, t, c, k = 2, 3, 4, 3
    one = (_r(rng, n, t, c), _r(rng, c, 4 * k) / 2, _r(rng, k, 4 * k) / 2, _r(rng, 4 * k))
    many = (_r(rng, B, n, t, c), _r(rng, B, c, 4 * k) / 2, _r(rng, B, k, 4 * k) / 2, _r(rng, B, 4 * k))
    args = _args(one, many, in_axes)
    _compare(lambda f: jax.vmap(f, in_axes=in_axes), _lstm_op, _lstm_ref, args)
    _compare(_vmapped_grad(in_axes, (0, 1, 2, 3), _r(rng, n, t, k)), _lstm_op, _lstm_ref, args)
