"""jax_brgemm.nn.dense and jax_brgemm.nn.mlp: fully-connected layers on the brgemm kernel.

The forward, backward-data and weight-update passes are C++ loop nests around the one
kernel (cpp/primitives/dense.cc); the bias and activation are fused into the forward's
epilogue and the activation's derivative into the backward.

bfloat16: x's dtype is the compute dtype (float32 params are cast to it inside the op, like
Flax's ``dtype`` / ``param_dtype``); every sum is float32 and each result is rounded to its
dtype once.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import _ext  # noqa: F401  (_ext registers the FFI targets)
from .._checks import check_activation, check_kernel_dtype, check_rank
from .._bilinear import given, op_jvp
from .._op import kernel_call, problems_rule
from .._sharding import align_to_batch

_NONE = jnp.zeros((0,), jnp.float32)  # an absent optional operand or result


def dense(x, kernel, bias=None, *, activation=None):
    """``activation(x @ kernel + bias)`` through the brgemm kernel.

    Args:
      x: ``(..., in)`` float32 or bfloat16; leading dims are folded into the minibatch. Its
        dtype is the compute dtype: kernel is cast to it.
      kernel: ``(in, out)`` float32 or bfloat16.
      bias: optional ``(out,)`` float32 or bfloat16, added in float32.
      activation: None, "relu", "gelu" (tanh form), "sigmoid" or "tanh".

    Returns ``(..., out)`` in x's dtype. Differentiable (x, kernel, bias), each gradient in
    its input's dtype; works under jit and vmap. In bfloat16 the products accumulate in
    float32 (the weight gradient over the whole minibatch, rounded once); the activation's
    derivative is taken in float32 and the result rounded to bfloat16 for the two backward
    products, as :func:`jax_brgemm.brgemm` does.
    """
    dtype = check_kernel_dtype("x", x)
    check_kernel_dtype("kernel", kernel)
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
        check_kernel_dtype("bias", bias)
        bias = jnp.asarray(bias)
        if bias.shape != (k,):
            raise ValueError(f"bias must have shape (out,) = ({k},), got {bias.shape}")
    act = check_activation("activation", activation)
    lead = x.shape[:-1]
    n = math.prod(lead)
    if n == 0 or k == 0:
        return jnp.zeros(lead + (k,), dtype)
    x, kernel, bias = align_to_batch((x.reshape(n, c), kernel, bias), (0, None, None))
    return _dense(x, kernel, bias, act, np.dtype(dtype)).reshape(lead + (k,))


def _forward(x, kernel, bias, act, out_dtype=None):
    """act(x @ kernel + bias) in out_dtype (default x's) for 2-D x, kernel cast to x's dtype
    and bias to float32."""
    out_dtype = np.dtype(x.dtype if out_dtype is None else out_dtype)
    call = _forward_call(act, out_dtype, bias is not None)
    return call(x, kernel.astype(x.dtype), _NONE if bias is None else bias.astype(jnp.float32))[0]


# Under vmap the handlers take one leading problem dim (lead=True): the data (x; dy, x and
# the saved output) have every problem, the weights one (shared: folded into the
# minibatch) or every problem (run one by one).


@functools.lru_cache(maxsize=None)
def _forward_call(act, out_dtype, has_bias, lead=False):
    # (The handler can also keep the float32 pre-activation, its second result: not asked
    # for, since the derivatives are applied in JAX.)
    def results(x, kernel, bias):
        return (jax.ShapeDtypeStruct(x.shape[:-1] + kernel.shape[-1:], out_dtype),
                jax.ShapeDtypeStruct((0,), jnp.float32))

    # Data parallel: rows split across devices, weights replicated.
    data = (True, False, False)
    return kernel_call(
        "jax_brgemm_dense_fwd", results, batched=(True, True, has_bias) if lead else data,
        outputs=("batch", "replicated"),
        vmap=problems_rule(lambda: _forward_call(act, out_dtype, has_bias, True), data, lead),
        activation=act)


def _backward_call(dy, x, kernel, saved, act, *, want_dx=True, want_dw=True, want_db=True,
                   dw_dtype=None, db_dtype=jnp.float32):
    """(dx, dkernel, dbias) of the layer, each skipped (returned empty) when not wanted.
    `saved` is y for relu/sigmoid/tanh, the pre-activation for gelu, None for none. The
    products run in x's dtype (dy and kernel are cast to it); dx comes in x's dtype, dkernel
    in dw_dtype (default kernel's), dbias in db_dtype."""
    dw_dtype = np.dtype(kernel.dtype if dw_dtype is None else dw_dtype)
    call = _backward_kernel_call(act, saved is not None, (want_dx, want_dw, want_db),
                                 np.dtype(x.dtype), dw_dtype, np.dtype(db_dtype))
    return call(dy.astype(x.dtype), x, kernel.astype(x.dtype), _NONE if saved is None else saved)


@functools.lru_cache(maxsize=None)
def _backward_kernel_call(act, has_saved, wants, dx_dtype, dw_dtype, db_dtype, lead=False):
    def results(dy, x, kernel, saved):
        shapes = (x.shape, dy.shape[:-2] + kernel.shape[-2:], dy.shape[:-2] + dy.shape[-1:])
        if not lead:  # the weight gradients are sums over the minibatch
            shapes = shapes[:1] + (kernel.shape, dy.shape[-1:])
        return tuple(jax.ShapeDtypeStruct(shape if want else (0,), dtype if want else jnp.float32)
                     for shape, dtype, want in zip(shapes, (dx_dtype, dw_dtype, db_dtype), wants))

    # dx splits like the rows; dkernel and dbias are per-shard sums, all-reduced.
    data = (True, True, False, True)
    kinds = ("batch",) * 3 if lead else ("batch", "sum", "sum")
    return kernel_call(
        "jax_brgemm_dense_bwd", results,
        batched=(True, True, True, has_saved) if lead else (True, True, False, has_saved),
        outputs=tuple(k if want else "replicated" for k, want in zip(kinds, wants)),
        vmap=problems_rule(lambda: _backward_kernel_call(act, has_saved, wants, dx_dtype, dw_dtype,
                                                         db_dtype, True), data, lead),
        activation=act)


class _Maps:
    """The layer's kernel passes for jax_brgemm._bilinear: F(x, w) = x @ w, backward-data and
    weight update (both in one call)."""

    def forward(self, x, kernel, bias, dtype):
        return _forward(x, kernel, bias, "none", dtype)

    def backward(self, x, kernel, g, want_dx, want_dw, want_db, b_dtype):
        # In bfloat16 the bias gradient sums the float32 g (as brgemm and conv2d do), not
        # its rounded copy; in float32 the kernel sums it in the same pass.
        in_kernel_db = want_db and x.dtype == jnp.float32
        dx, dkernel, dbias = _backward_call(g.astype(x.dtype), x, kernel, None, "none", want_dx=want_dx,
                                            want_dw=want_dw, want_db=in_kernel_db, db_dtype=b_dtype)
        if want_db and not in_kernel_db:
            dbias = g.astype(jnp.float32).sum(0).astype(b_dtype)
        return (dx if want_dx else None, dkernel if want_dw else None, dbias if want_db else None)


_MAPS = _Maps()


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _dense(x, kernel, bias, act, out_dtype):
    return _forward(x, kernel, bias, act, out_dtype)


@functools.partial(_dense.defjvp, symbolic_zeros=True)
def _dense_jvp(act, out_dtype, primals, tangents):
    # Symbolic zeros: an input not differentiated (the data of a first layer, a frozen
    # kernel) has no tangent, so jax.grad's one backward call skips its gradient.
    x, kernel, bias = primals
    dx, dkernel, dbias = (given(t) for t in tangents)
    return op_jvp(lambda act, dtype: _dense(x, kernel, bias, act, np.dtype(dtype)), _MAPS, act,
                  out_dtype, x, kernel, bias, dx, dkernel, dbias)


# ------------------------------------------------------------------ multi-layer perceptron


def mlp(x, layers: Sequence, *, activation="relu", final_activation=None):
    """Applies ``dense`` layers in turn: ``activation`` between them, ``final_activation``
    (default None) after the last.

    Args:
      x: ``(..., in)`` float32 or bfloat16 (the compute dtype of every layer).
      layers: a sequence of ``(kernel, bias)`` pairs (bias may be None), e.g. from
        :func:`mlp_init`; float32 or bfloat16 (cast to x's dtype inside each layer).
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


def mlp_init(key, sizes: Sequence[int], dtype=jnp.float32):
    """[(kernel, bias), ...] for layer widths ``sizes`` (LeCun-normal kernels, zero biases),
    in ``dtype`` (the parameters' dtype)."""
    if len(sizes) < 2:
        raise ValueError(f"sizes must list at least the input and output widths, got {sizes}")
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        ((jax.random.normal(kk, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in)).astype(dtype),
         jnp.zeros((fan_out,), dtype))
        for kk, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:])
    ]
