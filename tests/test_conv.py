"""jax_brgemm.nn.conv2d against lax.conv_general_dilated in float64: forward, the gradients
to x, kernel and bias (backward-data and weight-update loop nests), jit, vmap, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import rel_err
from jax_brgemm.nn import conv2d

DN = ("NHWC", "HWIO", "NHWC")
ACTS = {None: lambda z: z, "relu": jax.nn.relu, "gelu": lambda z: jax.nn.gelu(z, approximate=True),
        "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh}


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _reference(x, kernel, bias, dy, strides, padding, dilation, groups, act):
    """float64 lax forward and its gradients (to x, kernel, bias) against cotangent dy."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    with jax.enable_x64(True):
        def f(x, kernel, bias):
            z = lax.conv_general_dilated(x, kernel, _pair(strides), padding, rhs_dilation=_pair(dilation),
                                         dimension_numbers=DN, feature_group_count=groups)
            return ACTS[act](z + bias)

        @jax.jit
        def fwd_and_grads(x, kernel, bias, dy):
            out, vjp = jax.vjp(f, x, kernel, bias)
            return out, vjp(dy)

        out, grads = fwd_and_grads(*[jnp.asarray(np.asarray(a, np.float64)) for a in (x, kernel, bias, dy)])
        return np.asarray(out), [np.asarray(g) for g in grads]


def _check(rng, n, hw, c, k, taps, strides=1, padding="SAME", dilation=1, groups=1, act=None,
           tol=1e-5):
    h, w = _pair(hw)
    r, s = _pair(taps)
    x = rng.standard_normal((n, h, w, c), np.float32)
    kernel = rng.standard_normal((r, s, c // groups, k), np.float32) / np.sqrt(r * s * c // groups)
    bias = rng.standard_normal((k,), np.float32)
    kw = dict(strides=strides, padding=padding, dilation=dilation, feature_group_count=groups, activation=act)
    out_shape = jax.eval_shape(lambda x, k, b: conv2d(x, k, b, **kw), x, kernel, bias).shape
    dy = rng.standard_normal(out_shape, np.float32)
    ref, ref_grads = _reference(x, kernel, bias, dy, strides, padding, dilation, groups, act)

    @jax.jit
    def fwd_and_grads(x, kernel, bias):
        out, vjp = jax.vjp(lambda *a: conv2d(*a, **kw), x, kernel, bias)
        return out, vjp(dy)

    out, grads = fwd_and_grads(x, kernel, bias)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < tol
    for name, g, rg in zip(("x", "kernel", "bias"), grads, ref_grads):
        assert g.shape == rg.shape, name
        assert rel_err(g, rg) < tol, (name, rel_err(g, rg))


# (n, hw, c, k, taps, strides, padding, dilation, groups, activation)
GRID = [
    (2, 7, 3, 17, 1, 1, "SAME", 1, 1, None),
    (1, 13, 17, 33, 3, 1, "SAME", 1, 1, "relu"),
    (2, 13, 33, 17, 3, 2, "SAME", 1, 1, None),
    (1, 13, 17, 16, 5, 1, "VALID", 1, 1, "tanh"),
    (2, 13, 3, 8, 5, 2, "SAME", 1, 1, None),
    (1, 13, 3, 64, 7, 2, 3, 1, 1, "relu"),
    (1, 7, 8, 9, 7, 1, "SAME", 1, 1, None),
    (2, (7, 13), 17, 17, 3, (2, 1), ((2, 0), (0, 3)), 1, 1, "sigmoid"),
    (1, 13, 16, 8, 3, 1, "SAME", 2, 1, "gelu"),
    (1, (13, 7), 6, 10, (3, 5), 2, ((1, 2), (3, 1)), (2, 1), 2, None),
    (2, 7, 34, 66, 3, 1, "SAME", 1, 2, None),
    (2, 7, 33, 33, 3, 1, "SAME", 1, 33, None),        # depthwise
    (2, 13, 34, 66, 3, 1, "SAME", 1, 2, "relu"),      # groups, border pixels by column
    (1, 13, 33, 33, 3, 1, "SAME", 1, 33, None),       # depthwise, border pixels by column
    (1, (9, 21), 17, 16, 3, (1, 2), "SAME", 1, 1, None),  # column stride 2, border pixels by column
    (1, 13, 8, 16, 3, 2, "VALID", 1, 8, "relu"),      # depthwise, channel multiplier 2
    (3, 1, 17, 33, 1, 1, "VALID", 1, 1, None),        # 1x1 spatial
    (2, 1, 5, 7, 3, 1, "SAME", 1, 1, None),           # every tap but the centre is padding
    (1, 5, 17, 17, 3, 2, ((4, 4), (0, 4)), 1, 1, None),  # outputs that see only padding
    (1, 5, 16, 16, 1, 2, "VALID", 1, 1, None),        # stride 2, 1x1: half of dx is zero
    (1, 5, 16, 16, 1, 2, ((0, 2), (0, 1)), 1, 1, None),  # stride 2, 1x1, a last row of padding
    (2, 13, 17, 16, 1, 1, "VALID", 1, 1, "relu"),     # pointwise: one long row
    (1, 13, 9, 9, 3, 3, ((-1, 2), (1, -2)), 1, 1, None),  # negative padding crops
    (1, 13, 5, 8, 3, 1, "SAME", (1, 2), 1, None),     # few channels, dilated columns: widened tap by tap
    (1, 5, 3, 4, 7, 1, "SAME", 1, 1, "relu"),         # few channels, filter wider than x: both edges in one run
    (1, 9, 3, 4, 3, 2, ((0, 1), (-1, 2)), 1, 1, None),  # few channels, negative left padding
    (2, 9, 3, 8, (1, 5), 1, "VALID", 1, 1, None),     # few channels, 1x5: widened, one tap row
    (2, 13, 17, 24, 1, 2, "VALID", 1, 1, "relu"),     # strided 1x1, 7-pixel rows: gathered first
]


@pytest.mark.parametrize("n,hw,c,k,taps,strides,padding,dilation,groups,act", GRID)
def test_matches_lax(rng, n, hw, c, k, taps, strides, padding, dilation, groups, act):
    _check(rng, n, hw, c, k, taps, strides, padding, dilation, groups, act)


def test_isa_paths(isa, rng):
    _check(rng, 2, (7, 5), 17, 33, 3, 2, "SAME", 1, 1, "relu")
    _check(rng, 1, 7, 6, 4, 3, 1, ((1, 0), (2, 1)), 2, 2, None)
    # Pointwise: the float32 weight-update reduces a chunk's rows as one long block.
    _check(rng, 3, 7, 17, 33, 1, 1, "VALID")
    # Strided 1x1, unpadded: the weight-update gathers every stride-th pixel first.
    _check(rng, 2, (7, 9), 17, 33, 1, (2, 3), "VALID")
    # Rows of more than 8 pixels: each border pixel's column is one call over the rows
    # whose row taps all land inside x, with the bias and activation in its epilogue.
    _check(rng, 2, (9, 13), 17, 33, 3, 1, "SAME", 1, 1, "relu")
    # A narrow row with a border on one side only goes by column too (no padded copy).
    _check(rng, 1, 14, 8, 16, 3, 2, "SAME", 1, 1, None)


def test_large_outputs_on_every_isa(isa, streaming, rng):
    """16 MB results (the forward's y, then backward-data's dx), written with non-temporal
    stores (Desc::stream_c) by the paths that have them: still exact."""
    _check(rng, 1, 64, 32, 1024, 1, 1, "VALID", act="relu")
    _check(rng, 1, 64, 1024, 32, 1, 1, "VALID")


RESNET50 = [  # (H=W, C, K, R=S, pad, stride)
    (224, 3, 64, 7, 3, 2), (56, 64, 256, 1, 0, 1), (56, 64, 64, 1, 0, 1), (56, 64, 64, 3, 1, 1),
    (56, 256, 64, 1, 0, 1), (56, 256, 512, 1, 0, 2), (56, 256, 128, 1, 0, 2), (28, 128, 128, 3, 1, 1),
    (28, 128, 512, 1, 0, 1), (28, 512, 128, 1, 0, 1), (28, 512, 1024, 1, 0, 2), (28, 512, 256, 1, 0, 2),
    (14, 256, 256, 3, 1, 1), (14, 256, 1024, 1, 0, 1), (14, 1024, 256, 1, 0, 1), (14, 1024, 2048, 1, 0, 2),
    (14, 1024, 512, 1, 0, 2), (7, 512, 512, 3, 1, 1), (7, 512, 2048, 1, 0, 1), (7, 2048, 512, 1, 0, 1),
]


@pytest.mark.parametrize("hw,c,k,taps,pad,stride", RESNET50)
def test_resnet50_layers(rng, hw, c, k, taps, pad, stride):
    # No relu here: with this many outputs, one pre-activation within rounding of 0 flips
    # its gradient mask against the float64 reference (relu is covered by smaller cases).
    _check(rng, 1, hw, c, k, taps, stride, pad, 1, 1, None)


def test_jit_and_no_bias(rng):
    x = rng.standard_normal((2, 9, 9, 5), np.float32)
    kernel = rng.standard_normal((3, 3, 5, 7), np.float32)
    f = jax.jit(lambda x, k: conv2d(x, k, strides=2, padding="VALID"))
    ref, _ = _reference(x, kernel, np.zeros(7), np.zeros((2, 4, 4, 7)), 2, "VALID", 1, 1, None)
    assert rel_err(f(x, kernel), ref) < 1e-5
    g = jax.jit(jax.grad(lambda x, k: jnp.sum(conv2d(x, k) ** 2), argnums=(0, 1)))(x, kernel)
    with jax.enable_x64(True):
        rg = jax.grad(lambda x, k: jnp.sum(lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN) ** 2),
                      argnums=(0, 1))(jnp.asarray(x, np.float64), jnp.asarray(kernel, np.float64))
    for a, b in zip(g, rg):
        assert rel_err(a, np.asarray(b)) < 1e-5


def test_extra_leading_dims_fold_into_batch(rng):
    x = rng.standard_normal((2, 3, 6, 6, 4), np.float32)
    kernel = rng.standard_normal((3, 3, 4, 5), np.float32)
    out = conv2d(x, kernel)
    assert out.shape == (2, 3, 6, 6, 5)
    assert rel_err(out, conv2d(x.reshape(6, 6, 6, 4), kernel).reshape(out.shape)) < 1e-6


def test_vmap(rng):
    """A vmapped x folds into the batch; vmapped kernels/bias become extra groups."""
    xs = rng.standard_normal((3, 2, 7, 7, 6), np.float32)
    ks = rng.standard_normal((3, 3, 3, 3, 4), np.float32)  # groups=2: (3, 3, 6 // 2, 4)
    bs = rng.standard_normal((3, 4), np.float32)
    kw = dict(strides=(1, 2), padding="SAME", feature_group_count=2, activation="tanh")

    def loop(x, k, b, in_axes):
        sel = lambda a, ax, i: a if ax is None else a[i]
        return np.stack([conv2d(sel(x, in_axes[0], i), sel(k, in_axes[1], i), sel(b, in_axes[2], i), **kw)
                         for i in range(3)])

    for in_axes in [(0, None, None), (None, 0, None), (0, None, 0)]:
        args = [a if ax == 0 else a[0] for a, ax in zip((xs, ks, bs), in_axes)]
        out = jax.jit(jax.vmap(lambda x, k, b: conv2d(x, k, b, **kw), in_axes=in_axes))(*args)
        assert rel_err(out, loop(*args, in_axes)) < 1e-6, in_axes

    # Gradients through vmap (per-example kernels exercise both backward batching rules).
    def loss(x, k, b):
        return jnp.sum(jax.vmap(lambda x, k, b: conv2d(x, k, b, **kw))(x, k, b) ** 2)

    def loop_loss(x, k, b):
        return sum(jnp.sum(conv2d(x[i], k[i], b[i], **kw) ** 2) for i in range(3))

    for g, rg in zip(jax.grad(loss, (0, 1, 2))(xs, ks, bs), jax.grad(loop_loss, (0, 1, 2))(xs, ks, bs)):
        assert rel_err(g, rg) < 1e-5

    # Nested vmap.
    xx = rng.standard_normal((2, 3, 1, 5, 5, 6), np.float32)
    out = jax.vmap(jax.vmap(lambda x, k: conv2d(x, k, feature_group_count=2), in_axes=(0, 0)), in_axes=(0, None))(xx, ks)
    ref = np.stack([np.stack([conv2d(xx[i, j], ks[j], feature_group_count=2) for j in range(3)]) for i in range(2)])
    assert rel_err(out, ref) < 1e-6


def test_bad_input():
    x = jnp.ones((1, 5, 5, 4), jnp.float32)
    k = jnp.ones((3, 3, 4, 8), jnp.float32)
    cases = [
        (dict(kernel=jnp.ones((3, 3, 3, 8))), ValueError, "channels"),
        (dict(feature_group_count=3), ValueError, "feature_group_count"),
        (dict(kernel=jnp.ones((3, 3, 2, 5)), feature_group_count=2), ValueError, "feature_group_count"),
        (dict(kernel=jnp.ones((3, 3, 1, 8)), feature_group_count=2), ValueError, "kernel's input channels"),
        (dict(kernel=jnp.ones((7, 7, 4, 8)), padding="VALID"), ValueError, "larger than the padded input"),
        (dict(dilation=3, padding="VALID"), ValueError, "larger than the padded input"),
        (dict(strides=0), ValueError, "strides"),
        (dict(strides=(1, -2)), ValueError, "strides"),
        (dict(dilation=0), ValueError, "dilation"),
        (dict(padding="FULL"), ValueError, "padding"),
        (dict(padding=((1, 1),)), ValueError, "padding"),
        (dict(bias=jnp.ones((4,))), ValueError, "bias"),
        (dict(activation="swish"), ValueError, "activation"),
        (dict(x=jnp.ones((5, 5, 4))), ValueError, "x"),
        (dict(kernel=jnp.ones((3, 4, 8))), ValueError, "kernel"),
        (dict(x=jnp.ones((1, 5, 5, 4), jnp.int32)), TypeError, "x"),
        (dict(kernel=jnp.ones((3, 3, 4, 8), jnp.float16)), TypeError, "kernel"),
    ]
    for override, error, match in cases:
        args = dict(x=x, kernel=k, bias=None)
        args.update(override)
        with pytest.raises(error, match=match):
            conv2d(**args)


# ------------------------------------------------------------------ bfloat16
# Reference: float64 lax at the bfloat16-rounded inputs (x, kernel, cotangent). The float32
# path on the same rounded inputs gives the accumulation error (doubled: the bfloat16
# kernels sum in another order); bfloat16 may exceed it only by its roundings, 2^-8
# relative each: the result's (forward, dx, dkernel in bfloat16), and with an activation
# the output gradient's (rounded before the backward passes) and the saved bfloat16 output
# the activation's derivative is computed from.
BF16 = jnp.bfloat16
ULP = 2.0 ** -8


def _round(a):
    return np.asarray(jnp.asarray(a).astype(BF16).astype(jnp.float32))


def _check_bf16(rng, n, hw, c, k, taps, strides=1, padding="SAME", dilation=1, groups=1, act=None,
                out_dtype=None, kernel_dtype=BF16, bias_dtype=jnp.float32):
    h, w = _pair(hw)
    r, s = _pair(taps)
    x = _round(rng.standard_normal((n, h, w, c), np.float32))
    kernel = rng.standard_normal((r, s, c // groups, k), np.float32) / np.sqrt(r * s * c // groups)
    kernel = _round(kernel) if kernel_dtype == BF16 else kernel
    bias = np.asarray(jnp.asarray(rng.standard_normal((k,), np.float32)).astype(bias_dtype).astype(jnp.float32))
    kw = dict(strides=strides, padding=padding, dilation=dilation, feature_group_count=groups, activation=act)
    out_dtype = np.dtype(BF16 if out_dtype is None else out_dtype)
    out_shape = jax.eval_shape(lambda x, k: conv2d(x, k, **kw), x, kernel).shape
    dy = _round(rng.standard_normal(out_shape, np.float32))
    ref, ref_grads = _reference(x, _round(kernel), bias, dy, strides, padding, dilation, groups, act)

    def run(x, kernel, bias, dy, **extra):
        out, vjp = jax.vjp(lambda *a: conv2d(*a, **kw, **extra), x, kernel, bias)
        return out, vjp(dy.astype(out.dtype))

    out32, grads32 = jax.jit(run)(x, _round(kernel), bias, dy)
    args = (jnp.asarray(x, BF16), jnp.asarray(kernel, kernel_dtype), jnp.asarray(bias, bias_dtype))
    out, grads = jax.jit(functools.partial(run, out_dtype=out_dtype))(*args, jnp.asarray(dy))
    assert out.dtype == out_dtype and out.shape == ref.shape
    rounds_out = int(out_dtype == BF16)
    rounds_grad = 0 if act is None else 2  # the output gradient and the saved output
    assert rel_err(out, ref) <= 2 * rel_err(out32, ref) + rounds_out * ULP, rel_err(out, ref)
    for name, g, g32, rg, arg in zip(("x", "kernel", "bias"), grads, grads32, ref_grads, args):
        assert g.dtype == arg.dtype and g.shape == rg.shape, name
        rounds = rounds_grad + int(g.dtype == BF16)
        assert rel_err(g, rg) <= 2 * rel_err(g32, rg) + rounds * ULP, (name, rel_err(g, rg), rel_err(g32, rg))


# A subset of GRID and RESNET50: (n, hw, c, k, taps, strides, padding, dilation, groups, activation)
GRID_BF16 = [
    (2, 13, 33, 17, 3, 2, "SAME", 1, 1, None),
    (1, 13, 17, 33, 3, 1, "SAME", 1, 1, "relu"),
    (2, 13, 3, 8, 5, 2, "SAME", 1, 1, None),             # 3 channels: the widened stem path
    (1, (13, 7), 6, 10, (3, 5), 2, ((1, 2), (3, 1)), (2, 1), 2, None),
    (2, 7, 33, 33, 3, 1, "SAME", 1, 33, None),           # depthwise
    (1, 5, 17, 17, 3, 2, ((4, 4), (0, 4)), 1, 1, "tanh"),  # outputs that see only padding
    (1, 5, 16, 16, 1, 2, "VALID", 1, 1, None),           # half of dx is zero
    (2, 13, 17, 16, 1, 1, "VALID", 1, 1, "sigmoid"),     # pointwise
    (1, 28, 128, 128, 3, 1, 1, 1, 1, None),              # ResNet-50 layer 7
    (1, 14, 1024, 512, 1, 2, 0, 1, 1, None),             # ResNet-50 layer 16
]


@pytest.mark.parametrize("n,hw,c,k,taps,strides,padding,dilation,groups,act", GRID_BF16)
def test_bfloat16(rng, n, hw, c, k, taps, strides, padding, dilation, groups, act):
    _check_bf16(rng, n, hw, c, k, taps, strides, padding, dilation, groups, act)


def test_bfloat16_isa_paths(isa_bf16, rng):
    _check_bf16(rng, 2, (7, 5), 17, 33, 3, 2, "SAME", 1, 1, "relu")  # odd channels and pixel counts
    _check_bf16(rng, 2, (7, 9), 17, 33, 1, (2, 3), "VALID", 1, 1, None)  # strided 1x1: gathered pixels


def test_bfloat16_large_outputs_on_every_isa(isa_bf16, streaming, rng):
    """8 MB bfloat16 results (forward y, then backward-data's dx), written with
    non-temporal stores (Desc::stream_c) where the path has them: still within bfloat16
    tolerance."""
    _check_bf16(rng, 1, 64, 32, 1024, 1, 1, "VALID", 1, 1, "relu")
    _check_bf16(rng, 1, 64, 1024, 32, 1, 1, "VALID", 1, 1, None)


def test_bfloat16_mixed_and_out_dtype(rng):
    # float32 params (kernel, bias) with bfloat16 activations; float32 results on request.
    _check_bf16(rng, 2, 9, 17, 33, 3, 1, "SAME", 1, 1, "gelu", out_dtype=jnp.float32, kernel_dtype=jnp.float32)
    _check_bf16(rng, 1, 9, 8, 16, 3, 2, "SAME", 1, 2, None, kernel_dtype=jnp.float32, bias_dtype=BF16)


def test_bfloat16_vmap(rng):
    xs = jnp.asarray(rng.standard_normal((3, 2, 7, 7, 6), np.float32), BF16)
    ks = jnp.asarray(rng.standard_normal((3, 3, 3, 3, 4), np.float32), BF16)
    f = lambda x, k: conv2d(x, k, feature_group_count=2)
    out = jax.jit(jax.vmap(f))(xs, ks)
    assert out.dtype == BF16
    ref = np.stack([np.asarray(f(xs[i], ks[i]), np.float32) for i in range(3)])
    assert rel_err(out, ref) == 0.0  # the same sums, each rounded once


def test_bfloat16_bad_input():
    x = jnp.ones((1, 5, 5, 4), BF16)
    with pytest.raises(TypeError, match="out_dtype"):
        conv2d(x, jnp.ones((3, 3, 4, 8), BF16), out_dtype=jnp.int32)
    with pytest.raises(TypeError, match="bias"):
        conv2d(x, jnp.ones((3, 3, 4, 8), BF16), jnp.ones((8,), jnp.int32))


def test_second_order_derivatives(rng):
    """Gradients of gradients (once refused with a NotImplementedError) equal those of the
    lax reference."""
    x = jnp.asarray(rng.standard_normal((1, 5, 5, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(conv2d(x, w, activation="tanh") ** 2))
    ref = jax.grad(lambda x: jnp.sum(jnp.tanh(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))) ** 2))
    gg = jax.grad(lambda x: jnp.sum(grad(x) ** 2))(x)
    gg_ref = jax.grad(lambda x: jnp.sum(ref(x) ** 2))(x)
    assert rel_err(gg, gg_ref) < 1e-5, rel_err(gg, gg_ref)
