"""The kernel (all three batch forms, through the C++ layer) and the brgemm ops."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_brgemm as jb
from jax_brgemm._ext import ext
from conftest import rel_err

ACTIVATIONS = {
    "none": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3))),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
}
F32 = np.float32


def call_kernel(form, a_pool, b_pool, c, m, n, k, lda, ldb, ldc, offs_a, offs_b, *, alpha=1.0,
                beta=0.0, activation="none", bias=None, isa="", b_vnni=False):
    count = len(offs_a)
    stride_a = offs_a[1] if count > 1 else 0
    stride_b = offs_b[1] if count > 1 else 0
    ext.testing.kernel_call(form, a_pool, b_pool, c, m, n, k, lda, ldb, ldc, count, stride_a, stride_b,
                    np.asarray(offs_a, np.int64), np.asarray(offs_b, np.int64), alpha, beta,
                    activation, bias, isa, b_vnni)


def kernel_reference(a_pool, b_pool, c, m, n, k, lda, ldb, ldc, offs_a, offs_b, alpha, beta,
                     activation, bias):
    acc = np.zeros((m, n))
    for oa, ob in zip(offs_a, offs_b):
        sa, sb = a_pool.itemsize, b_pool.itemsize
        a = np.lib.stride_tricks.as_strided(a_pool[oa:], (m, k), (lda * sa, sa)).astype(np.float64)
        b = np.lib.stride_tricks.as_strided(b_pool[ob:], (k, n), (ldb * sb, sb)).astype(np.float64)
        acc += a @ b
    out = alpha * acc
    if beta != 0.0 and c is not None:
        out += beta * c[:, :n].astype(np.float64)
    if bias is not None:
        out += bias
    return ACTIVATIONS[activation](out)


SHAPES = [(1, 1, 1, 1), (7, 16, 17, 3), (16, 17, 33, 5), (33, 64, 1, 2), (100, 7, 16, 1),
          (17, 100, 64, 64), (64, 33, 100, 4), (28, 64, 64, 9)]


@pytest.mark.parametrize("form", ["stride", "offset", "address"])
@pytest.mark.parametrize("m,n,k,count", SHAPES)
def test_kernel_forms_all_isas(form, m, n, k, count, isa, rng):
    # Leading dimensions larger than the block: sub-blocks of bigger arrays, no copies.
    lda, ldb, ldc = k + 3, n + 5, n + 2
    a_block, b_block = m * lda, k * ldb
    # Offsets in a shuffled order (and a repeat) so the forms differ from plain striding.
    order = rng.permutation(count) if form != "stride" else np.arange(count)
    offs_a = [int(i) * a_block for i in order]
    offs_b = [int(i) * b_block for i in order]
    a_pool = rng.standard_normal(count * a_block).astype(F32)
    b_pool = rng.standard_normal(count * b_block).astype(F32)
    c = rng.standard_normal((m, ldc)).astype(F32)
    ref = kernel_reference(a_pool, b_pool, c, m, n, k, lda, ldb, ldc, offs_a, offs_b, 0.5, 1.0,
                           "none", None)
    call_kernel(form, a_pool, b_pool, c, m, n, k, lda, ldb, ldc, offs_a, offs_b, alpha=0.5, beta=1.0)
    assert rel_err(c[:, :n], ref) < 1e-5
    assert np.isfinite(c).all()


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_kernel_epilogue_beta_zero_ignores_nan_c(activation, isa, rng):
    m, n, k, count = 19, 37, 23, 6
    a_pool = rng.standard_normal(count * m * k).astype(F32)
    b_pool = rng.standard_normal(count * k * n).astype(F32)
    bias = rng.standard_normal(n).astype(F32)
    c = np.full((m, n + 3), np.nan, F32)  # beta 0 must never read C
    offs_a = [i * m * k for i in range(count)]
    offs_b = [i * k * n for i in range(count)]
    call_kernel("stride", a_pool, b_pool, c, m, n, k, k, n, n + 3, offs_a, offs_b,
                activation=activation, bias=bias)
    ref = kernel_reference(a_pool, b_pool, c, m, n, k, k, n, n + 3, offs_a, offs_b, 1.0, 0.0,
                           activation, bias)
    assert rel_err(c[:, :n], ref) < 1e-5
    assert np.isnan(c[:, n:]).all()  # beyond n, C is untouched


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_kernel_accumulate_bias_relu_epilogue(activation, isa, rng):
    # beta 1 with a bias and relu: finished from the accumulators in one pass (the float32
    # tile kernel's inline epilogue), partial last vector included.
    m, n, k, count = 13, 37, 17, 3
    a_pool = rng.standard_normal(count * m * k).astype(F32)
    b_pool = rng.standard_normal(count * k * n).astype(F32)
    bias = rng.standard_normal(n).astype(F32)
    c = rng.standard_normal((m, n + 3)).astype(F32)
    before = c.copy()
    offs_a = [i * m * k for i in range(count)]
    offs_b = [i * k * n for i in range(count)]
    ref = kernel_reference(a_pool, b_pool, c, m, n, k, k, n, n + 3, offs_a, offs_b, 1.0, 1.0,
                           activation, bias)
    call_kernel("stride", a_pool, b_pool, c, m, n, k, k, n, n + 3, offs_a, offs_b, beta=1.0,
                activation=activation, bias=bias)
    assert rel_err(c[:, :n], ref) < 1e-5
    if activation == "relu":
        assert (c[:, :n] >= 0).all() and (c[:, :n] == 0).any()
    np.testing.assert_array_equal(c[:, n:], before[:, n:])  # beyond n, C is untouched


def test_kernel_general_beta_and_activation_extremes(isa):
    # Saturating inputs: the vector exp must give exact 0 / 1 / inf limits, NaN propagates.
    z = np.array([-1e4, -100.0, -20.0, -1e-6, 0.0, 1e-6, 20.0, 100.0, 1e4, np.nan, np.inf, -np.inf], F32)
    n = z.size
    a_pool = np.ones(1, F32)
    for activation in ["sigmoid", "tanh", "relu"]:
        b_pool = z.copy()
        c = np.zeros((1, n), F32)
        call_kernel("stride", a_pool, b_pool, c, 1, n, 1, 1, n, n, [0], [0], activation=activation)
        with np.errstate(over="ignore", invalid="ignore"):
            ref = ACTIVATIONS[activation](z.astype(np.float64))
        np.testing.assert_allclose(c[0], ref, rtol=2e-6, atol=1e-30)
    b_pool = np.arange(1, 5, dtype=F32)
    c = np.full((1, 4), 3.0, F32)
    call_kernel("stride", a_pool, b_pool, c, 1, 4, 1, 1, 4, 4, [0], [0], alpha=2.0, beta=-0.5)
    np.testing.assert_allclose(c[0], 2.0 * np.arange(1, 5) - 1.5)


def test_kernel_rejects_bad_descriptors():
    a = np.ones(16, F32)
    with pytest.raises(ValueError, match="lda"):
        call_kernel("stride", a, a, np.zeros((2, 2), F32), 2, 2, 2, 0, 2, 2, [0], [0])
    with pytest.raises(ValueError, match="m must be >= 1"):
        call_kernel("stride", a, a, np.zeros((2, 2), F32), 0, 2, 2, 2, 2, 2, [0], [0])
    with pytest.raises(ValueError, match="a_pool"):
        call_kernel("offset", a, a, np.zeros((2, 2), F32), 2, 2, 2, 2, 2, 2, [15], [0])
    with pytest.raises(ValueError, match="isa"):
        jb.set_isa("neon")


# ------------------------------------------------------------------ the JAX ops


def brgemm_reference(a, b, c=None, alpha=1.0, beta=0.0, epilogue=None, bias=None):
    out = alpha * np.einsum("...imk,...ikn->...mn", np.asarray(a, np.float64), np.asarray(b, np.float64))
    if c is not None:
        out = out + beta * np.asarray(c, np.float64)
    if bias is not None:
        out = out + bias
    return ACTIVATIONS[epilogue or "none"](out)


@pytest.mark.parametrize("m,n,k,count", [(1, 1, 1, 1), (7, 17, 33, 3), (64, 64, 64, 16),
                                         (100, 33, 16, 64), (16, 100, 7, 2)])
def test_brgemm_op_matches_reference(m, n, k, count, rng):
    a = rng.standard_normal((2, count, m, k)).astype(F32)
    b = rng.standard_normal((count, k, n)).astype(F32)  # broadcast over the problems
    c = rng.standard_normal((2, m, n)).astype(F32)
    bias = rng.standard_normal(n).astype(F32)
    out = jax.jit(lambda a, b, c, bias: jb.brgemm(a, b, c, alpha=0.7, beta=1.5, bias=bias))(a, b, c, bias)
    assert out.shape == (2, m, n) and out.dtype == jnp.float32
    assert rel_err(out, brgemm_reference(a, b, c, 0.7, 1.5, None, bias)) < 1e-5


@pytest.mark.parametrize("epilogue", [None, "relu", "gelu", "sigmoid", "tanh"])
def test_brgemm_op_epilogues_all_isas(epilogue, isa, rng):
    a = rng.standard_normal((3, 5, 9, 20)).astype(F32)
    b = rng.standard_normal((3, 5, 20, 40)).astype(F32) * 0.3
    bias = rng.standard_normal(40).astype(F32)
    out = jb.brgemm(a, b, epilogue=epilogue, bias=bias)
    assert rel_err(out, brgemm_reference(a, b, epilogue=epilogue, bias=bias)) < 1e-5


def test_brgemm_broadcasts_leading_dims(rng):
    a = rng.standard_normal((4, 1, 2, 3, 5)).astype(F32)
    b = rng.standard_normal((3, 2, 5, 6)).astype(F32)
    c = rng.standard_normal((1, 3, 6)).astype(F32)
    out = jb.brgemm(a, b, c, beta=1.0)
    assert out.shape == (4, 3, 3, 6)
    assert rel_err(out, brgemm_reference(a, b, c, beta=1.0)) < 1e-5


def test_brgemm_zero_size_dims_have_defined_results(rng):
    a = rng.standard_normal((0, 2, 3, 4)).astype(F32)
    b = rng.standard_normal((2, 4, 5)).astype(F32)
    assert jb.brgemm(a, b).shape == (0, 3, 5)
    # An empty reduction (count 0 or k 0) leaves beta * c + bias.
    c = rng.standard_normal((3, 5)).astype(F32)
    bias = rng.standard_normal(5).astype(F32)
    out = jb.brgemm(np.zeros((0, 3, 4), F32), np.zeros((0, 4, 5), F32), c, beta=2.0, bias=bias)
    np.testing.assert_allclose(out, 2.0 * c + bias, rtol=1e-6)
    out = jb.brgemm(np.zeros((2, 3, 0), F32), np.zeros((2, 0, 5), F32), epilogue="sigmoid")
    np.testing.assert_allclose(out, np.full((3, 5), 0.5), rtol=1e-6)


@pytest.mark.parametrize("epilogue", [None, "relu", "gelu", "sigmoid", "tanh"])
def test_brgemm_gradients(epilogue, rng):
    a = rng.standard_normal((2, 3, 5, 7)).astype(F32)
    b = rng.standard_normal((3, 7, 6)).astype(F32) * 0.5
    c = rng.standard_normal((1, 5, 6)).astype(F32)
    bias = rng.standard_normal(6).astype(F32)
    f = lambda a, b, c, bias: jb.brgemm(a, b, c, alpha=0.8, beta=1.3, epilogue=epilogue, bias=bias)
    # Finite differences in float32 need gentle curvature: small inputs, and no relu kink
    # (relu is checked against jax.grad below like every epilogue).
    if epilogue != "relu":
        small = tuple(0.3 * x for x in (a, b, c, bias))
        check_grads(f, small, order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)

    def ref(a, b, c, bias):
        z = 0.8 * jnp.einsum("...imk,...ikn->...mn", a, b) + 1.3 * c + bias
        return {None: lambda z: z, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh,
                "gelu": lambda z: jax.nn.gelu(z, approximate=True)}[epilogue](z)

    w = rng.standard_normal((2, 5, 6)).astype(F32)
    loss = lambda fn: lambda *args: jnp.sum(w * fn(*args) ** 2)
    got = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2, 3)))(a, b, c, bias)
    want = jax.grad(loss(ref), argnums=(0, 1, 2, 3))(a, b, c, bias)
    for g, r in zip(got, want):
        assert g.shape == r.shape
        assert rel_err(g, r) < 1e-5


def test_brgemm_second_order_gradient(rng):
    a = rng.standard_normal((2, 4, 3)).astype(F32)
    b = rng.standard_normal((2, 3, 5)).astype(F32)
    check_grads(lambda a, b: jb.brgemm(a, b, epilogue="tanh"), (a, b), order=2, modes=["rev"],
                atol=5e-2, rtol=5e-2, eps=1e-2)


def test_brgemm_vmap_is_batched_not_looped(rng):
    a = rng.standard_normal((6, 3, 8, 5)).astype(F32)
    b = rng.standard_normal((3, 5, 4)).astype(F32)
    c = rng.standard_normal((6, 8, 4)).astype(F32)
    bias = rng.standard_normal((6, 4)).astype(F32)
    f = lambda a, c, bias: jb.brgemm(a, b, c, beta=1.0, bias=bias, epilogue="relu")
    out = jax.vmap(f)(a, c, bias)
    ref = np.stack([brgemm_reference(a[i], b, c[i], beta=1.0, bias=bias[i], epilogue="relu") for i in range(6)])
    assert rel_err(out, ref) < 1e-5
    # One custom call for the whole batch, not a loop of six.
    hlo = jax.jit(jax.vmap(f)).lower(a, c, bias).as_text()
    assert hlo.count("jax_brgemm_brgemm") == 1 and "while" not in hlo
    # vmap over an axis that is not the first, with unbatched c, nested under grad.
    out = jax.vmap(lambda a: jb.brgemm(a, b, c[0], beta=2.0), in_axes=1, out_axes=2)(
        np.moveaxis(a, 0, 1))
    assert rel_err(np.moveaxis(out, 2, 0), brgemm_reference(a, b, c[0], beta=2.0)) < 1e-5
    grads = jax.vmap(jax.grad(lambda a: jnp.sum(jb.brgemm(a, b) ** 2)))(a)
    ref = jax.vmap(jax.grad(lambda a: jnp.sum(jnp.einsum("imk,ikn->mn", a, b) ** 2)))(a)
    assert rel_err(grads, ref) < 1e-5


def test_concurrent_python_threads(rng):
    f = jax.jit(lambda a, b: jb.brgemm(a, b, epilogue="tanh"))
    inputs = [(rng.standard_normal((4, 3, 33, 17)).astype(F32),
               rng.standard_normal((4, 3, 17, 65)).astype(F32)) for _ in range(8)]
    expected = [brgemm_reference(a, b, epilogue="tanh") for a, b in inputs]
    errors = []

    def worker(i):
        for _ in range(10):
            a, b = inputs[i]
            if rel_err(f(a, b), expected[i]) > 1e-5:
                errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ------------------------------------------------------------------ bfloat16

BF16 = jnp.bfloat16
BF16_ROUNDING = 2.0**-8  # relative rounding of one bfloat16 value


def bf16_pools(rng, form, m, n, k, count, lda, ldb):
    """Random bfloat16 pools of `count` A (m x k, lda) and B (k x n, ldb) blocks and their
    offsets, in a shuffled order except for the stride form."""
    a_pool = rng.standard_normal(count * m * lda).astype(BF16)
    b_pool = rng.standard_normal(count * k * ldb).astype(BF16)
    order = rng.permutation(count) if form != "stride" else np.arange(count)
    return a_pool, b_pool, [int(i) * m * lda for i in order], [int(i) * k * ldb for i in order]


@pytest.mark.parametrize("form", ["stride", "offset", "address"])
@pytest.mark.parametrize("m,n,k,count", [(1, 1, 1, 1), (7, 17, 5, 3), (16, 64, 64, 4), (13, 33, 1, 2),
                                         (16, 16, 15, 3), (9, 5, 7, 2),
                                         (28, 64, 63, 9), (33, 100, 17, 5)])
def test_kernel_bf16_all_forms_all_isas(form, m, n, k, count, isa_bf16, rng):
    # Odd k exercises the unpaired last row of the bfloat16 pair layout.
    lda, ldb, ldc = k + 1, n + 3, n + 2
    a_pool, b_pool, offs_a, offs_b = bf16_pools(rng, form, m, n, k, count, lda, ldb)
    bias = rng.standard_normal(n).astype(F32)
    # The reference multiplies the same bfloat16-rounded values in float64.
    ref = kernel_reference(a_pool.astype(np.float64), b_pool.astype(np.float64), None, m, n, k,
                           lda, ldb, ldc, offs_a, offs_b, 1.0, 0.0, "tanh", bias)
    errors = {}
    for out_dtype in (F32, BF16):
        c = np.full((m, ldc), np.nan, out_dtype)
        call_kernel(form, a_pool.view(np.uint16), b_pool.view(np.uint16),
                    c.view(np.uint16) if out_dtype == BF16 else c, m, n, k, lda, ldb, ldc,
                    offs_a, offs_b, activation="tanh", bias=bias)
        errors[out_dtype] = rel_err(c[:, :n].astype(np.float64), ref)
    assert errors[F32] < 1e-5  # float32 accumulation of exact bfloat16 products
    # A bfloat16 result adds one rounding and nothing else.
    assert errors[BF16] < errors[F32] + BF16_ROUNDING


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_reads_overlapping_a_rows(dtype, isa_bf16, rng):
    """lda < k: rows of A overlap (read-only), as the widened convolution reads runs of
    S * C input values sw * C apart (the stem: 21 values, 6 apart)."""
    m, n, k, count, lda, ldb, ldc = 9, 64, 21, 3, 6, 64, 67
    as_dtype = F32 if dtype == "float32" else BF16
    a_pool = rng.standard_normal((count + 1) * 64).astype(as_dtype)
    b_pool = rng.standard_normal(count * k * ldb).astype(as_dtype)
    offs_a, offs_b = [64, 0, 128], [k * ldb, 0, 2 * k * ldb]
    ref = kernel_reference(a_pool.astype(np.float64), b_pool.astype(np.float64), None, m, n, k,
                           lda, ldb, ldc, offs_a, offs_b, 1.0, 0.0, "relu", None)
    c = np.full((m, ldc), np.nan, F32)
    pools = (a_pool, b_pool) if dtype == "float32" else (a_pool.view(np.uint16), b_pool.view(np.uint16))
    call_kernel("offset", *pools, c, m, n, k, lda, ldb, ldc, offs_a, offs_b, activation="relu")
    assert rel_err(c[:, :n], ref) < 1e-5


# The paths whose bfloat16 kernels read B in the pair layout (Desc::b_vnni).
VNNI_ISAS = [pytest.param(i, marks=pytest.mark.skipif(i not in jb.supported_isas(), reason=f"no {i} on this CPU"))
             for i in ("avx512bf16", "amx")]


@pytest.mark.parametrize("vnni_isa", VNNI_ISAS)
@pytest.mark.parametrize("form", ["stride", "offset", "address"])
@pytest.mark.parametrize("m,n,k,count", [(1, 1, 1, 1), (15, 17, 31, 2), (16, 16, 32, 1), (17, 48, 33, 3),
                                         (40, 100, 64, 4), (56, 64, 65, 9), (33, 31, 96, 2), (3, 65, 5, 2),
                                         (7, 129, 2, 1)])
@pytest.mark.parametrize("beta,activation,bias", [(0.0, "none", False), (1.0, "none", False),
                                                  (1.0, "relu", True), (-0.5, "gelu", False)])
def test_vnni_weights(vnni_isa, form, m, n, k, count, beta, activation, bias, rng):
    # B packed once into the pair-interleaved layout (as the primitives pack weights) and
    # read as is, against the same B plain (which the kernel packs, or shuffles, itself):
    # m not a multiple of the register or AMX block (AMX's overlapping last row tile, beta
    # != 0 included), n and k edges (zero-padded tiles, masked stores), odd k, blocks of
    # few accumulators (two sets), the inline and the per-vector epilogues.
    lda, ldb, ldc = k + 3, n + 1, n + 2
    a_pool, b_pool, offs_a, offs_b = bf16_pools(rng, form, m, n, k, count, lda, ldb)
    c0 = rng.standard_normal((m, ldc)).astype(F32)
    bias = rng.standard_normal(n).astype(F32) if bias else None
    ref = kernel_reference(a_pool.astype(np.float64), b_pool.astype(np.float64), c0, m, n, k,
                           lda, ldb, ldc, offs_a, offs_b, 1.0, beta, activation, bias)
    for b_vnni in (False, True):
        c = c0.copy()
        call_kernel(form, a_pool.view(np.uint16), b_pool.view(np.uint16), c, m, n, k, lda, ldb, ldc,
                    offs_a, offs_b, beta=beta, activation=activation, bias=bias, isa=vnni_isa, b_vnni=b_vnni)
        assert rel_err(c[:, :n], ref) < 1e-5, b_vnni
        np.testing.assert_array_equal(c[:, n:], c0[:, n:])  # beyond n, C is untouched


@pytest.mark.parametrize("vnni_isa", VNNI_ISAS)
def test_vnni_descriptors_a_path_cannot_read_are_rejected(vnni_isa):
    a = np.ones(64, F32)
    with pytest.raises(ValueError, match="b_vnni"):  # float32 has no pair layout
        call_kernel("stride", a, a, np.zeros((2, 2), F32), 2, 2, 2, 2, 2, 2, [0], [0], isa=vnni_isa, b_vnni=True)
    h = np.ones(64, np.uint16)
    with pytest.raises(ValueError, match="b_vnni"):  # nor does a path without VDPBF16PS read it
        call_kernel("stride", h, h, np.zeros((2, 2), F32), 2, 2, 2, 2, 2, 2, [0], [0], isa="avx512", b_vnni=True)


def test_brgemm_op_bf16_forward_and_gradients(rng):
    a = rng.standard_normal((2, 3, 17, 33)).astype(BF16)
    b = (0.3 * rng.standard_normal((3, 33, 20))).astype(BF16)
    bias = rng.standard_normal(20).astype(F32)
    out = jax.jit(lambda a, b: jb.brgemm(a, b, epilogue="gelu", bias=bias))(a, b)
    assert out.dtype == BF16
    ref = brgemm_reference(a.astype(np.float64), b.astype(np.float64), epilogue="gelu", bias=bias)
    assert rel_err(out, ref) < 1e-5 + BF16_ROUNDING
    out32 = jb.brgemm(a, b, epilogue="gelu", bias=bias, out_dtype=jnp.float32)
    assert out32.dtype == jnp.float32 and rel_err(out32, ref) < 1e-5

    w = rng.standard_normal((2, 17, 20)).astype(F32)
    loss = lambda a, b: jnp.sum(w * jb.brgemm(a, b, epilogue="tanh", out_dtype=jnp.float32) ** 2)
    ref_loss = lambda a, b: jnp.sum(w * jnp.tanh(jnp.einsum("...imk,...ikn->...mn", a, b)) ** 2)
    grads = jax.grad(loss, argnums=(0, 1))(a, b)
    want = jax.grad(ref_loss, argnums=(0, 1))(a.astype(F32), b.astype(F32))
    for g, r in zip(grads, want):
        assert g.dtype == BF16  # gradients in the input's dtype
        # The output gradient enters the products rounded to bfloat16, and the result is
        # rounded once more.
        assert rel_err(g, r) < 1e-5 + 2 * BF16_ROUNDING


def test_brgemm_indexed_bf16(rng):
    a_blocks = rng.standard_normal((5, 13, 24)).astype(BF16)
    b_blocks = rng.standard_normal((4, 24, 19)).astype(BF16)
    a_index = rng.integers(0, 5, (3, 7))
    b_index = rng.integers(0, 4, (3, 7))
    out = jb.brgemm_indexed(a_blocks, b_blocks, a_index, b_index, out_dtype=jnp.float32)
    ref = brgemm_reference(a_blocks.astype(np.float64)[a_index], b_blocks.astype(np.float64)[b_index])
    assert rel_err(out, ref) < 1e-5


# ------------------------------------------------------------------ offset form op


def test_brgemm_indexed_matches_reference(isa, rng):
    a_blocks = rng.standard_normal((5, 13, 24)).astype(F32)
    b_blocks = rng.standard_normal((4, 24, 19)).astype(F32)
    a_index = rng.integers(0, 5, (3, 7))
    b_index = rng.integers(0, 4, (3, 7))
    c = rng.standard_normal((3, 13, 19)).astype(F32)
    bias = rng.standard_normal(19).astype(F32)
    out = jax.jit(lambda *args: jb.brgemm_indexed(*args, alpha=2.0, beta=0.5, epilogue="sigmoid", bias=bias))(
        a_blocks, b_blocks, a_index, b_index, c)
    ref = brgemm_reference(a_blocks[a_index], b_blocks[b_index], c, 2.0, 0.5, "sigmoid", bias)
    assert rel_err(out, ref) < 1e-5


def test_brgemm_indexed_gradients_and_vmap(rng):
    a_blocks = rng.standard_normal((4, 6, 5)).astype(F32)
    b_blocks = rng.standard_normal((3, 5, 7)).astype(F32)
    a_index = np.array([[0, 2, 2, 3], [1, 1, 0, 3]])
    b_index = np.array([[2, 0, 1, 1], [0, 2, 2, 1]])
    f = lambda A, B: jb.brgemm_indexed(A, B, a_index, b_index, epilogue="tanh")
    check_grads(f, (a_blocks, b_blocks), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)
    ref = lambda A, B: jnp.tanh(jnp.einsum("...imk,...ikn->...mn", A[a_index], B[b_index]))
    loss = lambda fn: lambda A, B: jnp.sum(fn(A, B) ** 3)
    for g, r in zip(jax.grad(loss(f), (0, 1))(a_blocks, b_blocks), jax.grad(loss(ref), (0, 1))(a_blocks, b_blocks)):
        assert rel_err(g, r) < 1e-5
    # vmap over the block pool and, separately, over the indices.
    pools = np.stack([a_blocks, -2.0 * a_blocks])
    out = jax.vmap(lambda A: jb.brgemm_indexed(A, b_blocks, a_index, b_index))(pools)
    want = np.stack([brgemm_reference(p[a_index], b_blocks[b_index]) for p in pools])
    assert rel_err(out, want) < 1e-5
    idx = np.stack([a_index, a_index[:, ::-1]])
    out = jax.vmap(lambda i: jb.brgemm_indexed(a_blocks, b_blocks, i, b_index))(idx)
    want = np.stack([brgemm_reference(a_blocks[i], b_blocks[b_index]) for i in idx])
    assert rel_err(out, want) < 1e-5


def test_brgemm_indexed_out_of_range_is_an_error_not_a_read():
    a_blocks = np.ones((2, 3, 4), F32)
    b_blocks = np.ones((2, 4, 5), F32)
    with pytest.raises(ValueError, match="a_index holds 2"):
        jb.brgemm_indexed(a_blocks, b_blocks, np.array([[0, 2]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="b_index holds -1"):
        jb.brgemm_indexed(a_blocks, b_blocks, np.array([[0, 1]]), np.array([[0, -1]]))
    # Under jit the indices are traced: the kernel refuses them at run time.
    f = jax.jit(lambda i: jb.brgemm_indexed(a_blocks, b_blocks, i, np.array([[0, 1]])))
    with pytest.raises(Exception, match="a_index holds 7"):
        jax.block_until_ready(f(np.array([[0, 7]], np.int32)))
    assert np.all(np.asarray(f(np.array([[0, 1]], np.int32))) == 8.0)


def test_brgemm_indexed_vmapped_pools_check_each_elements_own_pool(rng):
    """With a pool per vmapped element, an index past element 0's own pool is an error,
    never a read of element 1's blocks (the pools used to be folded into one)."""
    pools = rng.standard_normal((2, 3, 4, 5)).astype(F32)  # 2 elements, 3 blocks each
    b_blocks = rng.standard_normal((2, 5, 6)).astype(F32)
    f = jax.jit(jax.vmap(lambda A, i: jb.brgemm_indexed(A, b_blocks, i, np.array([[0, 1]]))))
    good = np.array([[[0, 2]], [[1, 2]]], np.int32)
    want = np.stack([brgemm_reference(p[i], b_blocks[[[0, 1]]]) for p, i in zip(pools, good)])
    assert rel_err(f(pools, good), want) < 1e-5
    for bad in ([[[0, 3]], [[1, 2]]], [[[0, 1]], [[5, 0]]], [[[-1, 0]], [[0, 0]]]):
        with pytest.raises(Exception, match="a_index holds"):
            jax.block_until_ready(f(pools, np.array(bad, np.int32)))
    # Nested vmap, b pools batched on the outer axis only.
    bs = rng.standard_normal((3, 2, 5, 6)).astype(F32)
    g = jax.jit(jax.vmap(jax.vmap(lambda A, B, i: jb.brgemm_indexed(A, B, i, np.array([[1, 0]])),
                                  in_axes=(0, None, 0)), in_axes=(None, 0, None)))
    want = np.stack([[brgemm_reference(p[i], b[[[1, 0]]]) for p, i in zip(pools, good)] for b in bs])
    assert rel_err(g(pools, bs, good), want) < 1e-5
    with pytest.raises(Exception, match="a_index holds 3"):
        jax.block_until_ready(g(pools, bs, np.array([[[0, 1]], [[3, 0]]], np.int32)))


def test_brgemm_indexed_int64_indices_are_not_truncated():
    """With jax_enable_x64 a traced int64 index of 2**32 is refused, not wrapped to 0."""
    a_blocks = np.ones((2, 3, 4), F32)
    b_blocks = np.ones((2, 4, 5), F32)
    with jax.enable_x64(True):
        f = jax.jit(lambda i: jb.brgemm_indexed(a_blocks, b_blocks, i, np.array([[0, 1]])))
        for bad in (2**32, 2**31, 2**63 - 1):
            with pytest.raises(Exception, match=f"a_index holds {bad}"):
                jax.block_until_ready(f(np.array([[0, bad]], np.int64)))
        with pytest.raises(Exception, match="a_index holds"):
            jax.block_until_ready(f(np.array([[0, 2**32]], np.uint64)))
        assert np.all(np.asarray(f(np.array([[0, 1]], np.int64))) == 8.0)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: jb.brgemm(np.ones((2, 3), F32), np.ones((1, 3, 2), F32)), ValueError, "a must have shape"),
        (lambda: jb.brgemm(np.ones((1, 2, 3), F32), np.ones((3, 2), F32)), ValueError, "b must have shape"),
        (lambda: jb.brgemm(np.ones((2, 2, 3), F32), np.ones((1, 3, 2), F32)), ValueError, "b's count"),
        (lambda: jb.brgemm(np.ones((1, 2, 3), F32), np.ones((1, 4, 2), F32)), ValueError, "b's k"),
        (lambda: jb.brgemm(np.ones((1, 2, 3), F32), np.ones((1, 3, 2), F32), np.ones((3, 2), F32)), ValueError, "c must end in"),
        (lambda: jb.brgemm(np.ones((1, 2, 3), np.int32), np.ones((1, 3, 2), F32)), TypeError, "a must be float32 or bfloat16, got integer"),
        (lambda: jb.brgemm(np.ones((1, 2, 3), F32), np.ones((1, 3, 2), np.float64)), TypeError, "b must be float32 or bfloat16"),
        (lambda: jb.brgemm(np.ones((1, 2, 3), F32), np.ones((1, 3, 2), jnp.bfloat16)), TypeError, "a and b must have the same dtype"),
        (lambda: jb.brgemm(np.ones((1, 2, 3), F32), np.ones((1, 3, 2), F32), np.ones((2, 2), jnp.bfloat16), beta=1.0), TypeError, "c must have the result's dtype"),
        (lambda: jb.brgemm(np.ones((1, 2, 3), F32), np.ones((1, 3, 2), F32), out_dtype=np.float16), TypeError, "out_dtype must be"),
        (lambda: jb.brgemm(np.ones((1, 2, 3), F32), np.ones((1, 3, 2), F32), epilogue="swish"), ValueError, "epilogue must be one of"),
        (lambda: jb.brgemm(np.ones((1, 2, 3), F32), np.ones((1, 3, 2), F32), bias=np.ones(3, F32)), ValueError, "bias must have shape"),
        (lambda: jb.brgemm(np.ones((2, 1, 2, 3), F32), np.ones((3, 1, 3, 2), F32)), ValueError, "leading dims do not broadcast"),
        (lambda: jb.brgemm(np.ones((1, 2, 3), F32), np.ones((1, 3, 2), F32), alpha=jnp.float32(2)), TypeError, "alpha must be a Python number"),
        (lambda: jb.brgemm_indexed(np.ones((2, 3), F32), np.ones((1, 3, 2), F32), [[0]], [[0]]), ValueError, "a_blocks must have shape"),
        (lambda: jb.brgemm_indexed(np.ones((1, 2, 3), F32), np.ones((1, 3, 2), F32), [[0.5]], [[0]]), TypeError, "a_index must hold integers"),
        (lambda: jb.brgemm_indexed(np.ones((1, 2, 3), F32), np.ones((1, 3, 2), F32), [[0, 0]], [[0]]), ValueError, "b_index's count"),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 17), (16, 16), (33, 65), (100, 7), (64, 129)])
def test_kernel_layer_transpose(rows, cols, isa, rng):
    x = rng.standard_normal((rows, cols)).astype(F32)
    np.testing.assert_array_equal(ext.testing.transpose_f32(x, isa), x.T)
    bits = rng.integers(0, 1 << 16, size=(rows, cols), dtype=np.uint16)
    np.testing.assert_array_equal(ext.testing.transpose_bf16(bits, isa), bits.T)


@pytest.mark.parametrize("name", jb.supported_isas())
def test_env_var_forces_the_isa(name):
    # JAX_BRGEMM_ISA is read when the extension loads: a fresh interpreter per value.
    import subprocess
    import sys

    code = ("import numpy as np, jax_brgemm as jb; a = np.random.rand(2, 5, 7).astype(np.float32); "
            "b = np.random.rand(2, 7, 9).astype(np.float32); out = np.asarray(jb.brgemm(a, b)); "
            "ref = np.einsum('imk,ikn->mn', a.astype(np.float64), b); "
            "print(jb.active_isa(), float(np.linalg.norm(out - ref) / np.linalg.norm(ref)))")
    env = dict(__import__("os").environ, JAX_BRGEMM_ISA=name)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    active, err = result.stdout.split()
    assert active == name and float(err) < 1e-5


def test_env_var_rejects_an_unknown_isa():
    import subprocess
    import sys

    env = dict(__import__("os").environ, JAX_BRGEMM_ISA="neon")
    result = subprocess.run([sys.executable, "-c", "import jax_brgemm"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode != 0 and "JAX_BRGEMM_ISA=neon" in result.stderr


def test_activation_argument_and_its_epilogue_alias(rng):
    a = rng.standard_normal((2, 5, 4)).astype(F32)
    b = rng.standard_normal((2, 4, 6)).astype(F32)
    ref = brgemm_reference(a, b, epilogue="tanh")
    assert rel_err(jb.brgemm(a, b, activation="tanh"), ref) < 1e-5
    assert rel_err(jb.brgemm(a, b, epilogue="tanh"), ref) < 1e-5
    assert rel_err(jb.brgemm(a, b, activation="tanh", epilogue="tanh"), ref) < 1e-5
    with pytest.raises(ValueError, match="disagree"):
        jb.brgemm(a, b, activation="relu", epilogue="tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        jb.brgemm(a, b, activation="swish")
    idx = np.array([[0, 1]])
    out = jb.brgemm_indexed(a, b, idx, idx, activation="sigmoid")
    assert rel_err(out, brgemm_reference(a[idx], b[idx], epilogue="sigmoid")) < 1e-5
