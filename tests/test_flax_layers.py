"""flax_layers against the stock Flax modules they replace: the same parameters for the same
rngs, outputs and gradients (to parameters and inputs) equal with the same state, the
kernel actually used (FFI calls in the jaxpr) or the stock computation where documented,
states saved by one loaded by the other, Linen too, and bad arguments."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_err
from flax import nnx, serialization

import flax_layers as fl
from flax_layers import linen as fll

TOL = 2e-5


def ffi_targets(fn, module, *args) -> set[str]:
    """The jax_brgemm FFI targets in fn(module, *args)'s jaxpr."""
    if isinstance(module, nnx.Module):  # traced through split / merge: it may update rng counts
        graphdef, state = nnx.split(module)
        fn = (lambda f: lambda s, *a: f(nnx.merge(graphdef, s), *a))(fn)
        module = state
    return set(re.findall(r"jax_brgemm_\w+", str(jax.make_jaxpr(fn)(module, *args))))


def assert_trees_close(a, b, tol=TOL):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert rel_err(x, y) <= tol, rel_err(x, y)


def assert_same_state(a, b):
    sa, sb = nnx.state(a, nnx.Param), nnx.state(b, nnx.Param)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        np.testing.assert_array_equal(x, y)


def loss(module, *args):
    """A scalar of the outputs with a non-trivial cotangent, and the outputs."""
    out = module(*args)
    return sum(jnp.sum(jnp.sin(3.0 * y)) for y in jax.tree.leaves(out)), out


def check_against_stock(ours, stock, *args, kernel=True):
    """Same initial parameters; outputs and gradients (parameters, inputs) equal under jit;
    the kernel in the forward and backward passes (or, kernel=False, not at all)."""
    assert_same_state(ours, stock)
    grad = nnx.grad(loss, argnums=tuple(range(len(args) + 1)), has_aux=True)
    (g_ours, out_ours), (g_stock, out_stock) = nnx.jit(grad)(ours, *args), nnx.jit(grad)(stock, *args)
    assert_trees_close(out_ours, out_stock)
    assert_trees_close(nnx.state(g_ours[0]), nnx.state(g_stock[0]))
    assert_trees_close(g_ours[1:], g_stock[1:])
    targets = ffi_targets(grad, ours, *args)
    if kernel:
        assert len(targets) >= 2, targets  # a forward and a backward call
    else:
        assert not targets, targets


def bf16_round(tree):
    return jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(a.dtype), tree)


def check_bfloat16_against_stock(ours, stock, *args):
    """bfloat16 compute (``dtype=jnp.bfloat16``, float32 params): ours runs the kernel, and
    its outputs and gradients are about as close to float32 compute on the same bf16-rounded
    params and inputs as the stock module's are: within 1.25x the stock error (the two round
    at different places, so equal-quality errors scatter) or 2^-8 relative, bfloat16's
    rounding step. A wrong result is off by O(1)."""
    assert_same_state(ours, stock)
    reference = nnx.clone(stock)
    for _, module in nnx.iter_modules(reference):
        if hasattr(module, "dtype"):
            module.dtype = jnp.float32
    nnx.update(reference, bf16_round(nnx.state(reference, nnx.Param)))
    grad = nnx.jit(nnx.grad(loss, argnums=tuple(range(len(args) + 1)), has_aux=True))
    args16 = bf16_round(args)
    (g_ref, out_ref) = grad(reference, *args16)
    errors = {}
    for name, module in (("ours", ours), ("stock", stock)):
        g, out = grad(module, *args16)
        assert jax.tree.structure(out) == jax.tree.structure(out_ref)
        errors[name] = [rel_err(a.astype(jnp.float32), b) for a, b in zip(
            jax.tree.leaves((out, nnx.state(g[0]), g[1:])),
            jax.tree.leaves((out_ref, nnx.state(g_ref[0]), g_ref[1:])))]
    for mine, theirs in zip(errors["ours"], errors["stock"]):
        assert mine <= max(1.25 * theirs, 2.0 ** -8), errors
    assert len(ffi_targets(grad, ours, *args16)) >= 2


class Wrap(nnx.Module):
    """``fn(layer(x))``: a stock layer plus an activation, beside ours with it fused."""

    def __init__(self, layer, fn=lambda y: y):
        self.layer, self.fn = layer, fn

    def __call__(self, x):
        return self.fn(self.layer(x))


def normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


# ------------------------------------------------------------------ Dense


@pytest.mark.parametrize("shape,kwargs", [
    ((5, 7), {}), ((2, 3, 7), {}), ((7,), {}), ((5, 7), dict(use_bias=False)),
    ((5, 7), dict(kernel_init=nnx.initializers.normal(1.0), bias_init=nnx.initializers.uniform(1.0)))])
def test_dense(rng, shape, kwargs):
    ours, stock = fl.Dense(7, 9, rngs=nnx.Rngs(3), **kwargs), nnx.Linear(7, 9, rngs=nnx.Rngs(3), **kwargs)
    check_against_stock(ours, stock, normal(rng, *shape))


@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid", "tanh"])
def test_dense_fused_activation(rng, activation):
    ours = fl.Dense(6, 11, activation=activation, rngs=nnx.Rngs(0))
    stock = nnx.Linear(6, 11, rngs=nnx.Rngs(0))
    act = dict(relu=nnx.relu, gelu=lambda y: nnx.gelu(y, approximate=True),
               sigmoid=nnx.sigmoid, tanh=nnx.tanh)[activation]
    check_against_stock(Wrap(ours), Wrap(stock, act), normal(rng, 8, 6))


def test_dense_isas(isa, rng):
    ours, stock = fl.Dense(33, 17, rngs=nnx.Rngs(1)), nnx.Linear(33, 17, rngs=nnx.Rngs(1))
    check_against_stock(ours, stock, normal(rng, 19, 33))


@pytest.mark.parametrize("kw", [dict(param_dtype=jnp.bfloat16, dtype=jnp.float32), dict(param_dtype=jnp.bfloat16)])
def test_dense_float32_compute_from_bfloat16_params(rng, kw):
    # bfloat16 parameters promoted to float32 (by dtype, or by float32 inputs): a float32
    # computation the kernel serves.
    check_against_stock(fl.Dense(5, 4, rngs=nnx.Rngs(0), **kw), nnx.Linear(5, 4, rngs=nnx.Rngs(0), **kw),
                        normal(rng, 3, 5))


@pytest.mark.parametrize("kwargs", [dict(dtype=jnp.float16),
                                    dict(dot_general=lambda *a, **k: jax.lax.dot_general(*a, **k)),
                                    dict(preferred_element_type=jnp.float32, dtype=jnp.bfloat16)])
def test_dense_stock_fallback(rng, kwargs):
    """What the kernel does not serve runs the stock computation: identical results."""
    ours, stock = fl.Dense(5, 4, rngs=nnx.Rngs(0), **kwargs), nnx.Linear(5, 4, rngs=nnx.Rngs(0), **kwargs)
    x = normal(rng, 3, 5)
    assert not ffi_targets(lambda m, x: m(x), ours, x)
    np.testing.assert_array_equal(ours(x), stock(x))
    assert ours(x).dtype == stock(x).dtype


@pytest.mark.parametrize("kwargs", [dict(dtype=jnp.bfloat16), dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)])
def test_dense_bfloat16(rng, kwargs):
    ours = fl.Dense(20, 40, rngs=nnx.Rngs(0), **kwargs)
    stock = nnx.Linear(20, 40, rngs=nnx.Rngs(0), **kwargs)
    check_bfloat16_against_stock(ours, stock, normal(rng, 7, 20))


def test_dense_fallback_keeps_activation(rng):
    ours = fl.Dense(5, 4, dtype=jnp.float16, activation="relu", rngs=nnx.Rngs(0))
    stock = nnx.Linear(5, 4, dtype=jnp.float16, rngs=nnx.Rngs(0))
    x = normal(rng, 3, 5)
    np.testing.assert_array_equal(ours(x), nnx.relu(stock(x)))


# ------------------------------------------------------------------ Conv


CONV_CASES = [
    dict(kernel_size=(4, 3), strides=2),
    dict(kernel_size=(3, 3), strides=2, padding="VALID"),
    dict(kernel_size=(5, 3), strides=(2, 1), padding=((2, 1), (0, 3))),
    dict(kernel_size=[3, 2], padding=[(1, 1), 2], kernel_dilation=2),
    dict(kernel_size=(1, 1), use_bias=False, feature_group_count=2),
    dict(kernel_size=(3, 3), padding="CIRCULAR", kernel_dilation=(2, 1)),
    dict(kernel_size=(2, 3), padding="REFLECT", strides=2),
]


@pytest.mark.parametrize("kwargs", CONV_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_conv(rng, kwargs):
    ours, stock = fl.Conv(4, 6, rngs=nnx.Rngs(2), **kwargs), nnx.Conv(4, 6, rngs=nnx.Rngs(2), **kwargs)
    check_against_stock(ours, stock, normal(rng, 2, 9, 8, 4))


@pytest.mark.parametrize("shape", [(9, 8, 4), (2, 3, 9, 8, 4)])
def test_conv_batch_dims(rng, shape):
    ours, stock = fl.Conv(4, 5, (3, 3), rngs=nnx.Rngs(0)), nnx.Conv(4, 5, (3, 3), rngs=nnx.Rngs(0))
    check_against_stock(ours, stock, normal(rng, *shape))


def test_conv_mask_and_activation(rng):
    mask = jnp.asarray(rng.random((3, 3, 4, 5)) > 0.5, jnp.float32)
    ours = fl.Conv(4, 5, (3, 3), mask=mask, activation="relu", rngs=nnx.Rngs(0))
    stock = nnx.Conv(4, 5, (3, 3), mask=mask, rngs=nnx.Rngs(0))
    check_against_stock(Wrap(ours), Wrap(stock, nnx.relu), normal(rng, 2, 7, 7, 4))


def test_conv_isas(isa, rng):
    ours, stock = fl.Conv(8, 16, (3, 3), rngs=nnx.Rngs(1)), nnx.Conv(8, 16, (3, 3), rngs=nnx.Rngs(1))
    check_against_stock(ours, stock, normal(rng, 2, 10, 10, 8))


@pytest.mark.parametrize("kwargs", [dict(kernel_size=(3, 3)),
                                    dict(kernel_size=(3, 2), strides=2, padding="VALID", feature_group_count=2)])
def test_conv_bfloat16(rng, kwargs):
    ours = fl.Conv(4, 34, dtype=jnp.bfloat16, rngs=nnx.Rngs(2), **kwargs)
    stock = nnx.Conv(4, 34, dtype=jnp.bfloat16, rngs=nnx.Rngs(2), **kwargs)
    check_bfloat16_against_stock(ours, stock, normal(rng, 2, 9, 8, 4))


def test_batch_norm_bfloat16(rng):
    # Training mode, bfloat16 compute with float32 parameters and statistics, as the models
    # bench's --dtype bfloat16 builds it (an input far from zero mean, unit variance).
    ours = fl.BatchNorm(6, use_running_average=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    stock = nnx.BatchNorm(6, use_running_average=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    check_bfloat16_against_stock(ours, stock, 3.0 + 2.0 * normal(rng, 4, 5, 5, 6))
    assert ours(normal(rng, 2, 3, 3, 6).astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert ours.mean[...].dtype == jnp.float32


@pytest.mark.parametrize("kwargs,shape", [
    (dict(kernel_size=(3,)), (2, 9, 4)),                                # 1-D
    (dict(kernel_size=(3,), padding="CAUSAL", kernel_dilation=2), (2, 9, 4)),
    (dict(kernel_size=(5,), strides=2, padding="CIRCULAR"), (3, 11, 4)),
    (dict(kernel_size=(3, 3), input_dilation=2, padding=((1, 1), (2, 0))), (2, 6, 6, 4)),
    (dict(kernel_size=(3, 2), input_dilation=(2, 3), padding=((2, 1), (0, 1)), feature_group_count=2), (2, 5, 4, 4)),
])
def test_conv_1d_and_input_dilation(rng, kwargs, shape):
    """Served since the rules took over: 1-D convolutions with a unit height, input
    dilation as a transposed convolution."""
    ours, stock = fl.Conv(4, 6, rngs=nnx.Rngs(0), **kwargs), nnx.Conv(4, 6, rngs=nnx.Rngs(0), **kwargs)
    check_against_stock(ours, stock, normal(rng, *shape))


@pytest.mark.parametrize("kwargs,shape", [
    (dict(kernel_size=(3, 3), strides=2), (2, 5, 6, 4)),
    (dict(kernel_size=(4, 4), strides=2, padding="VALID", use_bias=False), (2, 5, 5, 4)),
    (dict(kernel_size=(3, 3), strides=(2, 1), padding=((1, 2), (0, 2)), kernel_dilation=(1, 2)), (2, 5, 6, 4)),
    (dict(kernel_size=(3, 3), strides=2, transpose_kernel=True), (2, 5, 6, 4)),
    (dict(kernel_size=(3, 3), strides=2, padding="CIRCULAR"), (2, 5, 6, 4)),
    (dict(kernel_size=(4,), strides=3), (2, 7, 4)),
])
def test_conv_transpose(rng, kwargs, shape):
    ours = fl.ConvTranspose(4, 6, rngs=nnx.Rngs(3), **kwargs)
    stock = nnx.ConvTranspose(4, 6, rngs=nnx.Rngs(3), **kwargs)
    check_against_stock(ours, stock, normal(rng, *shape))


def test_conv_transpose_activation_and_bfloat16(rng):
    ours = fl.ConvTranspose(4, 6, (3, 3), strides=2, activation="relu", rngs=nnx.Rngs(4))
    stock = nnx.ConvTranspose(4, 6, (3, 3), strides=2, rngs=nnx.Rngs(4))
    check_against_stock(Wrap(ours), Wrap(stock, nnx.relu), normal(rng, 2, 5, 5, 4))
    ours = fl.ConvTranspose(4, 6, (3, 3), strides=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(4))
    stock = nnx.ConvTranspose(4, 6, (3, 3), strides=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(4))
    check_bfloat16_against_stock(ours, stock, normal(rng, 2, 5, 5, 4))


@pytest.mark.parametrize("kwargs,shape", [
    (dict(kernel_size=(2, 2, 2)), (1, 5, 5, 5, 4)),                    # 3-D
    (dict(kernel_size=(3, 3), dtype=jnp.float16), (2, 6, 6, 4)),
    (dict(kernel_size=(3, 3), padding=((-1, 2), (1, 1))), (2, 6, 6, 4)),
])
def test_conv_stock_fallback(rng, kwargs, shape):
    ours, stock = fl.Conv(4, 3, rngs=nnx.Rngs(0), **kwargs), nnx.Conv(4, 3, rngs=nnx.Rngs(0), **kwargs)
    x = normal(rng, *shape)
    assert not ffi_targets(lambda m, x: m(x), ours, x)
    np.testing.assert_array_equal(ours(x), stock(x))


# ------------------------------------------------------------------ LSTM


def carry(rng, *shape):
    return normal(rng, *shape), normal(rng, *shape)


@pytest.mark.parametrize("batch", [(2, 3), ()])
def test_lstm_cell(rng, batch):
    ours = fl.OptimizedLSTMCell(6, 7, rngs=nnx.Rngs(4))
    stock = nnx.OptimizedLSTMCell(6, 7, rngs=nnx.Rngs(4))
    check_against_stock(ours, stock, carry(rng, *batch, 7), normal(rng, *batch, 6))


def test_lstm_cell_parameters_are_the_stock_layout():
    state = nnx.state(fl.OptimizedLSTMCell(6, 7, rngs=nnx.Rngs(0)), nnx.Param)
    shapes = {"/".join(map(str, path)): v.shape for path, v in jax.tree.leaves_with_path(nnx.to_pure_dict(state))
              for path in [[k.key for k in path]]}
    assert shapes == {"dense_i/kernel": (6, 28), "dense_h/kernel": (7, 28), "dense_h/bias": (28,)}


def test_lstm_cell_in_stock_rnn(rng):
    """Our cell under nnx.RNN's scan: one kernel call per step."""
    ours = nnx.RNN(fl.OptimizedLSTMCell(3, 4, rngs=nnx.Rngs(0)))
    stock = nnx.RNN(nnx.OptimizedLSTMCell(3, 4, rngs=nnx.Rngs(0)))
    check_against_stock(ours, stock, normal(rng, 2, 5, 3))


def test_lstm_cell_stock_fallback(rng):
    ours = fl.OptimizedLSTMCell(3, 4, gate_fn=nnx.hard_sigmoid, rngs=nnx.Rngs(0))
    stock = nnx.OptimizedLSTMCell(3, 4, gate_fn=nnx.hard_sigmoid, rngs=nnx.Rngs(0))
    args = carry(rng, 2, 4), normal(rng, 2, 3)
    assert not ffi_targets(lambda m, *a: m(*a), ours, *args)
    assert_trees_close(ours(*args), stock(*args), tol=0)


def test_lstm_cell_bfloat16(rng):
    ours = fl.OptimizedLSTMCell(6, 36, dtype=jnp.bfloat16, rngs=nnx.Rngs(4))
    stock = nnx.OptimizedLSTMCell(6, 36, dtype=jnp.bfloat16, rngs=nnx.Rngs(4))
    args = carry(rng, 3, 36), normal(rng, 3, 6)
    (c, h), _ = ours(*args)
    assert c.dtype == h.dtype == jnp.float32  # as the stock cell with a float32 carry
    check_bfloat16_against_stock(ours, stock, *args)


@pytest.mark.parametrize("kwargs", [dict(), dict(return_carry=True, time_major=True)])
def test_lstm_bfloat16(rng, kwargs):
    ours = fl.LSTM(5, 40, dtype=jnp.bfloat16, rngs=nnx.Rngs(7), **kwargs)
    stock = nnx.RNN(nnx.OptimizedLSTMCell(5, 40, dtype=jnp.bfloat16, rngs=nnx.Rngs(7)), **kwargs)
    check_bfloat16_against_stock(ours, stock, normal(rng, 3, 6, 5))


LSTM_CASES = [
    dict(),
    dict(reverse=True),
    dict(reverse=True, keep_order=True, return_carry=True),
    dict(return_carry=True, time_major=True),
]


@pytest.mark.parametrize("kwargs", LSTM_CASES, ids=lambda k: ",".join(k) or "default")
def test_lstm(rng, kwargs):
    ours = fl.LSTM(5, 8, rngs=nnx.Rngs(7), **kwargs)
    stock = nnx.RNN(nnx.OptimizedLSTMCell(5, 8, rngs=nnx.Rngs(7)), **kwargs)
    shape = (6, 3, 5) if kwargs.get("time_major") else (3, 6, 5)
    check_against_stock(ours, stock, normal(rng, *shape))


def test_lstm_initial_carry_and_batch_dims(rng):
    ours = fl.LSTM(5, 8, return_carry=True, rngs=nnx.Rngs(7))
    stock = nnx.RNN(nnx.OptimizedLSTMCell(5, 8, rngs=nnx.Rngs(7)), return_carry=True)
    x, c0 = normal(rng, 2, 3, 6, 5), carry(rng, 2, 3, 8)

    class WithCarry(nnx.Module):
        def __init__(self, rnn):
            self.rnn = rnn

        def __call__(self, x, c, h):
            return self.rnn(x, initial_carry=(c, h))

    check_against_stock(WithCarry(ours), WithCarry(stock), x, *c0)


def test_lstm_unbatched(rng):
    ours = fl.LSTM(5, 8, rngs=nnx.Rngs(7), return_carry=True)
    stock = nnx.RNN(nnx.OptimizedLSTMCell(5, 8, rngs=nnx.Rngs(7)), return_carry=True)
    check_against_stock(ours, stock, normal(rng, 6, 5))  # (T, C)


def test_lstm_isas(isa, rng):
    ours = fl.LSTM(16, 32, rngs=nnx.Rngs(1))
    stock = nnx.RNN(nnx.OptimizedLSTMCell(16, 32, rngs=nnx.Rngs(1)))
    check_against_stock(ours, stock, normal(rng, 4, 7, 16))


def test_rnn_over_stock_cell_runs_the_whole_sequence_in_one_call(rng):
    ours = fl.RNN(nnx.OptimizedLSTMCell(5, 8, rngs=nnx.Rngs(0)))
    stock = nnx.RNN(nnx.OptimizedLSTMCell(5, 8, rngs=nnx.Rngs(0)))
    check_against_stock(ours, stock, normal(rng, 3, 6, 5))


@pytest.mark.filterwarnings("ignore:carry_init is provided in __init__")
def test_lstm_nonzero_carry_init_and_rng_streams(rng):
    """With a random carry_init the carry comes from the same rng stream as nnx.RNN's."""
    init = nnx.initializers.normal(1.0)
    ours = fl.LSTM(5, 8, rngs=nnx.Rngs(7), carry_init=init)
    stock = nnx.RNN(nnx.OptimizedLSTMCell(5, 8, rngs=nnx.Rngs(7), carry_init=init))
    x = normal(rng, 3, 6, 5)
    for _ in range(2):  # the stream advances alike
        assert_trees_close(ours(x), stock(x))
    keys = nnx.state(ours, nnx.RngKey), nnx.state(stock, nnx.RngKey)
    assert_trees_close(*(jax.tree.map(jax.random.key_data, k) for k in keys), tol=0)
    assert_trees_close(nnx.state(ours, nnx.RngCount), nnx.state(stock, nnx.RngCount), tol=0)


def test_lstm_stock_fallback(rng):
    """seq_lengths and other cells run nnx.RNN's scan."""
    ours = fl.LSTM(5, 8, rngs=nnx.Rngs(7), return_carry=True)
    stock = nnx.RNN(nnx.OptimizedLSTMCell(5, 8, rngs=nnx.Rngs(7)), return_carry=True)
    x, lengths = normal(rng, 3, 6, 5), jnp.asarray([6, 2, 4])
    # (our cell, under nnx.RNN's scan: one kernel call per step)
    assert_trees_close(ours(x, seq_lengths=lengths), stock(x, seq_lengths=lengths))
    gru = fl.RNN(nnx.GRUCell(5, 8, rngs=nnx.Rngs(0)))
    assert not ffi_targets(lambda m, x: m(x), gru, x)
    np.testing.assert_array_equal(gru(x), nnx.RNN(nnx.GRUCell(5, 8, rngs=nnx.Rngs(0)))(x))


# ------------------------------------------------------------------ states and training


class Model(nnx.Module):
    """A small model of every layer, built from either set of modules."""

    def __init__(self, layers, rngs):
        self.conv = layers.Conv(3, 4, (3, 3), rngs=rngs)
        self.lstm = (layers.LSTM(4, 6, rngs=rngs) if layers is fl
                     else nnx.RNN(nnx.OptimizedLSTMCell(4, 6, rngs=rngs)))
        self.head = (layers.Dense if layers is fl else layers.Linear)(6, 2, rngs=rngs)

    def __call__(self, x):  # x (N, H, W, 3): the rows of the feature map as sequences
        y = nnx.relu(self.conv(x))
        y = self.lstm(y.reshape(y.shape[0], -1, 4))
        return self.head(y[:, -1])


def test_state_saved_by_one_loads_into_the_other(rng):
    ours, stock = Model(fl, nnx.Rngs(0)), Model(nnx, nnx.Rngs(5))
    x = normal(rng, 2, 4, 4, 3)
    # Save the stock model's state as bytes, load them into ours.
    saved = serialization.msgpack_serialize(nnx.to_pure_dict(nnx.state(stock, nnx.Param)))
    state = nnx.state(ours, nnx.Param)
    nnx.replace_by_pure_dict(state, serialization.msgpack_restore(saved))
    nnx.update(ours, state)
    assert_same_state(ours, stock)
    assert rel_err(ours(x), stock(x)) < TOL
    # And the other way round, through nnx.split / nnx.merge.
    other = Model(fl, nnx.Rngs(9))
    graphdef, _ = nnx.split(Model(nnx, nnx.Rngs(1)))
    back = nnx.merge(graphdef, nnx.state(other))
    assert rel_err(back(x), other(x)) < TOL


def test_training_steps_match_stock(rng):
    """A few optax steps under nnx.jit land on the same parameters."""
    x, labels = normal(rng, 8, 4, 4, 3), jnp.asarray(rng.integers(0, 2, 8))

    def train(model):
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer):
            def objective(m):
                return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

            value, grads = nnx.value_and_grad(objective)(model)
            optimizer.update(model, grads)
            return value

        return [float(step(model, optimizer)) for _ in range(5)], nnx.state(model, nnx.Param)

    (loss_ours, p_ours), (loss_stock, p_stock) = train(Model(fl, nnx.Rngs(0))), train(Model(nnx, nnx.Rngs(0)))
    assert loss_ours[-1] < loss_ours[0]
    np.testing.assert_allclose(loss_ours, loss_stock, rtol=1e-5)
    assert_trees_close(p_ours, p_stock, tol=1e-4)  # adam normalises: small differences grow a little


def test_vmap_over_inputs(rng):
    ours, stock = fl.Dense(5, 3, rngs=nnx.Rngs(0)), nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    x = normal(rng, 4, 2, 5)
    f = lambda m, x: m(x)  # noqa: E731
    assert rel_err(nnx.vmap(f, in_axes=(None, 0))(ours, x), nnx.vmap(f, in_axes=(None, 0))(stock, x)) < TOL


def test_bad_activation_names_the_argument():
    with pytest.raises(ValueError, match="activation"):
        fl.Dense(3, 4, activation="swish", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="activation"):
        fl.Conv(3, 4, (3, 3), activation="swish", rngs=nnx.Rngs(0))


def test_wrong_input_features_are_an_error(rng):
    with pytest.raises((ValueError, TypeError), match="kernel"):
        fl.Dense(3, 4, rngs=nnx.Rngs(0))(normal(rng, 2, 5))


# ------------------------------------------------------------------ Linen


def check_linen(ours, stock, *args, kernel=True):
    v_ours, v_stock = ours.init(jax.random.key(3), *args), stock.init(jax.random.key(3), *args)
    assert_trees_close(v_ours, v_stock, tol=0)

    def linen_loss(module):
        return lambda v, *a: loss(functools.partial(module.apply, v), *a)

    argnums = tuple(range(len(args) + 1))
    grad_ours = jax.grad(linen_loss(ours), argnums, has_aux=True)
    g_ours, out_ours = jax.jit(grad_ours)(v_stock, *args)
    g_stock, out_stock = jax.jit(jax.grad(linen_loss(stock), argnums, has_aux=True))(v_stock, *args)
    assert_trees_close(out_ours, out_stock)
    assert_trees_close(g_ours, g_stock)
    targets = ffi_targets(grad_ours, v_stock, *args)
    assert (len(targets) >= 2) if kernel else not targets, targets


@pytest.mark.parametrize("kwargs", [{}, dict(use_bias=False)])
def test_linen_dense(rng, kwargs):
    check_linen(fll.Dense(9, **kwargs), nn.Dense(9, **kwargs), normal(rng, 2, 3, 7))


def test_linen_dense_activation(rng):
    x = normal(rng, 4, 7)
    v = nn.Dense(5).init(jax.random.key(0), x)
    assert rel_err(fll.Dense(5, activation="tanh").apply(v, x), jnp.tanh(nn.Dense(5).apply(v, x))) < TOL


@pytest.mark.parametrize("kwargs", [dict(kernel_size=(3, 3)),
                                    dict(kernel_size=(3, 2), strides=2, padding="CIRCULAR"),
                                    dict(kernel_size=(3, 3), feature_group_count=2, kernel_dilation=(1, 2))])
def test_linen_conv(rng, kwargs):
    check_linen(fll.Conv(6, **kwargs), nn.Conv(6, **kwargs), normal(rng, 2, 8, 8, 4))


@pytest.mark.parametrize("ours,stock,shape", [
    (fll.Conv(6, (3,)), nn.Conv(6, (3,)), (2, 9, 4)),
    (fll.Conv(6, (3, 3), input_dilation=2, padding=1), nn.Conv(6, (3, 3), input_dilation=2, padding=1),
     (2, 6, 6, 4)),
    (fll.ConvTranspose(6, (3, 3), strides=(2, 2)), nn.ConvTranspose(6, (3, 3), strides=(2, 2)), (2, 5, 6, 4)),
])
def test_linen_conv_1d_input_dilation_and_transpose(rng, ours, stock, shape):
    check_linen(ours, stock, normal(rng, *shape))


def test_linen_conv_bfloat16(rng):
    x = normal(rng, 2, 8, 8, 4)
    ours, stock = fll.Conv(6, (3, 3), dtype=jnp.bfloat16), nn.Conv(6, (3, 3), dtype=jnp.bfloat16)
    v = stock.init(jax.random.key(0), x)
    assert len(ffi_targets(ours.apply, v, x)) == 1
    out, ref = ours.apply(v, x), stock.apply(v, x)
    assert out.dtype == ref.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), ref.astype(jnp.float32)) < 2.0 ** -7


def test_linen_lstm_cell_bfloat16(rng):
    args = carry(rng, 3, 33), normal(rng, 3, 5)
    ours, stock = fll.OptimizedLSTMCell(33, dtype=jnp.bfloat16), nn.OptimizedLSTMCell(33, dtype=jnp.bfloat16)
    v = stock.init(jax.random.key(0), *args)
    assert len(ffi_targets(ours.apply, v, *args)) == 1
    out, ref = ours.apply(v, *args), stock.apply(v, *args)
    assert jax.tree.map(lambda a: a.dtype, out) == jax.tree.map(lambda a: a.dtype, ref)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        assert rel_err(a.astype(jnp.float32), b.astype(jnp.float32)) < 2.0 ** -7


def test_linen_lstm_cell(rng):
    args = carry(rng, 3, 7), normal(rng, 3, 5)
    check_linen(fll.OptimizedLSTMCell(7), nn.OptimizedLSTMCell(7), *args)


@pytest.mark.parametrize("ours,stock,shape", [
    (fll.Dense(4, dtype=jnp.float16), nn.Dense(4, dtype=jnp.float16), (2, 5)),
    (fll.Conv(4, (3, 3, 3)), nn.Conv(4, (3, 3, 3)), (1, 5, 6, 6, 5)),
])
def test_linen_stock_fallback(rng, ours, stock, shape):
    x = normal(rng, *shape)
    v = stock.init(jax.random.key(0), x)
    assert_trees_close(ours.init(jax.random.key(0), x), v, tol=0)
    assert not ffi_targets(ours.apply, v, x)
    np.testing.assert_array_equal(ours.apply(v, x), stock.apply(v, x))


def test_linen_lstm_cell_stock_fallback(rng):
    args = carry(rng, 3, 7), normal(rng, 3, 5)
    ours, stock = fll.OptimizedLSTMCell(7, gate_fn=nn.hard_sigmoid), nn.OptimizedLSTMCell(7, gate_fn=nn.hard_sigmoid)
    v = stock.init(jax.random.key(0), *args)
    assert_trees_close(ours.init(jax.random.key(0), *args), v, tol=0)
    assert not ffi_targets(ours.apply, v, *args)
    assert_trees_close(ours.apply(v, *args), stock.apply(v, *args), tol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_is_nnx_max_pool(dtype):
    """fl.max_pool: nnx.max_pool's results and gradient (identical: ties included) on the
    kernel; a 1-D window or float16 runs the stock function."""
    x = jnp.asarray(np.maximum(np.random.default_rng(0).standard_normal((2, 9, 8, 5)), 0), dtype)
    args = ((3, 3), (2, 2), "SAME")
    assert "jax_brgemm_max_pool_forward" in jax.jit(lambda x: fl.max_pool(x, *args)).lower(x).as_text()
    np.testing.assert_array_equal(fl.max_pool(x, *args), nnx.max_pool(x, *args))
    loss = lambda f: lambda x: (f(x, *args).astype(jnp.float32) ** 2).sum()  # noqa: E731
    np.testing.assert_array_equal(jax.grad(loss(fl.max_pool))(x), jax.grad(loss(nnx.max_pool))(x))
    seq = x[:, :, 0]
    np.testing.assert_array_equal(fl.max_pool(seq, (2,)), nnx.max_pool(seq, (2,)))
    half = x.astype(jnp.float16)
    np.testing.assert_array_equal(fl.max_pool(half, (2, 2)), nnx.max_pool(half, (2, 2)))
