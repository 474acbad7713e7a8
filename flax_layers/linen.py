"""Linen modules on the jax_brgemm kernel: drop-ins for flax.linen.Dense, flax.linen.Conv and
flax.linen.OptimizedLSTMCell, for code that has not moved to NNX.

Same attributes, defaults, parameter names, shapes and initial values as the stock modules
(variables from ``init`` of one ``apply`` to the other). The kernel serves the dtypes the
jax_brgemm.nn ops take; anything else runs the stock computation (see :mod:`flax_layers`). Dense and
Conv take one extra attribute, ``activation``, fused into the kernel's epilogue.
"""

from __future__ import annotations

import functools

from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen
from flax.linen.dtypes import promote_dtype
from flax.linen.recurrent import DenseParams

from . import _common
from . import attention as _attention

__all__ = ["Dense", "Conv", "ConvTranspose", "OptimizedLSTMCell", "MultiHeadDotProductAttention"]


def _promoted(promote, dtype, *arrays) -> list:
    """``promote(*arrays, dtype=dtype)`` as shapes and dtypes; arrays may be
    ShapeDtypeStructs (parameters not created yet) or None."""
    return jax.tree.leaves(jax.eval_shape(lambda *a: promote(*a, dtype=dtype), *arrays))


def _served_call(module, stock_call, inputs):
    """The stock Linen computation, its convolution or matmul on the kernel (flax_layers'
    rules, as in the NNX modules); at init, the stock computation creates the parameters."""

    def stock(x):
        return _common.activate(module.activation, stock_call(module, x))

    if module.is_initializing():
        return stock(inputs)
    return _common.serve(stock, inputs)


class Dense(linen.Dense):
    """:class:`flax.linen.Dense` computed by :func:`jax_brgemm.nn.dense` (default
    ``dot_general``); plus ``activation`` (None, "relu", "gelu", "sigmoid", "tanh")."""

    activation: str | None = None

    @linen.compact
    def __call__(self, inputs):
        _common.activation_name(self.activation)
        if self.dot_general is not None or self.dot_general_cls is not None:
            return _common.activate(self.activation, super().__call__(inputs))
        return _served_call(self, linen.Dense.__call__, inputs)


class Conv(linen.Conv):
    """:class:`flax.linen.Conv` on the kernel for what :class:`flax_layers.Conv` serves (1-D
    and 2-D float32 and bfloat16 convolutions); plus ``activation``."""

    activation: str | None = None

    @linen.compact
    def __call__(self, inputs):
        _common.activation_name(self.activation)
        if self.conv_general_dilated is not None or self.conv_general_dilated_cls is not None:
            return _common.activate(self.activation, super().__call__(inputs))
        return _served_call(self, linen.Conv.__call__, inputs)


class ConvTranspose(linen.ConvTranspose):
    """:class:`flax.linen.ConvTranspose` on the kernel (see :class:`flax_layers.ConvTranspose`);
    plus ``activation``."""

    activation: str | None = None

    @linen.compact
    def __call__(self, inputs):
        _common.activation_name(self.activation)
        return _served_call(self, linen.ConvTranspose.__call__, inputs)


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
    :func:`jax_brgemm.nn.dot_product_attention` where it serves (flax_layers.attention).
    Without decoding, dropout or sown weights the projections run on the kernel too (the
    rules of :func:`jax_brgemm.optimize`, as in :class:`flax_layers.MultiHeadAttention`)."""

    attention_fn: Callable[..., jax.Array] = _attention.linen_dot_product_attention

    @linen.compact
    def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, inputs_kv=None, mask=None,
                 deterministic=None, dropout_rng=None, sow_weights=False):
        call = functools.partial(linen.MultiHeadDotProductAttention.__call__, self)
        deterministic = linen.merge_param("deterministic", self.deterministic, deterministic) \
            if self.dropout_rate > 0.0 else True
        stateless = (not sow_weights and not self.decode and dropout_rng is None
                     and (self.dropout_rate == 0.0 or deterministic))
        if self.is_initializing() or not stateless:
            return call(inputs_q, inputs_k, inputs_v, inputs_kv=inputs_kv, mask=mask,
                        deterministic=deterministic, dropout_rng=dropout_rng, sow_weights=sow_weights)
        stock = lambda q, k, v, kv, m: call(q, k, v, inputs_kv=kv, mask=m,  # noqa: E731
                                            deterministic=deterministic)
        return _common.serve(stock, inputs_q, inputs_k, inputs_v, inputs_kv, mask)
