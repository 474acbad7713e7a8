"""jax_brgemm.nn.max_pool against a float64 lax.reduce_window reference (forward) and
jax.grad of flax's max_pool (the gradient, which must be identical: ties, padding, NaN and
inf included): odd sizes, strides 1-3, windows 1x1-3x3, every padding form, bfloat16,
every ISA path, leading batch dims, jit, vmap, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen

import jax_brgemm as jb

# (shape, window, strides, padding): odd sizes, a height over the backward's 16-row bands
# (37), windows wider than their stride (overlapping) and narrower (gaps).
CASES = [
    ((2, 7, 9, 5), (3, 3), (2, 2), "SAME"),
    ((2, 7, 9, 5), (3, 3), (1, 1), "SAME"),
    ((1, 37, 11, 19), (3, 3), (2, 2), "SAME"),
    ((3, 8, 6, 16), (2, 2), (2, 2), "VALID"),
    ((2, 9, 7, 33), (3, 2), (3, 1), "VALID"),
    ((2, 5, 5, 3), (1, 1), (2, 3), "VALID"),
    ((1, 6, 7, 17), (3, 3), (3, 2), ((1, 2), (2, 0))),
    ((2, 5, 4, 8), (2, 3), (1, 2), ((0, 3), (1, 1))),
]


def _reference(x, window, strides, padding):
    """float64 max pooling (lax.reduce_window, as flax's pool calls it)."""
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(x, np.float64))
        pads = padding if isinstance(padding, str) else ((0, 0), *padding, (0, 0))
        y = jax.lax.reduce_window(x64, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1), pads)
        return np.asarray(y)


def _flax_grad(x, g, window, strides, padding):
    f = lambda x: linen.max_pool(x, window, strides=strides, padding=padding)
    return jax.jit(lambda x, g: jax.vjp(f, x)[1](g)[0])(x, g)


def _ours(x, window, strides, padding):
    return jb.nn.max_pool(x, window, strides=strides, padding=padding)


def _our_grad(x, g, window, strides, padding):
    return jax.jit(lambda x, g: jax.vjp(lambda x: _ours(x, window, strides, padding), x)[1](g)[0])(x, g)


def _same(a, b):
    return np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), equal_nan=True)


def _tied(rng, shape):
    """Values with many ties: relu of a few levels (zeros in most windows)."""
    return np.maximum(rng.integers(-3, 3, shape), 0).astype(np.float32)


@pytest.mark.parametrize("shape,window,strides,padding", CASES)
def test_forward_and_grad_float32(isa, shape, window, strides, padding):
    rng = np.random.default_rng(0)
    for x in (rng.standard_normal(shape).astype(np.float32), _tied(rng, shape)):
        y = jax.jit(lambda x: _ours(x, window, strides, padding))(x)
        ref = _reference(x, window, strides, padding)
        assert y.dtype == jnp.float32 and y.shape == ref.shape
        np.testing.assert_array_equal(np.asarray(y, np.float64), ref)
        g = rng.standard_normal(ref.shape).astype(np.float32)
        # Overlapping windows add in XLA's order, so the sums agree to the bit.
        assert _same(_our_grad(x, g, window, strides, padding), _flax_grad(x, g, window, strides, padding))


@pytest.mark.parametrize("shape,window,strides,padding", CASES[:3] + CASES[6:7])
def test_bfloat16(isa_bf16, shape, window, strides, padding):
    rng = np.random.default_rng(1)
    for x in (rng.standard_normal(shape), _tied(rng, shape)):
        x = jnp.asarray(x, jnp.bfloat16)
        y = _ours(x, window, strides, padding)
        assert y.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(y, np.float64), _reference(x, window, strides, padding))
        g = jnp.asarray(rng.standard_normal(y.shape) * 4, jnp.bfloat16)
        dx = _our_grad(x, g, window, strides, padding)
        assert dx.dtype == jnp.bfloat16
        # bfloat16 sums round after every add, as XLA's scatter-add: identical too.
        assert _same(dx, _flax_grad(x, g, window, strides, padding))


def test_tie_rule_first_in_window_order():
    """Equal values: the gradient goes to the first pixel of the window (row-major)."""
    x = jnp.zeros((1, 5, 5, 1)).at[0, 1, 3, 0].set(2.0).at[0, 2, 2, 0].set(2.0).at[0, 3, 1, 0].set(2.0)
    g = jnp.zeros((1, 3, 3, 1)).at[0, 1, 1, 0].set(1.0)
    dx = _our_grad(x, g, (3, 3), (2, 2), "SAME")[0, :, :, 0]
    expect = np.zeros((5, 5))
    expect[1, 3] = 1.0  # window rows 1-3, cols 1-3: (1, 3) comes first
    np.testing.assert_array_equal(dx, expect)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nan_and_inf(isa_bf16, dtype):
    """NaN propagates in the forward as XLA's max; the gradient follows XLA's choice (after a
    NaN the next pixel wins; a padding tap can win over -inf and drops its gradient)."""
    rng = np.random.default_rng(2)
    values = np.array([-np.inf, np.inf, np.nan, 0.0, -0.0, 1.0], np.float32)
    for window, strides, padding in [((3, 3), (2, 2), "SAME"), ((2, 3), (1, 1), ((1, 2), (2, 0)))]:
        x = jnp.asarray(values[rng.integers(0, len(values), (2, 7, 8, 18))], dtype)
        y = _ours(x, window, strides, padding)
        assert _same(y, linen.max_pool(x, window, strides=strides, padding=padding))
        g = jnp.asarray(rng.standard_normal(y.shape), dtype)
        assert _same(_our_grad(x, g, window, strides, padding), _flax_grad(x, g, window, strides, padding))


@pytest.mark.parametrize("shape", [(9, 8, 6), (2, 3, 9, 8, 6)])
def test_leading_dims_as_flax(shape):
    """No batch dim, or several, as flax's pool accepts them."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal(shape), jnp.float32)
    y = _ours(x, (3, 3), (2, 2), "SAME")
    want = linen.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    assert y.shape == want.shape and _same(y, want)
    g = jnp.ones_like(y)
    assert _same(_our_grad(x, g, (3, 3), (2, 2), "SAME"), _flax_grad(x, g, (3, 3), (2, 2), "SAME"))


def test_defaults_as_flax():
    """strides default to 1, padding to VALID."""
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 6, 5, 3)), jnp.float32)
    assert _same(jb.nn.max_pool(x, (2, 2)), linen.max_pool(x, (2, 2)))


def test_vmap_folds_into_the_batch():
    rng = np.random.default_rng(5)
    x = jnp.asarray(_tied(rng, (3, 2, 7, 7, 4)))
    f = lambda x: _ours(x, (3, 3), (2, 2), "SAME")
    ref = lambda x: linen.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    assert _same(jax.vmap(f)(x), jax.vmap(ref)(x))
    loss = lambda p: lambda x: (p(x) * jnp.arange(4.0)).sum()
    assert _same(jax.vmap(jax.grad(loss(f)))(x), jax.vmap(jax.grad(loss(ref)))(x))
    # The mapped axis in the middle, and one jaxpr with one forward call.
    assert _same(jax.vmap(f, in_axes=1, out_axes=1)(x), jax.vmap(ref, in_axes=1, out_axes=1)(x))
    text = str(jax.make_jaxpr(jax.vmap(f))(x))
    assert text.count("jax_brgemm_max_pool_forward") == 1


def test_empty():
    assert _ours(jnp.zeros((0, 5, 5, 3)), (2, 2), None, "VALID").shape == (0, 4, 4, 3)
    assert _ours(jnp.zeros((2, 5, 5, 0)), (2, 2), (2, 2), "SAME").shape == (2, 3, 3, 0)


def test_bad_input_names_the_argument():
    x = jnp.zeros((2, 6, 6, 3))
    with pytest.raises(TypeError, match="inputs"):
        _ours(jnp.zeros((2, 6, 6, 3), jnp.int32), (2, 2), None, "VALID")
    with pytest.raises(TypeError, match="inputs"):
        _ours(jnp.zeros((2, 6, 6, 3), jnp.float16), (2, 2), None, "VALID")
    with pytest.raises(ValueError, match="window_shape"):
        _ours(x, (2, 2, 2), None, "VALID")  # a 3-D window
    with pytest.raises(ValueError, match="window_shape"):
        _ours(x, (2,), None, "VALID")
    with pytest.raises(ValueError, match="window_shape"):
        _ours(x, (0, 2), None, "VALID")
    with pytest.raises(TypeError, match="strides"):
        _ours(x, (2, 2), (1.5, 1), "VALID")
    with pytest.raises(ValueError, match="strides"):
        _ours(x, (2, 2), (1, 2, 1), "VALID")
    with pytest.raises(ValueError, match="padding"):
        _ours(x, (2, 2), None, "FULL")
    with pytest.raises(ValueError, match="padding"):
        _ours(x, (2, 2), None, ((1, 1),))
    with pytest.raises(ValueError, match="padding"):
        _ours(x, (2, 2), None, ((-1, 0), (0, 0)))
    with pytest.raises(ValueError, match="window_shape"):
        _ours(x, (7, 2), None, "VALID")  # larger than the input
    with pytest.raises(ValueError, match="inputs"):
        _ours(jnp.zeros((6, 6)), (2, 2), None, "VALID")


def test_handler_rejects_a_bad_geometry():
    """The C++ checks again and returns an error, never crashes."""
    x = jnp.zeros((1, 4, 4, 2))
    out = jax.ShapeDtypeStruct((1, 2, 2, 2), jnp.float32)
    for geometry in ([2, 2, 2, 2, 0, 0, 0], [0, 2, 2, 2, 0, 0, 0, 0], [2, 2, 2, 2, -1, 0, 0, 0],
                     [9, 2, 1, 1, 0, 0, 0, 0]):
        with pytest.raises(Exception, match="jax_brgemm"):
            jax.ffi.ffi_call("jax_brgemm_max_pool_forward", out)(x, geometry=np.array(geometry, np.int64))
    with pytest.raises(Exception, match="result must have shape"):
        jax.ffi.ffi_call("jax_brgemm_max_pool_forward", jax.ShapeDtypeStruct((1, 3, 2, 2), jnp.float32))(
            x, geometry=np.array([2, 2, 2, 2, 0, 0, 0, 0], np.int64))


SHARDED = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from flax import linen
import jax_brgemm as jb

x = jnp.asarray(np.maximum(np.random.default_rng(0).standard_normal((8, 9, 9, 16)), 0), jnp.float32)
loss = lambda pool: lambda x: (pool(x, (3, 3), (2, 2), "SAME") ** 2).sum()
step = jax.jit(jax.value_and_grad(loss(jb.nn.max_pool)))
mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
(l4, g4), (l, g) = step(xs), jax.value_and_grad(loss(linen.max_pool))(x)
assert np.allclose(l4, l, rtol=1e-5) and np.array_equal(g4, g), "sharded max_pool differs"
assert g4.sharding.spec[0] == "batch", g4.sharding
assert "all-gather" not in step.lower(xs).compile().as_text(), "the batch is gathered"
print("sharded ok")
"""


def test_four_devices_split_the_batch():
    import os
    import subprocess
    import sys
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sharded ok" in result.stdout
