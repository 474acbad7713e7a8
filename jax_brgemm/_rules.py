"""When the kernel serves a convolution or a matmul, and how: the one rule set that both
`jax_brgemm.optimize` and `flax_layers` use.

A rule takes the arguments of `lax.conv_general_dilated` / `lax.dot_general` /
`reduce_window_max` as they appear
in a jaxpr (shapes, dtypes, explicit paddings, dimension numbers) and returns either a plan
that says which `jax_brgemm.nn` op computes the same result, or a `Refusal` with the reason
the op stays in XLA. `run_conv` / `run_dot` execute a plan, with an optional fused epilogue:
a per-output-channel scale folded into the weights, a per-channel bias and an activation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from . import nn
from .ops import brgemm

_F32 = np.dtype(jnp.float32)
_BF16 = np.dtype(jnp.bfloat16)
KERNEL_DTYPES = (_F32, _BF16)

# Below this many multiply-adds XLA's own op wins: the FFI call, its argument checks and
# thread start cost microseconds, which is the whole runtime of a tiny product; a small
# matmul's backward pays it twice. Measured with `python -m jax_brgemm bench threshold`
# (docs/design.md, "optimize").
# Pooling counts window taps (output elements x window size); its threshold is the
# convolution's, not measured on its own. A batch norm counts its elements; alone, it
# showed no size below which it loses (0.8-1.1x the stock from 512 to 1.6M elements), so
# none is set.
DEFAULT_MIN_MACS = {"conv": 1 << 16, "dot": 1 << 21, "attention": 1 << 16, "pool": 1 << 16, "batch_norm": 0}


class Refusal(NamedTuple):
    """Why an op stays in XLA (shown by `jax_brgemm.explain`)."""

    reason: str


class ConvPlan(NamedTuple):
    """A `conv_general_dilated` as `nn.conv2d` (or its transpose) in NHWC / HWIO."""

    spatial: int                    # 1 or 2 (a 1-D convolution gets a unit height)
    lhs_perm: tuple                 # lhs -> (N, *spatial, C)
    rhs_perm: tuple                 # rhs -> (*spatial, I, O)
    out_perm: tuple                 # (N, *spatial, K) -> the jaxpr's output layout
    strides: tuple
    dilation: tuple
    pads: tuple                     # ((lo, hi), ...) per spatial dim
    input_dilation: tuple           # all 1, or the strides of a transposed convolution
    groups: int
    out_dtype: np.dtype
    channel_axis: int               # the output's feature axis (where a bias broadcasts)
    macs: int

    @property
    def op(self) -> str:
        return "nn.conv_transpose" if any(d != 1 for d in self.input_dilation) else "nn.conv2d"


class DotPlan(NamedTuple):
    """A `dot_general` as `nn.dense` (no batch dims) or a batched `jb.brgemm`."""

    batched: bool
    lhs_perm: tuple                 # lhs -> (*batch, *free, *contract)
    rhs_perm: tuple                 # rhs -> (*batch, *contract, *free)
    lhs_free: tuple                 # sizes
    rhs_free: tuple
    batch: tuple
    k: int
    out_dtype: np.dtype
    channel_axis: int | None        # where a bias broadcasts (the last axis, if one rhs free dim)
    macs: int

    @property
    def op(self) -> str:
        return "jb.brgemm" if self.batched else "nn.dense"


def _kernel_dtypes(lhs_dtype, rhs_dtype, preferred):
    """The result dtype when the kernel can compute these dtypes exactly as XLA would, else a
    Refusal."""
    lhs_dtype, rhs_dtype = np.dtype(lhs_dtype), np.dtype(rhs_dtype)
    if lhs_dtype != rhs_dtype:
        return Refusal(f"mixed dtypes {lhs_dtype} x {rhs_dtype}")
    if lhs_dtype not in KERNEL_DTYPES:
        return Refusal(str(lhs_dtype))
    out = lhs_dtype if preferred is None else np.dtype(preferred)
    if out not in KERNEL_DTYPES:
        return Refusal(f"{out} result")
    if lhs_dtype == _F32 and out != _F32:
        return Refusal(f"float32 inputs with a {out} result")
    return out


def _too_small(macs, min_macs):
    if macs < min_macs:
        return Refusal(f"too small: {_count(macs)} multiply-adds (min_macs={_count(min_macs)})")
    return None


def _count(n):
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


# ------------------------------------------------------------------ convolution


def conv_rule(lhs_shape, lhs_dtype, rhs_shape, rhs_dtype, *, window_strides, padding,
              lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count=1,
              batch_group_count=1, preferred_element_type=None, out_sharding=None,
              min_macs=DEFAULT_MIN_MACS["conv"], **_unused):
    """A ConvPlan for these `conv_general_dilated` parameters, or a Refusal."""
    dn = dimension_numbers
    spatial = len(lhs_shape) - 2
    if spatial not in (1, 2):
        return Refusal(f"{spatial}-D convolution")
    if out_sharding is not None:
        return Refusal("out_sharding given")
    out_dtype = _kernel_dtypes(lhs_dtype, rhs_dtype, preferred_element_type)
    if isinstance(out_dtype, Refusal):
        return out_dtype
    if batch_group_count != 1:
        return Refusal("batch_group_count > 1 (a weight-gradient convolution)")
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    strides, dilation = tuple(window_strides), tuple(rhs_dilation)
    input_dilation = tuple(lhs_dilation)
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        return Refusal("negative padding")
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    n, c = lhs_shape[lhs_spec[0]], lhs_shape[lhs_spec[1]]
    in_sizes = [lhs_shape[d] for d in lhs_spec[2:]]
    k, taps = rhs_shape[rhs_spec[0]], [rhs_shape[d] for d in rhs_spec[2:]]
    groups = int(feature_group_count)
    if any(d != 1 for d in input_dilation):
        # A transposed convolution: the backward-data pass of a strided convolution, which
        # needs unit window strides and pads within the dilated kernel's reach.
        if any(s != 1 for s in strides):
            return Refusal("input dilation with window strides")
        if out_dtype != np.dtype(lhs_dtype):
            return Refusal("input dilation with a result dtype other than the inputs'")
        span = [(t - 1) * d for t, d in zip(taps, dilation)]
        if any(lo > sp or hi > sp for (lo, hi), sp in zip(pads, span)):
            return Refusal("input dilation with padding beyond the kernel's span")
        in_sizes = [(size - 1) * d + 1 for size, d in zip(in_sizes, input_dilation)]
    out_sizes = [(size + lo + hi - (d * (t - 1) + 1)) // s + 1
                 for size, (lo, hi), t, s, d in zip(in_sizes, pads, taps, strides, dilation)]
    if min(out_sizes + [n, c, k]) < 1:
        return Refusal("empty convolution")
    macs = n * math.prod(out_sizes) * k * math.prod(taps) * (c // groups)
    if (small := _too_small(macs, min_macs)) is not None:
        return small
    lhs_perm = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
    rhs_perm = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
    # out_perm takes the NHWC result to out_spec's layout: output dim out_spec[j] is NHWC dim j'.
    nhwc_of_spec = (0, spatial + 1) + tuple(range(1, spatial + 1))  # spec position -> NHWC dim
    out_perm = [0] * (spatial + 2)
    for pos, dim in enumerate(out_spec):
        out_perm[dim] = nhwc_of_spec[pos]
    return ConvPlan(spatial, lhs_perm, rhs_perm, tuple(out_perm), strides, dilation, pads,
                    input_dilation, groups, out_dtype, out_spec[1], macs)


def _transpose(x, perm):
    return x if tuple(perm) == tuple(range(x.ndim)) else jnp.transpose(x, perm)


def run_conv(plan: ConvPlan, lhs, rhs, *, scale=None, bias=None, activation=None):
    """The convolution of `plan` on the kernel: ``activation(conv(lhs, rhs) * scale + bias)``
    with scale and bias per output channel (scale folded into the weights)."""
    x, w = _transpose(lhs, plan.lhs_perm), _transpose(rhs, plan.rhs_perm)
    strides, dilation, pads, input_dilation = plan.strides, plan.dilation, plan.pads, plan.input_dilation
    if plan.spatial == 1:  # a unit height in front of the width
        x, w = x[:, None], w[None]
        strides, dilation, input_dilation = (1, *strides), (1, *dilation), (1, *input_dilation)
        pads = ((0, 0), *pads)
    if scale is not None:
        w = w * scale.astype(w.dtype)
    if plan.op == "nn.conv_transpose":
        y = nn.conv_transpose(x, w, bias, input_dilation=input_dilation, padding=pads,
                              dilation=dilation, feature_group_count=plan.groups,
                              activation=activation, out_dtype=plan.out_dtype)
    else:
        y = nn.conv2d(x, w.astype(x.dtype), bias, strides=strides, padding=pads, dilation=dilation,
                      feature_group_count=plan.groups, activation=activation,
                      out_dtype=plan.out_dtype)
    if plan.spatial == 1:
        y = y[:, 0]
    return _transpose(y, plan.out_perm)


# ------------------------------------------------------------------ matmul


def dot_rule(lhs_shape, lhs_dtype, rhs_shape, rhs_dtype, *, dimension_numbers,
             preferred_element_type=None, out_sharding=None, min_macs=DEFAULT_MIN_MACS["dot"],
             **_unused):
    """A DotPlan for these `dot_general` parameters, or a Refusal."""
    (lc, rc), (lb, rb) = dimension_numbers
    if out_sharding is not None:
        return Refusal("out_sharding given")
    out_dtype = _kernel_dtypes(lhs_dtype, rhs_dtype, preferred_element_type)
    if isinstance(out_dtype, Refusal):
        return out_dtype
    lc, rc, lb, rb = map(tuple, (lc, rc, lb, rb))
    lfree = tuple(d for d in range(len(lhs_shape)) if d not in lc + lb)
    rfree = tuple(d for d in range(len(rhs_shape)) if d not in rc + rb)
    k = math.prod(lhs_shape[d] for d in lc)
    batch = tuple(lhs_shape[d] for d in lb)
    lhs_free = tuple(lhs_shape[d] for d in lfree)
    rhs_free = tuple(rhs_shape[d] for d in rfree)
    m, n = math.prod(lhs_free), math.prod(rhs_free)
    macs = math.prod(batch) * m * n * k
    if min(m, n, k, math.prod(batch)) < 1:
        return Refusal("empty matmul")
    if not lb and out_dtype != np.dtype(lhs_dtype):
        return Refusal("bfloat16 inputs with a float32 result (nn.dense returns bfloat16)")
    if (small := _too_small(macs, min_macs)) is not None:
        return small
    out_rank = len(batch) + len(lhs_free) + len(rhs_free)
    channel_axis = out_rank - 1 if len(rhs_free) == 1 else None
    return DotPlan(bool(lb), lb + lfree + lc, rb + rc + rfree, lhs_free, rhs_free, batch, k,
                   out_dtype, channel_axis, macs)


def run_dot(plan: DotPlan, lhs, rhs, *, scale=None, bias=None, activation=None):
    """The dot_general of `plan` on the kernel, with the same optional epilogue as run_conv."""
    m, n = math.prod(plan.lhs_free), math.prod(plan.rhs_free)
    a = _transpose(lhs, plan.lhs_perm).reshape(plan.batch + (m, plan.k))
    b = _transpose(rhs, plan.rhs_perm).reshape(plan.batch + (plan.k, n))
    if scale is not None:
        b = b * scale.astype(b.dtype)
    if plan.batched:
        lead = math.prod(plan.batch)
        y = brgemm(a.reshape(lead, 1, m, plan.k), b.reshape(lead, 1, plan.k, n), bias=bias,
                   epilogue=activation, out_dtype=plan.out_dtype)
    else:
        y = nn.dense(a, b, bias, activation=activation)
    return y.reshape(plan.batch + plan.lhs_free + plan.rhs_free)


# ------------------------------------------------------------------ max pooling


class PoolPlan(NamedTuple):
    """A 2-D `reduce_window_max` as `nn.max_pool` in NHWC."""

    perm: tuple                     # operand -> NHWC
    out_perm: tuple                 # NHWC result -> the jaxpr's layout
    window: tuple
    strides: tuple
    pads: tuple                     # ((top, bottom), (left, right))
    macs: int                       # window taps: output elements x window size
    op: str = "nn.max_pool"


# The two layouts served: (spatial dims, operand -> NHWC, NHWC -> operand).
_POOL_LAYOUTS = (((1, 2), (0, 1, 2, 3), (0, 1, 2, 3)), ((2, 3), (0, 2, 3, 1), (0, 3, 1, 2)))


def pool_rule(shape, dtype, *, window_dimensions, window_strides, padding, base_dilation,
              window_dilation, min_macs=DEFAULT_MIN_MACS["pool"], **_unused):
    """A PoolPlan for these `reduce_window_max` parameters, or a Refusal."""
    if len(shape) != 4:
        return Refusal(f"{len(shape)}-D operand (4-D NHWC or NCHW served)")
    if np.dtype(dtype) not in KERNEL_DTYPES:
        return Refusal(str(np.dtype(dtype)))
    if any(d != 1 for d in base_dilation) or any(d != 1 for d in window_dilation):
        return Refusal("dilated window")
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        return Refusal("negative padding")
    pooled = {d for d in range(4) if window_dimensions[d] != 1 or window_strides[d] != 1 or pads[d] != (0, 0)}
    for spatial, perm, out_perm in _POOL_LAYOUTS:
        if pooled <= set(spatial):
            break
    else:
        return Refusal("window over dims other than a 4-D array's H, W (NHWC) or H, W (NCHW)")
    out = [(shape[d] + lo + hi - window_dimensions[d]) // window_strides[d] + 1
           for d, (lo, hi) in enumerate(pads)]
    if min(out) < 1 or min(shape) < 1:
        return Refusal("empty pooling")
    macs = math.prod(out) * math.prod(window_dimensions)
    if (small := _too_small(macs, min_macs)) is not None:
        return small
    return PoolPlan(perm, out_perm, tuple(int(window_dimensions[d]) for d in spatial),
                    tuple(int(window_strides[d]) for d in spatial), tuple(pads[d] for d in spatial), macs)


def run_pool(plan: PoolPlan, operand):
    """The `reduce_window_max` of `plan` on the kernel."""
    y = nn.max_pool(_transpose(operand, plan.perm), plan.window, strides=plan.strides, padding=plan.pads)
    return _transpose(y, plan.out_perm)
