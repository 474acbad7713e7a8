"""Trace-time argument checks shared by every op: bad input becomes a ValueError or
TypeError naming the argument before anything reaches C++."""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from ._activations import ACTIVATIONS


def dtype_of(x) -> np.dtype:
    """The dtype as given (no canonicalisation: float64 stays float64 without x64)."""
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def check_float32(name: str, x) -> None:
    dtype = dtype_of(x)
    if dtype != jnp.float32:
        kind = "integer" if jnp.issubdtype(dtype, jnp.integer) else str(dtype)
        raise TypeError(f"{name} must be float32, got {kind} ({dtype})")


KERNEL_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16))


def check_kernel_dtype(name: str, x) -> np.dtype:
    """float32 or bfloat16 (the kernel's input types); returns the dtype."""
    dtype = dtype_of(x)
    if dtype not in KERNEL_DTYPES:
        kind = "integer" if jnp.issubdtype(dtype, jnp.integer) else str(dtype)
        raise TypeError(f"{name} must be float32 or bfloat16, got {kind} ({dtype})")
    return dtype


def check_same_dtype(names: str, *arrays) -> None:
    dtypes = {str(dtype_of(x)) for x in arrays}
    if len(dtypes) > 1:
        raise TypeError(f"{names} must have the same dtype, got {', '.join(sorted(dtypes))}")


def check_integer(name: str, x) -> None:
    if not jnp.issubdtype(dtype_of(x), jnp.integer):
        raise TypeError(f"{name} must hold integers, got {dtype_of(x)}")


def check_rank(name: str, x, min_rank: int, layout: str) -> None:
    if np.ndim(x) < min_rank:
        raise ValueError(f"{name} must have shape {layout} (rank >= {min_rank}), got {np.shape(x)}")


def check_activation(name: str, activation) -> str:
    """Returns the kernel's name for the activation ('none' for None)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name} must be one of {ACTIVATIONS}, got {activation!r}")
    return activation or "none"


def broadcast_lead(shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """NumPy broadcast of leading shapes, with an error naming the arguments that clash."""
    try:
        return tuple(np.broadcast_shapes(*shapes.values()))
    except ValueError:
        described = ", ".join(f"{k} {v}" for k, v in shapes.items())
        raise ValueError(f"leading dims do not broadcast: {described}") from None
