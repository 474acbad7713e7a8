"""Regressions from outside testing: silent wrong results and unnamed errors that were
found by fuzzing, bad-input sweeps and Flax's own test files."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

import flax_layers as fl


class ZeroOut(nnx.OptimizedLSTMCell):
    """A subclass with its own step: the stock RNN scans it, and so must ours."""

    def __call__(self, carry, inputs):
        c, h = carry
        return (jnp.zeros_like(c), jnp.zeros_like(h)), jnp.zeros_like(h)


class Doubled(fl.OptimizedLSTMCell):
    """A subclass of ours that calls the kernel step and changes its output."""

    def __call__(self, carry, inputs):
        carry, h = super().__call__(carry, inputs)
        return carry, 2.0 * h


def test_rnn_runs_a_subclassed_cells_own_step():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 3)), jnp.float32)
    for cell_type in (ZeroOut, Doubled):
        ours = fl.RNN(cell_type(3, 4, rngs=nnx.Rngs(0)))
        stock = nnx.RNN(cell_type(3, 4, rngs=nnx.Rngs(0)))
        want = stock(x)
        assert float(jnp.abs(want).max()) > 0 or cell_type is ZeroOut
        np.testing.assert_allclose(ours(x), want, rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------ sizes that overflow int64

import os
import subprocess
import sys

import jax
import pytest
from jax import lax

import jax_brgemm as jb
from conftest import rel_err


def _conv_ref(x, w, strides, padding, dilation):
    return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("kwargs, name", [
    (dict(strides=2**61), "strides"),
    (dict(strides=(1, 2**31)), "strides"),
    (dict(dilation=2**63), "dilation"),
    (dict(dilation=(2**40, 1)), "dilation"),
    (dict(padding=2**40), "padding"),
    (dict(padding=((0, 0), (-(2**62), 0))), "padding"),
    (dict(feature_group_count=2**63), "feature_group_count"),
])
def test_conv2d_refuses_sizes_that_overflow_naming_the_argument(kwargs, name):
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2))
    with pytest.raises(ValueError, match=name):
        jb.nn.conv2d(x, w, **kwargs)
    with pytest.raises(ValueError, match=name):  # the same at trace time
        jax.jit(lambda x, w: jb.nn.conv2d(x, w, **kwargs)).lower(x, w)


def test_conv2d_refuses_a_padded_input_past_2_56_elements():
    x, w = jax.ShapeDtypeStruct((2**20, 8, 8, 64), jnp.float32), jax.ShapeDtypeStruct((1, 1, 64, 64), jnp.float32)
    with pytest.raises(ValueError, match="over 2\\*\\*56"):
        jax.eval_shape(lambda x, w: jb.nn.conv2d(x, w, padding=2**31 - 1), x, w)


@pytest.mark.parametrize("kwargs, name", [
    (dict(input_dilation=2**61), "input_dilation"),
    (dict(input_dilation=2**30), "input_dilation"),  # valid alone, but the output is 2**60 pixels
    (dict(input_dilation=2, dilation=2**63), "dilation"),
    (dict(input_dilation=2, feature_group_count=2**63), "feature_group_count"),
])
def test_conv_transpose_refuses_sizes_that_overflow_naming_the_argument(kwargs, name):
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2))
    with pytest.raises(ValueError, match=name):
        jb.nn.conv_transpose(x, w, padding=((1, 1), (1, 1)), **kwargs)


@pytest.mark.parametrize("strides, dilation, padding", [
    ((1000, 2**31 - 1), 1, "VALID"),      # one output pixel per axis: the stride is never used
    ((7, 2**31 - 1), 1, ((2, 1), (0, 3))),
    (2**31 - 1, 1, "SAME"),
    (1, (2**31 - 1, 1), ((0, 0), (1, 1))),  # one row tap: its dilation is never used
])
def test_conv2d_takes_huge_but_harmless_strides_and_dilations(rng, strides, dilation, padding):
    """Values within 2**31 - 1 that change nothing (a stride past the input, one tap's
    dilation) are what lax gives, values and gradients, without a hang or an overflow."""
    r = 1 if dilation != 1 else 3
    x = jnp.asarray(rng.standard_normal((2, 5, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((r, 3, 3, 4)), jnp.float32)
    ref = lambda x, w: jnp.sum(jnp.sin(_conv_ref(x, w, _two(strides), padding, _two(dilation))))
    ours = lambda x, w: jnp.sum(jnp.sin(jb.nn.conv2d(x, w, strides=strides, padding=padding, dilation=dilation)))
    y = jb.nn.conv2d(x, w, strides=strides, padding=padding, dilation=dilation)
    with jax.enable_x64(True):
        x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
        assert rel_err(y, _conv_ref(x64, w64, _two(strides), padding, _two(dilation))) < 1e-5
        want = jax.grad(ref, argnums=(0, 1))(x64, w64)
    for got, ref_g in zip(jax.jit(jax.grad(ours, argnums=(0, 1)))(x, w), want):
        assert rel_err(got, ref_g) < 1e-5


def _two(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def test_attention_window_past_the_sequence_is_the_whole_sequence(rng):
    q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 2, 8)), jnp.float32) for _ in range(3))
    want = jb.nn.dot_product_attention(q, k, v)
    for window in (2**62, 2**63 - 1, (3, 2**63 - 1), (2**63 - 1, 0)):
        got = jb.nn.dot_product_attention(q, k, v, local_window_size=window)
        left, right = _two(window)
        mask = (np.arange(5)[None, :] >= np.arange(5)[:, None] - min(left, 9)) & \
               (np.arange(5)[None, :] <= np.arange(5)[:, None] + min(right, 9))
        assert rel_err(got, jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)[None, None])) < 1e-5
    assert rel_err(jb.nn.dot_product_attention(q, k, v, local_window_size=2**63 - 1), want) < 1e-6


def test_beta_zero_never_reads_c(rng):
    """BLAS's rule (documented on brgemm): with beta=0, c is not read, so NaN in it stays out."""
    a = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 5, 6)), jnp.float32)
    c = jnp.full((4, 6), jnp.nan, jnp.float32)
    want = np.einsum("imk,ikn->mn", np.asarray(a, np.float64), np.asarray(b, np.float64))
    assert rel_err(jb.brgemm(a, b, c, beta=0.0), want) < 1e-5
    assert np.isnan(np.asarray(jb.brgemm(a, b, c, beta=1.0))).all()


def _import_with(env, code="import jax_brgemm"):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **env))


@pytest.mark.parametrize("var", ["JAX_BRGEMM_SPIN_US", "JAX_BRGEMM_LINGER_US"])
def test_polling_setting_past_a_minute_is_a_clear_error(var):
    for value in ("99999999999999999999", "60000001"):
        result = _import_with({var: value})
        assert result.returncode != 0 and var in result.stderr and "60000000" in result.stderr, result.stderr
    assert _import_with({var: " 60000000 "}).returncode == 0


SATURATED = """
import os
import numpy as np
import jax.numpy as jnp
import jax_brgemm as jb
# Set after the import's check: the worker team (which starts on the first kernel call)
# reads it and must clamp, not overflow.
os.environ["JAX_BRGEMM_SPIN_US"] = "99999999999999999999"
os.environ["JAX_BRGEMM_LINGER_US"] = "0"
x, w = jnp.ones((64, 256)), jnp.ones((256, 256))
print("ok", float(jb.nn.dense(x, w)[0, 0]))
"""


def test_worker_team_clamps_a_setting_it_reads_unchecked():
    result = _import_with({}, SATURATED)
    assert result.returncode == 0 and "ok 256.0" in result.stdout, result.stderr


def test_attention_huge_window_is_no_window():
    import jax
    import jax_brgemm as jb

    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 6, 2, 8)), jnp.float32) for _ in range(3))
    want = jb.nn.dot_product_attention(q, k, v)
    got = jb.nn.dot_product_attention(q, k, v, local_window_size=2**63)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert jax.numpy.isfinite(got).all()
