"""OptimizedLSTMCell, RNN and LSTM: drop-ins for flax.nnx.OptimizedLSTMCell and
flax.nnx.RNN over it, on the brgemm kernel (jax_brgemm.nn.lstm)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from flax import nnx
from flax.nnx import rnglib

from . import _common


def _kernel_weights(cell, x, carry, batch):
    """``(x, w_ih, w_hh, bias, c, h)`` promoted as the stock cell promotes them, when the
    kernel can serve this cell on these inputs; else None (the stock computation runs).
    ``carry`` may be None (then c and h come back None); else its c and h must have shape
    ``batch + (hidden,)``.

    Works on any ``nnx.OptimizedLSTMCell``, ours or stock: their parameters are already in
    the op's layout, ``dense_i.kernel`` ``(C, 4K)``, ``dense_h.kernel`` ``(K, 4K)`` and
    ``dense_h.bias`` ``(4K,)``, gates i, f, g, o.
    """
    if not isinstance(cell, nnx.OptimizedLSTMCell):
        return None
    dense_i, dense_h = cell.dense_i, cell.dense_h
    if not (_common.is_sigmoid(cell.gate_fn) and _common.is_tanh(cell.activation_fn)):
        return None
    if dense_i.dot_general is not lax.dot_general or dense_h.dot_general is not lax.dot_general:
        return None
    c, h = (None, None) if carry is None else carry
    if carry is not None and not (c.shape == h.shape == tuple(batch) + (cell.hidden_features,)):
        return None
    x, w_ih, _ = dense_i.promote_dtype((x, dense_i.kernel[...], None), dtype=dense_i.dtype)
    h, w_hh, bias = dense_h.promote_dtype((h, dense_h.kernel[...], dense_h.bias[...]), dtype=dense_h.dtype)
    if c is not None:  # the stock cell's f * c promotes c to the gates' dtype
        c = c.astype(jnp.promote_types(c.dtype, w_hh.dtype))
    # The op takes a cell state of either dtype beside its compute dtype.
    if c is not None and _common.served_dtype("lstm", c) is None:
        return None
    for layer in (dense_i, dense_h):
        if _common.served_dtype("lstm", x, w_ih, w_hh, bias, h,
                                preferred_element_type=layer.preferred_element_type) is None:
            return None
    return x, w_ih, w_hh, bias, c, h


def _stock_step(cell) -> bool:
    """Whether the cell's step is the stock LSTM step (ours or Flax's), so that one kernel
    call can stand for the whole scan: a subclass overriding ``__call__`` computes
    something else, and gets the stock scan over its own step."""
    return type(cell).__call__ in (nnx.OptimizedLSTMCell.__call__, OptimizedLSTMCell.__call__)


class OptimizedLSTMCell(nnx.OptimizedLSTMCell):
    """:class:`flax.nnx.OptimizedLSTMCell` computed by one :func:`jax_brgemm.nn.lstm` step.

    Same arguments, defaults, parameters (``dense_i.kernel`` ``(in, 4 * hidden)``,
    ``dense_h.kernel`` ``(hidden, 4 * hidden)``, ``dense_h.bias``) and initial values for
    the same ``rngs`` as the stock cell; the carry is ``(c, h)`` as there.

    The kernel serves the default gates (``gate_fn=sigmoid``, ``activation_fn=tanh``) in
    the dtypes :func:`jax_brgemm.nn.lstm` takes. Other gate functions, other dtypes, or a carry whose batch
    shape differs from the input's run the stock computation. To run a whole sequence in
    one kernel call rather than one per step, use :class:`RNN` or :class:`LSTM`.
    """

    def __call__(self, carry, inputs):
        served = _kernel_weights(self, inputs, carry, inputs.shape[:-1])
        if served is None:
            return super().__call__(carry, inputs)
        new_c, new_h = _common.lstm_step(*served)
        return (new_c, new_h), new_h


class RNN(nnx.RNN):
    """:class:`flax.nnx.RNN`; over an ``OptimizedLSTMCell`` (ours or stock) whose step the
    kernel serves, the whole sequence is one :func:`jax_brgemm.nn.lstm` call (forward) and
    one backward-through-time call (gradient) instead of a scan of per-step matmuls.

    Same arguments, defaults and state as ``nnx.RNN``, and the same carry initialisation
    (``cell.initialize_carry`` with the same rng streams). ``time_major``, ``reverse``,
    ``keep_order``, ``return_carry`` and ``initial_carry`` are honoured on the fused path;
    ``seq_lengths``, other cells, subclasses that override the cell's ``__call__`` and what
    the cell's kernel path does not serve run the stock scan.
    """

    def __call__(self, inputs, *, initial_carry=None, seq_lengths=None, return_carry=None,
                 time_major=None, reverse=None, keep_order=None, rngs=None):
        return_carry = self.return_carry if return_carry is None else return_carry
        time_major = self.time_major if time_major is None else time_major
        reverse = self.reverse if reverse is None else reverse
        keep_order = self.keep_order if keep_order is None else keep_order
        step_batch = inputs.shape[1:-1] if time_major else inputs.shape[:-2]
        if (seq_lengths is not None or inputs.ndim < 2 or not _stock_step(self.cell)
                or _kernel_weights(self.cell, inputs, initial_carry, step_batch) is None):
            return super().__call__(inputs, initial_carry=initial_carry, seq_lengths=seq_lengths,
                                    return_carry=return_carry, time_major=time_major,
                                    reverse=reverse, keep_order=keep_order, rngs=rngs)
        time_axis = 0 if time_major else inputs.ndim - 2
        # As nnx.RNN does, so that the rng streams advance alike.
        if rngs is None:
            rngs = self.rngs
        if isinstance(rngs, rnglib.Rngs):
            rngs = rngs.carry.fork()
        if initial_carry is None:
            initial_carry = self.cell.initialize_carry(step_batch + inputs.shape[-1:], rngs)
        x, w_ih, w_hh, bias, c, h = _kernel_weights(self.cell, inputs, initial_carry, step_batch)
        if reverse:
            x = jnp.flip(x, axis=time_axis)
        outputs, carry = _common.lstm(x, w_ih, w_hh, bias, c, h, time_major=time_major)
        if reverse and keep_order:
            outputs = jnp.flip(outputs, axis=time_axis)
        return (carry, outputs) if return_carry else outputs


class LSTM(RNN):
    """An LSTM layer over whole sequences: ``LSTM(in_features, hidden_features, rngs=rngs)``
    is ``nnx.RNN(nnx.OptimizedLSTMCell(in_features, hidden_features, rngs=rngs))`` (same
    state, same results) run as one :func:`jax_brgemm.nn.lstm` call.

    Cell keywords (``kernel_init``, ``recurrent_kernel_init``, ``bias_init``, ``dtype``,
    ``param_dtype``, ...) go to :class:`OptimizedLSTMCell`; ``time_major``,
    ``return_carry``, ``reverse``, ``keep_order``, ``unroll``, ``state_axes``,
    ``broadcast_rngs`` and ``carry_rngs`` (``nnx.RNN``'s ``rngs``) to :class:`RNN`.
    Inputs ``(*batch, T, in_features)`` (``(T, *batch, in_features)`` when time-major).
    """

    def __init__(self, in_features: int, hidden_features: int, *, rngs: rnglib.Rngs,
                 time_major: bool = False, return_carry: bool = False, reverse: bool = False,
                 keep_order: bool = False, unroll: int = 1, state_axes=None, broadcast_rngs=None,
                 carry_rngs: rnglib.Rngs | bool = True, **cell_kwargs):
        cell = OptimizedLSTMCell(in_features, hidden_features, rngs=rngs, **cell_kwargs)
        super().__init__(cell, time_major=time_major, return_carry=return_carry, reverse=reverse,
                         keep_order=keep_order, unroll=unroll, state_axes=state_axes,
                         broadcast_rngs=broadcast_rngs, rngs=carry_rngs)
