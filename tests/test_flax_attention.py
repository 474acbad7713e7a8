"""fl.MultiHeadAttention and flax_layers.linen.MultiHeadDotProductAttention against the stock
Flax modules: same parameters and state, same outputs and gradients within float32
rounding; dropout in training falls back to the stock computation."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import linen, nnx

import flax_layers as fl
from flax_layers import linen as fll
from conftest import rel_err


def _flat(tree):
    """All leaves as one vector: the key projection's bias has a zero gradient (softmax
    ignores a constant per row), so only the whole gradient has a meaningful relative error."""
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])


def _pair(**kw):
    return (nnx.MultiHeadAttention(num_heads=4, in_features=32, qkv_features=64, rngs=nnx.Rngs(0), **kw),
            fl.MultiHeadAttention(num_heads=4, in_features=32, qkv_features=64, rngs=nnx.Rngs(0), **kw))


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_nnx_matches_stock(rng, kv_heads):
    stock, ours = _pair(num_kv_heads=kv_heads, decode=False)
    s_state, o_state = nnx.state(stock), nnx.state(ours)
    assert jax.tree.structure(s_state) == jax.tree.structure(o_state)
    for a, b in zip(jax.tree.leaves(s_state), jax.tree.leaves(o_state)):
        np.testing.assert_array_equal(a, b)
    x = jnp.asarray(rng.standard_normal((2, 37, 32)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((2, 21, 32)), jnp.float32)
    causal = nnx.make_causal_mask(jnp.ones((2, 37)))
    pad = nnx.make_attention_mask(jnp.ones((2, 37)), jnp.arange(21)[None] < jnp.array([[15], [21]]))
    for args, kw in [((x,), {}), ((x,), {"mask": causal}), ((x, y), {"mask": pad})]:
        assert rel_err(ours(*args, **kw), stock(*args, **kw)) < 2e-6

    def loss(model, x):
        return jnp.sum(jnp.sin(model(x, mask=causal)))
    g_stock = nnx.grad(loss)(stock, x)
    g_ours = nnx.grad(loss)(ours, x)
    assert rel_err(_flat(g_ours), _flat(g_stock)) < 2e-5
    # The projections run on the kernel too: four dense calls and the attention, no matmul left.
    jaxpr = str(jax.make_jaxpr(lambda x: ours(x, mask=causal))(x))
    assert "dot_general" not in jaxpr and jaxpr.count("ffi_call") == 5, jaxpr


def test_nnx_decoding_keeps_its_cache(rng):
    """Autoregressive decoding writes the module's cache: the stock call (attention served),
    token by token equal to the stock module's."""
    stock, ours = _pair(decode=True)
    x = jnp.asarray(rng.standard_normal((2, 6, 32)), jnp.float32)
    for m in (stock, ours):
        m.init_cache(x.shape)
    for t in range(x.shape[1]):
        assert rel_err(ours(x[:, t:t + 1]), stock(x[:, t:t + 1])) < 2e-6
    np.testing.assert_allclose(ours.cached_key[...], stock.cached_key[...], rtol=1e-6, atol=1e-6)


def test_nnx_dropout_training_falls_back(rng):
    stock, ours = _pair(dropout_rate=0.5, deterministic=False, decode=False)
    x = jnp.asarray(rng.standard_normal((2, 10, 32)), jnp.float32)
    np.testing.assert_allclose(ours(x), stock(x), rtol=1e-6, atol=1e-6)
    ours.set_view(deterministic=True), stock.set_view(deterministic=True)
    assert rel_err(ours(x), stock(x)) < 2e-6


def test_linen_matches_stock(rng):
    x = jnp.asarray(rng.standard_normal((2, 3, 19, 16)), jnp.float32)  # two batch dims
    mask = linen.make_causal_mask(jnp.ones((2, 3, 19)))
    stock = linen.MultiHeadDotProductAttention(num_heads=2, qkv_features=32)
    ours = fll.MultiHeadDotProductAttention(num_heads=2, qkv_features=32)
    variables = stock.init(jax.random.key(1), x)
    ours_vars = ours.init(jax.random.key(1), x)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(ours_vars)):
        np.testing.assert_array_equal(a, b)
    assert rel_err(ours.apply(variables, x, mask=mask), stock.apply(variables, x, mask=mask)) < 2e-6
    jaxpr = str(jax.make_jaxpr(lambda x: ours.apply(variables, x, mask=mask))(x))
    assert "dot_general" not in jaxpr and jaxpr.count("ffi_call") == 5, jaxpr
    loss = lambda m: lambda v: jnp.sum(jnp.cos(m.apply(v, x, mask=mask)))
    assert rel_err(_flat(jax.grad(loss(ours))(variables)), _flat(jax.grad(loss(stock))(variables))) < 2e-5
