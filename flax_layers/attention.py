"""Multi-head attention on jax_brgemm.nn.dot_product_attention: drop-ins for
flax.nnx.MultiHeadAttention (here) and flax.linen.MultiHeadDotProductAttention
(flax_layers.linen), with the stock modules' parameters, state and results.

Only the attention function changes. It runs the kernel's flash-style attention when no
dropout is applied, no attention weights are sown (``module``), no custom precision or
einsum is asked for and the compute dtype is float32 or bfloat16; anything else runs the
stock Flax function, so results are the stock module's there.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import linen, nnx
from flax.nnx.nn import dtypes as nnx_dtypes

import jax_brgemm as jb

from . import _common

__all__ = ["MultiHeadAttention", "dot_product_attention", "linen_dot_product_attention"]

_SERVED = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _kernel_attention(query, key, value, bias, mask, is_causal):
    """query/key/value [batch..., T, N, H] (batch dims flattened for the op), or None when
    the op does not serve these arrays."""
    if query.dtype not in _SERVED or not (query.dtype == key.dtype == value.dtype):
        return None
    if key.shape[-1] != value.shape[-1] or query.ndim < 3:
        return None  # the op's value head dim equals the query's
    lead = query.shape[:-3]
    if key.shape[:-3] != lead or value.shape[:-3] != lead:
        return None
    flat = lambda x: x.reshape((math.prod(lead),) + x.shape[-3:])

    def flat_mask(m):  # broadcastable to [batch..., N, T, S] -> 4-D
        if m is None:
            return None
        m = jnp.asarray(m)
        m = m.reshape((1,) * (len(lead) + 3 - m.ndim) + m.shape)
        return jnp.broadcast_to(m, lead + m.shape[-3:]).reshape((math.prod(lead),) + m.shape[-3:])

    out = jb.nn.dot_product_attention(
        flat(query), flat(key), flat(value), flat_mask(bias),
        None if mask is None else flat_mask(mask).astype(jnp.bool_), is_causal=is_causal)
    return out.reshape(query.shape[:-1] + (value.shape[-1],))


def _no_dropout(dropout_rate, deterministic):
    return dropout_rate == 0.0 or deterministic


def dot_product_attention(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                          dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                          precision=None, module=None,
                          promote_dtype=nnx_dtypes.promote_dtype, is_causal=False):
    """:func:`flax.nnx.dot_product_attention` (same arguments) on the kernel where it serves."""
    if _no_dropout(dropout_rate, deterministic) and module is None and precision is None:
        q, k, v = promote_dtype((query, key, value), dtype=dtype)
        out = _kernel_attention(q, k, v, bias, mask, is_causal)
        if out is not None:
            return out
    return nnx.dot_product_attention(
        query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
        deterministic, dtype, precision, module, promote_dtype, is_causal)


def linen_dot_product_attention(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                                dropout_rng=None, dropout_rate=0.0, deterministic=False,
                                dtype=None, precision=None, module=None,
                                force_fp32_for_softmax=False, einsum_dot_general=None,
                                qk_attn_weights_einsum=None, attn_weights_value_einsum=None):
    """:func:`flax.linen.dot_product_attention` (same arguments) on the kernel where it
    serves (its softmax is always float32)."""
    if (_no_dropout(dropout_rate, deterministic) and module is None and precision is None
            and einsum_dot_general is None and qk_attn_weights_einsum is None
            and attn_weights_value_einsum is None):
        q, k, v = linen.dtypes.promote_dtype(query, key, value, dtype=dtype)
        out = _kernel_attention(q, k, v, bias, mask, False)
        if out is not None:
            return out
    return linen.dot_product_attention(
        query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
        deterministic, dtype, precision, module, force_fp32_for_softmax, einsum_dot_general,
        qk_attn_weights_einsum, attn_weights_value_einsum)


class MultiHeadAttention(nnx.MultiHeadAttention):
    """:class:`flax.nnx.MultiHeadAttention` whose default ``attention_fn`` is
    :func:`dot_product_attention` above (same parameters, state and results). Without
    decoding, dropout or sown weights the whole stock computation runs through the rules of
    :func:`jax_brgemm.optimize`, so the query, key, value and output projections run on
    :func:`jax_brgemm.nn.dense` as well."""

    def __init__(self, *args, attention_fn=dot_product_attention, **kwargs):
        super().__init__(*args, attention_fn=attention_fn, **kwargs)

    def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None, deterministic=None,
                 rngs=None, sow_weights=False, decode=None, **kwargs):
        call = super().__call__
        stateless = (not sow_weights and rngs is None and not (self.decode if decode is None else decode)
                     and _no_dropout(self.dropout_rate, self.deterministic if deterministic is None
                                     else deterministic))
        if not stateless:  # the module reads or writes state: the stock call, attention served
            return call(inputs_q, inputs_k, inputs_v, mask=mask, deterministic=deterministic, rngs=rngs,
                        sow_weights=sow_weights, decode=decode, **kwargs)
        stock = lambda q, k, v, m: call(q, k, v, mask=m, deterministic=deterministic,  # noqa: E731
                                        decode=decode, **kwargs)
        return _common.serve(stock, inputs_q, inputs_k, inputs_v, mask)
