"""jax_brgemm.nn.dense / mlp against float64 NumPy: forward, all three gradients, jit,
vmap, leading dims, every activation and ISA path, an optax training run, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_err

from jax_brgemm.nn import dense, mlp, mlp_init

ACTS = [None, "relu", "gelu", "sigmoid", "tanh"]
TOL = 2e-5


def _act64(name, z):
    if name is None:
        return z, np.ones_like(z)
    if name == "relu":
        return np.maximum(z, 0), (z > 0).astype(z.dtype)
    if name == "sigmoid":
        s = 1 / (1 + np.exp(-z))
        return s, s * (1 - s)
    if name == "tanh":
        t = np.tanh(z)
        return t, 1 - t * t
    if name == "gelu":
        c, a = np.sqrt(2 / np.pi), 0.044715
        t = np.tanh(c * (z + a * z**3))
        return 0.5 * z * (1 + t), 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * a * z * z)
    raise AssertionError(name)


def _dact_from_y(name, y):
    """act'(z) from y = act(z), for the activations whose backward uses the output."""
    if name == "relu":
        return (y > 0).astype(y.dtype)
    if name == "sigmoid":
        return y * (1 - y)
    if name == "tanh":
        return 1 - y * y
    raise AssertionError(name)


def reference(x, w, b, act, dy, scales=False, saved=None):
    """float64 forward and the analytic gradients of sum(y * dy); with scales, also the
    same sums over absolute values of their terms (float32 rounding error is relative
    to those, so a sum that cancels to nearly 0 does not make a tiny case ill-posed).
    saved(y): the output as the backward sees it (relu/sigmoid/tanh take act' from it)."""
    x, w, dy = (np.asarray(v, np.float64) for v in (x, w, dy))
    b = np.zeros(w.shape[1]) if b is None else np.asarray(b, np.float64)
    x2 = x.reshape(-1, x.shape[-1])
    z = x2 @ w + b
    y, dact = _act64(act, z)
    if saved is not None and act in ("relu", "sigmoid", "tanh"):
        dact = _dact_from_y(act, saved(y))
    dz = dy.reshape(z.shape) * dact
    out = (y.reshape(x.shape[:-1] + (w.shape[1],)), (dz @ w.T).reshape(x.shape),
           x2.T @ dz, dz.sum(0))
    if not scales:
        return out
    adz = np.abs(dz)
    return out, (np.abs(x2) @ np.abs(w) + np.abs(b), adz @ np.abs(w).T, np.abs(x2).T @ adz,
                 adz.sum(0))


def scaled_err(out, ref, scale):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref) + np.linalg.norm(scale), 1e-30))


def make(rng, lead, c, k, bias=True):
    x = rng.standard_normal(lead + (c,)).astype(np.float32)
    w = (rng.standard_normal((c, k)) / np.sqrt(max(c, 1))).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32) if bias else None
    dy = rng.standard_normal(lead + (k,)).astype(np.float32)
    return x, w, b, dy


def check_all(x, w, b, act, dy, fn=dense):
    loss = lambda x, w, b: jnp.sum(fn(x, w, b, activation=act) * dy)
    argnums = (0, 1, 2) if b is not None else (0, 1)
    y = jax.jit(lambda x, w, b: fn(x, w, b, activation=act))(x, w, b)
    grads = jax.jit(jax.grad(loss, argnums))(x, w, b)
    refs, scales = reference(x, w, b, act, dy, scales=True)
    assert y.shape == refs[0].shape and y.dtype == jnp.float32
    for name, g, r, sc in zip(("y", "dx", "dw", "db"), (y,) + tuple(grads), refs, scales):
        assert g.shape == r.shape, name
        assert scaled_err(g, r, sc) < TOL / 2, (name, scaled_err(g, r, sc))


@pytest.mark.parametrize("act", ACTS)
# (128, 512, 10): a classifier head, whose weight gradient goes through dw^T = dz^T @ x.
@pytest.mark.parametrize("n,c,k", [(1, 1, 1), (3, 17, 5), (17, 1023, 3), (1000, 3, 1025),
                                   (65, 1025, 130), (257, 200, 64), (128, 512, 10)])
def test_shapes_and_activations(rng, n, c, k, act):
    check_all(*make(rng, (n,), c, k)[:3], act, make(rng, (n,), c, k)[3])


@pytest.mark.parametrize("n,c,k", [(1023, 1000, 17), (2048, 64, 256), (1, 4096, 1000)])
def test_large_and_skinny(rng, n, c, k):
    x, w, b, dy = make(rng, (n,), c, k)
    check_all(x, w, b, "relu", dy)


def test_every_isa(isa, rng):
    for act in ACTS:
        x, w, b, dy = make(rng, (70,), 129, 67)
        check_all(x, w, b, act, dy)


def test_large_weight_gradient_on_every_isa(isa, streaming, rng):
    """A 16 MB dkernel finished by one kernel call per block, written with non-temporal
    stores (Desc::stream_c) by the paths that have them: still exact."""
    x, w, b, dy = make(rng, (64,), 2048, 2048)
    check_all(x, w, b, "relu", dy)


@pytest.mark.parametrize("act", [None, "gelu"])
def test_no_bias_and_leading_dims(rng, act):
    x, w, _, dy = make(rng, (2, 3, 5), 33, 19, bias=False)
    check_all(x, w, None, act, dy)


def test_one_dim_input(rng):
    x, w, b, dy = make(rng, (), 40, 9)
    check_all(x, w, b, "tanh", dy)


def test_vmap_shared_and_batched_weights(rng):
    x, w, b, _ = make(rng, (4, 6), 21, 11)
    y = jax.vmap(lambda x: dense(x, w, b, activation="relu"))(x)
    assert rel_err(y, reference(x, w, b, "relu", np.zeros((4, 6, 11)))[0]) < TOL
    ws = np.stack([make(rng, (1,), 21, 11)[1] for _ in range(4)])
    bs = rng.standard_normal((4, 11)).astype(np.float32)
    y = jax.jit(jax.vmap(lambda x, w, b: dense(x, w, b, activation="sigmoid")))(x, ws, bs)
    for i in range(4):
        assert rel_err(y[i], reference(x[i], ws[i], bs[i], "sigmoid", np.zeros((6, 11)))[0]) < TOL


def test_grad_of_vmap_and_per_example_grads(rng):
    x, w, b, dy = make(rng, (5, 3), 18, 7)
    _, dx_ref, dw_ref, db_ref = reference(x, w, b, "gelu", dy)

    def loss(x, w, b):
        y = jax.vmap(lambda xi: dense(xi, w, b, activation="gelu"))(x)
        return jnp.sum(y * dy)

    dx, dw, db = jax.jit(jax.grad(loss, (0, 1, 2)))(x, w, b)
    for g, r in ((dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        assert rel_err(g, r) < TOL

    # Per-example weight gradients: vmap over grad.
    per = jax.vmap(jax.grad(lambda w, xi, dyi: jnp.sum(dense(xi, w, b, activation="gelu") * dyi)),
                   in_axes=(None, 0, 0))
    dws = jax.jit(per)(w, x, dy)
    assert dws.shape == (5,) + w.shape
    for i in range(5):
        assert rel_err(dws[i], reference(x[i], w, b, "gelu", dy[i])[2]) < TOL


@pytest.mark.parametrize("argnums", [(0,), (1,), (2,), (1, 2), (0, 2)])
def test_gradients_to_some_inputs_only(rng, argnums):
    """The backward computes only the gradients asked for (the rest are not perturbed):
    each one asked for must still be exact, with or without the others."""
    x, w, b, dy = make(rng, (37,), 70, 45)
    loss = lambda x, w, b: jnp.sum(dense(x, w, b, activation="tanh") * dy)
    grads = jax.jit(jax.grad(loss, argnums))(x, w, b)
    refs, scales = reference(x, w, b, "tanh", dy, scales=True)
    for i, g in zip(argnums, grads):
        assert g.shape == refs[i + 1].shape
        assert scaled_err(g, refs[i + 1], scales[i + 1]) < TOL / 2, i


def test_empty_inputs(rng):
    assert dense(np.zeros((0, 4), np.float32), np.ones((4, 3), np.float32)).shape == (0, 3)
    x = rng.standard_normal((5, 0)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    y = dense(x, np.zeros((0, 3), np.float32), b, activation="relu")
    np.testing.assert_allclose(y, np.broadcast_to(np.maximum(b, 0), (5, 3)))


def test_bad_input():
    x, w = np.ones((4, 8), np.float32), np.ones((8, 3), np.float32)
    with pytest.raises(ValueError, match="kernel's in-features"):
        dense(x, np.ones((7, 3), np.float32))
    with pytest.raises(ValueError, match="bias must have shape"):
        dense(x, w, np.ones((4,), np.float32))
    with pytest.raises(ValueError, match="activation must be one of"):
        dense(x, w, activation="swish")
    with pytest.raises(TypeError, match="x must be float32 or bfloat16, got integer"):
        dense(np.ones((4, 8), np.int32), w)
    with pytest.raises(TypeError, match="kernel must be float32 or bfloat16"):
        dense(x, np.ones((8, 3), np.int8))
    with pytest.raises(TypeError, match="bias must be float32 or bfloat16"):
        dense(x, w, np.ones((3,), np.int32))
    with pytest.raises(ValueError, match="kernel must have shape"):
        dense(x, np.ones((8,), np.float32))
    with pytest.raises(ValueError, match="layers"):
        mlp(x, [])


def _plain_mlp(x, layers):
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i + 1 < len(layers):
            x = jax.nn.relu(x)
    return x


def test_mlp_training_matches_plain_jax(rng):
    """A short optax run: the loss matches the plain-jnp MLP's step by step."""
    sizes = [48, 64, 64, 10]
    params = mlp_init(jax.random.PRNGKey(0), sizes)
    x = jnp.asarray(rng.standard_normal((96, sizes[0])), jnp.float32)
    labels = jnp.asarray(rng.integers(0, sizes[-1], 96))
    opt = optax.adam(1e-2)

    def make_step(forward):
        def loss_fn(params):
            logits = forward(x, params)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        @jax.jit
        def step(params, state):
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        return step

    ours, plain = make_step(mlp), make_step(_plain_mlp)
    p1, s1 = params, opt.init(params)
    p2, s2 = params, opt.init(params)
    losses = []
    for _ in range(15):
        p1, s1, l1 = ours(p1, s1)
        p2, s2, l2 = plain(p2, s2)
        losses.append(float(l1))
        assert abs(float(l1) - float(l2)) <= 1e-4 * max(1.0, abs(float(l2))), (l1, l2)
    assert losses[-1] < 0.7 * losses[0]  # it trains


# ------------------------------------------------------------------ bfloat16
# Inputs are bfloat16-representable; the float64 reference and the float32 path both take
# those same values. The backward's inputs include the saved output, which relu, sigmoid and
# tanh take act' from: the reference rounds it to y's dtype too (as jax_brgemm.brgemm does,
# act' of a bfloat16 y; tanh's 1 - y^2 magnifies y's rounding where |y| is near 1). The
# bfloat16 path may exceed the float32 path's error by 2^-8 (two half-ulps) per rounding to
# bfloat16 a result goes through: y its own (1); dx and dw dz's and their own (2); dbias,
# summed from the float32 dz, its own (1).

BF16, F32 = jnp.bfloat16, jnp.float32
ULP = 2.0 ** -8
ROUNDINGS = {"y": 1, "dx": 2, "dw": 2, "db": 1}


def bf16_make(rng, lead, c, k, bias=True):
    """make()'s arrays rounded to bfloat16 (as bfloat16 jax arrays)."""
    return tuple(None if v is None else jnp.asarray(v, BF16) for v in make(rng, lead, c, k, bias))


def run_dense(x, w, b, act, dy, fn=dense):
    """y and the gradients of sum(y * dy) to (x, w, b), jitted."""
    y = jax.jit(lambda x, w, b: fn(x, w, b, activation=act))(x, w, b)
    loss = lambda x, w, b: jnp.sum(fn(x, w, b, activation=act).astype(F32) * dy)
    argnums = (0, 1, 2) if b is not None else (0, 1)
    return (y,) + tuple(jax.jit(jax.grad(loss, argnums))(x, w, b))


def f32(v):
    return None if v is None else jnp.asarray(v, F32)


def check_bf16(x, w, b, act, dy, fn=dense):
    """x, w, b in the dtypes under test (x's is the compute dtype); dy bfloat16-exact."""
    f64 = lambda v: None if v is None else np.asarray(v, np.float64)
    saved = lambda y: np.asarray(jnp.asarray(y, x.dtype), np.float64)  # y as the backward sees it
    refs = reference(f64(x), f64(jnp.asarray(w, x.dtype)), f64(b), act, f64(dy), saved=saved)
    ours = run_dense(x, w, b, act, f32(dy), fn)
    base = run_dense(f32(x), f32(jnp.asarray(w, x.dtype)), f32(b), act, f32(dy), fn)
    dtypes = (x.dtype, x.dtype, w.dtype) + (() if b is None else (b.dtype,))
    for name, out, out32, ref, dtype in zip(ROUNDINGS, ours, base, refs, dtypes):
        assert out.dtype == dtype and out.shape == ref.shape, (name, out.dtype, out.shape)
        err, err32 = rel_err(out, ref), rel_err(out32, ref)
        assert err <= err32 + ROUNDINGS[name] * ULP, (name, err, err32)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("n,c,k", [(3, 17, 5), (65, 2053, 130), (257, 200, 64), (5, 301, 200),
                                   (2100, 41, 70)])
def test_bf16_shapes_and_activations(rng, n, c, k, act):
    # 2053 > one bfloat16 reduction chunk (2048) and 200 = 3 * 64 + 8 (a tail block): float32
    # partial sums; (5, 301, 200): backward-data through dx^T; n 2100: two weight-update chunks.
    x, w, b, dy = bf16_make(rng, (n,), c, k)
    check_bf16(x, w, b, act, dy)


@pytest.mark.parametrize("n,c,k", [(33, 2048, 1030), (600, 1030, 2048), (2048, 40, 1030)])
def test_bf16_page_strided_rows(rng, n, c, k):
    # A operands whose rows lie a multiple of 4 KB apart, read by >= 16 strips, are copied
    # with a padded stride: x in the forward, dz in backward-data, x^T in the weight-update.
    x, w, b, dy = bf16_make(rng, (n,), c, k)
    check_bf16(x, w, b, "gelu", dy)


def test_bf16_every_isa(isa_bf16, rng):
    for act in (None, "gelu", "sigmoid"):
        x, w, b, dy = bf16_make(rng, (70,), 129, 67)
        check_bf16(x, w, b, act, dy)


@pytest.mark.parametrize("n,c,k", [(2085, 2085, 70), (70, 67, 2085), (9, 600, 2085)])
def test_bf16_split_reductions_on_amx(amx, rng, n, c, k):
    # AMX reads B from VNNI panels packed per reduction chunk, in 32-row pieces: reductions of
    # 2085 (a 2048 chunk and a 37-deep one, not a multiple of 32) in the forward (c),
    # backward-data through W^T (k) and through dz^T (few rows: k again), weight-update (n).
    x, w, b, dy = bf16_make(rng, (n,), c, k)
    check_bf16(x, w, b, "gelu", dy)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_bf16_mixed_params(rng, act):
    """float32 params with bfloat16 x compute in bfloat16 (params cast inside the op), their
    gradients come in float32; bfloat16 params with float32 x compute in float32."""
    x, w, b, dy = bf16_make(rng, (2, 33), 97, 45)
    check_bf16(x, f32(w), f32(b), act, dy)
    check_bf16(x, w, f32(b), act, dy)
    y = dense(f32(x), w, b, activation=act)
    assert y.dtype == F32
    assert rel_err(y, reference(f32(x), f32(w), f32(b), act, f32(dy))[0]) < TOL
    dw = jax.grad(lambda w: jnp.sum(dense(f32(x), w, b, activation=act) * f32(dy)))(w)
    assert dw.dtype == BF16
    assert rel_err(dw, reference(f32(x), f32(w), f32(b), act, f32(dy))[2]) < ULP


def test_bf16_vmap_and_no_bias(rng):
    x, w, b, dy = bf16_make(rng, (4, 6), 21, 11)
    y = jax.jit(jax.vmap(lambda x: dense(x, w, b, activation="tanh")))(x)
    assert y.dtype == BF16
    assert rel_err(y, reference(f32(x), f32(w), f32(b), "tanh", f32(dy))[0]) < 2 * ULP
    ws = jnp.stack([bf16_make(rng, (1,), 21, 11)[1] for _ in range(4)])
    y = jax.jit(jax.vmap(lambda x, w: dense(x, w, b, activation="relu")))(x, ws)
    for i in range(4):
        assert rel_err(y[i], reference(f32(x[i]), f32(ws[i]), f32(b), "relu", f32(dy[i]))[0]) < 2 * ULP
    # grad of vmap with shared weights folds the vmapped axis into the minibatch.
    loss = lambda x, w: jnp.sum(jax.vmap(lambda xi: dense(xi, w, None))(x).astype(F32) * dy)
    dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    _, dx_ref, dw_ref, _ = reference(f32(x), f32(w), None, None, f32(dy))
    assert dx.dtype == dw.dtype == BF16
    assert rel_err(dx, dx_ref) < 2 * ULP and rel_err(dw, dw_ref) < 2 * ULP


def test_bf16_mlp_trains(rng):
    """Mixed precision: float32 params, bfloat16 activations; the loss tracks the float32
    run's and falls."""
    sizes = [48, 64, 64, 10]
    params = mlp_init(jax.random.PRNGKey(0), sizes)
    x = jnp.asarray(rng.standard_normal((96, sizes[0])), F32)
    labels = jnp.asarray(rng.integers(0, sizes[-1], 96))
    opt = optax.adam(1e-2)

    def make_step(dtype):
        def loss_fn(params):
            logits = mlp(x.astype(dtype), params).astype(F32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        @jax.jit
        def step(params, state):
            loss, grads = jax.value_and_grad(loss_fn)(params)
            assert all(g.dtype == F32 for g in jax.tree.leaves(grads))
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        return step

    ours, full = make_step(BF16), make_step(F32)
    p1, s1, p2, s2 = params, opt.init(params), params, opt.init(params)
    losses = []
    for _ in range(10):
        p1, s1, l1 = ours(p1, s1)
        p2, s2, l2 = full(p2, s2)
        losses.append(float(l1))
        assert abs(float(l1) - float(l2)) <= 0.05 * max(1.0, abs(float(l2))), (l1, l2)
    assert losses[-1] < 0.7 * losses[0]
    assert mlp(x.astype(BF16), mlp_init(jax.random.PRNGKey(1), sizes, BF16)).dtype == BF16


def test_bf16_bad_dtypes():
    x, w = jnp.ones((4, 8), BF16), jnp.ones((8, 3), BF16)
    with pytest.raises(TypeError, match="x must be float32 or bfloat16, got float16"):
        dense(jnp.ones((4, 8), jnp.float16), w)
    with pytest.raises(TypeError, match="kernel must be float32 or bfloat16, got integer"):
        dense(x, jnp.ones((8, 3), jnp.int32))
    with pytest.raises(TypeError, match="bias must be float32 or bfloat16, got float16"):
        dense(x, w, jnp.ones((3,), jnp.float16))
    with pytest.raises(TypeError, match="x must be float32 or bfloat16, got float64"):
        dense(np.ones((4, 8)), w)


def test_bf16_empty_reduction():
    b = jnp.asarray([1.0, -2.0, 3.0], BF16)
    x, w = jnp.zeros((5, 0), BF16), jnp.zeros((0, 3), F32)
    y = dense(x, w, b, activation="relu")
    assert y.dtype == BF16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.broadcast_to([1, 0, 3], (5, 3)))
    loss = lambda x, w, b: jnp.sum(dense(x, w, b, activation="relu").astype(F32))
    dx, dw, db = jax.grad(loss, (0, 1, 2))(x, w, b)
    assert (dx.dtype, dw.dtype, db.dtype) == (BF16, F32, BF16)
    np.testing.assert_array_equal(np.asarray(db, np.float32), [5, 0, 5])
    assert dense(jnp.zeros((0, 4), BF16), jnp.ones((4, 3), F32)).dtype == BF16


def test_second_order_derivatives(rng):
    """Gradients of gradients (once refused with a NotImplementedError) equal those of the
    lax reference."""
    x = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(dense(x, w, activation="tanh") ** 2))
    ref = jax.grad(lambda x: jnp.sum(jnp.tanh(x @ w) ** 2))
    gg = jax.grad(lambda x: jnp.sum(grad(x) ** 2))(x)
    gg_ref = jax.grad(lambda x: jnp.sum(ref(x) ** 2))(x)
    assert rel_err(gg, gg_ref) < 1e-5, rel_err(gg, gg_ref)


@pytest.mark.parametrize("n", [4, 4096])  # a small call (a task on XLA's pool) and a large one
def test_handler_errors_reach_python(n):
    """Operands inconsistent with the results (only possible by calling the FFI target
    directly) are a clear runtime error from the handler, whether the call would run as a
    task or in the handler."""
    x = jnp.ones((n, 8), jnp.float32)
    w = jnp.ones((7, 3000), jnp.float32)  # 7 != 8 in-features
    outs = (jax.ShapeDtypeStruct((n, 3000), jnp.float32), jax.ShapeDtypeStruct((0,), jnp.float32))
    call = jax.ffi.ffi_call("jax_brgemm_dense_fwd", outs)
    with pytest.raises(jax.errors.JaxRuntimeError, match="kernel must have shape"):
        jax.block_until_ready(call(x, w, jnp.zeros((0,), jnp.float32), activation="none"))
    dy = jnp.ones((n, 3000), jnp.float32)
    outs = (jax.ShapeDtypeStruct((n, 8), jnp.float32), jax.ShapeDtypeStruct((0,), jnp.float32),
            jax.ShapeDtypeStruct((0,), jnp.float32))
    call = jax.ffi.ffi_call("jax_brgemm_dense_bwd", outs)
    with pytest.raises(jax.errors.JaxRuntimeError, match="kernel must have shape"):
        jax.block_until_ready(call(dy, x, w, jnp.zeros((0,), jnp.float32), activation="none"))
