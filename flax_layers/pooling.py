"""``fl.max_pool``: ``nnx.max_pool`` (``flax.linen.max_pool``) on the kernel's pooling loop
nest, with the same signature and results (the gradient too, ties included)."""

from __future__ import annotations

import numpy as np
from flax import linen

import jax_brgemm as jb
from jax_brgemm._checks import KERNEL_DTYPES, dtype_of


def max_pool(inputs, window_shape, strides=None, padding="VALID"):
    """``nnx.max_pool(inputs, window_shape, strides, padding)``: 2-D windows over float32 or
    bfloat16 inputs ``(..., H, W, C)`` run ``jax_brgemm.nn.max_pool``; anything else
    (other window ranks or dtypes, negative padding) runs the stock function."""
    if (dtype_of(inputs) in KERNEL_DTYPES and len(window_shape) == 2 and np.ndim(inputs) >= 3
            and (isinstance(padding, str) or all(v >= 0 for p in padding for v in p))):
        return jb.nn.max_pool(inputs, tuple(window_shape), strides, padding)
    return linen.max_pool(inputs, window_shape, strides, padding)
