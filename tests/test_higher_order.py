"""Forward mode and higher orders: jax.jvp, jax.linearize, jax.jacfwd, jax.hessian, grad of
grad and Hessian-vector products of dense, conv2d, brgemm and conv_transpose against the
same transformations of jax.lax / jnp references in float64; jax.grad still on exactly the
kernel passes it ran before; the ops that stay reverse-mode only say so by name."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_brgemm as jb
from conftest import rel_err
from jax_brgemm import nn

TOL = 1e-5
ACT = {None: lambda z: z, "relu": jax.nn.relu, "gelu": lambda z: jax.nn.gelu(z, approximate=True),
       "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh}
NHWC = ("NHWC", "HWIO", "NHWC")


def normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def dense_case(rng, act):
    args = (normal(rng, 4, 3), normal(rng, 3, 2), normal(rng, 2))
    return (lambda x, w, b: nn.dense(x, w, b, activation=act),
            lambda x, w, b: ACT[act](x @ w + b), args)


def conv_case(rng, act):
    args = (normal(rng, 1, 5, 5, 2), 0.5 * normal(rng, 3, 3, 2, 3), normal(rng, 3))
    geometry = dict(strides=(2, 1), padding=((1, 0), (2, 1)), dilation=(1, 2))

    def ref(x, w, b):
        z = jax.lax.conv_general_dilated(x, w, geometry["strides"], geometry["padding"],
                                         rhs_dilation=geometry["dilation"], dimension_numbers=NHWC)
        return ACT[act](z + b)

    return lambda x, w, b: nn.conv2d(x, w, b, activation=act, **geometry), ref, args


def brgemm_case(rng, act):
    # Broadcast leading dims (a's 2, b's 1), c scaled by beta, a bias and alpha.
    args = (normal(rng, 2, 3, 2, 4), normal(rng, 1, 3, 4, 3), normal(rng, 2, 2, 3), normal(rng, 3))

    def op(a, b, c, bias):
        return jb.brgemm(a, b, c, alpha=0.5, beta=-1.5, bias=bias, activation=act)

    def ref(a, b, c, bias):
        return ACT[act](0.5 * jnp.einsum("...imk,...ikn->...mn", a, b) - 1.5 * c + bias)

    return op, ref, args


def conv_transpose_case(rng, act):
    args = (normal(rng, 1, 3, 4, 2), 0.5 * normal(rng, 3, 2, 2, 3), normal(rng, 3))
    pads = ((1, 2), (0, 1))

    def ref(x, w, b):
        z = jax.lax.conv_general_dilated(x, w, (1, 1), pads, lhs_dilation=(2, 2), dimension_numbers=NHWC)
        return ACT[act](z + b)

    return (lambda x, w, b: nn.conv_transpose(x, w, b, input_dilation=2, padding=pads, activation=act),
            ref, args)


CASES = {"dense": dense_case, "conv2d": conv_case, "brgemm": brgemm_case,
         "conv_transpose": conv_transpose_case}
# Every activation of the kernel ops; conv_transpose applies its activation in JAX.
OP_ACTS = [(op, act) for op in CASES for act in (ACT if op != "conv_transpose" else (None, "gelu"))]


def in_float64(fn, *args):
    """fn (a reference) on args cast to float64, with float64 enabled: numpy results."""
    with jax.enable_x64(True):
        args = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), args)
        return jax.tree.map(np.asarray, fn(*args))


def err(out, ref):
    """The relative error of a whole pytree (e.g. a Hessian's blocks), as one vector: a
    block of tiny norm carries float32 rounding of the others' size (stock XLA's float32
    Hessian of these cases lies up to 2e-5 from float64 in such blocks, and ~1e-7 overall)."""
    flat = lambda t: np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(t)])  # noqa: E731
    return rel_err(flat(out), flat(ref))


def check(out, fn, *args):
    """`out` against `fn` (the same transformation of the reference) in float64: within TOL,
    or where stock XLA's float32 `fn` lies further from float64 (rounding amplified by
    cancellation, as in gelu's higher derivatives), within twice its distance."""
    ref = in_float64(fn, *args)
    stock = err(fn(*args), ref)
    assert err(out, ref) < max(TOL, 2 * stock), (err(out, ref), stock)


def loss_of(f):
    return lambda *args: jnp.sum(jnp.sin(f(*args)))


@pytest.mark.parametrize("op,act", OP_ACTS)
def test_jvp_linearize_and_jacfwd(rng, op, act):
    f, ref, args = CASES[op](rng, act)
    tangents = tuple(normal(rng, *a.shape) for a in args)
    out, tan = jax.jit(lambda p, t: jax.jvp(f, p, t))(args, tangents)
    check(out, ref, *args)
    check(tan, lambda p, t: jax.jvp(ref, p, t)[1], args, tangents)
    y, lin = jax.linearize(f, *args)
    check(y, ref, *args)
    check(lin(*tangents), lambda p, t: jax.jvp(ref, p, t)[1], args, tangents)
    # jacfwd in every argument: vmap over a batch of tangents.
    argnums = tuple(range(len(args)))
    check(jax.jacfwd(f, argnums)(*args), jax.jacfwd(ref, argnums), *args)


@pytest.mark.parametrize("op,act", OP_ACTS)
def test_hessian_grad_of_grad_and_hvp(rng, op, act):
    f, ref, args = CASES[op](rng, act)
    loss, loss_ref = loss_of(f), loss_of(ref)
    argnums = tuple(range(len(args)))
    hess = jax.jit(jax.hessian(loss, argnums))(*args)
    check(hess, jax.hessian(loss_ref, argnums), *args)
    # grad of grad (reverse over reverse) and a Hessian-vector product (forward over reverse).
    grad_of_grad = lambda loss: jax.grad(  # noqa: E731
        lambda *a: jnp.sum(jax.grad(loss, argnums)(*a)[1] ** 2), argnums)
    check(grad_of_grad(loss)(*args), grad_of_grad(loss_ref), *args)
    v = tuple(normal(rng, *a.shape) for a in args)
    hvp = lambda loss: lambda p, v: jax.jvp(jax.grad(loss, argnums), p, v)[1]  # noqa: E731
    check(hvp(loss)(args, v), hvp(loss_ref), args, v)


def test_third_order_and_per_example_hvp(rng):
    """Forward over forward over reverse, and a vmapped Hessian-vector product (weights
    shared, data batched): more kernel calls of the same two primitives."""
    x, w, b = normal(rng, 5, 3), normal(rng, 3, 4), normal(rng, 4)

    def third(dense, x, w, b):
        loss = lambda w: jnp.sum(jnp.tanh(dense(x, w, b)))  # noqa: E731
        g = lambda w: jax.jvp(jax.grad(loss), (w,), (jnp.ones_like(w),))[1]  # noqa: E731
        return jax.jvp(g, (w,), (w,))[1]

    def per_example(dense, x, w, b):
        loss = lambda w, x: jnp.sum(jax.nn.gelu(dense(x, w, b)) ** 2)  # noqa: E731
        hvp = lambda x: jax.jvp(lambda w: jax.grad(loss)(w, x), (w,), (w,))[1]  # noqa: E731
        return jax.vmap(hvp)(x[:, None, :])

    ops = lambda x, w, b: nn.dense(x, w, b)  # noqa: E731
    ref = lambda x, w, b: x @ w + b  # noqa: E731
    for order in (third, per_example):
        check(order(ops, x, w, b), lambda *a: order(ref, *a), x, w, b)


# ------------------------------------------------------------------ the kernel does the work


def custom_calls(fn, *args):
    text = jax.jit(fn).lower(*args).as_text()
    assert "dot_general" not in text and "convolution" not in text  # no XLA fallback
    return sorted(re.findall(r"custom_call @(\w+)\(.*?-> (.*)$", text, re.M))


def test_grad_runs_the_same_kernel_passes(rng):
    """jax.grad: one forward and one backward call for dense (dx skipped where x is data),
    forward + backward-data + weight-update for conv2d, forward + two products for brgemm,
    as with the former custom_vjp."""
    f, _, (x, w, b) = dense_case(rng, "gelu")
    loss = loss_of(f)
    assert custom_calls(jax.grad(loss, (0, 1, 2)), x, w, b) == [
        ("jax_brgemm_dense_bwd", "(tensor<4x3xf32>, tensor<3x2xf32>, tensor<2xf32>)"),
        ("jax_brgemm_dense_fwd", "(tensor<4x2xf32>, tensor<0xf32>)")]
    assert custom_calls(jax.grad(loss, (1, 2)), x, w, b) == [
        ("jax_brgemm_dense_bwd", "(tensor<0xf32>, tensor<3x2xf32>, tensor<2xf32>)"),
        ("jax_brgemm_dense_fwd", "(tensor<4x2xf32>, tensor<0xf32>)")]
    f, _, args = conv_case(rng, "relu")
    assert [t for t, _ in custom_calls(jax.grad(loss_of(f), (0, 1, 2)), *args)] == [
        "jax_brgemm_conv2d_backward_data", "jax_brgemm_conv2d_forward", "jax_brgemm_conv2d_weight_update"]
    f, _, args = brgemm_case(rng, "tanh")
    assert [t for t, _ in custom_calls(jax.grad(loss_of(f), (0, 1, 2, 3)), *args)] == ["jax_brgemm_brgemm"] * 3


def test_jvp_and_hessian_run_on_the_kernel(rng):
    f, _, (x, w, b) = dense_case(rng, "sigmoid")
    # The tangent F(dx, w) + F(x, dw): two more forward calls.
    calls = custom_calls(lambda p, t: jax.jvp(f, p, t), (x, w, b), (x, w, b))
    assert [t for t, _ in calls] == ["jax_brgemm_dense_fwd"] * 3
    calls = custom_calls(jax.hessian(loss_of(f), (0, 1, 2)), x, w, b)
    assert {t for t, _ in calls} == {"jax_brgemm_dense_fwd", "jax_brgemm_dense_bwd"}
    f, _, args = conv_case(rng, "tanh")
    calls = custom_calls(jax.hessian(loss_of(f), (0, 1)), *args[:2], args[2])
    assert {t for t, _ in calls} == {"jax_brgemm_conv2d_forward", "jax_brgemm_conv2d_backward_data",
                                     "jax_brgemm_conv2d_weight_update"}


def test_bfloat16_tangents_and_gradients_keep_their_dtypes(rng):
    x = normal(rng, 6, 5).astype(jnp.bfloat16)
    w, b = normal(rng, 5, 3), normal(rng, 3)  # float32 params, bfloat16 compute
    f = lambda x, w, b: nn.dense(x, w, b, activation="tanh")  # noqa: E731
    y, t = jax.jvp(f, (x, w, b), (x, w, b))
    assert y.dtype == t.dtype == jnp.bfloat16
    ref = jax.jvp(lambda x, w, b: jnp.tanh(x.astype(jnp.float32) @ w + b), (x, w, b), (x, w, b))[1]
    assert rel_err(t, ref) < 2e-2  # bfloat16 operands and result
    hess = jax.hessian(lambda w: jnp.sum(f(x, w, b).astype(jnp.float32) ** 2))(w)
    assert hess.dtype == jnp.float32 and hess.shape == (5, 3, 5, 3)


# ------------------------------------------------------------------ still reverse mode only


def test_reverse_mode_only_ops_name_themselves(rng):
    x, w_ih, w_hh, bias = normal(rng, 2, 3, 4), normal(rng, 4, 8), normal(rng, 2, 8), normal(rng, 8)
    lstm = lambda x: nn.lstm(x, w_ih, w_hh, bias)[0]  # noqa: E731
    assert jax.grad(lambda x: jnp.sum(lstm(x)))(x).shape == x.shape  # reverse mode works
    with pytest.raises(NotImplementedError, match="lstm: forward-mode"):
        jax.jvp(lstm, (x,), (x,))
    with pytest.raises(NotImplementedError, match="lstm: forward-mode"):
        jax.hessian(lambda x: jnp.sum(lstm(x)))(x)
    q = normal(rng, 1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="dot_product_attention: forward-mode"):
        jax.jacfwd(lambda q: nn.dot_product_attention(q, q, q))(q)
    blocks, index = normal(rng, 3, 2, 2), jnp.array([[0, 2], [1, 1]])
    with pytest.raises(NotImplementedError, match="brgemm_indexed: forward-mode"):
        jax.jvp(lambda a: jb.brgemm_indexed(a, blocks, index, index), (blocks,), (blocks,))
    # Its reverse mode is itself made of brgemm_indexed calls: grad of grad works.
    loss = lambda a: jnp.sum(jnp.sin(jb.brgemm_indexed(a, blocks, index, index)))  # noqa: E731
    ref = lambda a, b: jnp.sum(jnp.sin(jnp.einsum("pimk,pikn->pmn", a[index], b[index])))  # noqa: E731
    gg = jax.grad(lambda a: jnp.sum(jax.grad(loss)(a) ** 2))(blocks)
    check(gg, lambda a, b: jax.grad(lambda a: jnp.sum(jax.grad(ref)(a, b) ** 2))(a), blocks, blocks)
