"""The activations every op fuses into its kernel's epilogue, defined once: their names
(the kernel's, cpp/brgemm/brgemm.h), their jnp forms, and the one derivative policy.

Derivative policy, for every op: the kernel computes values, JAX applies the activation's
derivative. relu, sigmoid and tanh take it from the output (the forward keeps its fused
epilogue); gelu needs its input, so a differentiated forward runs the kernel without the
activation to a float32 pre-activation and applies gelu in JAX, and the backward kernels
run on ``d loss / d pre-activation``. Measured against dense's former policy (pre-activation
saved by the forward kernel, derivative applied inside its backward kernel), on a 2-core
Xeon (Sapphire Rapids), fwd+bwd, interleaved medians: gelu 256x1024x1024 36 vs 57 ms,
2048x512x512 61 vs 121 ms, 64x256x256 0.42 vs 0.70 ms; tanh level (24.3 vs 24.6,
48.2 vs 49.3, 0.31 vs 0.33 ms).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The public names (None: no activation); the kernel calls None "none".
ACTIVATIONS = (None, "relu", "gelu", "sigmoid", "tanh")


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


def needs_output(name: str) -> bool:
    """Whether the derivative is taken from the output (relu, sigmoid, tanh)."""
    return name in ("relu", "sigmoid", "tanh")


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


def forward_with_residuals(call, act, out_dtype):
    """``call(act, out_dtype)`` (the forward kernel call) and what the derivative needs
    besides the output: for gelu the float32 pre-activation (the kernel runs without it and
    gelu is applied here), else None."""
    if needs_preactivation(act):
        z = call("none", jnp.float32)
        return apply(act, z).astype(out_dtype), z
    return call(act, out_dtype), None


def activation_grad(act, g, out, z, dtype):
    """d loss / d pre-activation from d loss / d out: in float32, and rounded to `dtype`
    (the backward kernels' input dtype). `out` may be None where not needs_output(act)."""
    gz = grad_from(act, g.astype(jnp.float32), None if out is None else out.astype(jnp.float32), z)
    return gz, gz.astype(dtype)
