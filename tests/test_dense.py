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


def reference(x, w, b, act, dy):
    """float64 forward and the analytic gradients of sum(y * dy)."""
    x, w, dy = (np.asarray(v, np.float64) for v in (x, w, dy))
    x2 = x.reshape(-1, x.shape[-1])
    z = x2 @ w + (0 if b is None else np.asarray(b, np.float64))
    y, dact = _act64(act, z)
    dz = dy.reshape(z.shape) * dact
    return (y.reshape(x.shape[:-1] + (w.shape[1],)), (dz @ w.T).reshape(x.shape),
            x2.T @ dz, dz.sum(0))


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
    y_ref, dx_ref, dw_ref, db_ref = reference(x, w, b, act, dy)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert rel_err(y, y_ref) < TOL, ("y", rel_err(y, y_ref))
    for name, g, r in zip(("dx", "dw", "db"), grads, (dx_ref, dw_ref, db_ref)):
        assert g.shape == r.shape, name
        assert rel_err(g, r) < TOL, (name, rel_err(g, r))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("n,c,k", [(1, 1, 1), (3, 17, 5), (17, 1023, 3), (1000, 3, 1025),
                                   (65, 1025, 130), (257, 200, 64)])
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
    with pytest.raises(TypeError, match="x must be float32, got integer"):
        dense(np.ones((4, 8), np.int32), w)
    with pytest.raises(TypeError, match="kernel must be float32"):
        dense(x, np.ones((8, 3), np.int8))
    with pytest.raises(TypeError, match="bias must be float32"):
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
