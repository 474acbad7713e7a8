"""jax_brgemm.nn.batch_norm: fused batch normalisation over channels-last data.

Training mode is two sweeps over the data: one call sums every channel (its sum and sum of
squares), one applies ``act(x * a + b + residual)`` with ``a = scale / sqrt(var + eps)``
and ``b = bias - mean * a``. The backward is two more: the sums of ``h`` and ``h * x`` (``h``
the output gradient masked by relu's derivative, read from the saved output) and one pass
writing dx (and the residual's gradient, ``h`` itself). C++ loop nests in
cpp/primitives/batch_norm.cc; the per-channel algebra between the calls stays here.

Sharding: the statistics calls return per-shard partial sums that the partitioned lowering
all-reduces (as the convolution's weight update does), and the apply calls split along the
batch, so under jit with a batch-sharded x the statistics are the global batch's.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from .. import _ext  # noqa: F401  (registers the FFI targets)
from .._op import first_order_only
from .._checks import check_kernel_dtype, dtype_of
from .._sharding import align_to_batch, batch_partitioned

_F32 = jnp.float32


def _none():
    """An absent optional operand of the FFI calls (made in the trace: the partitioned
    lowering takes no captured constants)."""
    return jnp.zeros((0,), _F32)


def batch_norm(x, scale, bias, mean, var, *, use_running_average, momentum=0.99, epsilon=1e-5,
               activation=None, residual=None, axis_name=None, out_dtype=None):
    """Batch normalisation over every axis but the last, as ``flax.nnx.BatchNorm`` computes it,
    with relu and a residual add fused: ``act(bn(x) + residual)``.

    Args:
      x: ``(..., C)`` float32 or bfloat16, channels last; every other axis is reduced.
      scale, bias: ``(C,)`` float32 or bfloat16, or None (1 and 0: ``use_scale`` /
        ``use_bias`` False).
      mean, var: ``(C,)`` running averages (float32 or bfloat16).
      use_running_average: True normalises with ``mean`` and ``var`` (eval); False with
        the batch's mean and biased variance (training), and updates the running averages.
      momentum: ``new = momentum * old + (1 - momentum) * batch``.
      epsilon: added to the variance: ``(x - mean) / sqrt(var + epsilon)``.
      activation: None or "relu", applied after the residual add.
      residual: optional array of x's shape, added before the activation.
      axis_name: under ``shard_map`` / ``pmap``, the mapped axis (or axes) over which
        training statistics are combined, as ``nnx.BatchNorm(axis_name=...)``. Under jit
        with sharded inputs nothing is needed: the statistics are the global batch's.
      out_dtype: float32 or bfloat16; default x's dtype.

    Statistics are float32: sums of x less the running mean (so that E[d^2] - E[d]^2 does
    not cancel once the running mean is close to the batch's), in float32 over 32 rows at a
    time and float64 beyond.

    Returns ``(y, new_mean, new_var)``; in eval mode the running averages come back as
    given. Works under jit, vmap (each vmapped slice its own statistics) and grad (to x,
    scale, bias, residual, and through the returned statistics).
    """
    dtype = check_kernel_dtype("x", x)
    if np.ndim(x) < 1:
        raise ValueError(f"x must have shape (..., C) (channels last), got {np.shape(x)}")
    if not isinstance(use_running_average, (bool, np.bool_)):
        raise TypeError(f"use_running_average must be a bool, got {use_running_average!r}")
    momentum = _real("momentum", momentum)
    epsilon = _real("epsilon", epsilon)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    if out_dtype is None:
        out_dtype = dtype
    elif np.dtype(out_dtype) not in (np.dtype(_F32), np.dtype(jnp.bfloat16)):
        raise TypeError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
    out_dtype = np.dtype(out_dtype)
    x = jnp.asarray(x)
    c = x.shape[-1]
    scale, bias, mean, var = (_vector(name, v, c) for name, v in
                              (("scale", scale), ("bias", bias), ("mean", mean), ("var", var)))
    if mean is None or var is None:
        raise TypeError("mean and var must be arrays of shape (C,), got None")
    if residual is not None:
        check_kernel_dtype("residual", residual)
        if np.shape(residual) != x.shape:
            raise ValueError(f"residual must have x's shape {x.shape}, got {np.shape(residual)}")
        residual = jnp.asarray(residual).astype(out_dtype)
    if axis_name is not None and not isinstance(axis_name, (str, tuple)):
        raise TypeError(f"axis_name must be a str, a tuple of them or None, got {axis_name!r}")

    rows = math.prod(x.shape[:-1])
    ones, zeros = jnp.ones((c,), _F32), jnp.zeros((c,), _F32)
    scale32 = ones if scale is None else scale.astype(_F32)
    bias32 = zeros if bias is None else bias.astype(_F32)
    mean32, var32 = mean.astype(_F32), var.astype(_F32)
    act = activation or "none"
    if rows == 0 or c == 0:  # nothing to normalise; the running averages keep their values
        y = jnp.zeros(x.shape, out_dtype)
        return y, mean, var
    x3 = x.reshape((1, rows, c))
    res3 = None if residual is None else residual.reshape((1, rows, c))
    x3, res3 = align_to_batch((x3, res3), (1, 1))
    if use_running_average:
        y = _eval(x3, scale32, bias32, mean32, var32, res3, epsilon, act, out_dtype)
        return y.reshape(x.shape), mean, var
    y, batch_mean, batch_var = _train(x3, scale32, bias32, jax.lax.stop_gradient(mean32), res3,
                                      epsilon, act, out_dtype, axis_name)
    new_mean = (momentum * mean32 + (1 - momentum) * batch_mean).astype(mean.dtype)
    new_var = (momentum * var32 + (1 - momentum) * batch_var).astype(var.dtype)
    return y.reshape(x.shape), new_mean, new_var


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _vector(name, v, c):
    if v is None:
        return None
    check_kernel_dtype(name, v)
    if np.shape(v) != (c,):
        raise ValueError(f"{name} must have shape (C,) = ({c},) (x's last axis), got {np.shape(v)}")
    return jnp.asarray(v)


# ------------------------------------------------------------------ custom_vjp
# Arrays are (1, R, C) (G = 1; vmap adds groups), per-channel vectors (C,); the calls take
# them as (G, C).


def _row(v):
    return v[None, :]


def _count(rows, axis_name):
    """Rows of the whole batch: this device's times the devices along axis_name."""
    return rows if axis_name is None else rows * jax.lax.psum(1, axis_name)


def _coefficients(scale, bias, mean, var, epsilon):
    invstd = jax.lax.rsqrt(var + epsilon)
    a = scale * invstd
    return invstd, a, bias - mean * a


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _train(x, scale, bias, shift, residual, epsilon, act, out_dtype, axis_name):
    return _train_fwd(x, scale, bias, shift, residual, epsilon, act, out_dtype, axis_name)[0]


def _train_fwd(x, scale, bias, shift, residual, epsilon, act, out_dtype, axis_name):
    s1, s2 = _stats_call()(x, _row(shift))
    s1, s2 = s1[0], s2[0]
    if axis_name is not None:
        s1, s2 = jax.lax.psum((s1, s2), axis_name)
    n = _count(x.shape[1], axis_name)
    d = s1 / n
    mean = shift + d
    var = jnp.maximum(s2 / n - d * d, 0.0)
    invstd, a, b = _coefficients(scale, bias, mean, var, epsilon)
    y = _apply(x, a, b, residual, act, out_dtype)
    # A zero-size stand-in says a residual was given (residuals must be arrays).
    has_res = None if residual is None else jnp.zeros((0,), _F32)
    return (y, mean, var), (x, y if act == "relu" else None, scale, mean, invstd, has_res)


@first_order_only("jax_brgemm.nn.batch_norm")
def _train_bwd(epsilon, act, out_dtype, axis_name, res, cts):
    x, y, scale, mean, invstd, has_res = res
    g, g_mean, g_var = cts
    sh, shx = _backward_sums_call(y is not None)(*_masked(x, g, y), _row(mean))
    sh, shx = sh[0], shx[0]  # this shard's: the parameters' gradients (as nnx's under pmap)
    dscale, dbias = shx * invstd, sh
    if axis_name is not None:  # dx sees the statistics of the whole batch
        sh, shx = jax.lax.psum((sh, shx), axis_name)
    n = _count(x.shape[1], axis_name)
    a = scale * invstd
    b = -a * invstd * invstd * shx / n + 2.0 * g_var / n
    c = -a * sh / n - b * mean + g_mean / n
    dx, dres = _backward_apply(x, g, y, a, b, c, has_res is not None)
    return dx, dscale, dbias, jnp.zeros_like(mean), dres


_train.defvjp(_train_fwd, _train_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _eval(x, scale, bias, mean, var, residual, epsilon, act, out_dtype):
    return _eval_fwd(x, scale, bias, mean, var, residual, epsilon, act, out_dtype)[0]


def _eval_fwd(x, scale, bias, mean, var, residual, epsilon, act, out_dtype):
    invstd, a, b = _coefficients(scale, bias, mean, var, epsilon)
    y = _apply(x, a, b, residual, act, out_dtype)
    has_res = None if residual is None else jnp.zeros((0,), _F32)
    return y, (x, y if act == "relu" else None, scale, mean, invstd, has_res)


@first_order_only("jax_brgemm.nn.batch_norm")
def _eval_bwd(epsilon, act, out_dtype, res, g):
    x, y, scale, mean, invstd, has_res = res
    sh, shx = _backward_sums_call(y is not None)(*_masked(x, g, y), _row(mean))
    sh, shx = sh[0], shx[0]
    a = scale * invstd
    zeros = jnp.zeros_like(a)
    dx, dres = _backward_apply(x, g, y, a, zeros, zeros, has_res is not None)
    dmean = -a * sh
    dvar = -0.5 * a * invstd * invstd * shx
    return dx, shx * invstd, sh, dmean, dvar, dres


_eval.defvjp(_eval_fwd, _eval_bwd)


def _masked(x, g, y):
    """The backward calls' activation operands: x, dy, and y where relu masks dy."""
    return (x, g) if y is None else (x, g, y)


def _apply(x, a, b, residual, act, out_dtype):
    call = _apply_call(act, residual is not None, np.dtype(out_dtype))
    args = (x, _row(a), _row(b)) + (() if residual is None else (residual,))
    return call(*args)


def _backward_apply(x, g, y, a, b, c, has_residual):
    call = _backward_apply_call(y is not None, has_residual)
    dx, dres = call(*_masked(x, g, y), _row(a), _row(b), _row(c))
    return dx, dres if has_residual else None


# ------------------------------------------------------------------ FFI calls, vmap, sharding
# Every call takes activations (G, R, C), whose rows are the batch (dim 1), and per-channel
# vectors (G, C). vmap folds the vmapped axis into G: each vmapped slice is its own
# normalisation problem (its own statistics), so it cannot join the rows.


def _wrap(ffi, kinds, outputs):
    """ffi(*arrays) made batch-partitioned and vmappable. kinds: per argument, "act"
    ((G, R, C)) or "vec" ((G, C))."""
    sharded = batch_partitioned(ffi, batched=tuple(1 if k == "act" else False for k in kinds),
                                outputs=outputs)

    @jax.custom_batching.custom_vmap
    def call(*args):
        return sharded(*args)

    @call.def_vmap
    def rule(size, in_batched, *args):
        lifted = [a if b else jnp.broadcast_to(a, (size,) + a.shape) for a, b in zip(args, in_batched)]
        folded = [a.reshape((-1,) + a.shape[2:]) for a in lifted]
        out = call(*folded)
        unfold = lambda r: r.reshape((size, -1) + r.shape[1:])
        single = not isinstance(out, tuple)
        return (unfold(out), True) if single else (tuple(map(unfold, out)), (True,) * len(out))

    return call


def _vec_result(x):
    return jax.ShapeDtypeStruct((x.shape[0], x.shape[2]), _F32)


@functools.lru_cache(maxsize=None)
def _stats_call():
    def ffi(x, shift):
        out = (_vec_result(x),) * 2
        return jax.ffi.ffi_call("jax_brgemm_batch_norm_stats", out)(x, shift)

    return _wrap(ffi, ("act", "vec"), ("sum", "sum"))


@functools.lru_cache(maxsize=None)
def _apply_call(act, has_residual, out_dtype):
    def ffi(x, a, b, *residual):
        out = jax.ShapeDtypeStruct(x.shape, out_dtype)
        return jax.ffi.ffi_call("jax_brgemm_batch_norm_apply", out)(
            x, a, b, residual[0] if residual else _none(), activation=act)

    return _wrap(ffi, ("act", "vec", "vec") + (("act",) if has_residual else ()), (1,))


@functools.lru_cache(maxsize=None)
def _backward_sums_call(has_mask):
    def ffi(x, g, *rest):
        *y, shift = rest
        out = (_vec_result(x),) * 2
        return jax.ffi.ffi_call("jax_brgemm_batch_norm_backward_sums", out)(
            x, g, y[0] if y else _none(), shift)

    return _wrap(ffi, ("act", "act") + (("act",) if has_mask else ()) + ("vec",), ("sum", "sum"))


@functools.lru_cache(maxsize=None)
def _backward_apply_call(has_mask, has_residual):
    def ffi(x, g, *rest):
        *y, a, b, c = rest
        dres = jax.ShapeDtypeStruct(g.shape if has_residual else (0,), g.dtype)
        out = (jax.ShapeDtypeStruct(x.shape, x.dtype), dres)
        return jax.ffi.ffi_call("jax_brgemm_batch_norm_backward_apply", out)(
            x, g, y[0] if y else _none(), a, b, c)

    outputs = (1, 1 if has_residual else "replicated")
    return _wrap(ffi, ("act", "act") + (("act",) if has_mask else ()) + ("vec",) * 3, outputs)
