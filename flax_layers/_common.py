"""What the NNX and Linen modules share: when the brgemm kernel can serve a call, and how
a call is put to the jax_brgemm.nn ops. Everything here is plain JAX; no Flax state."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

import jax_brgemm as jb
from jax_brgemm import _activations, _optimize
from jax_brgemm._checks import check_activation

_F32 = jnp.dtype(jnp.float32)
_BF16 = jnp.dtype(jnp.bfloat16)

# The compute dtypes each jax_brgemm.nn op takes; other computations run the stock Flax math.
SERVED_DTYPES = {"dense": (_F32, _BF16), "conv": (_F32, _BF16), "lstm": (_F32, _BF16)}


def activation_name(activation) -> str:
    """Validates the `activation` argument (None, "relu", "gelu", "sigmoid", "tanh")."""
    return check_activation("activation", activation)


def activate(activation, y):
    """The fused activation, applied in jnp on the stock path."""
    return _activations.apply(activation_name(activation), y)


def served_dtype(op, *arrays, preferred_element_type=None):
    """The compute dtype when `op` ("dense", "conv", "lstm") serves these arrays (promoted as
    the stock module promotes them; None entries ignored): they share one dtype the op takes,
    and ``preferred_element_type`` asks for that dtype's results or nothing. Else None."""
    dtypes = {jnp.dtype(a.dtype) for a in arrays if a is not None}
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    if dtype not in SERVED_DTYPES[op]:
        return None
    if preferred_element_type is not None and jnp.dtype(preferred_element_type) != dtype:
        return None
    return dtype


def is_sigmoid(fn) -> bool:
    return fn is jax.nn.sigmoid


def is_tanh(fn) -> bool:
    return fn is jnp.tanh


# ------------------------------------------------------------------ dense and conv


def serve(stock_call, *arrays):
    """``stock_call(*arrays)``, the stock module's computation, with its convolutions and
    matmuls on the kernel: the same rules (jax_brgemm._rules) and rewrite as
    ``jax_brgemm.optimize``, with no size threshold, since a layer chosen by the user runs on
    the kernel at any size. What the rules do not serve stays the stock computation."""
    return _optimize.rewrite_call(stock_call, arrays, _OPTIONS)


_OPTIONS = _optimize.Options(min_macs=0)


# ------------------------------------------------------------------ lstm


def lstm(x, w_ih, w_hh, bias, c, h, *, time_major=False):
    """The LSTM over x ``(*batch, T, C)`` (``(T, *batch, C)`` when time-major) from the
    carry ``(c, h)`` of shape ``(*batch, K)``; returns ``(hs, (c_T, h_T))`` shaped alike.
    Like the stock cell, whose ``h' = o * tanh(c')`` promotes the gates' dtype with c's,
    hs and h_T come back in ``promote_types(h, c)`` (float32 for a bfloat16 cell with a
    float32 carry), c_T in c's dtype."""
    batch = x.shape[1:-1] if time_major else x.shape[:-2]
    steps, features, hidden = x.shape[0 if time_major else -2], x.shape[-1], w_hh.shape[0]
    n = math.prod(batch)
    x = x.reshape((steps, n, features) if time_major else (n, steps, features))
    hs, (c, h) = jb.nn.lstm(x, w_ih, w_hh, bias, h.reshape(n, hidden), c.reshape(n, hidden),
                            time_major=time_major)
    out_dtype = jnp.promote_types(h.dtype, c.dtype)
    hs = hs.astype(out_dtype).reshape(((steps,) + batch if time_major else batch + (steps,)) + (hidden,))
    return hs, (c.reshape(batch + (hidden,)), h.astype(out_dtype).reshape(batch + (hidden,)))


def lstm_step(x, w_ih, w_hh, bias, c, h):
    """One LSTM cell step: x ``(*batch, C)``, c and h ``(*batch, K)``; returns (c', h')."""
    _, carry = lstm(x[..., None, :], w_ih, w_hh, bias, c, h)
    return carry

