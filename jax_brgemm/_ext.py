"""The compiled extension: loads it once and registers its XLA FFI targets with JAX."""

from __future__ import annotations

import jax

from . import _jax_brgemm as ext

# JAX_BRGEMM_ISA, and the worker team's JAX_BRGEMM_SPIN_US / JAX_BRGEMM_LINGER_US (read by
# cpp/primitives/parallel.cc when the team starts): checked here, where a bad value can
# still be a clear error naming the variable. The C++ parses them, so the rule is one.
for _env_error in (ext.isa_env_error(), ext.wait_env_error()):
    if _env_error:
        raise ValueError(f"jax_brgemm: {_env_error}")

for _name, _capsule in ext.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")


def active_isa() -> str:
    """The instruction set the kernels use now (JAX_BRGEMM_ISA, set_isa, or CPUID)."""
    return ext.active_isa()


def supported_isas() -> list[str]:
    """Every instruction-set path this CPU can run."""
    return list(ext.supported_isas())


def set_isa(name: str | None) -> None:
    """Force the kernels onto one ISA path for this process (None restores the default).

    Takes effect for every later kernel call, jitted ones included, since the handler
    reads it at run time. Raises ValueError for an unknown or unsupported name.
    """
    ext.set_isa(name or "")

try:  # CUDA handlers (platform "CUDA"), where the CUDA extension was built
    from . import _cuda  # noqa: F401
except ImportError:
    pass
