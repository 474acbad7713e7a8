"""Flax parity: what Flax's own tests check of Linear, Conv, ConvTranspose and the recurrent
modules, asked of flax_layers' drop-ins against the stock modules.

The same constructor arguments as there (every padding form, strides, input and kernel
dilation, groups, masks, dtypes and param dtypes, precision, preferred_element_type,
unbatched and multi-batch inputs, 1-D kernels; for RNN time_major, reverse, keep_order,
return_carry, seq_lengths, unroll, other cells, and cells subclassed with their own step),
built from the same rngs: the same parameters, and results and gradients equal to stock
within float32 reassociation (the kernel sums in another order and fuses the bias). Compute
dtype bfloat16 is held to stock's own bfloat16 distance from a float32 run of the same
module, since the two round at different places.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx
from jax.lax import Precision

import flax_layers as fl
import flax_layers.linen as fll
from conftest import rel_err

F32_TOL = 1e-5  # float32 reassociation over at most a few hundred terms


def _inputs(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _state(module):
    return jax.tree.map(np.asarray, nnx.state(module, nnx.Param))


def _check_pair(ours, stock, x, dtype=jnp.float32):
    """Same parameters, same result and same gradients (to x and every parameter)."""
    assert jax.tree.structure(_state(ours)) == jax.tree.structure(_state(stock))
    for a, b in zip(jax.tree.leaves(_state(ours)), jax.tree.leaves(_state(stock))):
        np.testing.assert_array_equal(a, b)
    y_ours, y_stock = ours(x), stock(x)
    assert y_ours.shape == y_stock.shape and y_ours.dtype == y_stock.dtype
    tol = F32_TOL
    if np.dtype(dtype) == jnp.bfloat16:  # stock's own rounding against a float32 run
        stock32 = nnx.clone(stock)
        stock32.dtype = jnp.float32
        want = stock32(x)
        tol = 3 * rel_err(y_stock, want) + 2.0**-10
        y_stock = want
    assert rel_err(y_ours, y_stock) <= tol, (rel_err(y_ours, y_stock), tol)
    if np.dtype(dtype) != jnp.float32:
        return
    cot = _inputs(y_stock.shape, 1)

    def grads(model):
        loss = lambda m, x: jnp.sum(m(x).astype(jnp.float32) * cot)
        gm, gx = nnx.grad(loss, argnums=(0, 1))(model, x)
        return jax.tree.leaves(nnx.state(gm, nnx.Param)) + [gx]

    for g_ours, g_stock in zip(grads(ours), grads(stock)):
        assert g_ours.dtype == g_stock.dtype
        assert rel_err(g_ours, g_stock) <= _grad_tol(g_stock), rel_err(g_ours, g_stock)


def _grad_tol(g):
    """A gradient stored in a narrower param dtype rounds the float32 sum once: where the
    two sums straddle a rounding boundary, they differ by one ulp of that dtype."""
    return F32_TOL if g.dtype == jnp.float32 else F32_TOL + float(jnp.finfo(g.dtype).eps)


# ------------------------------------------------------------------ Linear / Dense


@pytest.mark.parametrize("use_bias, dtype, param_dtype, precision, preferred", [
    *itertools.product([True, False], [jnp.float32], [jnp.float32, jnp.float16, jnp.bfloat16],
                       [Precision.DEFAULT, Precision.HIGHEST], [None]),
    (True, jnp.float32, jnp.float32, Precision.HIGH, jnp.float32),  # a custom dot_general: stock
    (True, jnp.float16, jnp.float32, None, None),  # float16 compute: stock
    (True, jnp.bfloat16, jnp.float32, None, None),
    (False, jnp.bfloat16, jnp.bfloat16, None, None),
])
def test_dense_matches_linear(use_bias, dtype, param_dtype, precision, preferred):
    kwargs = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
                  preferred_element_type=preferred)
    ours, stock = fl.Dense(32, 64, rngs=nnx.Rngs(42), **kwargs), nnx.Linear(32, 64, rngs=nnx.Rngs(42), **kwargs)
    _check_pair(ours, stock, _inputs((3, 32)), dtype)


@pytest.mark.parametrize("shape", [(32,), (1, 32), (2, 3, 32), (2, 1, 3, 32)])
def test_dense_takes_any_batch_dims(shape):
    _check_pair(fl.Dense(32, 7, rngs=nnx.Rngs(0)), nnx.Linear(32, 7, rngs=nnx.Rngs(0)), _inputs(shape))


@pytest.mark.parametrize("ours_cls, stock_cls, args", [
    (fl.Dense, nnx.Linear, (2, 4)), (fl.Conv, nnx.Conv, (2, 4, 3)), (fl.ConvTranspose, nnx.ConvTranspose, (2, 4, 3))])
def test_same_graph_whatever_the_initializers(ours_cls, stock_cls, args):
    """Flax's check that initializers do not change the graph, and ours has stock's state."""
    inits = lambda init: dict(kernel_init=init, bias_init=init)
    g1 = nnx.graphdef(ours_cls(*args, **inits(nnx.initializers.zeros), rngs=nnx.Rngs(0)))
    g2 = nnx.graphdef(ours_cls(*args, **inits(nnx.initializers.ones), rngs=nnx.Rngs(0)))
    assert g1 == g2
    ours, stock = ours_cls(*args, rngs=nnx.Rngs(3)), stock_cls(*args, rngs=nnx.Rngs(3))
    assert jax.tree.map(np.shape, _state(ours)) == jax.tree.map(np.shape, _state(stock))


# ------------------------------------------------------------------ Conv

PADDINGS = ["SAME", "VALID", "CIRCULAR", "REFLECT", 2, (4, 2), ((1, 2), (0, 3)), [(2, 2), (1, 1)]]


CONV_SETTINGS = [  # strides, input_dilation, kernel_dilation, groups, use_bias, masked
    (None, 1, 1, 1, True, False),
    ((2, 3), 1, 1, 1, False, False),
    (1, 1, (2, 3), 3, True, True),      # Flax's nnx/linen consistency case
    ((2, 3), (2, 3), (2, 3), 3, True, False),
    (1, (2, 3), 1, 1, False, True),
]


# Stock refuses string padding with input dilation (as Flax's own test works around).
@pytest.mark.parametrize("padding, strides, input_dilation, kernel_dilation, groups, use_bias, masked", [
    (padding, *settings) for settings in CONV_SETTINGS for padding in PADDINGS
    if settings[1] == 1 or not isinstance(padding, str)])
def test_conv_matches_stock(padding, strides, input_dilation, kernel_dilation, groups, use_bias, masked):
    mask = jnp.tril(jnp.ones((7, 4, 3 // groups, 6))) if masked else None
    kwargs = dict(strides=strides, padding=padding, input_dilation=input_dilation,
                  kernel_dilation=kernel_dilation, feature_group_count=groups, use_bias=use_bias, mask=mask,
                  param_dtype=jnp.float16)
    ours = fl.Conv(3, 6, (7, 4), rngs=nnx.Rngs(42), **kwargs)
    stock = nnx.Conv(3, 6, (7, 4), rngs=nnx.Rngs(42), **kwargs)
    _check_pair(ours, stock, _inputs((24, 9, 3)))  # unbatched, as in Flax's test


@pytest.mark.parametrize("shape, kernel_size, padding, kwargs", [
    ((2, 10, 3), (3,), "CAUSAL", {}),
    ((2, 10, 3), (3,), "CIRCULAR", dict(kernel_dilation=2)),
    ((2, 10, 3), (4,), "SAME", dict(strides=2)),
    ((2, 2, 6, 7, 3), (3, 3), "SAME", {}),             # two batch dims
    ((1, 6, 7, 3), (3, 3), "VALID", dict(feature_group_count=3)),
    ((2, 8, 8, 4), (3, 3), "SAME", dict(dtype=jnp.bfloat16)),
    ((2, 8, 8, 4), (2, 2), "VALID", dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, strides=2)),
    ((2, 8, 8, 4), (3, 3), "SAME", dict(preferred_element_type=jnp.float32)),  # stock path
    ((2, 8, 8, 4), (3, 3), "SAME", dict(precision=Precision.HIGHEST)),
])
def test_conv_forms_match_stock(shape, kernel_size, padding, kwargs):
    cin = shape[-1]
    ours = fl.Conv(cin, 6, kernel_size, padding=padding, rngs=nnx.Rngs(1), **kwargs)
    stock = nnx.Conv(cin, 6, kernel_size, padding=padding, rngs=nnx.Rngs(1), **kwargs)
    _check_pair(ours, stock, _inputs(shape), kwargs.get("dtype", jnp.float32))


# ------------------------------------------------------------------ ConvTranspose


@pytest.mark.parametrize("padding", ["VALID", "SAME", "CIRCULAR", (4, 2), ((1, 2), (0, 1))])
@pytest.mark.parametrize("strides, kernel_dilation, use_bias, masked, transpose_kernel", [
    (None, 1, True, False, False),
    ((2, 3), (2, 3), False, True, False),   # Flax's nnx/linen consistency case
    ((2, 3), 1, True, False, True),
    (2, (2, 1), True, True, True),
])
def test_conv_transpose_matches_stock(padding, strides, kernel_dilation, use_bias, masked, transpose_kernel):
    mask = jnp.tril(jnp.ones((7, 4, 3, 6))) if masked else None
    if masked and transpose_kernel:
        mask = jnp.swapaxes(mask, 2, 3)
    kwargs = dict(strides=strides, padding=padding, kernel_dilation=kernel_dilation, use_bias=use_bias,
                  mask=mask, transpose_kernel=transpose_kernel, param_dtype=jnp.float16)
    ours = fl.ConvTranspose(3, 6, (7, 4), rngs=nnx.Rngs(42), **kwargs)
    stock = nnx.ConvTranspose(3, 6, (7, 4), rngs=nnx.Rngs(42), **kwargs)
    _check_pair(ours, stock, _inputs((24, 9, 3)))


@pytest.mark.parametrize("shape, kernel_size, kwargs", [
    ((2, 10, 3), (3,), dict(padding="CIRCULAR", strides=2)),
    ((3, 10, 3), (3,), dict(padding="VALID")),
    ((2, 2, 5, 6, 3), (3, 3), dict(padding="SAME", strides=2)),
    ((2, 5, 6, 4), (3, 3), dict(padding="SAME", strides=2, dtype=jnp.bfloat16)),
])
def test_conv_transpose_forms_match_stock(shape, kernel_size, kwargs):
    cin = shape[-1]
    ours = fl.ConvTranspose(cin, 5, kernel_size, rngs=nnx.Rngs(2), **kwargs)
    stock = nnx.ConvTranspose(cin, 5, kernel_size, rngs=nnx.Rngs(2), **kwargs)
    _check_pair(ours, stock, _inputs(shape), kwargs.get("dtype", jnp.float32))


# ------------------------------------------------------------------ linen


@pytest.mark.parametrize("ours_cls, stock_cls, kwargs, shape", [
    (fll.Dense, linen.Dense, dict(features=6), (4, 5)),
    (fll.Dense, linen.Dense, dict(features=6, use_bias=False, param_dtype=jnp.float16), (2, 3, 5)),
    (fll.Conv, linen.Conv, dict(features=6, kernel_size=(7, 4), padding="CIRCULAR", feature_group_count=3,
                                kernel_dilation=(2, 3)), (24, 9, 3)),
    (fll.Conv, linen.Conv, dict(features=4, kernel_size=(3,), padding="CAUSAL"), (2, 9, 3)),
    (fll.Conv, linen.Conv, dict(features=4, kernel_size=(3, 3), padding=((1, 0), (2, 1)), strides=(2, 1),
                                input_dilation=2), (2, 7, 6, 3)),
    (fll.ConvTranspose, linen.ConvTranspose, dict(features=6, kernel_size=(7, 4), strides=(2, 3),
                                                  padding=(4, 2), kernel_dilation=(2, 3)), (24, 9, 3)),
    (fll.ConvTranspose, linen.ConvTranspose, dict(features=5, kernel_size=(3,), padding="CIRCULAR"), (2, 9, 3)),
])
def test_linen_modules_match_stock(ours_cls, stock_cls, kwargs, shape):
    x = _inputs(shape)
    variables = stock_cls(**kwargs).init(jax.random.key(0), x)
    assert jax.tree.map(np.shape, ours_cls(**kwargs).init(jax.random.key(0), x)) == jax.tree.map(np.shape, variables)
    want = stock_cls(**kwargs).apply(variables, x)
    got = ours_cls(**kwargs).apply(variables, x)
    assert got.shape == want.shape and rel_err(got, want) <= F32_TOL
    loss = lambda cls: lambda v, x: jnp.sum(jnp.sin(cls(**kwargs).apply(v, x)))
    for g, w in zip(jax.tree.leaves(jax.grad(loss(ours_cls), argnums=(0, 1))(variables, x)),
                    jax.tree.leaves(jax.grad(loss(stock_cls), argnums=(0, 1))(variables, x))):
        assert rel_err(g, w) <= F32_TOL


# ------------------------------------------------------------------ RNN


class DroppedOut(nnx.OptimizedLSTMCell):
    """Flax's recurrent-dropout cell: a subclass whose own step drops out h."""

    def __init__(self, in_features, hidden_features, *, rngs, rate=0.25):
        super().__init__(in_features, hidden_features, rngs=rngs)
        self.drop = nnx.Dropout(rate, deterministic=False, rng_collection="recurrent_dropout", rngs=rngs)

    def __call__(self, carry, x):
        carry, h = super().__call__(carry, x)
        return carry, self.drop(h)


CELLS = {
    "ours": lambda: fl.OptimizedLSTMCell(3, 4, rngs=nnx.Rngs(5)),
    "stock-optimized": lambda: nnx.OptimizedLSTMCell(3, 4, rngs=nnx.Rngs(5)),
    "lstm": lambda: nnx.LSTMCell(3, 4, rngs=nnx.Rngs(5)),
    "gru": lambda: nnx.GRUCell(3, 4, rngs=nnx.Rngs(5)),
    # Flax's float16 case (the stock path); orthogonal init has no float16 QR in this JAX.
    "float16": lambda: nnx.OptimizedLSTMCell(3, 4, dtype=jnp.float16, param_dtype=jnp.float16, rngs=nnx.Rngs(5),
                                             recurrent_kernel_init=nnx.initializers.lecun_normal()),
}


def _rnn_pair(cell, **kwargs):
    return fl.RNN(CELLS[cell](), **kwargs), nnx.RNN(CELLS[cell](), **kwargs)


def _check_rnn(ours, stock, x, **call):
    got, want = ours(x, **call), stock(x, **call)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) <= F32_TOL, rel_err(g, w)
    loss = lambda m, x: sum(jnp.sum(jnp.sin(l)) for l in jax.tree.leaves(m(x, **call)))
    g_ours = jax.tree.leaves(nnx.grad(loss, argnums=(0, 1))(ours, x))
    g_stock = jax.tree.leaves(nnx.grad(loss, argnums=(0, 1))(stock, x))
    assert len(g_ours) == len(g_stock)
    for g, w in zip(g_ours, g_stock):
        assert g.dtype == w.dtype and rel_err(g, w) <= _grad_tol(w), rel_err(g, w)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("options", [
    {}, dict(time_major=True), dict(reverse=True), dict(reverse=True, keep_order=True),
    dict(return_carry=True), dict(unroll=2)], ids=lambda o: ",".join(o) or "default")
def test_rnn_matches_stock(cell, options):
    x = _inputs((4, 6, 3)) if not options.get("time_major") else _inputs((6, 4, 3))
    _check_rnn(*_rnn_pair(cell, **options), x)


def test_rnn_with_seq_lengths_and_initial_carry_matches_stock():
    ours, stock = _rnn_pair("ours", return_carry=True)
    x = _inputs((3, 5, 3))
    _check_rnn(ours, stock, x, seq_lengths=jnp.array([5, 2, 4]))
    carry = (_inputs((3, 4), 7), _inputs((3, 4), 8))
    _check_rnn(ours, stock, x, initial_carry=carry)


@pytest.mark.parametrize("batch", [(1,), (7,), (2, 3)])
def test_rnn_takes_any_batch_size(batch):
    _check_rnn(*_rnn_pair("ours"), _inputs(batch + (5, 3)))


def test_rnn_runs_a_subclassed_cells_dropout_like_stock():
    """Flax's recurrent-dropout test: the subclass's own step, the same rng streams."""
    make = lambda rnn_cls: rnn_cls(DroppedOut(3, 4, rngs=nnx.Rngs(0, recurrent_dropout=1)),
                                   broadcast_rngs="recurrent_dropout")
    ours, stock = make(fl.RNN), make(nnx.RNN)
    x = _inputs((8, 10, 3))
    got, want = ours(x), stock(x)
    assert rel_err(got, want) <= F32_TOL
    assert float(jnp.mean(want == 0)) > 0.1  # the dropout did run
    assert int(ours.cell.drop.rngs.count[...]) == int(stock.cell.drop.rngs.count[...]) == 1
