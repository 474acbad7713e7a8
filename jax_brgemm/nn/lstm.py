"""jax_brgemm.nn.lstm: a whole LSTM sequence as one FFI call, backward through time as another.

Both passes are loop nests around the brgemm kernel (cpp/primitives/lstm.cc): the input
products of every step as one GEMM up front, then per step the recurrent product with the
gate activations fused into the kernel's epilogue and the cell update on the hot block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import _ext  # noqa: F401  (registers the FFI targets)
from .._op import kernel_call, kernel_op, lift, without_derivative
from .._sharding import align_to_batch
from .._checks import check_kernel_dtype

__all__ = ["lstm"]


def lstm(x, w_ih, w_hh, bias, h0=None, c0=None, *, time_major=False):
    """LSTM over a whole sequence, gate order i, f, g, o (as Flax and PyTorch).

    ``z = x_t @ w_ih + h @ w_hh + bias``; ``c' = sigmoid(z_f) * c + sigmoid(z_i) * tanh(z_g)``;
    ``h' = sigmoid(z_o) * tanh(c')``.

    Args:
      x: ``(N, T, C)``, or ``(T, N, C)`` with ``time_major=True``; float32 or bfloat16. Its
        dtype is the compute dtype.
      w_ih: ``(C, 4K)``; w_hh: ``(K, 4K)``; bias: ``(4K,)``; float32 or bfloat16 each
        (float32 params with bfloat16 x work like Flax's ``param_dtype`` / ``dtype``).
      h0, c0: optional ``(N, K)`` initial states, float32 or bfloat16 (zeros when None).

    Returns ``(hs, (c_T, h_T))``: hs ``(N, T, K)`` (``(T, N, K)`` if time-major) in x's
    dtype, the final cell state in c0's dtype (float32 when c0 is None) and the final hidden
    state in h0's dtype (x's when h0 is None), so a carried state keeps its dtypes.

    Precision in bfloat16 (x bfloat16): w_ih, w_hh and h0 are rounded to bfloat16 and every
    product sums in float32. The bias, the gate pre-activations and activations, the cell
    state c and the update of c and h are float32 throughout; h_t is rounded to bfloat16 once
    per step, and that rounded value is both hs[t] and the next step's GEMM operand (Flax's
    OptimizedLSTMCell with dtype=bfloat16 rounds h the same way at its next matmul, though
    its returned h stays float32 with a float32 carry; it also rounds its two matmul
    outputs, the bias add and the gates to bfloat16, which we do not). Backward: the
    cotangents of hs and c_T arrive in their dtypes and are summed in float32; the gate
    gradients are rounded to bfloat16 once before the products that consume them (the dh
    recurrence, dx, dw_ih, dw_hh, dh0), dbias sums them unrounded; dc and dh are float32;
    the weight gradients are float32 sums over every step and batch row. Each gradient is
    rounded once, to its input's own dtype.

    Works under jit, grad (to every input) and vmap (extra leading dims of x, h0, c0 fold
    into N; vmapped weights run one call per element). Memory kept for backward: the
    activated gates and the cell state, 5K float32 per step and batch row, besides hs.
    """
    dtype = check_kernel_dtype("x", x)
    for name, value in (("w_ih", w_ih), ("w_hh", w_hh), ("bias", bias)):
        check_kernel_dtype(name, value)
    x, w_ih, w_hh, bias = map(jnp.asarray, (x, w_ih, w_hh, bias))
    layout = "(T, N, C)" if time_major else "(N, T, C)"
    if x.ndim != 3:
        raise ValueError(f"x must have shape {layout}, got {x.shape}")
    steps, batch = (x.shape[0], x.shape[1]) if time_major else (x.shape[1], x.shape[0])
    features = x.shape[2]
    if steps == 0:
        raise ValueError(f"x must have at least one time step, got shape {x.shape} {layout}")
    if batch == 0 or features == 0:
        raise ValueError(f"x must have N >= 1 and C >= 1, got shape {x.shape} {layout}")
    if w_ih.ndim != 2 or w_ih.shape[0] != features or w_ih.shape[1] % 4 or w_ih.shape[1] == 0:
        raise ValueError(f"w_ih must have shape (C, 4K) = ({features}, 4K) with K >= 1, got {w_ih.shape}")
    hidden = w_ih.shape[1] // 4
    if w_hh.shape != (hidden, 4 * hidden):
        raise ValueError(f"w_hh must have shape (K, 4K) = {(hidden, 4 * hidden)}, got {w_hh.shape}")
    if bias.shape != (4 * hidden,):
        raise ValueError(f"bias must have shape (4K,) = ({4 * hidden},), got {bias.shape}")
    states = []
    for name, state, default in (("h0", h0, dtype), ("c0", c0, jnp.float32)):
        if state is None:
            state = jnp.zeros((batch, hidden), default)
        else:
            check_kernel_dtype(name, state)
            state = jnp.asarray(state)
            if state.shape != (batch, hidden):
                raise ValueError(f"{name} must have shape (N, K) = {(batch, hidden)}, got {state.shape}")
        states.append(state)
    h0, c0 = states
    time_major = bool(time_major)
    x, w_ih, w_hh, bias, h0, c0 = align_to_batch((x, w_ih, w_hh, bias, h0, c0),
                                                 (int(time_major), None, None, None, 0, 0))
    hs, c_last = _lstm(x, w_ih, w_hh, bias, h0, c0, time_major)
    return hs, (c_last.astype(c0.dtype), _last(hs, time_major).astype(h0.dtype))


def _last(seq, time_major):
    return seq[-1] if time_major else seq[:, -1]


# ------------------------------------------------------------------ the FFI calls


def _seq_results(x, widths_dtypes):
    return [jax.ShapeDtypeStruct(x.shape[:2] + (w,), d) for w, d in widths_dtypes]


@functools.lru_cache(maxsize=None)
def _forward_call(time_major):
    """The forward FFI call: hs (x's dtype), cs and the activated gates (float32); w_ih,
    w_hh, h0 in x's dtype, bias and c0 float32. A vmapped axis of x, h0, c0 folds into N
    (one call); vmapped weights fall back to one call per element."""

    def results(x, w_ih, w_hh, *_):
        hidden = w_hh.shape[0]
        return tuple(_seq_results(x, ((hidden, x.dtype), (hidden, jnp.float32), (4 * hidden, jnp.float32))))

    def rule(axis_size, in_batched, *args):
        if any(in_batched[1:4]):  # per-element weights: one call per element
            return _per_element(call, args, in_batched, axis_size), (True, True, True)
        x, w_ih, w_hh, bias, h0, c0 = args
        x, h0, c0 = (lift(a, b, axis_size) for a, b in zip((x, h0, c0), in_batched[0:1] + in_batched[4:]))
        batch = x.shape[2] if time_major else x.shape[1]
        if time_major:  # (B, T, N, C) -> (T, B*N, C)
            x = jnp.moveaxis(x, 0, 1).reshape(x.shape[1], axis_size * batch, x.shape[3])
        else:  # (B, N, T, C) -> (B*N, T, C)
            x = x.reshape((axis_size * batch,) + x.shape[2:])
        h0, c0 = (s.reshape(axis_size * batch, s.shape[-1]) for s in (h0, c0))
        outs = call(x, w_ih, w_hh, bias, h0, c0)

        def unfold(seq):
            if time_major:
                return jnp.moveaxis(seq.reshape(seq.shape[0], axis_size, batch, seq.shape[2]), 1, 0)
            return seq.reshape((axis_size, batch) + seq.shape[1:])

        return tuple(unfold(o) for o in outs), (True, True, True)

    # Data parallel over the batch N: dim 0 of the states, dim 0 (or 1 time-major) of the
    # sequences.
    seq = 1 if time_major else 0
    call = kernel_call("jax_brgemm_lstm_forward", results, batched=(seq, False, False, False, 0, 0),
                       outputs=(seq,) * 3, vmap=rule, time_major=np.int32(time_major))
    return call


@functools.lru_cache(maxsize=None)
def _backward_call(time_major):
    """The backward FFI call, every gradient in float32 (callers round once); x, w_ih, w_hh,
    h0, hs in the compute dtype, the rest float32. Split along the batch under sharding
    (weight gradients are per-shard sums, all-reduced); under vmap one call per element."""

    def results(x, w_ih, w_hh, h0, c0, *_):
        out = [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x, w_ih, w_hh)]
        out += [jax.ShapeDtypeStruct((w_ih.shape[1],), jnp.float32)]
        return tuple(out + [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (h0, c0)])

    def rule(axis_size, in_batched, *args):
        return _per_element(call, args, in_batched, axis_size), (True,) * 6

    seq = 1 if time_major else 0
    call = kernel_call(
        "jax_brgemm_lstm_backward", results,
        # x, w_ih, w_hh, h0, c0, hs, cs, gates, d_hs, d_cT
        batched=(seq, False, False, 0, 0, seq, seq, seq, seq, 0),
        outputs=(seq, "sum", "sum", "sum", 0, 0), vmap=rule, time_major=np.int32(time_major))
    return call


def _per_element(call, args, in_batched, axis_size):
    """`call` once per vmapped element (per-element weights cannot share one recurrence),
    as a lax.map loop. Unrolling it into separate calls measured level with the loop (2-core
    Xeon, Sapphire Rapids, interleaved: 8 weight sets, N=16, T=32, C=K=64, fwd+bwd 29.6 vs
    31.9 ms; 4 sets, N=64, C=K=128, 138 vs 137 ms) while compile time grows with the size."""
    lifted = tuple(a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                   for a, b in zip(args, in_batched))
    return tuple(jax.lax.map(lambda a: call(*a), lifted))


# ------------------------------------------------------------------ differentiation


def _compute_operands(x, w_ih, w_hh, bias, h0, c0):
    """The FFI's operands: weights and h0 in the compute dtype (x's), bias and c0 float32."""
    ct = x.dtype
    return x, w_ih.astype(ct), w_hh.astype(ct), bias.astype(jnp.float32), h0.astype(ct), c0.astype(jnp.float32)


def _lstm_primal(x, w_ih, w_hh, bias, h0, c0, time_major):
    hs, cs, _ = _forward_call(time_major)(*_compute_operands(x, w_ih, w_hh, bias, h0, c0))
    return hs, _last(cs, time_major)


def _lstm_fwd(x, w_ih, w_hh, bias, h0, c0, time_major):
    forward = without_derivative("jax_brgemm.nn.lstm", _forward_call(time_major))  # grad of grad: a clear error
    hs, cs, gates = forward(*_compute_operands(x, w_ih, w_hh, bias, h0, c0))
    return (hs, _last(cs, time_major)), (x, w_ih, w_hh, bias, h0, c0, hs, cs, gates)


def _lstm_bwd(time_major, res, cotangents):
    x, w_ih, w_hh, bias, h0, c0, hs, cs, gates = res
    d_hs, d_cT = cotangents
    x, w_ih_c, w_hh_c, _, h0_c, c0_c = _compute_operands(x, w_ih, w_hh, bias, h0, c0)
    grads = _backward_call(time_major)(x, w_ih_c, w_hh_c, h0_c, c0_c, hs, cs, gates,
                                       d_hs.astype(jnp.float32), d_cT.astype(jnp.float32))
    return tuple(g.astype(a.dtype) for g, a in zip(grads, (x, w_ih, w_hh, bias, h0, c0)))


_lstm = kernel_op(_lstm_primal, _lstm_fwd, _lstm_bwd, name="jax_brgemm.nn.lstm", nondiff_argnums=(6,))
