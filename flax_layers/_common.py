"""What the NNX and Linen modules share: when the brgemm kernel can serve a call, and how
a call is put to the jax_brgemm.nn ops. Everything here is plain JAX; no Flax state."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

import jax_brgemm as jb
from jax_brgemm import _activations
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


# ------------------------------------------------------------------ dense


def dense(x, kernel, bias, activation):
    return jb.nn.dense(x, kernel, bias, activation=activation)


# ------------------------------------------------------------------ conv


class ConvPlan(NamedTuple):
    """How a Flax 2-D convolution maps onto jax_brgemm.nn.conv2d."""

    strides: tuple[int, int]
    dilation: tuple[int, int]
    padding: str | tuple  # for conv2d: "SAME", "VALID" or ((top, bottom), (left, right))
    pre_pad: tuple | None  # (jnp.pad mode, pads) for CIRCULAR / REFLECT, applied first


def _pair(value):
    if value is None:
        return (1, 1)
    if isinstance(value, numbers.Integral):
        return (int(value),) * 2
    return tuple(value)


def conv_plan(kernel_size, strides, padding, input_dilation, kernel_dilation) -> ConvPlan | None:
    """The conv2d arguments for a Flax Conv's settings, or None when the kernel cannot
    serve them (not 2-D, input dilation, CAUSAL or negative padding): the stock path runs."""
    from flax.nnx.nn.linear import canonicalize_padding

    if len(kernel_size) != 2:
        return None
    strides, input_dilation, dilation = _pair(strides), _pair(input_dilation), _pair(kernel_dilation)
    if len(strides) != 2 or len(dilation) != 2 or input_dilation != (1, 1):
        return None
    pad = canonicalize_padding(padding, 2)
    if pad in ("SAME", "VALID"):
        return ConvPlan(strides, dilation, pad, None)
    if pad in ("CIRCULAR", "REFLECT"):  # Flax pads the input, then runs a VALID conv
        spans = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
        pads = ((0, 0),) + tuple(((s - 1) // 2, s // 2) for s in spans) + ((0, 0),)
        return ConvPlan(strides, dilation, "VALID", ({"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad], pads))
    if isinstance(pad, str):
        return None
    pad = tuple((int(lo), int(hi)) for lo, hi in pad)
    if len(pad) != 2 or min(min(p) for p in pad) < 0:
        return None
    return ConvPlan(strides, dilation, pad, None)


def conv(plan: ConvPlan, inputs, kernel, bias, feature_group_count, activation):
    """Flax's Conv computation for NHWC inputs with any number of batch dims (or none)."""
    batch = inputs.shape[:-3]
    x = inputs.reshape((math.prod(batch),) + inputs.shape[-3:])
    if plan.pre_pad is not None:
        mode, pads = plan.pre_pad
        x = jnp.pad(x, pads, mode=mode)
    y = jb.nn.conv2d(x, kernel, bias, strides=plan.strides, padding=plan.padding,
                     dilation=plan.dilation, feature_group_count=feature_group_count,
                     activation=activation)
    return y.reshape(batch + y.shape[1:])


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

