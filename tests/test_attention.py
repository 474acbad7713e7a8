"""jax_brgemm.nn.dot_product_attention against a float64 NumPy softmax attention with
jax.nn.dot_product_attention's semantics (masked logits -0.7 * FLT_MAX, causal top-left
aligned, outputs past a query length zero), and its gradients against jax.grad of
jax.nn.dot_product_attention, on every ISA path."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jax_brgemm.nn import dot_product_attention as attention
from conftest import rel_err

MASKED = -0.7 * float(np.finfo(np.float32).max)


def reference(q, k, v, bias=None, mask=None, *, scale=None, is_causal=False,
              query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
    scale = 1 / np.sqrt(H) if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    keep = np.ones((B, N, T, S), bool)
    if mask is not None:
        keep &= np.asarray(mask)
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    if is_causal:
        keep &= j <= i
    if local_window_size is not None:
        left, right = local_window_size
        keep &= (j >= i - left) & (j <= i + right)
    if key_value_seq_lengths is not None:
        keep &= j[None, None] < np.asarray(key_value_seq_lengths)[:, None, None, None]
    logits = np.where(keep, logits, MASKED)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", p, v)
    if query_seq_lengths is not None:
        out *= (np.arange(T)[None, :] < np.asarray(query_seq_lengths)[:, None])[:, :, None, None]
    return out


def inputs(rng, B, T, S, N, K, H, dtype=jnp.float32):
    make = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    return make(B, T, N, H), make(B, S, K, H), make(B, S, K, H)


def mask_kwargs(form, rng, B, T, S, N):
    if form == "none":
        return {}
    if form == "bias":  # broadcast over the batch
        return {"bias": jnp.asarray(rng.standard_normal((1, N, T, S)), jnp.float32)}
    if form == "mask":  # broadcast over heads, with a fully masked row
        m = rng.random((B, 1, T, S)) > 0.4
        m[0, 0, T // 2] = False
        return {"mask": jnp.asarray(m)}
    if form == "lengths":  # a batch row with no keys at all
        return {"query_seq_lengths": jnp.asarray([max(T - 3, 1)] + [T] * (B - 1), jnp.int32),
                "key_value_seq_lengths": jnp.asarray([0] + [max(S // 2, 1)] * (B - 1), jnp.int32)}
    if form == "window":
        return {"local_window_size": (5, 3)}
    raise ValueError(form)


# (B, T, S, N, K, H): block tails, T = 1, T != S both ways, GQA and MQA.
CASES = [(2, 70, 70, 4, 2, 32), (1, 1, 9, 2, 1, 16), (2, 50, 130, 2, 2, 64),
         (2, 130, 50, 4, 1, 16)]
FORMS = ["none", "bias", "mask", "lengths", "window"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_float32(isa, rng, case, causal):
    B, T, S, N, K, H = case
    q, k, v = inputs(rng, *case)
    for form in FORMS:
        kw = mask_kwargs(form, rng, B, T, S, N)
        out = attention(q, k, v, is_causal=causal, **kw)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert rel_err(out, reference(q, k, v, is_causal=causal, **kw)) < 2e-6, form


def grads(fn, q, k, v, bias, kw, weights):
    def loss(q, k, v, bias):
        return jnp.sum(fn(q, k, v, bias, **kw).astype(jnp.float32) * weights)
    return jax.grad(loss, argnums=(0, 1, 2, 3) if bias is not None else (0, 1, 2))(q, k, v, bias)


@pytest.mark.parametrize("case", [(2, 70, 70, 4, 2, 32), (2, 50, 130, 2, 1, 16)],
                         ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("form", ["bias", "mask", "lengths", "window"])
def test_gradients_float32(isa, rng, case, form):
    B, T, S, N, K, H = case
    q, k, v = inputs(rng, *case)
    kw = mask_kwargs(form, rng, B, T, S, N)
    bias = kw.pop("bias", None)
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    for causal in (False, True):
        kw["is_causal"] = causal
        ours = grads(attention, q, k, v, bias, kw, weights)
        ref = grads(jax.nn.dot_product_attention, q, k, v, bias, kw, weights)
        for name, a, b in zip("qkvb", ours, ref):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert rel_err(a, b) < 2e-5, (name, causal)


def test_bias_gradient_broadcast_shapes(rng):
    B, T, S, N, K, H = 2, 20, 33, 4, 2, 16
    q, k, v = inputs(rng, B, T, S, N, K, H)
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    for shape in [(B, N, T, S), (B, 1, 1, S), (1, N, 1, S), (T, S)]:
        bias = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        ours = grads(attention, q, k, v, bias, {"is_causal": True}, weights)
        ref = grads(jax.nn.dot_product_attention, q, k, v, bias, {"is_causal": True}, weights)
        assert ours[3].shape == shape
        for a, b in zip(ours, ref):
            assert rel_err(a, b) < 2e-5, shape


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bfloat16(isa_bf16, rng, causal):
    """bf16 tolerance: twice the distance of jax.nn.dot_product_attention in bf16 from the
    float64 reference (forward) / from its own float32 gradients (backward)."""
    case = (2, 70, 90, 4, 2, 64)
    B, T, S, N, K, H = case
    q, k, v = inputs(rng, *case, dtype=jnp.bfloat16)
    for form in ["none", "bias", "lengths"]:
        kw = mask_kwargs(form, rng, B, T, S, N)
        out = attention(q, k, v, is_causal=causal, **kw)
        assert out.dtype == jnp.bfloat16
        ref = reference(q, k, v, is_causal=causal, **kw)
        jax_err = rel_err(jax.nn.dot_product_attention(q, k, v, is_causal=causal, **kw), ref)
        assert rel_err(out, ref) < 2 * jax_err, form
        bias = kw.pop("bias", None)
        kw["is_causal"] = causal
        weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
        ours = grads(attention, q, k, v, bias, kw, weights)
        f32 = lambda a: None if a is None else a.astype(jnp.float32)
        exact = grads(jax.nn.dot_product_attention, f32(q), f32(k), f32(v), bias, kw, weights)
        theirs = grads(jax.nn.dot_product_attention, q, k, v, bias, kw, weights)
        for name, a, b, c in zip("qkvb", ours, exact, theirs):
            assert a.dtype == c.dtype
            assert rel_err(a, b) < 2 * rel_err(c, b) + 1e-6, (form, name)


def test_fully_masked_rows_follow_jax(rng):
    """Every key masked: JAX averages all values (equal masked logits), and no gradient
    reaches query, key or bias from such a row."""
    B, T, S, N, K, H = 2, 9, 70, 2, 1, 16
    q, k, v = inputs(rng, B, T, S, N, K, H)
    mask = np.ones((B, N, T, S), bool)
    mask[0, :, 3] = False
    mask[1, 1, :] = False
    bias = jnp.asarray(rng.standard_normal((1, 1, T, S)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    for kw in [{"mask": jnp.asarray(mask)},
               {"key_value_seq_lengths": jnp.asarray([0, 5], jnp.int32), "is_causal": True}]:
        out = attention(q, k, v, bias, **kw)
        np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v, bias, **kw),
                                   rtol=1e-5, atol=1e-6)
        ours = grads(attention, q, k, v, bias, kw, weights)
        ref = grads(jax.nn.dot_product_attention, q, k, v, bias, kw, weights)
        for a, b in zip(ours, ref):
            assert rel_err(a, b) < 2e-5


def test_medium_scale_and_residual(rng):
    B, T, S, N, K, H = 1, 300, 520, 2, 2, 128
    q, k, v = inputs(rng, B, T, S, N, K, H)
    kw = {"scale": 0.05, "is_causal": True,
          "key_value_seq_lengths": jnp.asarray([400], jnp.int32)}
    out, lse = attention(q, k, v, return_residual=True, **kw)
    assert rel_err(out, reference(q, k, v, **kw)) < 2e-6
    _, lse_ref = jax.nn.dot_product_attention(q, k, v, return_residual=True, **kw)
    assert lse.shape == lse_ref.shape == (B, T, N)
    assert rel_err(lse, lse_ref) < 1e-6


def test_jit_vmap_and_unbatched(rng):
    V, B, T, S, N, K, H = 3, 2, 17, 23, 4, 2, 16
    q = jnp.asarray(rng.standard_normal((V, B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((V, B, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)  # not vmapped
    bias = jnp.asarray(rng.standard_normal((1, N, T, S)), jnp.float32)  # not vmapped
    mask = jnp.asarray(rng.random((V, B, 1, T, S)) > 0.2)
    fn = lambda q, k, mask: attention(q, k, v, bias, mask, is_causal=True)
    out = jax.jit(jax.vmap(fn))(q, k, mask)
    for i in range(V):
        ref = reference(q[i], k[i], v, bias, mask[i], is_causal=True)
        assert rel_err(out[i], ref) < 2e-6
    # gradients through vmap: the per-element gradient, the unbatched ones summed
    loss = lambda fn_: lambda q, k, v, bias: jnp.sum(jax.vmap(
        lambda q, k, m: fn_(q, k, v, bias, m, is_causal=True))(q, k, mask) ** 2)
    ours = jax.grad(loss(attention), argnums=(0, 1, 2, 3))(q, k, v, bias)
    ref = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2, 3))(q, k, v, bias)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 2e-5
    # (T, N, H) without batch, as JAX accepts
    out = attention(q[0, 0], k[0, 0], v[0])
    assert rel_err(out, reference(q[0, :1], k[0, :1], v[:1])[0]) < 2e-6


def test_bad_input():
    q = jnp.zeros((2, 8, 4, 16))
    k = jnp.zeros((2, 10, 2, 16))
    with pytest.raises(ValueError, match="value"):
        attention(q, k, jnp.zeros((2, 10, 2, 8)))
    with pytest.raises(ValueError, match="key"):
        attention(q, jnp.zeros((2, 10, 3, 16)), jnp.zeros((2, 10, 3, 16)))
    with pytest.raises(ValueError, match="key"):
        attention(q, jnp.zeros((2, 10, 2, 8)), jnp.zeros((2, 10, 2, 8)))
    with pytest.raises(TypeError, match="query, key and value"):
        attention(q.astype(jnp.bfloat16), k, k)
    with pytest.raises(TypeError, match="query"):
        attention(q.astype(jnp.float16), k, k)
    with pytest.raises(ValueError, match="bias"):
        attention(q, k, k, bias=jnp.zeros((2, 4, 8, 9)))
    with pytest.raises(TypeError, match="mask"):
        attention(q, k, k, mask=jnp.zeros((2, 4, 8, 10)))
    with pytest.raises(ValueError, match="mask"):
        attention(q, k, k, mask=jnp.zeros((3, 1, 8, 10), bool))
    with pytest.raises(ValueError, match="key_value_seq_lengths"):
        attention(q, k, k, key_value_seq_lengths=jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeError, match="query_seq_lengths"):
        attention(q, k, k, query_seq_lengths=jnp.zeros((2,), jnp.float32))
    with pytest.raises(ValueError, match="local_window_size"):
        attention(q, k, k, local_window_size=(-1, 2))
    with pytest.raises(ValueError, match="implementation"):
        attention(q, k, k, implementation="cudnn")
    with pytest.raises(ValueError, match="query"):
        attention(jnp.zeros((8, 16)), k, k)
