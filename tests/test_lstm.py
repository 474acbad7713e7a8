"""jax_brgemm.nn.lstm against a float64 lax.scan LSTM: forward, every gradient, layouts,
initial states, ISA paths, jit/vmap, bad input, and a short training run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import rel_err
from jax_brgemm.nn import lstm

TOL = 1e-5


def scan_lstm(x, w_ih, w_hh, bias, h0, c0, time_major=False):
    """Plain-JAX reference (any float dtype), gate order i, f, g, o."""
    K = w_hh.shape[0]
    xs = x if time_major else jnp.swapaxes(x, 0, 1)

    def step(carry, xt):
        h, c = carry
        z = xt @ w_ih + h @ w_hh + bias
        i, f, o = (jax.nn.sigmoid(z[:, j * K:(j + 1) * K]) for j in (0, 1, 3))
        c = f * c + i * jnp.tanh(z[:, 2 * K:3 * K])
        h = o * jnp.tanh(c)
        return (h, c), h

    (h, c), hs = jax.lax.scan(step, (h0, c0), xs)
    return (hs if time_major else jnp.swapaxes(hs, 0, 1)), (c, h)


def make_inputs(rng, N, T, C, K, time_major, scale=1.0):
    x = rng.standard_normal((T, N, C) if time_major else (N, T, C))
    w_ih = scale * rng.standard_normal((C, 4 * K)) / np.sqrt(C)
    w_hh = scale * rng.standard_normal((K, 4 * K)) / np.sqrt(K)
    bias = 0.5 * rng.standard_normal(4 * K)
    h0 = rng.standard_normal((N, K))
    c0 = rng.standard_normal((N, K))
    return [a.astype(np.float32) for a in (x, w_ih, w_hh, bias, h0, c0)]


def loss_of(fn, weights):
    """A loss touching hs, c_T and h_T with random weights (so no gradient is trivial)."""
    w_hs, w_c, w_h = weights

    def loss(*args):
        hs, (c, h) = fn(*args)
        return jnp.sum(jnp.sin(hs) * w_hs) + jnp.sum(c * w_c) + jnp.sum(h * h * w_h)

    return loss


def check_against_reference(rng, N, T, C, K, time_major, with_states):
    args = make_inputs(rng, N, T, C, K, time_major)
    n_args = 6 if with_states else 4
    args = args[:n_args]
    hs_shape = (T, N, K) if time_major else (N, T, K)
    weights = [rng.standard_normal(s).astype(np.float32) for s in (hs_shape, (N, K), (N, K))]

    def ours(*a):
        return lstm(*a, time_major=time_major)

    def ref(*a):
        if not with_states:
            a = a + (jnp.zeros((N, K), a[0].dtype),) * 2
        return scan_lstm(*a, time_major=time_major)

    out = jax.jit(ours)(*args)
    grads = jax.jit(jax.grad(loss_of(ours, weights), argnums=tuple(range(n_args))))(*args)
    with jax.enable_x64(True):
        args64 = [jnp.asarray(a, jnp.float64) for a in args]
        w64 = [jnp.asarray(w, jnp.float64) for w in weights]
        out_ref = ref(*args64)
        grads_ref = jax.grad(loss_of(ref, w64), argnums=tuple(range(n_args)))(*args64)
        out_ref, grads_ref = jax.tree.map(np.asarray, (out_ref, grads_ref))
    assert out[0].shape == hs_shape and out[1][0].shape == (N, K) and out[1][1].shape == (N, K)
    for name, o, r in zip(("hs", "c_T", "h_T"), jax.tree.leaves(out), jax.tree.leaves(out_ref)):
        assert rel_err(o, r) < TOL, name
    for name, g, r in zip(("x", "w_ih", "w_hh", "bias", "h0", "c0"), grads, grads_ref):
        assert g.shape == r.shape, name
        assert rel_err(g, r) < TOL, f"d{name}"


@pytest.mark.parametrize(
    "N, T, C, K, time_major, with_states",
    [
        (1, 1, 1, 1, False, False),
        (5, 2, 3, 17, True, True),
        (5, 7, 17, 3, False, True),
        (64, 7, 100, 64, True, False),
        (5, 50, 64, 100, False, True),
        (1, 50, 3, 17, True, True),
        (64, 2, 17, 100, False, False),
    ],
)
def test_matches_reference(rng, N, T, C, K, time_major, with_states):
    check_against_reference(rng, N, T, C, K, time_major, with_states)


@pytest.mark.parametrize("time_major", [False, True])
def test_every_isa(isa, rng, time_major):
    check_against_reference(rng, 5, 7, 17, 100, time_major, with_states=time_major)


def test_large_activations_saturate_like_reference(rng):
    # Large weights push the gates into saturation, where sigmoid/tanh tails matter.
    args = make_inputs(rng, 5, 7, 17, 64, False, scale=6.0)
    out = jax.jit(lstm)(*args)
    with jax.enable_x64(True):
        ref = jax.tree.map(np.asarray, scan_lstm(*(jnp.asarray(a, jnp.float64) for a in args)))
    for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        assert rel_err(o, r) < TOL


@pytest.mark.parametrize("time_major", [False, True])
def test_vmap_folds_into_batch(rng, time_major):
    B, N, T, C, K = 3, 5, 4, 17, 33
    per = [make_inputs(rng, N, T, C, K, time_major) for _ in range(B)]
    xs = np.stack([p[0] for p in per])
    h0s = np.stack([p[4] for p in per])
    w_ih, w_hh, bias, c0 = per[0][1], per[0][2], per[0][3], per[0][5]

    def f(x, h0):
        return lstm(x, w_ih, w_hh, bias, h0, c0, time_major=time_major)

    out = jax.jit(jax.vmap(f))(xs, h0s)
    for b in range(B):
        expect = f(xs[b], h0s[b])
        for o, e in zip(jax.tree.leaves(out), jax.tree.leaves(expect)):
            np.testing.assert_allclose(o[b], e, rtol=1e-5, atol=1e-6)
    # Per-example gradients through the vmapped op, weights included.
    g = jax.jit(jax.vmap(jax.grad(lambda x, w: jnp.sum(lstm(x, w, w_hh, bias, time_major=time_major)[0] ** 2),
                                  argnums=(0, 1)), in_axes=(0, None)))(xs, w_ih)
    for b in range(B):
        e = jax.grad(lambda x, w: jnp.sum(lstm(x, w, w_hh, bias, time_major=time_major)[0] ** 2),
                     argnums=(0, 1))(xs[b], w_ih)
        for o, ee in zip(g, e):
            np.testing.assert_allclose(o[b], ee, rtol=1e-5, atol=1e-6)


def test_vmap_over_weights(rng):
    N, T, C, K = 3, 4, 5, 7
    per = [make_inputs(rng, N, T, C, K, False) for _ in range(2)]
    x = per[0][0]
    w_ihs = np.stack([p[1] for p in per])
    out = jax.vmap(lambda w: lstm(x, w, per[0][2], per[0][3])[0])(w_ihs)
    for b in range(2):
        np.testing.assert_allclose(out[b], lstm(x, w_ihs[b], per[0][2], per[0][3])[0], rtol=1e-5, atol=1e-6)


def test_bad_input(rng):
    x, w_ih, w_hh, bias, h0, c0 = make_inputs(rng, 2, 3, 4, 5, False)
    cases = [
        (TypeError, "x", (x.astype(np.float64), w_ih, w_hh, bias)),
        (TypeError, "x", (x.astype(jnp.bfloat16), w_ih, w_hh, bias)),
        (TypeError, "x", (x.astype(np.int32), w_ih, w_hh, bias)),
        (TypeError, "w_hh", (x, w_ih, w_hh.astype(np.float16), bias)),
        (TypeError, "bias", (x, w_ih, w_hh, bias.astype(np.int8))),
        (TypeError, "h0", (x, w_ih, w_hh, bias, h0.astype(np.int32))),
        (ValueError, "x", (x[0], w_ih, w_hh, bias)),
        (ValueError, "time step", (x[:, :0], w_ih, w_hh, bias)),
        (ValueError, "w_ih", (x, w_ih[1:], w_hh, bias)),
        (ValueError, "w_ih", (x, w_ih[:, 1:], w_hh, bias)),
        (ValueError, "w_hh", (x, w_ih, w_hh[1:], bias)),
        (ValueError, "bias", (x, w_ih, w_hh, bias[1:])),
        (ValueError, "h0", (x, w_ih, w_hh, bias, h0[1:])),
        (ValueError, "c0", (x, w_ih, w_hh, bias, h0, c0[:, 1:])),
    ]
    for error, name, args in cases:
        with pytest.raises(error, match=name):
            lstm(*args)
    with pytest.raises(ValueError, match="h0"):  # time-major: N is x's second dim
        lstm(np.swapaxes(x, 0, 1), w_ih, w_hh, bias, h0[:, :1].repeat(3, 0)[:3], time_major=True)


def test_training_matches_plain_jax(rng):
    """A small sequence model (LSTM + linear readout) trained with Adam: the loss follows
    the plain-JAX model's step by step."""
    N, T, C, K = 8, 10, 6, 16
    x = rng.standard_normal((N, T, C)).astype(np.float32)
    y = np.cumsum(x[..., :1], axis=1).astype(np.float32) * 0.3  # a running-sum target
    init = make_inputs(rng, 1, 1, C, K, False)
    params = {"w_ih": init[1], "w_hh": init[2], "bias": init[3],
              "w_out": (rng.standard_normal((K, 1)) / np.sqrt(K)).astype(np.float32)}

    def model_loss(fn):
        def loss(p):
            hs, _ = fn(x, p["w_ih"], p["w_hh"], p["bias"])
            return jnp.mean((hs @ p["w_out"] - y) ** 2)
        return loss

    def ref_fn(x, w_ih, w_hh, bias):
        zeros = jnp.zeros((x.shape[0], w_hh.shape[0]), jnp.float32)
        return scan_lstm(x, w_ih, w_hh, bias, zeros, zeros)

    opt = optax.adam(1e-2)

    def train(fn, steps=15):
        loss = model_loss(fn)

        @jax.jit
        def update(p, state):
            value, grads = jax.value_and_grad(loss)(p)
            updates, state = opt.update(grads, state, p)
            return optax.apply_updates(p, updates), state, value

        p, state, losses = params, opt.init(params), []
        for _ in range(steps):
            p, state, value = update(p, state)
            losses.append(float(value))
        return np.array(losses)

    ours, ref = train(lstm), train(ref_fn)
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    assert ours[-1] < 0.8 * ours[0]  # it did learn
