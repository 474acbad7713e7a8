"""Linen modules on the jax_brgemm kernel: drop-ins for flax.linen.Dense, flax.linen.Conv and
flax.linen.OptimizedLSTMCell, for code that has not moved to NNX.

Same attributes, defaults, parameter names, shapes and initial values as the stock modules
(variables from ``init`` of one ``apply`` to the other). The kernel serves the dtypes the
jax_brgemm.nn ops take; anything else runs the stock computation (see :mod:`flax_layers`). Dense and
Conv take one extra attribute, ``activation``, fused into the kernel's epilogue.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen
from flax.linen.dtypes import promote_dtype
from flax.linen.recurrent import DenseParams

from . import _common
from . import attention as _attention

__all__ = ["Dense", "Conv", "OptimizedLSTMCell", "MultiHeadDotProductAttention"]


def _promoted(promote, dtype, *arrays) -> list:
    """``promote(*arrays, dtype=dtype)`` as shapes and dtypes; arrays may be
    ShapeDtypeStructs (parameters not created yet) or None."""
    return jax.tree.leaves(jax.eval_shape(lambda *a: promote(*a, dtype=dtype), *arrays))


class Dense(linen.Dense):
    """:class:`flax.linen.Dense` computed by :func:`jax_brgemm.nn.dense` (default
    ``dot_general``); plus ``activation`` (None, "relu", "gelu", "sigmoid", "tanh")."""

    activation: str | None = None

    @linen.compact
    def __call__(self, inputs):
        kernel_shape = (jnp.shape(inputs)[-1], self.features)
        param = jax.ShapeDtypeStruct(kernel_shape, self.param_dtype)
        if (self.dot_general is not None or self.dot_general_cls is not None
                or not _common.served_dtype("dense", *_promoted(self.promote_dtype, self.dtype,
                                                                inputs, param, None))):
            return _common.activate(self.activation, super().__call__(inputs))
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        return _common.dense(x, kernel, bias, self.activation)


class Conv(linen.Conv):
    """:class:`flax.linen.Conv` computed by :func:`jax_brgemm.nn.conv2d` for 2-D float32 and
    bfloat16 convolutions (what :class:`flax_layers.Conv` serves); plus ``activation``."""

    activation: str | None = None

    @linen.compact
    def __call__(self, inputs):
        kernel_size = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        plan = None
        if self.conv_general_dilated is None and self.conv_general_dilated_cls is None:
            plan = _common.conv_plan(kernel_size, self.strides, self.padding, self.input_dilation,
                                     self.kernel_dilation)
        kernel_shape = kernel_size + (jnp.shape(inputs)[-1] // self.feature_group_count, self.features)
        if (plan is None or (self.mask is not None and self.mask.shape != kernel_shape)
                or not _common.served_dtype("conv", *_promoted(
                    self.promote_dtype, self.dtype, inputs,
                    jax.ShapeDtypeStruct(kernel_shape, self.param_dtype), None))):
            return _common.activate(self.activation, super().__call__(inputs))
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        if self.mask is not None:
            kernel = kernel * self.mask
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        return _common.conv(plan, x, kernel, bias, self.feature_group_count, self.activation)


class OptimizedLSTMCell(linen.OptimizedLSTMCell):
    """:class:`flax.linen.OptimizedLSTMCell` computed by one :func:`jax_brgemm.nn.lstm` step.

    Linen keeps one kernel per gate (``ii``, ``if``, ``ig``, ``io`` for the input and
    ``hi``, ``hf``, ``hg``, ``ho`` with biases for the hidden state); they are concatenated
    into the op's ``(C, 4K)`` / ``(K, 4K)`` / ``(4K,)`` layout on each call. Served: the
    default gates (sigmoid, tanh) in a dtype ``nn.lstm`` takes, with matching carry shapes;
    else the stock step.
    """

    @linen.compact
    def __call__(self, carry, inputs):
        c, h = carry
        hidden = h.shape[-1]
        param = jax.ShapeDtypeStruct((hidden, 4 * hidden), self.param_dtype)
        # Promoted as the stock step promotes them: (x, w_ih), (h, w_hh, bias), c to the gates'.
        x_side = _promoted(promote_dtype, self.dtype, inputs, param)
        h_side = _promoted(promote_dtype, self.dtype, h, param, param)
        c_side = jax.ShapeDtypeStruct(c.shape, jnp.promote_types(c.dtype, h_side[1].dtype))
        if not (_common.is_sigmoid(self.gate_fn) and _common.is_tanh(self.activation_fn)
                and c.shape == h.shape == inputs.shape[:-1] + (hidden,)
                and _common.served_dtype("lstm", *x_side, *h_side)
                and _common.served_dtype("lstm", c_side)):  # the op takes c in either dtype
            return super().__call__(carry, inputs)
        w_ih, w_hh, bias = [], [], []
        for gate in "ifgo":  # the stock cell's parameters, in its order
            w, _ = DenseParams(features=hidden, use_bias=False, param_dtype=self.param_dtype,
                               kernel_init=self.kernel_init, bias_init=self.bias_init,
                               name=f"i{gate}")(inputs)
            u, b = DenseParams(features=hidden, use_bias=True, param_dtype=self.param_dtype,
                               kernel_init=self.recurrent_kernel_init, bias_init=self.bias_init,
                               name=f"h{gate}")(h)
            w_ih.append(w), w_hh.append(u), bias.append(b)
        cat = lambda parts: jnp.concatenate(parts, axis=-1)  # noqa: E731
        x, w_ih, _ = promote_dtype(inputs, cat(w_ih), None, dtype=self.dtype)
        h, w_hh, bias = promote_dtype(h, cat(w_hh), cat(bias), dtype=self.dtype)
        c = c.astype(jnp.promote_types(c.dtype, w_hh.dtype))
        new_c, new_h = _common.lstm_step(x, w_ih, w_hh, bias, c, h)
        return (new_c, new_h), new_h


class MultiHeadDotProductAttention(linen.MultiHeadDotProductAttention):
    """:class:`flax.linen.MultiHeadDotProductAttention` whose default ``attention_fn`` runs
    :func:`jax_brgemm.nn.dot_product_attention` where it serves (flax_layers.attention)."""

    attention_fn: Callable[..., jax.Array] = _attention.linen_dot_product_attention
