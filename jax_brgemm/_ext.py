"""The compiled extension: loads it once and registers its XLA FFI targets with JAX."""

from __future__ import annotations

import os

import jax

from . import _jax_brgemm as ext

_env_error = ext.isa_env_error()
if _env_error:
    raise ValueError(f"jax_brgemm: {_env_error}")
# Read by the worker team (cpp/primitives/parallel.cc) when it starts: checked here, where
# a bad value can still be a clear error.
for _var, _what in (("JAX_BRGEMM_SPIN_US", "how long an idle worker polls before it parks"),
                    ("JAX_BRGEMM_LINGER_US", "how long after each call workers keep polling")):
    _value = os.environ.get(_var)
    if _value is not None and not _value.strip().isdigit():
        raise ValueError(f"jax_brgemm: {_var}={_value!r} must be a whole number of "
                         f"microseconds >= 0 ({_what})")

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
