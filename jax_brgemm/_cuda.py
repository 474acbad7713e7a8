"""The CUDA extension, when it was built: registers its XLA FFI handlers for platform CUDA.

The handlers carry the same target names as the CPU ones (``jax_brgemm_brgemm``,
``jax_brgemm_brgemm_indexed``, ``jax_brgemm_dense_fwd`` / ``_bwd``, ``jax_brgemm_conv2d_forward``
/ ``_backward_data`` / ``_weight_update``), so ``jax.ffi.ffi_call`` runs them whenever the op's
inputs live on a GPU; nothing in the ops changes. Without the extension (no nvcc at build time)
or without a GPU this module does nothing else: ``built`` and ``gpu_available()`` say so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

try:
    from . import _jax_brgemm_cuda as ext
except ImportError as error:  # built without CUDA
    ext = None
    load_error: str | None = str(error)
else:
    load_error = None
    for _name, _capsule in ext.registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")

built: bool = ext is not None


def gpu_available() -> bool:
    """True when the extension was built and JAX has a CUDA GPU to run it on."""
    if ext is None:
        return False
    try:
        return len(jax.devices("cuda")) > 0
    except RuntimeError:  # no CUDA backend in this JAX installation
        return False


def raw_brgemm(a, b, c=None, bias=None, *, alpha=1.0, beta=0.0, activation="none"):
    """The ``jax_brgemm_brgemm`` FFI target called directly, without the op's checks or
    gradient: a ``(..., count, m, k)`` and b ``(..., count, k, n)`` both float32, bfloat16 or
    float16 (the CUDA handlers accept all three; the op takes float32 and bfloat16), c
    ``(..., m, n)`` and bias ``(n,)`` float32. Returns ``(..., m, n)`` float32. For GPU tests
    and benchmarks of the 16-bit kernels.
    """
    lead = jnp.broadcast_shapes(a.shape[:-3], b.shape[:-3], *(() if c is None else (c.shape[:-2],)))
    out = jax.ShapeDtypeStruct(lead + (a.shape[-2], b.shape[-1]), jnp.float32)
    none = jnp.zeros((0,), jnp.float32)
    return jax.ffi.ffi_call("jax_brgemm_brgemm", out)(
        a, b, none if c is None else c, none if bias is None else bias,
        alpha=np.float32(alpha), beta=np.float32(0.0 if c is None else beta), activation=activation)


def raw_brgemm_indexed(a_blocks, b_blocks, a_index, b_index, c=None, bias=None, *, alpha=1.0,
                       beta=0.0, activation="none"):
    """The ``jax_brgemm_brgemm_indexed`` FFI target called directly (see :func:`raw_brgemm`):
    a_index and b_index int32 ``(..., count)`` of the same shape, c ``(..., m, n)`` with the
    same leading dims when given."""
    out = jax.ShapeDtypeStruct(a_index.shape[:-1] + (a_blocks.shape[1], b_blocks.shape[2]), jnp.float32)
    none = jnp.zeros((0,), jnp.float32)
    return jax.ffi.ffi_call("jax_brgemm_brgemm_indexed", out)(
        a_blocks, b_blocks, a_index, b_index, none if c is None else c, none if bias is None else bias,
        alpha=np.float32(alpha), beta=np.float32(0.0 if c is None else beta), activation=activation)


def raw_dense(x, kernel, bias=None, *, activation="none", out_dtype=jnp.float32):
    """The ``jax_brgemm_dense_fwd`` FFI target called directly, without the op's checks or
    gradient: x ``(n, c)`` and kernel ``(c, k)`` both float32 or both bfloat16 (the CUDA
    handler takes either), bias ``(k,)`` float32. Returns ``activation(x @ kernel + bias)``,
    ``(n, k)`` in ``out_dtype`` (float32 or bfloat16). For GPU tests and benchmarks."""
    outs = (jax.ShapeDtypeStruct((x.shape[0], kernel.shape[1]), out_dtype),
            jax.ShapeDtypeStruct((0,), jnp.float32))
    none = jnp.zeros((0,), jnp.float32)
    return jax.ffi.ffi_call("jax_brgemm_dense_fwd", outs)(
        x, kernel, none if bias is None else bias, activation=activation)[0]
