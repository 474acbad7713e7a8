"""What the custom_vjp rules of the nn ops share: a clear error for second-order
derivatives, which their FFI calls do not have."""

from __future__ import annotations

import functools

import jax


def without_derivative(op: str, fn):
    """`fn` (a function of arrays) made to raise a NotImplementedError naming `op` when it is
    differentiated, instead of JAX's error about an internal primitive."""

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
