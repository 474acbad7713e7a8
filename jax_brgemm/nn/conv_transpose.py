"""jax_brgemm.nn.conv_transpose: a transposed (input-dilated) 2-D convolution.

A convolution with input dilation D is the backward-data pass of a convolution with
stride D, whose kernel is the given one flipped in space with input and output channels
swapped. So its forward runs conv2d's backward-data loop nest, its data gradient conv2d's
forward and its kernel gradient conv2d's weight update: no new loop nest, no gather. It is
written as that adjoint (jax.vjp of conv2d), so forward mode and higher orders come with
conv2d's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .. import _activations
from .._checks import check_activation, check_kernel_dtype
from .conv import MAX_ELEMENTS, _pair, _positive_int, conv2d


def conv_transpose(x, kernel, bias=None, *, input_dilation, padding, dilation=1,
                   feature_group_count=1, activation=None, out_dtype=None):
    """``activation(conv(x, kernel) + bias)`` with ``lax.conv_general_dilated``'s meaning of
    ``lhs_dilation=input_dilation``, unit window strides and explicit ``padding``.

    Args:
      x: ``(N, H, W, C)`` float32 or bfloat16 (NHWC); kernel ``(R, S, C // groups, K)``
        (HWIO), cast to x's dtype; bias optional ``(K,)``, added in float32.
      input_dilation: an int or a pair (the transposed convolution's strides), >= 1.
      padding: ``((top, bottom), (left, right))`` of the dilated input, each between 0 and
        the dilated kernel's span ``dilation * (taps - 1)``.
      dilation: kernel dilation (``rhs_dilation``); feature_group_count: groups.
      activation: None, "relu", "gelu", "sigmoid" or "tanh"; out_dtype: x's dtype (the
        backward-data pass returns it).

    Returns ``(N, P, Q, K)``; ``P = (H - 1) * D + 1 + top + bottom - dilation * (R - 1)``.
    Differentiable in x, kernel and bias; works under jit and vmap.
    """
    dtype = check_kernel_dtype("x", x)
    check_kernel_dtype("kernel", kernel)
    if out_dtype is not None and np.dtype(out_dtype) != dtype:
        raise TypeError(f"out_dtype must be x's dtype {dtype} for a transposed convolution, got {np.dtype(out_dtype)}")
    if np.ndim(x) != 4 or np.ndim(kernel) != 4:
        raise ValueError(f"x must be (N, H, W, C) and kernel (R, S, C // groups, K); got {np.shape(x)}, {np.shape(kernel)}")
    act = check_activation("activation", activation)
    stride, dil = _pair("input_dilation", input_dilation), _pair("dilation", dilation)
    r, s, cg, k = kernel.shape
    groups = _positive_int("feature_group_count", feature_group_count)
    if x.shape[3] != cg * groups or k % groups:
        raise ValueError(f"kernel {kernel.shape} and feature_group_count {groups} do not match x {x.shape}")
    try:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    except (TypeError, ValueError):
        raise ValueError(f"padding must be ((top, bottom), (left, right)), got {padding!r}") from None
    spans = ((r - 1) * dil[0], (s - 1) * dil[1])
    if len(pads) != 2 or any(not 0 <= p <= span for pair, span in zip(pads, spans) for p in pair):
        raise ValueError(f"padding must be ((top, bottom), (left, right)) with each value in "
                         f"[0, dilation * (taps - 1)] = {spans}, got {padding!r}")
    # The strided convolution whose backward-data pass this is: pads (span - lo, span - hi).
    geometry = (stride, dil, tuple((span - lo, span - hi) for (lo, hi), span in zip(pads, spans)), groups)
    out_shape = _out_shape(x, kernel, geometry)
    if math.prod(out_shape) > MAX_ELEMENTS:  # conv2d bounds the rest (conv.py, _fit)
        raise ValueError(f"input_dilation {stride} gives an output of shape {out_shape}, over 2**56 elements")
    y = _conv_transpose(jnp.asarray(x), jnp.asarray(kernel).astype(dtype), geometry)
    if bias is not None:
        check_kernel_dtype("bias", bias)
        if np.shape(bias) != (k,):
            raise ValueError(f"bias must have shape (K,) = ({k},), got {np.shape(bias)}")
        y = y.astype(jnp.float32) + jnp.asarray(bias).astype(jnp.float32)
    return _activations.apply(act, y).astype(dtype)


def _adjoint_kernel(kernel, groups):
    """(R, S, C/G, K) -> (R, S, K/G, C): flipped in space, input and output channels swapped
    within each group. Its own inverse up to the shapes."""
    r, s, cg, k = kernel.shape
    w = kernel.reshape(r, s, cg, groups, k // groups)[::-1, ::-1]
    return jnp.transpose(w, (0, 1, 4, 3, 2)).reshape(r, s, k // groups, groups * cg)


def _strided(u, w_adj, geometry):
    """The strided convolution whose adjoint (in u) is the transposed one."""
    stride, dil, pads, groups = geometry
    return conv2d(u, w_adj, strides=stride, padding=pads, dilation=dil, feature_group_count=groups)


def _out_shape(x, kernel, geometry):
    stride, dil, pads, _ = geometry
    taps = kernel.shape[:2]
    spatial = tuple((size - 1) * st + (t - 1) * d + 1 - lo - hi
                    for size, st, t, d, (lo, hi) in zip(x.shape[1:3], stride, taps, dil, pads))
    return (x.shape[0], *spatial, kernel.shape[3])


def _conv_transpose(x, kernel, geometry):
    # The adjoint of the strided convolution in its input: jax.vjp transposes conv2d's
    # tangent into its backward-data call (XLA drops the forward traced alongside). Every
    # derivative of this is again conv2d's passes (jax_brgemm._bilinear): the data gradient
    # its forward, the kernel gradient its weight update.
    w_adj = _adjoint_kernel(kernel, geometry[3])
    u = jnp.zeros(_out_shape(x, kernel, geometry), x.dtype)
    return jax.vjp(lambda u: _strided(u, w_adj, geometry), u)[1](x)[0]
