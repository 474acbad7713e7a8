"""jax_brgemm.nn.max_pool: 2-D max pooling over channels-last images, as flax's max_pool.

The forward is one C++ loop nest (cpp/primitives/pool.cc) taking a vector max over each
window's input pixels; the backward recomputes each window's winner from x (no argmax is
kept) and adds the output gradient to it, choosing exactly as ``jax.grad`` of
``lax.reduce_window`` max does (XLA's select_and_scatter with ``ge``): ties go to the first
pixel in window order (row-major), a padding tap (-inf) can win over an input of -inf (its
gradient is dropped), and after a NaN the next pixel wins. Overlapping windows add in
output order, in float32 also for bfloat16 (rounded once), as XLA does.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from .. import _ext  # noqa: F401  (registers the FFI targets)
from .._checks import check_kernel_dtype
from .._op import fold, kernel_op, lift, unfold, kernel_call
from .._sharding import align_to_batch

_NAME = "jax_brgemm.nn.max_pool"


def max_pool(inputs, window_shape, strides=None, padding="VALID"):
    """Max pooling with the signature and results of ``flax.linen.max_pool`` /
    ``nnx.max_pool`` for 2-D windows.

    Args:
      inputs: ``(..., H, W, C)`` float32 or bfloat16, channels last: ``(H, W, C)``, or
        ``(N, H, W, C)``, or any leading batch dims.
      window_shape: ``(kh, kw)``.
      strides: ``(sh, sw)``; default ``(1, 1)``.
      padding: ``"SAME"``, ``"VALID"`` (as ``lax.reduce_window`` reads them) or
        ``((top, bottom), (left, right))``; padded pixels are -inf.

    Returns ``(..., Ho, Wo, C)`` in the input's dtype. Works under jit, vmap (folded into
    the batch) and grad (reverse mode).
    """
    dtype = check_kernel_dtype("inputs", inputs)
    window = _pair("window_shape", window_shape)
    strides = (1, 1) if not strides else _pair("strides", strides)
    if np.ndim(inputs) < 3:
        raise ValueError(f"inputs must have shape (..., H, W, C) for a 2-D window, got {np.shape(inputs)}")
    x = jnp.asarray(inputs)
    *lead, h, w, c = x.shape
    pads = _pads(padding, (h, w), window, strides)
    for size, (lo, hi), k, name in zip((h, w), pads, window, ("height", "width")):
        if size + lo + hi < k:
            raise ValueError(f"window_shape {window} is larger than the padded input {name} "
                             f"({size} + padding {lo} + {hi})")
    out_hw = tuple((size + lo + hi - k) // s + 1 for size, (lo, hi), k, s in zip((h, w), pads, window, strides))
    out_shape = (*lead, *out_hw, c)
    if math.prod(out_shape) == 0:
        return jnp.zeros(out_shape, dtype)
    geometry = (*window, *strides, *pads[0], *pads[1])
    x4 = x.reshape((-1, h, w, c))
    (x4,) = align_to_batch((x4,), (0,))
    return _max_pool(x4, geometry).reshape(out_shape)


def _pair(name, value):
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair of ints for a 2-D window (only 2-D pooling is "
                         f"served), got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must hold ints, got {value!r}")
        if not 1 <= v <= 2**31 - 1:
            raise ValueError(f"{name} entries must be in [1, 2**31 - 1], got {value!r}")
    return tuple(int(v) for v in value)


def _pads(padding, in_hw, window, strides):
    """((top, bottom), (left, right)) as lax.reduce_window reads `padding`."""
    if isinstance(padding, str):
        try:
            pads = jax.lax.padtype_to_pads(in_hw, window, strides, padding)
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise ValueError(f"padding must be 'SAME', 'VALID' or ((top, bottom), (left, right)), "
                             f"got {padding!r}") from e
        return tuple((int(lo), int(hi)) for lo, hi in pads)
    try:
        pads = tuple(tuple(p) for p in padding)
    except TypeError:
        pads = ()
    ok = len(pads) == 2 and all(len(p) == 2 and all(isinstance(v, numbers.Integral) and
                                                   not isinstance(v, bool) for v in p) for p in pads)
    if not ok:
        raise ValueError(f"padding must be 'SAME', 'VALID' or ((top, bottom), (left, right)), got {padding!r}")
    if any(v < 0 or v > 2**31 - 1 for p in pads for v in p):
        raise ValueError(f"padding must be in [0, 2**31 - 1] (negative padding is not served), got {padding!r}")
    return tuple((int(lo), int(hi)) for lo, hi in pads)


# ------------------------------------------------------------------ custom_vjp


def _fwd(x, geometry):
    return _forward_call(geometry)(x), x


def _bwd(geometry, x, g):
    return (_backward_call(geometry)(x, g.astype(x.dtype)),)


_max_pool = kernel_op(lambda x, geometry: _forward_call(geometry)(x), _fwd, _bwd, name=_NAME,
                      nondiff_argnums=(1,))


# ------------------------------------------------------------------ FFI calls and vmap


def _out_shape(x, geometry):
    kh, kw, sh, sw, pt, pb, pl, pr = geometry
    n, h, w, c = x.shape
    return (n, (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1, c)


def _fold_rule(call):
    """vmap: every operand is an image tensor, so the vmapped axis joins the batch."""

    def rule(size, in_batched, *args):
        return unfold(call()(*(fold(lift(a, b, size)) for a, b in zip(args, in_batched))), size), True

    return rule


@functools.lru_cache(maxsize=None)
def _forward_call(geometry):
    return kernel_call(
        "jax_brgemm_max_pool_forward", lambda x: jax.ShapeDtypeStruct(_out_shape(x, geometry), x.dtype),
        batched=(True,), outputs=("batch",), vmap=_fold_rule(lambda: _forward_call(geometry)),
        geometry=np.array(geometry, np.int64))


@functools.lru_cache(maxsize=None)
def _backward_call(geometry):
    return kernel_call(
        "jax_brgemm_max_pool_backward", lambda x, dy: jax.ShapeDtypeStruct(x.shape, x.dtype),
        batched=(True, True), outputs=("batch",), vmap=_fold_rule(lambda: _backward_call(geometry)),
        geometry=np.array(geometry, np.int64))
