"""Shared test fixtures: every test that takes `isa` runs once per float32 kernel path this
CPU has (avx512bf16 runs float32 on the AVX-512 kernels, so it is left out there), and every
test that takes `isa_bf16` once per bfloat16 path (all of them)."""

import os
import zlib

import numpy as np
import pytest

import jax_brgemm


def _forced(name):
    jax_brgemm.set_isa(name)
    yield name
    jax_brgemm.set_isa(None)


@pytest.fixture(params=[i for i in jax_brgemm.supported_isas() if i not in ("avx512bf16", "amx")])
def isa(request):
    yield from _forced(request.param)


@pytest.fixture(params=jax_brgemm.supported_isas())
def isa_bf16(request):
    yield from _forced(request.param)


@pytest.fixture
def amx():
    """The AMX path forced for the test (skipped where this CPU has none)."""
    if "amx" not in jax_brgemm.supported_isas():
        pytest.skip("this CPU has no AMX")
    yield from _forced("amx")


@pytest.fixture
def streaming():
    """Results of 1 MB and more written with non-temporal stores (Desc::stream_c) for the
    test: by default convolution results only over a quarter of the L3 cache are, which on
    a CPU with a large L3 is none that a test makes."""
    from jax_brgemm._ext import ext
    ext.testing.set_stream_bytes(1 << 20)
    yield
    ext.testing.set_stream_bytes(0)


@pytest.fixture
def rng(request):
    # Fresh random inputs per test, reproducible from the test's name (and JAX_BRGEMM_SEED).
    seed = zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("JAX_BRGEMM_SEED", "0"))
    return np.random.default_rng(seed)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
