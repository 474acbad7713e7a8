"""jax_brgemm.nn.conv2d: 2-D convolution as loop nests around the brgemm kernel.

Forward, backward-data and weight-update are each one FFI call into a C++ loop nest
(cpp/primitives/conv.cc); ``jax.grad`` runs the latter two, and forward mode and higher orders more of the
same (jax_brgemm._bilinear).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _activations, _ext  # noqa: F401  (_ext registers the FFI targets)
from .._checks import check_activation, check_kernel_dtype
from ..ops import _out_dtype
from .._bilinear import given, op_jvp
from .._op import fold, from_channels, kernel_call, lift, to_channels, unfold
from .._sharding import align_to_batch

_NONE = jnp.zeros((0,), jnp.float32)  # stands for an absent bias in the FFI call


class _Geometry(NamedTuple):
    strides: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))
    groups: int

    def attr(self):
        (top, _), (left, _) = self.pads
        return np.array([*self.strides, *self.dilation, top, left, self.groups], np.int64)

    def out_size(self, in_hw, taps_hw):
        return tuple((size + lo + hi - (d * (t - 1) + 1)) // s + 1
                     for size, (lo, hi), t, s, d in zip(in_hw, self.pads, taps_hw, self.strides, self.dilation))

    def widened(self, factor):
        return self._replace(groups=self.groups * factor)


def conv2d(x, kernel, bias=None, *, strides=1, padding="SAME", dilation=1, feature_group_count=1,
           activation=None, out_dtype=None):
    """2-D convolution, ``activation(conv(x, kernel) + bias)``.

    Args:
      x: ``(N, H, W, C)`` float32 or bfloat16 (NHWC); extra leading dims fold into the batch.
        Its dtype is the compute dtype: kernel is cast to it (float32 params with bfloat16
        activations, like Flax's ``param_dtype`` / ``dtype``).
      kernel: ``(R, S, C // feature_group_count, K)`` float32 or bfloat16 (HWIO).
      bias: optional ``(K,)`` float32 or bfloat16, added in float32.
      strides, dilation: an int or a pair of ints (height, width), all >= 1. ``dilation``
        spreads the kernel taps (``rhs_dilation`` in ``lax.conv_general_dilated``).
      padding: "SAME", "VALID", an int, or explicit ``((top, bottom), (left, right))``.
      feature_group_count: groups; must divide C and K (C == groups: depthwise).
      activation: None, "relu", "gelu" (tanh form), "sigmoid" or "tanh", fused after bias.
      out_dtype: float32 or bfloat16; default x's dtype. Every sum is float32.

    Gradients come in each input's own dtype. In bfloat16 the output gradient is rounded to
    bfloat16 before the backward passes (as ``jax_brgemm.brgemm`` does), the kernel gradient
    is summed in float32 over every image and pixel and rounded once.

    Returns ``(N, P, Q, K)`` in ``out_dtype``, the same as ``lax.conv_general_dilated`` with
    ``dimension_numbers=("NHWC", "HWIO", "NHWC")`` plus bias and activation. Works under
    jit, vmap and grad (to x, kernel and bias).
    """
    dtype = check_kernel_dtype("x", x)
    check_kernel_dtype("kernel", kernel)
    out_dtype = _out_dtype(out_dtype, dtype)
    if np.ndim(x) < 4:
        raise ValueError(f"x must have shape (N, H, W, C) (NHWC), got {np.shape(x)}")
    if np.ndim(kernel) != 4:
        raise ValueError(f"kernel must have shape (R, S, C // feature_group_count, K) (HWIO), got {np.shape(kernel)}")
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
    r, s, cg, k = kernel.shape
    groups = _positive_int("feature_group_count", feature_group_count)
    if c % groups:
        raise ValueError(f"feature_group_count ({groups}) must divide x's channels ({c})")
    if k % groups:
        raise ValueError(f"feature_group_count ({groups}) must divide kernel's output channels ({k})")
    if cg * groups != c:
        raise ValueError(f"kernel's input channels ({cg}) times feature_group_count ({groups}) must equal "
                         f"x's channels ({c}); x {x.shape}, kernel {kernel.shape}")
    geom = _Geometry(_pair("strides", strides), _pair("dilation", dilation), (), groups)
    geom = geom._replace(pads=_pads(padding, (h, w), (r, s), geom.strides, geom.dilation))
    p, q = geom.out_size((h, w), (r, s))
    if p < 1 or q < 1:
        raise ValueError(f"kernel {kernel.shape[:2]} (dilation {geom.dilation}) is larger than the padded input: "
                         f"x spatial {(h, w)}, padding {geom.pads} give an output of {(p, q)}")
    geom = _fit(geom, x.shape, (r, s), k)
    act = check_activation("activation", activation)
    if bias is not None:
        check_kernel_dtype("bias", bias)
        bias = jnp.asarray(bias)
        if bias.shape != (k,):
            raise ValueError(f"bias must have shape (K,) = ({k},), got {bias.shape}")
    n = math.prod(lead)
    if n == 0 or k == 0:
        return jnp.zeros(lead + (p, q, k), out_dtype)
    if c == 0:  # an empty sum: only bias and activation remain
        z = jnp.zeros(lead + (p, q, k), jnp.float32)
        return _activations.apply(act, z if bias is None else z + bias.astype(jnp.float32)).astype(out_dtype)
    x, kernel, bias = align_to_batch((x.reshape((n, h, w, c)), kernel, bias), (0, None, None))
    out = _conv(x, kernel, bias, geom, act, out_dtype)
    return out.reshape(lead + out.shape[1:])


# The largest stride, dilation, padding or group count, and the most elements a padded
# input or an output may hold (far beyond any memory): see _fit.
MAX_GEOMETRY = 2**31 - 1
MAX_ELEMENTS = 2**56


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not 1 <= value <= MAX_GEOMETRY:
        raise ValueError(f"{name} must be in [1, 2**31 - 1], got {value}")
    return int(value)


def _fit(geom, x_shape, taps_hw, out_c):
    """The geometry the C++ runs, with sizes bounded so that its int64 arithmetic is exact.

    The loop nests form pixel coordinates ``o * stride + t * dilation - pad`` and element
    offsets: a coordinate or a stride, times the elements of one pixel or row, times the
    element size. A stride past the padded extent gives one output pixel along that axis
    and is never used, so it runs as that extent (the same result; so does one tap's
    dilation, as 1). Then every coordinate lies within the padded extent and every offset
    within a small multiple (< 2**6) of the bytes of the padded input or of the output, so
    values within 2**31 - 1 and at most 2**56 elements keep every product under 2**63.
    """
    *lead, h, w, c = x_shape
    extents = [max(size, size + lo + hi) for size, (lo, hi) in zip((h, w), geom.pads)]
    elements = math.prod(lead) * extents[0] * extents[1] * max(c, out_c)
    if elements > MAX_ELEMENTS:
        raise ValueError(f"x {tuple(x_shape)} with padding {geom.pads} and {out_c} output channels "
                         f"spans {elements} elements, over 2**56")
    return geom._replace(strides=tuple(min(st, e) for st, e in zip(geom.strides, extents)),
                         dilation=tuple(d if t > 1 else 1 for d, t in zip(geom.dilation, taps_hw)))


def _pair(name, value):
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
    return tuple(_positive_int(name, v) for v in value)


def _pads(padding, in_hw, taps_hw, strides, dilation):
    """((top, bottom), (left, right)) with lax.conv_general_dilated's meaning of padding."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode == "SAME":
            pads = []
            for size, t, s, d in zip(in_hw, taps_hw, strides, dilation):
                total = max((-(-size // s) - 1) * s + d * (t - 1) + 1 - size, 0)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        raise ValueError(f"padding must be 'SAME', 'VALID', an int or ((top, bottom), (left, right)), got {padding!r}")
    if isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
        pads = ((int(padding),) * 2,) * 2
    else:
        try:
            pads = tuple((int(lo), int(hi)) for lo, hi in padding)
            ok = len(pads) == 2 and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                        for pair in padding for v in pair)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or ((top, bottom), (left, right)), "
                             f"got {padding!r}")
    if any(abs(v) > MAX_GEOMETRY for pair in pads for v in pair):
        raise ValueError(f"padding must lie in [-(2**31 - 1), 2**31 - 1], got {padding!r}")
    return pads


# ------------------------------------------------------------------ derivatives


_F32 = np.dtype(jnp.float32)


def _forward(x, kernel, bias, geom, act, out_dtype):
    """The forward FFI call in x's dtype (kernel cast to it, bias to float32)."""
    call = _forward_call(geom, act, bias is not None, out_dtype)
    return call(x, kernel.astype(x.dtype), _NONE if bias is None else bias.astype(jnp.float32))


class _Maps(NamedTuple):
    """The convolution's kernel passes for jax_brgemm._bilinear: forward, backward-data
    and weight update."""

    geom: _Geometry

    def forward(self, x, kernel, bias, dtype):
        return _forward(x, kernel, bias, self.geom, "none", np.dtype(dtype))

    def backward(self, x, kernel, g, want_dx, want_dw, want_db, b_dtype):
        g_in = g.astype(x.dtype)  # the backward passes run in the compute dtype
        dx = _backward_data_call(self.geom, x.shape[1:3])(g_in, kernel.astype(x.dtype)) if want_dx else None
        dkernel = _weight_update_call(self.geom, kernel.shape[:2])(x, g_in).astype(kernel.dtype) if want_dw else None
        dbias = g.astype(jnp.float32).sum(axis=(0, 1, 2)).astype(b_dtype) if want_db else None
        return dx, dkernel, dbias


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _conv(x, kernel, bias, geom, act, out_dtype):
    return _forward(x, kernel, bias, geom, act, out_dtype)


@functools.partial(_conv.defjvp, symbolic_zeros=True)
def _conv_jvp(geom, act, out_dtype, primals, tangents):
    x, kernel, bias = primals
    dx, dkernel, dbias = (given(t) for t in tangents)
    return op_jvp(lambda act, dtype: _conv(x, kernel, bias, geom, act, np.dtype(dtype)), _Maps(geom), act,
                  out_dtype, x, kernel, bias, dx, dkernel, dbias)


# ------------------------------------------------------------------ FFI calls and vmap


def _conv_rule(call, wide_call, weights):
    """The batching rule of every convolution call. `weights`: per operand, whether it is a
    weight (kernel, bias) rather than an image tensor (x, dy); `call` is None where the
    result is itself a weight (the kernel gradient). A vmapped axis of the images alone
    folds into the batch; anything else runs `wide_call(size)`, the same call with the
    vmapped axis as `size` times the groups (every operand's channels B-major)."""

    def rule(size, in_batched, *args):
        if call is not None and not any(b for b, w in zip(in_batched, weights) if w):
            args = [fold(lift(a, b, size)) if not w else a for a, b, w in zip(args, in_batched, weights)]
            return unfold(call(*args), size), True
        args = [a if a.size == 0 else to_channels(lift(a, b, size)) for a, b in zip(args, in_batched)]
        return from_channels(wide_call(size)(*args), size), True

    return rule


@functools.lru_cache(maxsize=None)
def _forward_call(geom, act, has_bias, out_dtype=_F32):
    def results(x, kernel, bias):
        n, h, w, _ = x.shape
        return jax.ShapeDtypeStruct((n, *geom.out_size((h, w), kernel.shape[:2]), kernel.shape[3]), out_dtype)

    # Data parallel: images split across devices, weights replicated.
    return kernel_call(
        "jax_brgemm_conv2d_forward", results, batched=(True, False, False), outputs=("batch",),
        vmap=_conv_rule(lambda *a: _forward_call(geom, act, has_bias, out_dtype)(*a),
                        lambda size: _forward_call(geom.widened(size), act, has_bias, out_dtype),
                        (False, True, True)),
        geometry=geom.attr(), activation=act)


@functools.lru_cache(maxsize=None)
def _backward_data_call(geom, in_hw):
    def results(dy, kernel):  # dx in dy's dtype
        return jax.ShapeDtypeStruct((dy.shape[0], *in_hw, kernel.shape[2] * geom.groups), dy.dtype)

    return kernel_call(
        "jax_brgemm_conv2d_backward_data", results, batched=(True, False), outputs=("batch",),
        vmap=_conv_rule(lambda *a: _backward_data_call(geom, in_hw)(*a),
                        lambda size: _backward_data_call(geom.widened(size), in_hw), (False, True)),
        geometry=geom.attr())


@functools.lru_cache(maxsize=None)
def _weight_update_call(geom, taps_hw):
    def results(x, dy):  # float32 whatever x and dy are: callers round it once
        return jax.ShapeDtypeStruct((*taps_hw, x.shape[3] // geom.groups, dy.shape[3]), jnp.float32)

    # Per-shard partial sums over the images, all-reduced across the batch's devices.
    return kernel_call(
        "jax_brgemm_conv2d_weight_update", results, batched=(True, True), outputs=("sum",),
        vmap=_conv_rule(None, lambda size: _weight_update_call(geom.widened(size), taps_hw), (False, False)),
        geometry=geom.attr())
