"""jax_brgemm.nn.dot_product_attention: flash-style attention on the brgemm kernel.

The same arguments, layout (B, T, N, H) and results as jax.nn.dot_product_attention, as
one FFI call forward and one backward (cpp/primitives/attention.cc): per block of
queries, S = Q K_j^T and O += P V_j by brgemm with an online softmax between them, so no
T x S logits are formed; the forward keeps only the per-row log-sum-exp for the backward,
which recomputes P block by block.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .. import _ext  # noqa: F401  (registers the FFI targets)
from .._op import first_order_only, reverse_mode_only, without_derivative
from .._checks import check_kernel_dtype, check_same_dtype, dtype_of
from .._sharding import align_to_batch, batch_partitioned

__all__ = ["dot_product_attention"]

# jax.nn.dot_product_attention's masked logit (-0.7 * the float32 max): a fully masked row
# has equal logits, and its log-sum-exp is this plus log(S).
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size=None, implementation=None, return_residual=False):
    """Scaled dot-product attention, as ``jax.nn.dot_product_attention``.

    ``softmax(scale * Q K^T + bias, masked) V`` per head: query ``(B, T, N, H)`` (or
    ``(T, N, H)``), key and value ``(B, S, K, H)`` with K dividing N (grouped-query and
    multi-query attention: query head n reads kv head ``n // (N // K)``); float32 or
    bfloat16, all three the same. bias (any float dtype) and the boolean mask (True takes
    part) are 4-D and broadcast to ``(B, N, T, S)``. is_causal lets query i see keys
    ``j <= i`` (top-left aligned when T != S, as JAX); query_seq_lengths /
    key_value_seq_lengths (int, shape ``(B,)``) mask keys past the length and zero the
    outputs past the query length; local_window_size ``(left, right)`` (or one int for
    both) lets query i see keys ``i - left <= j <= i + right``. scale defaults to
    ``1 / sqrt(H)``.

    A row whose every logit is masked returns the mean of all values (JAX's convention: its
    masked logits are equal), with no gradient to query, key or bias. Every sum is float32;
    in bfloat16 the probabilities are rounded to bfloat16 before ``P V`` (as JAX does).
    Differentiable once (query, key, value, bias), under jit and vmap (vmapped axes fold
    into B), split along B and the heads under sharding. Memory: O(B N T) beyond inputs and outputs, plus
    in the backward a float32 copy of dq per thread. ``implementation`` must be None
    (or "xla", accepted for compatibility); ``return_residual=True`` also returns the
    log-sum-exp of each row, ``(B, T, N)`` in the inputs' dtype, as JAX does.
    """
    if implementation not in (None, "xla"):
        raise ValueError(f"implementation must be None, got {implementation!r}")
    dtype = check_kernel_dtype("query", query)
    check_kernel_dtype("key", key)
    check_kernel_dtype("value", value)
    check_same_dtype("query, key and value", query, key, value)
    query, key, value = map(jnp.asarray, (query, key, value))
    unbatched = query.ndim == 3
    if unbatched:
        if key.ndim != 3 or value.ndim != 3:
            raise ValueError(f"key and value must have shape (S, K, H) with a (T, N, H) query, "
                             f"got {key.shape} and {value.shape}")
        query, key, value = query[None], key[None], value[None]
    if query.ndim != 4:
        raise ValueError(f"query must have shape (B, T, N, H) or (T, N, H), got {query.shape}")
    if key.ndim != 4:
        raise ValueError(f"key must have shape (B, S, K, H), got {key.shape}")
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    if key.shape[0] != B or key.shape[3] != H:
        raise ValueError(f"key must have shape (B, S, K, H) = ({B}, S, K, {H}), got {key.shape}")
    if value.shape != key.shape:
        raise ValueError(f"value must have the shape of key {key.shape}, got {value.shape}")
    if K == 0 or N % K:
        raise ValueError(f"key's heads K must divide query's heads N, got K={K}, N={N}")
    if min(B, T, S, N, H) == 0:
        raise ValueError(f"query {query.shape} and key {key.shape} must have no zero-size dims")
    full = (B, N, T, S)
    bias = _broadcastable("bias", bias, full, unbatched)
    if bias is not None:
        if not jnp.issubdtype(dtype_of(bias), jnp.floating):
            raise TypeError(f"bias must be a float array, got {dtype_of(bias)}")
    mask = _broadcastable("mask", mask, full, unbatched)
    if mask is not None and dtype_of(mask) != np.dtype(bool):
        raise TypeError(f"mask must be boolean, got {dtype_of(mask)}")
    lengths = []
    for name, value_ in (("query_seq_lengths", query_seq_lengths),
                         ("key_value_seq_lengths", key_value_seq_lengths)):
        if value_ is not None:
            value_ = jnp.asarray(value_)
            if not jnp.issubdtype(value_.dtype, jnp.integer):
                raise TypeError(f"{name} must hold integers, got {value_.dtype}")
            if value_.shape != (B,):
                raise ValueError(f"{name} must have shape (B,) = ({B},), got {value_.shape}")
            value_ = value_.astype(jnp.int32)
        lengths.append(value_)
    if local_window_size is None:
        window = (-1, -1)
    else:
        window = ((local_window_size,) * 2 if isinstance(local_window_size, (int, np.integer))
                  else tuple(local_window_size))
        if len(window) != 2 or not all(isinstance(w, (int, np.integer)) and w >= 0 for w in window):
            raise ValueError("local_window_size must be an int >= 0 or a pair (left, right) of "
                             f"them, got {local_window_size!r}")
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    # A window wider than both sequences sees every key: clamped, it fits the int64 attribute.
    window = tuple(w if w < 0 else min(int(w), max(T, S)) for w in window)
    config = (scale, bool(is_causal), int(window[0]), int(window[1]))
    # The kernel adds a float32 bias; its gradient returns in bias's dtype through astype.
    bias_f32 = None if bias is None else bias.astype(jnp.float32)
    ops = align_to_batch((query, key, value, bias_f32, mask, *lengths), (0, 0, 0, 0, 0, 0, 0),
                         heads=(2, 2, 2, 1, 1, None, None))
    out, lse = _attention(*ops, config)
    result = out[0] if unbatched else out
    if not return_residual:
        return result
    lse = jnp.where(lse == jnp.inf, _MASKED + math.log(S), lse)  # JAX's value, fully masked rows
    lse = jax.lax.stop_gradient(jnp.transpose(lse, (0, 2, 1)).astype(dtype))
    return result, (lse[0] if unbatched else lse)


def _broadcastable(name, x, full, unbatched):
    """x made 4-D (leading 1s, as JAX) and checked to broadcast to `full` (B, N, T, S)."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.ndim > 4:
        raise ValueError(f"{name} must be 4-D, broadcastable to (B, N, T, S) = {full}, got {x.shape}")
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    if any(d not in (1, f) for d, f in zip(x.shape, full)):
        raise ValueError(f"{name} must broadcast to (B, N, T, S) = {full}, got {x.shape}")
    return x


# ------------------------------------------------------------------ the FFI calls

def _placeholder(x, dtype):
    return jnp.zeros((0,), dtype) if x is None else x


def _forward_raw(q, k, v, bias, mask, q_len, kv_len, config):
    scale, causal, left, right = config
    B, T, N, _ = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, T), jnp.float32))
    return tuple(jax.ffi.ffi_call("jax_brgemm_attention_forward", out)(
        q, k, v, _placeholder(bias, jnp.float32), _placeholder(mask, jnp.bool_),
        _placeholder(q_len, jnp.int32), _placeholder(kv_len, jnp.int32),
        scale=np.float32(scale), causal=np.int32(causal), window_left=np.int64(left),
        window_right=np.int64(right)))


def _backward_raw(q, k, v, bias, mask, q_len, kv_len, out, lse, d_out, config, bias_grad):
    scale, causal, left, right = config
    shapes = [jax.ShapeDtypeStruct(a.shape, q.dtype) for a in (q, k, v)]
    shapes.append(jax.ShapeDtypeStruct(bias.shape if bias_grad else (0,), jnp.float32))
    return tuple(jax.ffi.ffi_call("jax_brgemm_attention_backward", tuple(shapes))(
        q, k, v, _placeholder(bias, jnp.float32), _placeholder(mask, jnp.bool_),
        _placeholder(q_len, jnp.int32), _placeholder(kv_len, jnp.int32), out, lse, d_out,
        scale=np.float32(scale), causal=np.int32(causal), window_left=np.int64(left),
        window_right=np.int64(right)))


def _present(*args):
    return tuple(a is not None for a in args)


@functools.lru_cache(maxsize=None)
def _forward_call(config, present):
    """The forward FFI call over the operands present (bias, mask, the two lengths), split
    along B under sharding, with vmapped axes folded into B."""
    # q, k, v, then bias, mask, q_len, kv_len where present: all carry B in dim 0 (a size-1
    # B of bias / mask is a broadcast, replicated).
    batched = (0, 0, 0) + tuple(0 for p in present if p)

    def impl(q, k, v, *rest):
        return _forward_raw(q, k, v, *_unpack(rest, present), config)

    sharded = batch_partitioned(impl, batched=batched, outputs=(0, 0), heads=_heads_dims(present),
                                out_heads=(2, 1))

    @jax.custom_batching.custom_vmap
    def call(*args):
        return sharded(*args)

    @call.def_vmap
    def rule(axis_size, in_batched, *args):
        q = args[0]
        batch = q.shape[1] if in_batched[0] else q.shape[0]
        folded = [_fold(a, b, axis_size, batch, broadcast=i in _bcast_positions(present))
                  for i, (a, b) in enumerate(zip(args, in_batched))]
        out, lse = call(*folded)
        return ((out.reshape((axis_size, batch) + out.shape[1:]),
                 lse.reshape((axis_size, batch) + lse.shape[1:])), (True, True))

    return call


def _heads_dims(present):
    """The heads dim of each operand of the calls: q, k, v (B, T, N, H), bias and mask
    (B, N, T, S) where present, the lengths (B,) none. Sharding splits the heads with them."""
    optional = {"bias": 1, "mask": 1, "q_len": None, "kv_len": None}
    return (2, 2, 2) + tuple(d for (_, d), p in zip(optional.items(), present) if p)


def _bcast_positions(present):
    """Positions (in the call's arguments) of bias and mask, whose B may be 1."""
    positions, i = [], 3
    for kind, p in zip(("bias", "mask", "q_len", "kv_len"), present):
        if p:
            if kind in ("bias", "mask"):
                positions.append(i)
            i += 1
    return tuple(positions)


def _fold(x, batched, axis_size, batch, broadcast):
    """x with a vmapped axis (leading, where batched) folded into its B (dim 0): (V, B, ...)
    -> (V * B, ...). A bias or mask with B of 1 and no vmapped axis stays a broadcast."""
    if not batched:
        if broadcast and x.shape[0] == 1:
            return x
        x = jnp.broadcast_to(x, (axis_size,) + x.shape)
    if x.shape[1] != batch:  # a broadcast B of bias / mask under a vmapped axis
        x = jnp.broadcast_to(x, (axis_size, batch) + x.shape[2:])
    return x.reshape((axis_size * batch,) + x.shape[2:])


def _unpack(rest, present):
    it = iter(rest)
    return tuple(next(it) if p else None for p in present)


@functools.lru_cache(maxsize=None)
def _backward_call(config, present, bias_grad, bias_batch_full):
    """The backward FFI call, split along B under sharding (a bias gradient with a broadcast
    B is a per-shard sum, all-reduced), with vmapped axes folded into B (one call per
    element only for the gradient of a bias the vmap does not batch)."""
    batched = (0, 0, 0) + tuple(0 for p in present if p) + (0, 0, 0)
    dbias_kind = 0 if bias_batch_full or not bias_grad else "sum"
    if not bias_grad:
        dbias_kind = "replicated"

    def impl(q, k, v, *rest):
        *opt, out, lse, d_out = rest
        return _backward_raw(q, k, v, *_unpack(opt, present), out, lse, d_out, config, bias_grad)

    sharded = batch_partitioned(impl, batched=batched, outputs=(0, 0, 0, dbias_kind),
                                heads=_heads_dims(present) + (2, 1, 2), out_heads=(2, 2, 2, 1 if bias_grad else None))

    @jax.custom_batching.custom_vmap
    def call(*args):
        return sharded(*args)

    @call.def_vmap
    def rule(axis_size, in_batched, *args):
        bias_at = 3 if present[0] else None
        if bias_grad and not in_batched[bias_at]:
            # One bias for every element: its gradient is wanted per element, which a
            # folded call (a sum over all of them) does not give: one call per element.
            lifted = tuple(a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                           for a, b in zip(args, in_batched))
            return tuple(jax.lax.map(lambda a: call(*a), lifted)), (True,) * 4
        # As the forward: the vmapped axis folded into B, one call. A vmapped bias is
        # broadcast to the full folded B, its gradient summed back to its own B.
        q = args[0]
        batch = q.shape[1] if in_batched[0] else q.shape[0]
        bcast = tuple(i for i in _bcast_positions(present) if i != bias_at)
        folded = [_fold(a, b, axis_size, batch, broadcast=i in bcast)
                  for i, (a, b) in enumerate(zip(args, in_batched))]
        inner = _backward_call(config, present, bias_grad, bias_grad and axis_size * batch > 1)
        dq, dk, dv, dbias = inner(*folded)
        unfold = lambda x: x.reshape((axis_size, batch) + x.shape[1:])
        if bias_grad:
            dbias = unfold(dbias)
            if args[bias_at].shape[1] != batch:  # the element's bias broadcast along B
                dbias = dbias.sum(axis=1, keepdims=True)
        return (unfold(dq), unfold(dk), unfold(dv), dbias), (True,) * 4

    return call


# ------------------------------------------------------------------ differentiation

def _operands(q, k, v, bias, mask, q_len, kv_len):
    return tuple(a for a in (q, k, v, bias, mask, q_len, kv_len) if a is not None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, bias, mask, q_len, kv_len, config):
    present = _present(bias, mask, q_len, kv_len)
    return _forward_call(config, present)(*_operands(q, k, v, bias, mask, q_len, kv_len))


def _attention_fwd(q, k, v, bias, mask, q_len, kv_len, config):
    present = _present(bias, mask, q_len, kv_len)
    forward = without_derivative("jax_brgemm.nn.dot_product_attention", _forward_call(config, present))
    out, lse = forward(*_operands(q, k, v, bias, mask, q_len, kv_len))
    return (out, lse), (q, k, v, bias, mask, q_len, kv_len, out, lse)


@first_order_only("jax_brgemm.nn.dot_product_attention")
def _attention_bwd(config, res, cotangents):
    q, k, v, bias, mask, q_len, kv_len, out, lse = res
    d_out, _ = cotangents  # the log-sum-exp is returned without gradient
    present = _present(bias, mask, q_len, kv_len)
    bias_grad = bias is not None
    call = _backward_call(config, present, bias_grad,
                          bias_grad and bias.shape[0] == q.shape[0] and q.shape[0] > 1)
    dq, dk, dv, dbias = call(*_operands(q, k, v, bias, mask, q_len, kv_len), out, lse,
                             d_out.astype(q.dtype))
    return dq, dk, dv, (dbias if bias_grad else None), None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
_attention = reverse_mode_only("jax_brgemm.nn.dot_product_attention", _attention)
