"""What the custom_vjp rules of the nn ops share."""

from __future__ import annotations

import functools

import jax


def first_order_only(op: str):
    """Decorates a custom_vjp backward rule ``bwd(*static, residuals, cotangent)`` made of
    FFI calls that have no derivative of their own: differentiating the gradient again
    (``jax.grad`` of ``jax.grad``) then raises a NotImplementedError naming `op`, instead
    of JAX's error about an internal primitive."""

    def decorate(bwd):
        @functools.wraps(bwd)
        def rule(*args):
            *static, res, g = args

            @jax.custom_vjp
            def gradient(res, g):
                return bwd(*static, res, g)

            def second_order(_, __):
                raise NotImplementedError(
                    f"{op}: second-order derivatives (differentiating its gradient) are not "
                    "supported; jax.grad / jax.vjp of the op itself are.")

            gradient.defvjp(lambda res, g: (gradient(res, g), None), second_order)
            return gradient(res, g)

        return rule

    return decorate
