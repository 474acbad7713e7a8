"""How every op is built: kernel calls, then derivative rules over them.

An op is two layers:

1. ``kernel_call`` turns one FFI target into a JAX function of arrays:

       call = kernel_call("jax_brgemm_dense_fwd", results, batched=(True, False, False),
                          outputs=("batch",), vmap=rule, activation="relu")

   - ``results(*args)``: the shape rule, the result ``jax.ShapeDtypeStruct`` (or a tuple)
     from the operands' shapes (inside a sharded lowering the operands are shards, so
     results must follow them, not fixed shapes);
   - ``batched`` / ``outputs``: the sharding rule (see ``_sharding.batch_partitioned``):
     which operands carry the batch (data parallel; the rest, weights, are replicated) and
     whether each result is split like it ("batch") or a per-shard sum ("sum");
   - ``vmap(axis_size, in_batched, *args) -> (results, out_batched)``: the batching rule,
     usually one or a few kernel calls with other static attributes (folded into a batch,
     as extra groups, as leading problems); ``problems_rule`` is the rule for handlers
     that take one leading problem dim;
   - ``operands(*args)``: the FFI operands from the call's arguments, where they differ
     (e.g. a placeholder for an absent optional one); keyword arguments are the target's
     static attributes.

   Make the factory of each call ``functools.lru_cache``d on its static attributes, so
   that a vmap rule can ask for the same call with other attributes.

2. The differentiable op, one of two kinds:

   - bilinear in (data, weights) plus bias and activation (dense, conv2d, brgemm): a
     ``jax.custom_jvp`` whose tangent runs the op's forward pass on the tangents and whose
     transpose is its backward passes (``_bilinear``: give the forward and backward
     kernel calls, get every order of derivative, forward and reverse);
   - anything else (lstm, attention, brgemm_indexed): ``kernel_op(primal, fwd, bwd,
     name=...)``, a ``jax.custom_vjp`` whose primal and forward (which also returns the
     residuals) and backward (one cotangent per differentiable input) are made of kernel
     calls. Reverse mode only: forward mode raises a NotImplementedError naming the op,
     and so does differentiating the backward again unless it is itself made of
     differentiable ops.

A new op (attention, batch norm): one ``kernel_call`` factory per FFI target, a forward
and a backward made of them, ``_bilinear`` maps or ``kernel_op``, and the public function
that checks its arguments and calls it.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from ._sharding import batch_partitioned


def kernel_call(target: str, results: Callable, *, batched: Sequence, outputs: Sequence[str],
                vmap: Callable, operands: Callable | None = None, **attrs) -> Callable:
    """The FFI target `target` as a function of arrays, shardable along the batch and with
    the batching rule `vmap` (see the module docstring for the arguments)."""

    def impl(*args):
        ffi_args = args if operands is None else operands(*args)
        return jax.ffi.ffi_call(target, results(*args))(*ffi_args, **attrs)

    sharded = batch_partitioned(impl, batched, outputs)

    @jax.custom_batching.custom_vmap
    def call(*args):
        return sharded(*args)

    call.def_vmap(vmap)
    return call


def kernel_op(primal: Callable, fwd: Callable, bwd: Callable, *, name: str,
              nondiff_argnums: Sequence[int] = (), symbolic_zeros: bool = False,
              bwd_differentiable: bool = False) -> Callable:
    """A custom_vjp op: ``primal(*args)`` the forward kernel calls when not differentiated,
    ``fwd(*args) -> (out, residuals)`` when differentiated, ``bwd(*static, residuals,
    cotangent)`` the backward ones, one cotangent per differentiable input (`static`: the
    arguments at `nondiff_argnums`). With `symbolic_zeros`, fwd gets jax's CustomVJPPrimal
    wrappers (``.value``, ``.perturbed``), so the backward can skip gradients nobody asked
    for. Differentiating the backward raises a NotImplementedError naming `name`, unless
    `bwd_differentiable` (a backward made of differentiable ops, e.g. the op itself).
    Forward mode raises a NotImplementedError naming `name` (see reverse_mode_only)."""
    op = jax.custom_vjp(primal, nondiff_argnums=tuple(nondiff_argnums))
    op.defvjp(fwd, bwd if bwd_differentiable else first_order_only(name)(bwd),
              symbolic_zeros=symbolic_zeros)
    return reverse_mode_only(name, op)


def reverse_mode_only(name: str, op: Callable) -> Callable:
    """`op` (a custom_vjp function) with JAX's "can't apply forward-mode autodiff" error
    replaced by one naming `name` and saying what works instead."""

    @functools.wraps(op)
    def call(*args):
        try:
            return op(*args)
        except TypeError as e:
            if "forward-mode" not in str(e):
                raise
            raise NotImplementedError(
                f"{name}: forward-mode autodiff (jax.jvp, jax.linearize, jax.jacfwd, "
                "jax.hessian) is not supported; reverse mode (jax.grad, jax.vjp, "
                "jax.jacrev) is.") from None

    return call


# ------------------------------------------------------------------ second-order guard


def without_derivative(op: str, fn: Callable) -> Callable:
    """`fn` (a function of arrays) made to raise a NotImplementedError naming `op` when it
    is differentiated, instead of JAX's error about an internal primitive."""

    def refuse(_, __):
        raise NotImplementedError(
            f"{op}: second-order derivatives (differentiating its gradient) are not "
            "supported; jax.grad / jax.vjp of the op itself are.")

    guarded = jax.custom_vjp(fn)
    guarded.defvjp(lambda *args: (fn(*args), None), refuse)
    return guarded


def first_order_only(op: str):
    """Decorates a custom_vjp backward rule ``bwd(*static, residuals, cotangent)`` made of
    FFI calls: differentiating the gradient again raises (see without_derivative)."""

    def decorate(bwd):
        @functools.wraps(bwd)
        def rule(*args):
            *static, res, g = args
            return without_derivative(op, lambda res, g: bwd(*static, res, g))(res, g)

        return rule

    return decorate


# ------------------------------------------------------------------ pieces of vmap rules


def lift(x, batched: bool, size: int):
    """x with the vmapped axis in front: broadcast where x is not batched."""
    return x if batched else jnp.broadcast_to(x, (size,) + x.shape)


def fold(x):
    """(B, N, ...) -> (B*N, ...): the vmapped axis into the batch."""
    return x.reshape((-1,) + x.shape[2:])


def unfold(y, size: int):
    """(B*N, ...) -> (B, N, ...)."""
    return y.reshape((size, -1) + y.shape[1:])


def to_channels(x):
    """(B, ..., C) -> (..., B*C): the vmapped axis as B groups of the last dim."""
    x = jnp.moveaxis(x, 0, -2)
    return x.reshape(x.shape[:-2] + (-1,))


def from_channels(y, size: int):
    """(..., B*C) -> (B, ..., C)."""
    return jnp.moveaxis(y.reshape(y.shape[:-1] + (size, -1)), -2, 0)


def problems_rule(lead_call: Callable[[], Callable], data: Sequence[bool], lead: bool) -> Callable:
    """The vmap rule of a handler that takes one leading "problem" dim on every operand:
    the data operands (`data`) have every problem, the others (weights) one problem
    (shared) or every problem, and every non-empty result has every problem.

    `lead_call()` is the kernel call whose operands carry that dim; `lead` says whether
    the call being batched already does. The new axis and the existing problems become one
    problem dim (so nested vmaps stay one dim): the data are broadcast to every problem,
    a weight batched anywhere too. Empty operands (absent optional ones) pass unchanged,
    empty results (not asked for) stay empty."""

    def rule(axis_size, in_batched, *args):
        problems = args[0].shape[int(in_batched[0])] if lead else 1
        total = axis_size * problems
        old = (problems,) if lead else ()

        def operand(x, was_batched, is_data):
            if x.size == 0:
                return x[0] if was_batched else x
            x = x if was_batched else x[None]
            block = x.shape[1 + len(old):]
            if not is_data and not was_batched and (not lead or x.shape[1] == 1):
                return x.reshape((1,) + block)  # a shared weight
            return jnp.broadcast_to(x, (axis_size,) + old + block).reshape((total,) + block)

        outs = lead_call()(*(operand(*t) for t in zip(args, in_batched, data)))
        single = not isinstance(outs, (tuple, list))
        outs = (outs,) if single else tuple(outs)
        outs = tuple(jnp.zeros((axis_size,) + o.shape, o.dtype) if o.size == 0
                     else o.reshape((axis_size,) + old + o.shape[1:]) for o in outs)
        return (outs[0], True) if single else (outs, (True,) * len(outs))

    return rule
