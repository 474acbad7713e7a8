"""jax_brgemm.brgemm and jax_brgemm.brgemm_indexed: the kernel as JAX ops.

Both are FFI custom calls with batching rules that fold vmapped axes into the kernel's
leading (problem) dims. brgemm is bilinear in (a, b): a custom_jvp whose tangents and
backward are brgemm calls (jax_brgemm._bilinear), so every order of derivative works;
brgemm_indexed is a custom_vjp whose backward is made of brgemm_indexed calls (reverse
mode, any order).
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _activations, _ext  # noqa: F401  (_ext registers the FFI targets)
from ._bilinear import given, op_jvp
from ._op import kernel_call, kernel_op, lift
from ._sharding import align_to_batch
from ._checks import (
    broadcast_lead,
    check_activation,
    check_integer,
    check_kernel_dtype,
    check_rank,
    check_same_dtype,
)

def _none():
    """Stands for an absent c or bias in the FFI call (built in the trace, not a constant)."""
    return jnp.zeros((0,), jnp.float32)


def _scalar(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python number (it is a static kernel attribute), got {type(value).__name__}")
    return float(value)


def _with_lead_rank(x, rank: int, block_rank: int):
    """Prepends size-1 dims so x has exactly `rank` leading dims (keeps NumPy's
    right-aligned broadcasting correct after vmap adds a dim in front)."""
    missing = rank - (x.ndim - block_rank)
    return x.reshape((1,) * missing + x.shape) if missing > 0 else x


def _unbroadcast(x, shape):
    """Sums x down to `shape`, undoing NumPy broadcasting (for cotangents)."""
    extra = x.ndim - len(shape)
    if extra:
        x = x.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, (s, t) in enumerate(zip(shape, x.shape)) if s == 1 and t != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def _attrs(alpha, beta, act):
    return dict(alpha=np.float32(alpha), beta=np.float32(beta), activation=act)


# ------------------------------------------------------------------ stride form


def brgemm(a, b, c=None, *, alpha=1.0, beta=0.0, activation=None, bias=None, out_dtype=None,
           epilogue=None):
    """Batch-reduce GEMM: ``activation(beta * c + alpha * sum_i a[..., i, :, :] @ b[..., i, :, :] + bias)``.

    Args:
      a: ``(..., count, m, k)`` float32 or bfloat16.
      b: ``(..., count, k, n)``, a's dtype.
      c: optional ``(..., m, n)`` addend of the result's dtype, scaled by ``beta``.
      alpha, beta: Python numbers. ``beta=0`` (the default) never reads ``c``, as in BLAS:
        a NaN or Inf in ``c`` does not reach the result (XLA's ``0 * c`` would give NaN),
        and c's gradient is zero.
      activation: None, "relu", "gelu" (tanh form), "sigmoid" or "tanh", applied after bias
        (the kernel's epilogue).
      bias: optional ``(n,)`` row added to every output row (applied in float32).
      out_dtype: float32 or bfloat16; default a's dtype. Accumulation is always float32.
      epilogue: the former name of ``activation``, still accepted.

    Leading dims of a, b and c are independent problems and broadcast like NumPy's.
    Returns ``(..., m, n)``. Works under jit, vmap and grad (a, b, c and bias); gradients
    come in each input's dtype.
    """
    check_kernel_dtype("a", a)
    check_kernel_dtype("b", b)
    check_same_dtype("a and b", a, b)
    check_rank("a", a, 3, "(..., count, m, k)")
    check_rank("b", b, 3, "(..., count, k, n)")
    a, b = jnp.asarray(a), jnp.asarray(b)
    count, m, k = a.shape[-3:]
    if b.shape[-3] != count:
        raise ValueError(f"b's count ({b.shape[-3]}) must equal a's count ({count}); a {a.shape}, b {b.shape}")
    if b.shape[-2] != k:
        raise ValueError(f"b's k ({b.shape[-2]}) must equal a's k ({k}); a {a.shape}, b {b.shape}")
    n = b.shape[-1]
    e = _epilogue_args({"a": a.shape[:-3], "b": b.shape[:-3]}, m, n, a.dtype, c, out_dtype,
                       _activation_arg(activation, epilogue), alpha, beta, bias)
    if count == 0 or k == 0 or e.empty:
        return _without_products(e, m, n)
    lead = lambda x, rank: 0 if x is not None and x.ndim > rank else None  # noqa: E731
    a, b, c, bias = align_to_batch((a, b, e.c, e.bias), (lead(a, 3), lead(b, 3), lead(e.c, 2), None))
    return _brgemm(a, b, c, bias, e.alpha, e.beta, e.act, e.out_dtype)


def _activation_arg(activation, epilogue):
    """(argument name, value): `activation`, or its older alias `epilogue`."""
    if epilogue is not None:
        if activation is not None and activation != epilogue:
            raise ValueError(f"activation ({activation!r}) and its alias epilogue ({epilogue!r}) disagree")
        return "epilogue", epilogue
    return "activation", activation


def _out_dtype(out_dtype, default):
    dtype = np.dtype(default if out_dtype is None else out_dtype)
    if dtype not in (np.dtype(jnp.float32), np.dtype(jnp.bfloat16)):
        raise TypeError(f"out_dtype must be float32 or bfloat16, got {dtype}")
    return dtype


def _check_c(c, out_dtype):
    check_kernel_dtype("c", c)
    if np.dtype(c.dtype) != out_dtype:
        raise TypeError(f"c must have the result's dtype {out_dtype}, got {c.dtype}")


def _check_bias(bias, n):
    """The bias as float32 (the epilogue's precision), shape-checked."""
    if bias is None:
        return None
    check_kernel_dtype("bias", bias)
    bias = jnp.asarray(bias)
    if bias.shape != (n,):
        raise ValueError(f"bias must have shape (n,) = ({n},), got {bias.shape}")
    return bias.astype(jnp.float32)


class _Epilogue(NamedTuple):
    c: object
    bias: object
    lead: tuple
    out_dtype: np.dtype
    act: str
    alpha: float
    beta: float
    empty: bool  # the result has no elements


def _epilogue_args(leads, m, n, in_dtype, c, out_dtype, activation, alpha, beta, bias) -> _Epilogue:
    """Checks what both forms share (c, bias, activation: (name, value), alpha, beta,
    out_dtype) and
    broadcasts the leading dims of `leads` (name -> shape) and c's."""
    out_dtype = _out_dtype(out_dtype, in_dtype)
    leads = dict(leads)
    if c is not None:
        _check_c(c, out_dtype)
        check_rank("c", c, 2, "(..., m, n)")
        c = jnp.asarray(c)
        if c.shape[-2:] != (m, n):
            raise ValueError(f"c must end in (m, n) = {(m, n)}, got {c.shape}")
        leads["c"] = c.shape[:-2]
    act = check_activation(*activation)
    alpha, beta = _scalar("alpha", alpha), _scalar("beta", beta)
    bias = _check_bias(bias, n)
    lead = broadcast_lead(leads)
    return _Epilogue(c, bias, lead, out_dtype, act, alpha, beta, 0 in lead or m == 0 or n == 0)


def _without_products(e: _Epilogue, m, n):
    """The defined result when there is nothing to multiply: an empty array, or for an
    empty sum (count or k zero) only beta * c and the bias."""
    if e.empty:
        return jnp.zeros(e.lead + (m, n), e.out_dtype)
    return _epilogue_only(e.lead + (m, n), e.c, e.beta, e.bias, e.act).astype(e.out_dtype)


def _epilogue_only(shape, c, beta, bias, act):
    z = jnp.zeros(shape, jnp.float32)
    if c is not None and beta != 0.0:
        z = z + beta * c.astype(jnp.float32)
    if bias is not None:
        z = z + bias
    return _activations.apply(act, z)


def _brgemm_call(a, b, c, bias, alpha, beta, act, out_dtype):
    c = None if c is None else c.astype(out_dtype)  # gelu's residual path asks for float32
    lead = jnp.broadcast_shapes(a.shape[:-3], b.shape[:-3], *(() if c is None else (c.shape[:-2],)))
    rank = len(lead)
    args = [_with_lead_rank(a, rank, 3), _with_lead_rank(b, rank, 3)]
    args += [] if c is None else [_with_lead_rank(c, rank, 2)]
    args += [] if bias is None else [_with_lead_rank(bias, rank, 1)]
    return _stride_call_for(alpha, beta, act, c is not None, bias is not None, rank, out_dtype)(*args)


@functools.lru_cache(maxsize=None)
def _stride_call_for(alpha, beta, act, has_c, has_bias, lead_rank, out_dtype):
    """The raw FFI call for one set of static attributes. Every operand has `lead_rank`
    leading dims (size 1 where broadcast), which the kernel broadcasts; the first is the
    batch that data-parallel sharding splits. A vmapped axis is one more leading dim."""

    def results(a, b, *rest):
        # (A vmapped bias alone gives the problems their leading dims.)
        blocks = ((a, 3), (b, 3)) + tuple(zip(rest, ((2,) if has_c else ()) + ((1,) if has_bias else ())))
        lead = jnp.broadcast_shapes(*(x.shape[:x.ndim - rank] for x, rank in blocks))
        return jax.ShapeDtypeStruct(lead + (a.shape[-2], b.shape[-1]), out_dtype)

    def operands(a, b, *rest):
        c = rest[0] if has_c else _none()
        return a, b, c, rest[-1] if has_bias else _none()

    def rule(axis_size, in_batched, *args):
        # A new leading problem dim: size 1 (broadcast) on the unbatched operands.
        args = [x if batched else x[None] for x, batched in zip(args, in_batched)]
        return _stride_call_for(alpha, beta, act, has_c, has_bias, lead_rank + 1, out_dtype)(*args), True

    return kernel_call("jax_brgemm_brgemm", results, batched=(lead_rank > 0,) * (2 + has_c + has_bias),
                       outputs=("batch",), vmap=rule, operands=operands,
                       **_attrs(alpha, beta if has_c else 0.0, act))


class _Maps(NamedTuple):
    """The products' kernel passes for jax_brgemm._bilinear: F(a, b) = alpha * sum_i a_i @ b_i
    and its adjoints, count-1 brgemm calls (one product per batch element)."""

    alpha: float

    def forward(self, a, b, bias, dtype):
        return _brgemm_call(a, b, None, bias, self.alpha, 0.0, "none", np.dtype(dtype))

    def backward(self, a, b, g, want_da, want_db, want_dbias, b_dtype):
        # dA_i = alpha * g @ B_i^T and dB_i = alpha * A_i^T @ g, float32 results summed over
        # broadcast dims in float32, then cast to the input dtype.
        f32 = np.dtype(jnp.float32)
        g_block = g.astype(a.dtype)[..., None, None, :, :]  # (lead, 1, 1, m, n)
        da = db = dbias = None
        if want_da:
            da = _brgemm_call(g_block, jnp.swapaxes(b, -1, -2)[..., :, None, :, :], None, None, self.alpha,
                              0.0, "none", f32)
            da = _unbroadcast(da, a.shape).astype(a.dtype)
        if want_db:
            db = _brgemm_call(jnp.swapaxes(a, -1, -2)[..., :, None, :, :], g_block, None, None, self.alpha,
                              0.0, "none", f32)
            db = _unbroadcast(db, b.shape).astype(b.dtype)
        if want_dbias:
            dbias = g.astype(jnp.float32).reshape(-1, g.shape[-1]).sum(0).astype(b_dtype)
        return da, db, dbias


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7))
def _brgemm(a, b, c, bias, alpha, beta, act, out_dtype):
    return _brgemm_call(a, b, c, bias, alpha, beta, act, out_dtype)


@functools.partial(_brgemm.defjvp, symbolic_zeros=True)
def _brgemm_jvp(alpha, beta, act, out_dtype, primals, tangents):
    a, b, c, bias = primals
    da, db, dc, dbias = (given(t) for t in tangents)
    extra = None if dc is None or beta == 0.0 else beta * dc.astype(jnp.float32)
    return op_jvp(lambda act, dtype: _brgemm(a, b, c, bias, alpha, beta, act, np.dtype(dtype)),
                  _Maps(alpha), act, out_dtype, a, b, bias, da, db, dbias, extra)


# ------------------------------------------------------------------ offset form


def brgemm_indexed(a_blocks, b_blocks, a_index, b_index, c=None, *, alpha=1.0, beta=0.0,
                   activation=None, bias=None, out_dtype=None, epilogue=None):
    """Offset-form batch-reduce GEMM over pools of blocks.

    ``out[...] = activation(beta * c[...] + alpha * sum_i a_blocks[a_index[..., i]] @ b_blocks[b_index[..., i]] + bias)``

    Args:
      a_blocks: ``(Pa, m, k)`` float32 or bfloat16; b_blocks: ``(Pb, k, n)``, the same dtype.
      a_index, b_index: integer ``(..., count)``; leading dims broadcast with each other and c.
        Values outside ``[0, Pa)`` / ``[0, Pb)`` are an error (ValueError when the indices
        are concrete, a runtime error from the kernel under jit), never an out-of-bounds read.
      c, alpha, beta, activation, bias, out_dtype, epilogue: as in :func:`brgemm`.

    Returns ``(..., m, n)``. Works under jit, vmap and grad (to the blocks, c, bias).
    """
    check_kernel_dtype("a_blocks", a_blocks)
    check_kernel_dtype("b_blocks", b_blocks)
    check_same_dtype("a_blocks and b_blocks", a_blocks, b_blocks)
    if np.ndim(a_blocks) != 3:
        raise ValueError(f"a_blocks must have shape (Pa, m, k), got {np.shape(a_blocks)}")
    if np.ndim(b_blocks) != 3:
        raise ValueError(f"b_blocks must have shape (Pb, k, n), got {np.shape(b_blocks)}")
    a_blocks, b_blocks = jnp.asarray(a_blocks), jnp.asarray(b_blocks)
    _, m, k = a_blocks.shape
    if b_blocks.shape[1] != k:
        raise ValueError(f"b_blocks' k ({b_blocks.shape[1]}) must equal a_blocks' k ({k})")
    n = b_blocks.shape[2]
    for name, index in (("a_index", a_index), ("b_index", b_index)):
        check_integer(name, index)
        check_rank(name, index, 1, "(..., count)")
    a_index_host, b_index_host = a_index, b_index
    a_index, b_index = jnp.asarray(a_index), jnp.asarray(b_index)
    count = a_index.shape[-1]
    if b_index.shape[-1] != count:
        raise ValueError(f"b_index's count ({b_index.shape[-1]}) must equal a_index's ({count})")
    _check_index_range("a_index", a_index_host, a_blocks.shape[0])
    _check_index_range("b_index", b_index_host, b_blocks.shape[0])
    e = _epilogue_args({"a_index": a_index.shape[:-1], "b_index": b_index.shape[:-1]}, m, n,
                       a_blocks.dtype, c, out_dtype, _activation_arg(activation, epilogue), alpha, beta, bias)
    if count == 0 or k == 0 or e.empty:
        return _without_products(e, m, n)
    a_index = jnp.broadcast_to(a_index.astype(_index_dtype(a_index)), e.lead + (count,))
    b_index = jnp.broadcast_to(b_index.astype(_index_dtype(b_index)), e.lead + (count,))
    c = None if e.c is None else jnp.broadcast_to(e.c, e.lead + (m, n))
    return _indexed(a_blocks, b_blocks, a_index, b_index, c, e.bias, e.alpha, e.beta, e.act,
                    e.out_dtype)


def _index_dtype(index):
    """int32, or int64 for indices that may not fit it (with jax_enable_x64): the kernel
    range-checks them as they are, so nothing wraps into range."""
    dtype = np.dtype(index.dtype)
    wide = dtype.itemsize > 4 or (dtype.kind == "u" and dtype.itemsize == 4)
    return jnp.int64 if wide and jax.config.jax_enable_x64 else jnp.int32


def _check_index_range(name, index, blocks):
    if isinstance(index, jax.core.Tracer) or np.size(index) == 0:
        return  # checked by the kernel at run time
    values = np.asarray(index)
    low, high = values.min(), values.max()
    if low < 0 or high >= blocks:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds {bad}, outside [0, {blocks})")


@functools.lru_cache(maxsize=None)
def _indexed_call_for(alpha, beta, act, has_c, has_bias, lead_rank, out_dtype, pool_leads=(False, False)):
    """The raw FFI call for one set of static attributes, taking (a_blocks, b_blocks,
    a_index, b_index[, c][, bias]). A pool is (P, r, s), shared by every problem, or under
    vmap (lead..., P, r, s) with the problems' leading dims (size 1 where broadcast): then
    each problem reads, and is range-checked against, its own pool. Under sharding the
    problems (indices, c, out) split along their first leading dim, shared pools are
    replicated."""

    def results(a_blocks, b_blocks, a_index, *_):
        return jax.ShapeDtypeStruct(a_index.shape[:-1] + (a_blocks.shape[-2], b_blocks.shape[-1]), out_dtype)

    def operands(a_blocks, b_blocks, a_index, b_index, *rest):
        c = rest[0] if has_c else _none()
        bias = _with_lead_rank(rest[-1], a_index.ndim - 1, 1) if has_bias else _none()
        return a_blocks, b_blocks, a_index, b_index, c, bias

    def rule(axis_size, in_batched, a_blocks, b_blocks, a_index, b_index, *rest):
        def pool(blocks, batched, has_lead):
            # The new dim in front of the problems' leading dims (size 1 where shared).
            if batched:
                return blocks if has_lead else blocks.reshape(blocks.shape[:1] + (1,) * lead_rank + blocks.shape[1:])
            return blocks[None] if has_lead else blocks

        leads = tuple(b or had for b, had in zip(in_batched[:2], pool_leads))
        a_blocks = pool(a_blocks, in_batched[0], pool_leads[0])
        b_blocks = pool(b_blocks, in_batched[1], pool_leads[1])
        a_index, b_index = (lift(i, b, axis_size) for i, b in zip((a_index, b_index), in_batched[2:4]))
        rest, rest_b = list(rest), in_batched[4:]
        if has_c:
            rest[0] = lift(rest[0], rest_b[0], axis_size)
        if has_bias and rest_b[-1] and rest[-1].ndim == 2:  # (B, n): broadcast over the old problems
            rest[-1] = rest[-1].reshape(rest[-1].shape[:1] + (1,) * lead_rank + rest[-1].shape[1:])
        call = _indexed_call_for(alpha, beta, act, has_c, has_bias, lead_rank + 1, out_dtype, leads)
        return call(a_blocks, b_blocks, a_index, b_index, *rest), True

    split = lead_rank > 0
    batched = (split and pool_leads[0], split and pool_leads[1], split, split)
    batched += ((split,) if has_c else ()) + ((False,) if has_bias else ())
    return kernel_call("jax_brgemm_brgemm_indexed", results, batched=batched, outputs=("batch",),
                       vmap=rule, operands=operands, **_attrs(alpha, beta if has_c else 0.0, act))


def _indexed_call(a_blocks, b_blocks, a_index, b_index, c, bias, alpha, beta, act, out_dtype):
    c = None if c is None else c.astype(out_dtype)
    call = _indexed_call_for(alpha, beta, act, c is not None, bias is not None, a_index.ndim - 1,
                             out_dtype)
    return call(a_blocks, b_blocks, a_index, b_index, *(x for x in (c, bias) if x is not None))


def _indexed_fwd(a_blocks, b_blocks, a_index, b_index, c, bias, alpha, beta, act, out_dtype):
    out, z = _activations.forward_with_residuals(
        lambda act, dtype: _indexed(a_blocks, b_blocks, a_index, b_index, c, bias, alpha, beta, act,
                                    np.dtype(dtype)), act, out_dtype)
    return out, (a_blocks, b_blocks, a_index, b_index, c, bias, out, z)


def _indexed_bwd(alpha, beta, act, out_dtype, res, g):
    a_blocks, b_blocks, a_index, b_index, c, bias, out, z = res
    gz, gz_in = _activations.activation_grad(act, g, out, z, a_blocks.dtype)
    m, n = gz.shape[-2:]
    problems = gz_in.reshape(-1, m, n)  # the output gradients as a block pool
    # Problem p's index, once per batch element, for count-1 products per element.
    own = jnp.broadcast_to(
        jnp.arange(problems.shape[0], dtype=jnp.int32).reshape(a_index.shape[:-1] + (1,)),
        a_index.shape)[..., None]
    # Per element i: alpha * gz_p @ B_{b_index}^T, scattered (added) into dA[a_index].
    f32 = jnp.float32
    da_parts = brgemm_indexed(problems, jnp.swapaxes(b_blocks, 1, 2), own, b_index[..., None],
                              alpha=alpha, out_dtype=f32)
    db_parts = brgemm_indexed(jnp.swapaxes(a_blocks, 1, 2), problems, a_index[..., None], own,
                              alpha=alpha, out_dtype=f32)
    da = jnp.zeros(a_blocks.shape, f32).at[a_index.reshape(-1)].add(
        da_parts.reshape((-1,) + a_blocks.shape[1:])).astype(a_blocks.dtype)
    db = jnp.zeros(b_blocks.shape, f32).at[b_index.reshape(-1)].add(
        db_parts.reshape((-1,) + b_blocks.shape[1:])).astype(b_blocks.dtype)
    dc = None if c is None else (beta * gz).astype(c.dtype)
    dbias = None if bias is None else gz.reshape(-1, n).sum(0)
    return da, db, None, None, dc, dbias


_indexed = kernel_op(_indexed_call, _indexed_fwd, _indexed_bwd, name="jax_brgemm.brgemm_indexed",
                     nondiff_argnums=(6, 7, 8, 9), bwd_differentiable=True)
