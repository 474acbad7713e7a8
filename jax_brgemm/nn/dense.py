"""jax_brgemm.nn.dense and jax_brgemm.nn.mlp: fully-connected layers on the brgemm kernel.

The forward, backward-data and weight-update passes are C++ loop nests around the one
kernel (cpp/primitives/dense.cc); the bias and activation are fused into the forward's
epilogue and the activation's derivative into the backward.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import _ext  # noqa: F401  (registers the FFI targets)
from .._checks import check_activation, check_float32, check_rank
from .._sharding import align_to_batch, partitionable_ffi_call

_NONE = jnp.zeros((0,), jnp.float32)  # an absent optional operand or result


def dense(x, kernel, bias=None, *, activation=None):
    """``activation(x @ kernel + bias)`` through the brgemm kernel.

    Args:
      x: ``(..., in)`` float32; leading dims are folded into the minibatch.
      kernel: ``(in, out)`` float32.
      bias: optional ``(out,)`` float32.
      activation: None, "relu", "gelu" (tanh form), "sigmoid" or "tanh".

    Returns ``(..., out)`` float32. Differentiable (x, kernel, bias); works under jit and vmap.
    """
    check_float32("x", x)
    check_float32("kernel", kernel)
    check_rank("x", x, 1, "(..., in)")
    if np.ndim(kernel) != 2:
        raise ValueError(f"kernel must have shape (in, out), got {np.shape(kernel)}")
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    c, k = kernel.shape
    if x.shape[-1] != c:
        raise ValueError(
            f"x's last dim ({x.shape[-1]}) must equal kernel's in-features ({c}); "
            f"x {x.shape}, kernel {kernel.shape}")
    if bias is not None:
        check_float32("bias", bias)
        bias = jnp.asarray(bias)
        if bias.shape != (k,):
            raise ValueError(f"bias must have shape (out,) = ({k},), got {bias.shape}")
    act = check_activation("activation", activation)
    lead = x.shape[:-1]
    n = math.prod(lead)
    if n == 0 or k == 0:
        return jnp.zeros(lead + (k,), jnp.float32)
    x, kernel, bias = align_to_batch((x.reshape(n, c), kernel, bias), (0, None, None))
    return _dense(x, kernel, bias, act).reshape(lead + (k,))


def _forward_call(x, kernel, bias, act, keep_preact):
    """y (and the pre-activation when kept) for 2-D x; vmap adds leading problem dims,
    which the handler folds into the minibatch while the weights are shared."""
    shape = (x.shape[0], kernel.shape[1])
    outs = (jax.ShapeDtypeStruct(shape, jnp.float32),
            jax.ShapeDtypeStruct(shape if keep_preact else (0,), jnp.float32))
    # Data parallel: rows split across devices, weights replicated.
    call = partitionable_ffi_call("jax_brgemm_dense_fwd", outs, batched=(True, False, False),
                                  outputs=("batch", "batch"))
    return call(x, kernel, _NONE if bias is None else bias, activation=act)


def _backward_call(dy, x, kernel, saved, act, *, want_dx=True, want_dw=True, want_db=True):
    """(dx, dkernel, dbias) of the layer, each skipped (returned empty) when not wanted.
    `saved` is y for relu/sigmoid/tanh, the pre-activation for gelu, None for none."""
    (n, c), k = x.shape, kernel.shape[1]

    def result(want, shape):
        return jax.ShapeDtypeStruct(shape if want else (0,), jnp.float32)

    outs = (result(want_dx, (n, c)), result(want_dw, (c, k)), result(want_db, (k,)))
    # dx splits like the rows; dkernel and dbias are per-shard sums, all-reduced.
    call = partitionable_ffi_call("jax_brgemm_dense_bwd", outs, batched=(True, True, False, True),
                                  outputs=("batch", "sum", "sum"))
    return call(dy, x, kernel, _NONE if saved is None else saved, activation=act)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dense(x, kernel, bias, act):
    return _forward_call(x, kernel, bias, act, keep_preact=False)[0]


def _dense_fwd(x, kernel, bias, act):
    keep_preact = act == "gelu"  # gelu's derivative needs its input; others use the output
    y, preact = _forward_call(x, kernel, bias, act, keep_preact)
    saved = preact if keep_preact else (None if act == "none" else y)
    return y, (x, kernel, bias, saved)


def _dense_bwd(act, res, dy):
    x, kernel, bias, saved = res
    # Two calls, so XLA drops the backward-data one where dx is unused (a first layer).
    dx = _backward_call(dy, x, kernel, saved, act, want_dw=False, want_db=False)[0]
    _, dkernel, dbias = _backward_call(dy, x, kernel, saved, act, want_dx=False,
                                       want_db=bias is not None)
    return dx, dkernel, (None if bias is None else dbias)


_dense.defvjp(_dense_fwd, _dense_bwd)


# ------------------------------------------------------------------ multi-layer perceptron


def mlp(x, layers: Sequence, *, activation="relu", final_activation=None):
    """Applies ``dense`` layers in turn: ``activation`` between them, ``final_activation``
    (default None) after the last.

    Args:
      x: ``(..., in)`` float32.
      layers: a sequence of ``(kernel, bias)`` pairs (bias may be None), e.g. from
        :func:`mlp_init`.
    """
    if len(layers) == 0:
        raise ValueError("layers must hold at least one (kernel, bias) pair")
    for i, layer in enumerate(layers):
        if not isinstance(layer, (tuple, list)) or len(layer) != 2:
            raise ValueError(f"layers[{i}] must be a (kernel, bias) pair")
        kernel, bias = layer
        act = activation if i + 1 < len(layers) else final_activation
        x = dense(x, kernel, bias, activation=act)
    return x


def mlp_init(key, sizes: Sequence[int]):
    """[(kernel, bias), ...] for layer widths ``sizes`` (LeCun-normal kernels, zero biases)."""
    if len(sizes) < 2:
        raise ValueError(f"sizes must list at least the input and output widths, got {sizes}")
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(kk, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in),
         jnp.zeros((fan_out,), jnp.float32))
        for kk, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:])
    ]
