"""The epilogue activations in jnp, and their derivatives, for the custom_vjp rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply(name: str, z):
    if name == "none":
        return z
    if name == "relu":
        return jax.nn.relu(z)
    if name == "gelu":
        return jax.nn.gelu(z, approximate=True)
    if name == "sigmoid":
        return jax.nn.sigmoid(z)
    if name == "tanh":
        return jnp.tanh(z)
    raise ValueError(f"unknown activation {name!r}")


def needs_preactivation(name: str) -> bool:
    """gelu's derivative needs its input; the others are cheap functions of the output."""
    return name == "gelu"


def grad_from(name: str, g, out, preact=None):
    """d loss / d preactivation, given d loss / d out."""
    if name == "none":
        return g
    if name == "relu":
        return jnp.where(out > 0, g, 0.0)
    if name == "sigmoid":
        return g * out * (1.0 - out)
    if name == "tanh":
        return g * (1.0 - out * out)
    if name == "gelu":
        return jax.vjp(lambda z: jax.nn.gelu(z, approximate=True), preact)[1](g)[0]
    raise ValueError(f"unknown activation {name!r}")
