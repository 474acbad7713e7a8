"""jax_brgemm: one batch-reduce GEMM kernel, and dense, conv and LSTM layers built on it.

    C = epilogue(beta * C + alpha * sum_i A_i @ B_i + bias)

The kernel runs inside XLA as an FFI custom call (AMX, AVX512-BF16, AVX-512, AVX2 or portable
C++, chosen from CPUID; JAX_BRGEMM_ISA=amx|avx512bf16|avx512|avx2|ref forces one), so jit, grad
and vmap work on it.
"""

from ._ext import active_isa, set_isa, supported_isas
from .ops import brgemm, brgemm_indexed
from . import nn
from ._optimize import explain, optimize

__all__ = ["brgemm", "brgemm_indexed", "nn", "optimize", "explain", "active_isa", "set_isa", "supported_isas"]
__version__ = "0.1.0"
