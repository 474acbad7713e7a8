"""The CUDA variant of the brgemm, dense and conv2d targets.

Host-side tests (run wherever the CUDA extension was built, no GPU needed): the handlers are
exported under the CPU targets' names; the shape decoding, broadcasting, problem folding, tile
and split planning the handlers use; and dense's and conv2d's GEMM addressing (the offset
functions the kernels call), run through a float64 host emulation of the batch-reduce GEMM
against NumPy references. GPU tests (skipped without a GPU and JAX's CUDA plugin): every
target against float64 NumPy in float32 and the 16-bit types, gradients, jit, vmap.
"""

import itertools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_brgemm as jb
from jax_brgemm import _activations, _cuda
from jax_brgemm._ext import ext as cpu_ext
from conftest import rel_err

needs_ext = pytest.mark.skipif(not _cuda.built, reason="CUDA extension not built (no nvcc at build time)")
needs_gpu = pytest.mark.skipif(not _cuda.gpu_available(), reason="no CUDA GPU visible to JAX")
F32 = np.float32

ACTIVATIONS = {
    "none": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3))),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
}


# ------------------------------------------------------------------ host side


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("JAX_BRGEMM_CUDA", "").upper() in ("OFF", "0"),
                    reason="no nvcc on PATH, or JAX_BRGEMM_CUDA=OFF says the build left CUDA out on purpose")
def test_extension_built_where_nvcc_is_found():
    assert _cuda.built, f"nvcc is on PATH but jax_brgemm/_jax_brgemm_cuda was not built: {_cuda.load_error}"


@needs_ext
def test_handlers_use_the_cpu_target_names():
    # The CUDA module serves brgemm, dense and conv2d under the CPU names (not the LSTM yet).
    assert set(_cuda.ext.registrations()) == {
        "jax_brgemm_brgemm", "jax_brgemm_brgemm_indexed", "jax_brgemm_dense_fwd", "jax_brgemm_dense_bwd",
        "jax_brgemm_conv2d_forward", "jax_brgemm_conv2d_backward_data", "jax_brgemm_conv2d_weight_update"}
    assert set(_cuda.ext.registrations()) <= set(cpu_ext.registrations())
    assert _cuda.ext.device_count() >= 0  # 0 without a driver, never an exception


@needs_ext
def test_broadcast_strides():
    bs = _cuda.ext.broadcast_strides
    assert bs([4, 8, 16], 2, [3, 4]) == [0, 128]           # missing dim -> 0
    assert bs([3, 1, 8, 16], 2, [3, 4]) == [128, 0]        # size-1 dim -> 0
    assert bs([2, 3, 5, 7], 3, [2]) == [105]
    assert bs([5, 7], 2, []) == []
    with pytest.raises(ValueError, match=r"leading dims \(3, 8, 16\) do not broadcast to \(4,\)"):
        bs([3, 8, 16], 2, [4])
    with pytest.raises(ValueError, match="more leading dims"):
        bs([2, 3, 8, 16], 2, [3])


def brute_offsets(lead, strides, op):
    return [sum(i * s for i, s in zip(idx, strides[op])) for idx in itertools.product(*map(range, lead))]


def folded_offsets(folded, op):
    return brute_offsets(folded["shape"], folded["strides"], op)


@needs_ext
def test_fold_lead_merges_contiguous_dims_and_keeps_offsets(rng):
    fold = _cuda.ext.fold_lead
    # Every operand contiguous over (2, 3, 4): one dim of 24.
    f = fold([2, 3, 4], [[12 * 5, 4 * 5, 5], [12, 4, 1], [], []])
    assert f["shape"] == [24] and f["strides"] == [[5], [1], [0], [0]]
    # Size-1 dims vanish; a broadcast dim next to a walked one cannot merge.
    f = fold([1, 2, 1, 3], [[0, 3, 0, 1], [0, 0, 0, 1], [], []])
    assert f["shape"] == [2, 3] and f["strides"] == [[3, 1], [0, 1], [0, 0], [0, 0]]
    for _ in range(20):  # random lead shapes and broadcasting patterns: same offsets
        rank = int(rng.integers(0, 5))
        lead = [int(x) for x in rng.integers(1, 4, rank)]
        strides = []
        for _op in range(4):
            kept = rng.random(rank) < 0.7
            dims = [d if k else 1 for d, k in zip(lead, kept)]
            strides.append(_cuda.ext.broadcast_strides(dims + [2, 3], 2, lead))
        f = fold(lead, strides)
        assert len(f["shape"]) <= rank
        for op in range(4):
            assert folded_offsets(f, op) == brute_offsets(lead, strides, op)


@needs_ext
def test_fold_lead_refuses_too_many_dims():
    lead = [2] * 8
    # a walks the dims in reverse order, b forwards: nothing can merge.
    a = [2**d for d in range(8)]
    b = [2 ** (7 - d) for d in range(8)]
    with pytest.raises(ValueError, match="at most 6"):
        _cuda.ext.fold_lead(lead, [a, b, [], []])


@needs_ext
def test_decode_stride_form_offsets_follow_numpy_broadcasting():
    a_shape, b_shape, c_shape = (2, 1, 4, 8, 16), (3, 4, 16, 32), (1, 3, 8, 32)
    d = _cuda.ext.decode_stride_form(list(a_shape), list(b_shape), list(c_shape), [32], [2, 3, 8, 32])
    assert (d["m"], d["n"], d["k"], d["count"], d["problems"]) == (8, 32, 16, 4, 6)
    assert d["lead"] == [2, 3]
    # Element offset of problem (i, j) in each operand, the NumPy way.
    for p, (i, j) in enumerate(itertools.product(range(2), range(3))):
        assert d["offsets"][0][p] == np.ravel_multi_index((i, 0, 0, 0, 0), a_shape)
        assert d["offsets"][1][p] == np.ravel_multi_index((j, 0, 0, 0), b_shape)
        assert d["offsets"][2][p] == np.ravel_multi_index((0, j, 0, 0), c_shape)
        assert d["offsets"][3][p] == 0


@needs_ext
@pytest.mark.parametrize("args, match", [
    (([4, 8, 16], [4, 16, 32], None, None, [8, 32]), None),
    (([4, 8], [4, 16, 32], None, None, [8, 32]), "a and b must have rank >= 3"),
    (([4, 9, 16], [4, 16, 32], None, None, [8, 32]), r"a's m \(9\)"),
    (([4, 8, 16], [3, 16, 32], None, None, [8, 32]), "b must end in"),
    (([4, 8, 16], [4, 16, 32], [8, 31], None, [8, 32]), r"c must end in \(m, n\)"),
    (([4, 8, 16], [4, 16, 32], None, [31], [8, 32]), r"bias must have shape \(n,\)"),
    (([2, 4, 8, 16], [4, 16, 32], None, None, [3, 8, 32]), "a leading dims"),
    (([4, 8, 16], [4, 16, 32], [5, 8, 32], None, [8, 32]), "c has more leading dims"),
    (([4, 8, 16], [4, 16, 32], None, None, [32]), "result must have rank >= 2"),
])
def test_decode_stride_form_errors(args, match):
    if match is None:
        assert _cuda.ext.decode_stride_form(*args)["problems"] == 1
    else:
        with pytest.raises(ValueError, match=match):
            _cuda.ext.decode_stride_form(*args)


@needs_ext
def test_decode_offset_form():
    dec = _cuda.ext.decode_offset_form
    d = dec([5, 8, 16], [4, 16, 32], [2, 3, 7], [2, 3, 7], [2, 3, 8, 32], [32], [2, 3, 8, 32])
    assert (d["count"], d["a_blocks"], d["b_blocks"], d["problems"]) == (7, 5, 4, 6)
    assert d["offsets"][2] == [p * 8 * 32 for p in range(6)]  # c walks the problems
    assert d["offsets"][0] == [0] * 6  # pools: indexed, not walked
    with pytest.raises(ValueError, match="a_index and b_index must have shape"):
        dec([5, 8, 16], [4, 16, 32], [2, 3, 7], [2, 3, 6], None, None, [2, 3, 8, 32])
    with pytest.raises(ValueError, match="a_index and b_index must have shape"):
        dec([5, 8, 16], [4, 16, 32], [3, 7], [3, 7], None, None, [2, 3, 8, 32])
    with pytest.raises(ValueError, match="do not match a result"):
        dec([5, 8, 16], [4, 15, 32], [7], [7], None, None, [8, 32])
    with pytest.raises(ValueError, match="must have rank 3"):
        dec([8, 16], [4, 16, 32], [7], [7], None, None, [8, 32])


@needs_ext
def test_plan_tiles():
    plan = _cuda.ext.plan_tiles
    p = plan("float32", 100, 130, 3, 132)
    assert (p["bm"], p["bn"], p["threads"]) == (64, 64, 256)
    assert (p["tiles_m"], p["tiles_n"], p["blocks"]) == (2, 3, 18)
    # 16-bit: the 128 x 128 tile only when the output fills it and the grid fills the GPU.
    assert plan("bfloat16", 4096, 4096, 1, 132)["bm"] == 128
    assert plan("float16", 256, 256, 1, 132)["bm"] == 64      # 4 large blocks for 132 SMs
    assert plan("bfloat16", 256, 256, 64, 132)["bm"] == 128
    assert plan("bfloat16", 64, 4096, 64, 132)["bm"] == 64    # m smaller than the tile
    p = plan("bfloat16", 1, 1, 1, 132)
    assert (p["tiles_m"], p["tiles_n"], p["blocks"]) == (1, 1, 1)
    with pytest.raises(ValueError, match="too many output tiles"):
        plan("float32", 64 * 2**16, 64 * 2**16, 1, 132)
    with pytest.raises(ValueError, match="m, n and problems >= 1"):
        plan("float32", 0, 4, 1, 132)
    with pytest.raises(ValueError, match="dtype"):
        plan("int8", 4, 4, 1, 132)


@needs_ext
def test_plan_splits():
    splits = _cuda.ext.plan_splits
    # 9 blocks on 132 SMs: split up to 2 * 132 / 9 -> 30 ways, if the steps allow it.
    assert splits("float32", 64, 64, 9, 400, 132) == {"splits": 30, "blocks": 270}
    assert splits("float32", 64, 64, 9, 40, 132)["splits"] == 10   # >= 4 steps per split
    assert splits("float32", 64, 64, 9, 7, 132)["splits"] == 1     # too short to split
    assert splits("bfloat16", 4096, 4096, 1, 10**4, 132)["splits"] == 1  # the grid fills the GPU


# ------------------------------------------------------------------ dense and conv2d, host side


@needs_ext
def test_decode_dense_matches_the_cpu_checks():
    fwd, bwd = _cuda.ext.decode_dense_forward, _cuda.ext.decode_dense_backward
    d = fwd([3, 5, 4], [1, 4, 6], [3, 6], [3, 5, 6], None)  # vmap: shared kernel, batched bias
    assert (d["problems"], d["n"], d["c"], d["k"], d["w_shared"], d["bias_shared"]) == (3, 5, 4, 6, True, False)
    with pytest.raises(ValueError, match=r"kernel must have shape \(\.\.\., 4, 6\), got \(5, 6\)"):
        fwd([5, 4], [5, 6], None, [5, 6], None)
    with pytest.raises(ValueError, match="kernel has 2 leading problems, expected 1 or 3"):
        fwd([3, 5, 4], [2, 4, 6], None, [3, 5, 6], None)
    with pytest.raises(ValueError, match=r"bias must have shape \(\.\.\., 6\)"):
        fwd([5, 4], [4, 6], [5], [5, 6], None)
    with pytest.raises(ValueError, match="y's leading dims must match x's"):
        fwd([3, 5, 4], [4, 6], None, [5, 6], None)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., n, c\)"):
        fwd([4], [4, 6], None, [5, 6], None)
    d = bwd([3, 5, 6], [3, 5, 4], [4, 6], [3, 5, 6], True, [3, 5, 4], [4, 6], [6])
    assert (d["problems"], d["dw_shared"], d["dbias_shared"]) == (3, True, True)
    d = bwd([3, 5, 6], [3, 5, 4], [3, 4, 6], None, False, None, [3, 4, 6], None)
    assert not d["w_shared"] and not d["dw_shared"]
    with pytest.raises(ValueError, match="saved must have shape"):
        bwd([5, 6], [5, 4], [4, 6], None, True, [5, 4], None, None)
    with pytest.raises(ValueError, match="x's leading dims must match dy's"):
        bwd([3, 5, 6], [5, 4], [4, 6], None, False, None, [4, 6], None)
    with pytest.raises(ValueError, match=r"dx must have shape \(\.\.\., 5, 4\)"):
        bwd([5, 6], [5, 4], [4, 6], None, False, [5, 5], None, None)


def emulated(fn, *args, a, b, bias=None):
    out = fn(*args, np.ravel(a).tolist(), np.ravel(b).tolist(), None if bias is None else np.ravel(bias).tolist())
    return (np.array(out[0]), out[1]) if isinstance(out, tuple) else np.array(out)


@needs_ext
@pytest.mark.parametrize("problems, w_shared, bias_shared, dw_shared", [
    (1, True, True, True), (3, True, True, True), (3, True, False, False), (3, False, True, False),
])
def test_dense_addressing_on_the_host(rng, problems, w_shared, bias_shared, dw_shared):
    """Each pass's strided GEMM (the offsets the kernels use), emulated in float64."""
    n, c, k = 7, 5, 6
    x = rng.standard_normal((problems, n, c))
    w = rng.standard_normal((1 if w_shared else problems, c, k))
    bias = rng.standard_normal((1 if bias_shared else problems, k))
    dz = rng.standard_normal((problems, n, k))
    flags = (w_shared, bias_shared, dw_shared)
    y, shape = emulated(_cuda.ext.emulate_dense, "forward", problems, n, c, k, *flags, a=x, b=w, bias=bias)
    assert rel_err(y.reshape(problems, n, k), x @ w + bias[:, None, :]) < 1e-14
    # Shared weights and bias fold the problems into the rows: one bigger GEMM.
    assert (shape["m"], shape["problems"]) == ((problems * n, 1) if w_shared and bias_shared else (n, problems))
    dx, _ = emulated(_cuda.ext.emulate_dense, "backward_data", problems, n, c, k, *flags, a=dz, b=w)
    assert rel_err(dx.reshape(problems, n, c), dz @ np.swapaxes(w, 1, 2)) < 1e-14
    dw, shape = emulated(_cuda.ext.emulate_dense, "weight_update", problems, n, c, k, *flags, a=x, b=dz)
    want = np.swapaxes(x, 1, 2) @ dz
    if dw_shared:  # summed over the problems, which become the batch reduction
        want = want.sum(0, keepdims=True)
        assert (shape["count"], shape["problems"]) == (problems, 1)
    assert rel_err(dw.reshape(want.shape), want) < 1e-14


def pads_of(padding, in_hw, taps, strides, dilation):
    """((top, bottom), (left, right)) for lax-style padding, as nn.conv2d computes it."""
    from jax_brgemm.nn.conv import _pads
    return _pads(padding, in_hw, taps, strides, dilation)


def conv_reference(x, w, strides, pads, dilation, groups):
    """Forward, backward-data and weight-update in float64 NumPy (non-negative pads):
    returns y and the functions dy -> dx and dy -> dw."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    (pt, pb), (pl, pr) = pads
    n, h, wd, c = x.shape
    r_, s_, cg, k = w.shape
    (sh, sw), (dh, dw_) = strides, dilation
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    p = (xp.shape[1] - dh * (r_ - 1) - 1) // sh + 1
    q = (xp.shape[2] - dw_ * (s_ - 1) - 1) // sw + 1
    kg = k // groups

    def window(r, s):
        return (slice(None), slice(r * dh, r * dh + sh * (p - 1) + 1, sh),
                slice(s * dw_, s * dw_ + sw * (q - 1) + 1, sw))

    y = np.zeros((n, p, q, k))
    for r, s, g in itertools.product(range(r_), range(s_), range(groups)):
        patch = xp[window(r, s)][..., g * cg:(g + 1) * cg]
        y[..., g * kg:(g + 1) * kg] += patch @ w[r, s, :, g * kg:(g + 1) * kg]

    def backward_data(dy):
        dxp = np.zeros_like(xp)
        for r, s, g in itertools.product(range(r_), range(s_), range(groups)):
            dxp[window(r, s) + (slice(g * cg, (g + 1) * cg),)] += \
                dy[..., g * kg:(g + 1) * kg] @ w[r, s, :, g * kg:(g + 1) * kg].T
        return dxp[:, pt:pt + h, pl:pl + wd]

    def weight_update(dy):
        dw = np.zeros_like(w)
        for r, s, g in itertools.product(range(r_), range(s_), range(groups)):
            patch = xp[window(r, s)][..., g * cg:(g + 1) * cg]
            dw[r, s, :, g * kg:(g + 1) * kg] = np.einsum("npqc,npqk->ck", patch, dy[..., g * kg:(g + 1) * kg])
        return dw

    return y, backward_data, weight_update


# (x shape, kernel shape, strides, padding, dilation, groups): ragged SAME, strided + dilated
# + grouped with asymmetric pads, pointwise strided, depthwise, VALID with a wide kernel.
CONV_CASES = [
    ((2, 7, 6, 5), (3, 3, 5, 4), (1, 1), "SAME", (1, 1), 1),
    ((2, 9, 8, 6), (3, 2, 3, 4), (2, 1), ((1, 2), (0, 1)), (1, 2), 2),
    ((3, 6, 6, 4), (1, 1, 4, 8), (2, 2), "VALID", (1, 1), 1),
    ((1, 5, 7, 3), (3, 3, 1, 3), (1, 2), "SAME", (2, 1), 3),
    ((2, 6, 9, 2), (2, 5, 2, 3), (1, 1), "VALID", (1, 1), 1),
]


def conv_case(rng, case):
    x_shape, w_shape, strides, padding, dilation, groups = case
    pads = pads_of(padding, x_shape[1:3], w_shape[:2], strides, dilation)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    y, backward_data, weight_update = conv_reference(x, w, strides, pads, dilation, groups)
    (pt, _), (pl, _) = pads
    geometry = [*strides, *dilation, pt, pl, groups]
    return x, w, y, backward_data, weight_update, geometry


@needs_ext
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_addressing_on_the_host(rng, case):
    """Each pass's GEMM through the kernels' offset functions (emulated in float64): every
    output written once, every read inside its array, the contiguity the kernels assume."""
    x, w, y, backward_data, weight_update, geometry = conv_case(rng, case)
    dims = (list(x.shape), list(w.shape), list(y.shape), geometry)
    bias = rng.standard_normal(w.shape[3])
    out = emulated(_cuda.ext.emulate_conv, "forward", *dims, a=x, b=w, bias=bias)
    assert rel_err(out.reshape(y.shape), y + bias) < 1e-13
    dy = rng.standard_normal(y.shape)
    out = emulated(_cuda.ext.emulate_conv, "backward_data", *dims, a=dy, b=w)
    assert rel_err(out.reshape(x.shape), backward_data(dy)) < 1e-13
    out = emulated(_cuda.ext.emulate_conv, "weight_update", *dims, a=x, b=dy)
    assert rel_err(out.reshape(w.shape), weight_update(dy)) < 1e-13


@needs_ext
def test_decode_conv_shapes_and_errors():
    dec = _cuda.ext.decode_conv
    d = dec([2, 8, 8, 6], [3, 3, 3, 8], [2, 4, 4, 8], [2, 2, 1, 1, 1, 1, 2])
    # forward: pixels x group's out channels, reduce over taps and group's in channels.
    assert d["forward"] == {"m": 32, "n": 4, "k": 3, "count": 9, "problems": 2}
    assert d["backward_data"] == {"m": 128, "n": 3, "k": 4, "count": 9, "problems": 2}
    assert d["weight_update"] == {"m": 3, "n": 4, "k": 16, "count": 2, "problems": 18}
    with pytest.raises(ValueError, match=r"x must have shape \(N, H, W, C\), got \(8, 8, 6\)"):
        dec([8, 8, 6], [3, 3, 6, 8], [2, 8, 8, 8], [1, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="geometry must hold 7 values"):
        dec([2, 8, 8, 6], [3, 3, 6, 8], [2, 8, 8, 8], [1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="have different batch sizes"):
        dec([2, 8, 8, 6], [3, 3, 6, 8], [3, 8, 8, 8], [1, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="stride_w must be >= 1, got 0"):
        dec([2, 8, 8, 6], [3, 3, 6, 8], [2, 8, 8, 8], [1, 0, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"groups \(4\) must divide in_c \(6\)"):
        dec([2, 8, 8, 6], [3, 3, 6, 8], [2, 8, 8, 8], [1, 1, 1, 1, 1, 1, 4])
    with pytest.raises(ValueError, match=r"kernel \(3, 3, 6, 8\) does not match"):
        dec([2, 8, 8, 6], [3, 3, 6, 8], [2, 8, 8, 8], [1, 1, 1, 1, 1, 1, 2])


# ------------------------------------------------------------------ on a GPU


def gpu():
    return jax.devices("cuda")[0]


def to_gpu(*xs):
    return [jax.device_put(x, gpu()) for x in xs]


def reference(a, b, c=None, alpha=1.0, beta=0.0, act="none", bias=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    z = alpha * np.einsum("...imk,...ikn->...mn", a, b)
    if c is not None:
        z = z + beta * np.asarray(c, np.float64)
    if bias is not None:
        z = z + np.asarray(bias, np.float64)
    return ACTIVATIONS[act](z)


# (a lead, b lead, c lead or None, count, m, k, n): ragged tiles, several tiles, broadcasting.
GPU_SHAPES = [
    ((), (), None, 1, 1, 1, 1),
    ((2,), (2,), (2,), 5, 17, 33, 7),
    ((3,), (3,), None, 4, 64, 64, 64),
    ((2, 1), (3,), (1, 3), 3, 100, 129, 70),
    ((), (4,), (), 2, 130, 40, 260),
]


@needs_gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_brgemm_float32_on_gpu(rng, shape, act):
    a_lead, b_lead, c_lead, count, m, k, n = shape
    a = rng.standard_normal(a_lead + (count, m, k)).astype(F32)
    b = rng.standard_normal(b_lead + (count, k, n)).astype(F32)
    c = None if c_lead is None else rng.standard_normal(c_lead + (m, n)).astype(F32)
    bias = rng.standard_normal(n).astype(F32)
    epilogue = None if act == "none" else act
    f = jax.jit(lambda a, b, c, bias: jb.brgemm(a, b, c, alpha=0.7, beta=1.5, epilogue=epilogue, bias=bias))
    out = f(*to_gpu(a, b), None if c is None else to_gpu(c)[0], to_gpu(bias)[0])
    assert out.devices() == {gpu()}
    assert rel_err(out, reference(a, b, c, 0.7, 1.5, act, bias)) < 1e-5


@needs_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_brgemm_16bit_on_gpu(rng, dtype, shape):
    a_lead, b_lead, c_lead, count, m, k, n = shape
    # Round on the host: the reference sees exactly the kernel's inputs, so only the float32
    # accumulation differs (bf16/f16 products are exact in float32).
    a = jnp.asarray(rng.standard_normal(a_lead + (count, m, k)), dtype)
    b = jnp.asarray(rng.standard_normal(b_lead + (count, k, n)), dtype)
    c = None if c_lead is None else rng.standard_normal(c_lead + (m, n)).astype(F32)
    bias = rng.standard_normal(n).astype(F32)
    f = jax.jit(lambda a, b, c, bias: _cuda.raw_brgemm(a, b, c, bias, alpha=0.5, beta=2.0, activation="tanh"))
    out = f(*to_gpu(a, b), None if c is None else to_gpu(c)[0], to_gpu(bias)[0])
    ref = reference(np.asarray(a, np.float64), np.asarray(b, np.float64), c, 0.5, 2.0, "tanh", bias)
    assert rel_err(out, ref) < 2e-5


@needs_gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_brgemm_indexed_on_gpu(rng, dtype):
    a_blocks = jnp.asarray(rng.standard_normal((5, 40, 24)), dtype)
    b_blocks = jnp.asarray(rng.standard_normal((4, 24, 72)), dtype)
    a_index = rng.integers(0, 5, (3, 7)).astype(np.int32)
    b_index = rng.integers(0, 4, (3, 7)).astype(np.int32)
    c = rng.standard_normal((3, 40, 72)).astype(F32)
    bias = rng.standard_normal(72).astype(F32)
    args = to_gpu(a_blocks, b_blocks, a_index, b_index, c, bias)
    if dtype == jnp.float32:  # through the op
        out = jax.jit(lambda A, B, ia, ib, c, bias: jb.brgemm_indexed(
            A, B, ia, ib, c, alpha=2.0, beta=0.5, epilogue="sigmoid", bias=bias))(*args)
    else:
        out = jax.jit(lambda *x: _cuda.raw_brgemm_indexed(*x, alpha=2.0, beta=0.5, activation="sigmoid"))(*args)
    A, B = np.asarray(a_blocks, np.float64), np.asarray(b_blocks, np.float64)
    ref = reference(A[a_index], B[b_index], c, 2.0, 0.5, "sigmoid", bias)
    assert out.devices() == {gpu()}
    assert rel_err(out, ref) < 2e-5


@needs_gpu
def test_brgemm_indexed_out_of_range_on_gpu_is_an_error():
    a_blocks, b_blocks = to_gpu(np.ones((2, 3, 4), F32), np.ones((2, 4, 5), F32))
    f = jax.jit(lambda ia, ib: jb.brgemm_indexed(a_blocks, b_blocks, ia, ib))
    good = np.array([[0, 1]], np.int32)
    with pytest.raises(Exception, match=r"a_index holds 7, outside \[0, 2\)"):
        jax.block_until_ready(f(*to_gpu(np.array([[0, 7]], np.int32), good)))
    with pytest.raises(Exception, match=r"b_index holds -1, outside \[0, 2\)"):
        jax.block_until_ready(f(*to_gpu(good, np.array([[-1, 0]], np.int32))))
    assert rel_err(f(*to_gpu(good, good)), np.full((1, 3, 5), 8.0)) == 0.0  # still usable


@needs_gpu
@pytest.mark.parametrize("act", ["relu", "gelu", "tanh"])
def test_gradients_on_gpu(rng, act):
    a = rng.standard_normal((2, 3, 20, 30)).astype(F32)
    b = rng.standard_normal((3, 30, 40)).astype(F32)
    c = rng.standard_normal((2, 20, 40)).astype(F32)
    bias = rng.standard_normal(40).astype(F32)
    w = rng.standard_normal((2, 20, 40)).astype(F32)

    def loss(a, b, c, bias):
        return jnp.sum(jb.brgemm(a, b, c, alpha=1.3, beta=0.4, epilogue=act, bias=bias) * w)

    def loss_ref(a, b, c, bias):
        z = 1.3 * jnp.einsum("...imk,...ikn->...mn", a, b, precision="highest") + 0.4 * c + bias
        return jnp.sum(_activations.apply(act, z) * w)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*to_gpu(a, b, c, bias))
    with jax.default_device(jax.devices("cpu")[0]):
        want = jax.grad(loss_ref, argnums=(0, 1, 2, 3))(a, b, c, bias)
    for g, r in zip(grads, want):
        assert g.devices() == {gpu()}
        assert rel_err(g, r) < 1e-5


@needs_gpu
def test_vmap_and_cpu_agreement_on_gpu(rng):
    a = rng.standard_normal((4, 2, 3, 16, 24)).astype(F32)
    b = rng.standard_normal((3, 24, 8)).astype(F32)
    a_gpu, b_gpu = to_gpu(a, b)
    out = jax.jit(jax.vmap(lambda a: jb.brgemm(a, b_gpu, epilogue="relu")))(a_gpu)
    assert out.devices() == {gpu()}
    assert rel_err(out, reference(a, b, act="relu")) < 1e-5
    on_cpu = jax.jit(jax.vmap(lambda a: jb.brgemm(a, b, epilogue="relu")))(
        jax.device_put(a, jax.devices("cpu")[0]))
    assert on_cpu.devices() == set(jax.devices("cpu")[:1])
    assert rel_err(out, on_cpu) < 1e-5


# ------------------------------------------------------------------ dense and conv2d on a GPU


def act_arg(act):
    return None if act == "none" else act


def dense_reference(x, w, bias, act):
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    return ACTIVATIONS[act](z if bias is None else z + np.asarray(bias, np.float64))


@needs_gpu
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 70, 130), (256, 512, 384)])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_dense_on_gpu(rng, shape, act):
    n, c, k = shape
    x, w, bias = (rng.standard_normal(s).astype(F32) for s in ((n, c), (c, k), (k,)))
    out = jax.jit(lambda x, w, b: jb.nn.dense(x, w, b, activation=act_arg(act)))(*to_gpu(x, w, bias))
    assert out.devices() == {gpu()}
    assert rel_err(out, dense_reference(x, w, bias, act)) < 1e-5


@needs_gpu
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_dense_bfloat16_on_gpu(rng, out_dtype):
    x = jnp.asarray(rng.standard_normal((300, 200)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((200, 260)), jnp.bfloat16)
    bias = rng.standard_normal(260).astype(F32)
    out = jax.jit(lambda *a: _cuda.raw_dense(*a, activation="gelu", out_dtype=out_dtype))(*to_gpu(x, w, bias))
    ref = dense_reference(np.asarray(x, np.float64), np.asarray(w, np.float64), bias, "gelu")
    assert rel_err(np.asarray(out, np.float64), ref) < (2e-5 if out_dtype == jnp.float32 else 1e-2)


@needs_gpu
@pytest.mark.parametrize("act", ["none", "relu", "gelu", "sigmoid", "tanh"])
def test_dense_gradients_on_gpu(rng, act):
    x, w, bias, g = (rng.standard_normal(s).astype(F32) for s in ((50, 70), (70, 90), (90,), (50, 90)))

    def loss(x, w, b):
        return jnp.sum(jb.nn.dense(x, w, b, activation=act_arg(act)) * g)

    def loss_ref(x, w, b):
        return jnp.sum(_activations.apply(act, jnp.dot(x, w, precision="highest") + b) * g)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*to_gpu(x, w, bias))
    with jax.default_device(jax.devices("cpu")[0]):
        want = jax.grad(loss_ref, argnums=(0, 1, 2))(x, w, bias)
    for got, ref in zip(grads, want):
        assert got.devices() == {gpu()}
        assert rel_err(got, ref) < 1e-5


@needs_gpu
def test_dense_vmap_on_gpu(rng):
    xs, ws, bs = (rng.standard_normal(s).astype(F32) for s in ((4, 30, 20), (4, 20, 40), (4, 40)))
    xs_g, ws_g, bs_g = to_gpu(xs, ws, bs)
    # Per-problem weights (the handler's problem loop) and shared weights (folded rows).
    out = jax.jit(jax.vmap(lambda x, w, b: jb.nn.dense(x, w, b, activation="tanh")))(xs_g, ws_g, bs_g)
    assert rel_err(out, np.tanh(np.einsum("pnc,pck->pnk", xs.astype(np.float64), ws) + bs[:, None])) < 1e-5
    out = jax.jit(jax.vmap(lambda x: jb.nn.dense(x, ws_g[0], bs_g[0])))(xs_g)
    assert rel_err(out, xs.astype(np.float64) @ ws[0] + bs[0]) < 1e-5
    # The backward under vmap with shared weights: per-problem dkernel, summed outside.
    grad = jax.jit(jax.grad(lambda w: jnp.sum(jax.vmap(lambda x: jb.nn.dense(x, w, activation="relu"))(xs_g) ** 2)))
    z = xs.astype(np.float64) @ ws[0]
    want = np.einsum("pnc,pnk->ck", xs, 2 * np.maximum(z, 0) * (z > 0))
    assert rel_err(grad(ws_g[0]), want) < 1e-5


def conv_args(case):
    _, _, strides, padding, dilation, groups = case
    return dict(strides=strides, padding=padding, dilation=dilation, feature_group_count=groups)


# The host cases plus a ResNet-50 3x3 layer (its weight update splits the reduction).
CONV_GPU_CASES = CONV_CASES + [((4, 14, 14, 64), (3, 3, 64, 64), (1, 1), "SAME", (1, 1), 1)]


@needs_gpu
@pytest.mark.parametrize("case", CONV_GPU_CASES)
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_conv2d_on_gpu(rng, case, act):
    x, w, y, _, _, _ = conv_case(rng, case)
    bias = rng.standard_normal(w.shape[3])
    x, w, bias = x.astype(F32), w.astype(F32), bias.astype(F32)
    f = jax.jit(lambda x, w, b: jb.nn.conv2d(x, w, b, activation=act_arg(act), **conv_args(case)))
    out = f(*to_gpu(x, w, bias))
    assert out.devices() == {gpu()}
    y, _, _ = conv_reference(x, w, case[2], pads_of(case[3], x.shape[1:3], w.shape[:2], case[2], case[4]),
                             case[4], case[5])
    assert rel_err(out, ACTIVATIONS[act](y + bias)) < 1e-5


@needs_gpu
@pytest.mark.parametrize("case", CONV_GPU_CASES)
def test_conv2d_bfloat16_on_gpu(rng, case):
    x, w, _, _, _, _ = conv_case(rng, case)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    out = jax.jit(lambda x, w: jb.nn.conv2d(x, w, out_dtype=jnp.float32, **conv_args(case)))(*to_gpu(xb, wb))
    pads = pads_of(case[3], x.shape[1:3], w.shape[:2], case[2], case[4])
    y, _, _ = conv_reference(np.asarray(xb, np.float64), np.asarray(wb, np.float64), case[2], pads, case[4], case[5])
    assert rel_err(out, y) < 2e-5


@needs_gpu
@pytest.mark.parametrize("case", CONV_GPU_CASES)
def test_conv2d_backward_passes_on_gpu(rng, case):
    """vjp of conv2d = the backward-data and weight-update targets, against float64 NumPy."""
    x, w, y, backward_data, weight_update, _ = conv_case(rng, case)
    dy = rng.standard_normal(y.shape)
    f = lambda x, w: jb.nn.conv2d(x, w, **conv_args(case))  # noqa: E731
    x32, w32, dy32 = x.astype(F32), w.astype(F32), dy.astype(F32)
    _, vjp = jax.vjp(f, *to_gpu(x32, w32))
    dx, dw = jax.jit(vjp)(to_gpu(dy32)[0])
    assert dx.devices() == {gpu()} and dw.devices() == {gpu()}
    pads = pads_of(case[3], x.shape[1:3], w.shape[:2], case[2], case[4])
    _, backward_data, weight_update = conv_reference(x32, w32, case[2], pads, case[4], case[5])
    assert rel_err(dx, backward_data(dy32.astype(np.float64))) < 1e-5
    assert rel_err(dw, weight_update(dy32.astype(np.float64))) < 1e-5


@needs_gpu
@pytest.mark.parametrize("act", ["relu", "gelu", "tanh"])
def test_conv2d_gradients_on_gpu(rng, act):
    case = CONV_CASES[1]
    x, w, y, _, _, _ = conv_case(rng, case)
    bias, g = rng.standard_normal(w.shape[3]).astype(F32), rng.standard_normal(y.shape).astype(F32)
    x, w = x.astype(F32), w.astype(F32)
    pads = pads_of(case[3], x.shape[1:3], w.shape[:2], case[2], case[4])

    def loss(x, w, b):
        return jnp.sum(jb.nn.conv2d(x, w, b, activation=act, **conv_args(case)) * g)

    def loss_ref(x, w, b):
        z = jax.lax.conv_general_dilated(x, w, case[2], pads, rhs_dilation=case[4], feature_group_count=case[5],
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
        return jnp.sum(_activations.apply(act, z + b) * g)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*to_gpu(x, w, bias))
    with jax.default_device(jax.devices("cpu")[0]):
        want = jax.grad(loss_ref, argnums=(0, 1, 2))(x, w, bias)
    for got, ref in zip(grads, want):
        assert got.devices() == {gpu()}
        assert rel_err(got, ref) < 1e-5


@needs_gpu
def test_conv2d_vmap_and_cpu_agreement_on_gpu(rng):
    case = CONV_CASES[0]
    xs = rng.standard_normal((3,) + case[0]).astype(F32)
    ws = rng.standard_normal((3,) + case[1]).astype(F32)
    f = jax.jit(jax.vmap(lambda x, w: jb.nn.conv2d(x, w, activation="relu", **conv_args(case))))
    out = f(*to_gpu(xs, ws))  # batched kernels: the vmapped axis becomes extra groups
    assert out.devices() == {gpu()}
    pads = pads_of(case[3], case[0][1:3], case[1][:2], case[2], case[4])
    for i in range(3):
        y, _, _ = conv_reference(xs[i], ws[i], case[2], pads, case[4], case[5])
        assert rel_err(out[i], np.maximum(y, 0)) < 1e-5
    cpu = jax.devices("cpu")[0]
    on_cpu = f(jax.device_put(xs, cpu), jax.device_put(ws, cpu))
    assert on_cpu.devices() == {cpu}
    assert rel_err(out, on_cpu) < 1e-5
