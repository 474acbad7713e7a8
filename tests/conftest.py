"""Shared test fixtures: every test that takes `isa` runs once per ISA path this CPU has."""

import os
import zlib

import numpy as np
import pytest

import jax_brgemm


@pytest.fixture(params=jax_brgemm.supported_isas())
def isa(request):
    jax_brgemm.set_isa(request.param)
    yield request.param
    jax_brgemm.set_isa(None)


@pytest.fixture
def rng(request):
    # Fresh random inputs per test, reproducible from the test's name (and JAX_BRGEMM_SEED).
    seed = zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("JAX_BRGEMM_SEED", "0"))
    return np.random.default_rng(seed)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
