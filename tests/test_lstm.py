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
BF16 = jnp.bfloat16


def round_value(v):
    """v rounded to bfloat16 (kept in v's dtype), with an identity derivative: the rounding
    of h_t that the bfloat16 op does when it stores hs."""
    return v + jax.lax.stop_gradient(v.astype(BF16).astype(v.dtype) - v)


@jax.custom_vjp
def round_cotangent(v):
    """Identity whose cotangent is rounded to bfloat16: where the bfloat16 op rounds a
    gradient (an output's cotangent arriving in bfloat16, the gate gradients before the
    products that consume them)."""
    return v


round_cotangent.defvjp(lambda v: (v, None), lambda _, g: (g.astype(BF16).astype(g.dtype),))


def scan_lstm(x, w_ih, w_hh, bias, h0, c0, time_major=False, bf16_rounding=False):
    """Plain-JAX reference (any float dtype), gate order i, f, g, o. bf16_rounding: round
    where the bfloat16 op rounds (h_t between steps, the gate gradients before the
    products); everything else stays in the reference's dtype."""
    K = w_hh.shape[0]
    xs = x if time_major else jnp.swapaxes(x, 0, 1)

    def step(carry, xt):
        h, c = carry
        z = xt @ w_ih + h @ w_hh
        if bf16_rounding:
            z = round_cotangent(z)
        z = z + bias
        i, f, o = (jax.nn.sigmoid(z[:, j * K:(j + 1) * K]) for j in (0, 1, 3))
        c = f * c + i * jnp.tanh(z[:, 2 * K:3 * K])
        h = o * jnp.tanh(c)
        if bf16_rounding:
            h = round_value(h)
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
        # float32 at least (bfloat16 outputs are widened, float64 references stay float64)
        hs, c, h = (v.astype(jnp.promote_types(v.dtype, jnp.float32)) for v in (hs, c, h))
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
        out_ref = jax.jit(ref)(*args64)
        grads_ref = jax.jit(jax.grad(loss_of(ref, w64), argnums=tuple(range(n_args))))(*args64)
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
        (TypeError, "x", (x.astype(np.float16), w_ih, w_hh, bias)),
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


# ------------------------------------------------------------------ bfloat16
# The reference is the float64 scan on the same bfloat16-rounded inputs, with the op's own
# roundings replayed (h_t rounded to bfloat16 between steps; the cotangents of bfloat16
# outputs and the gate gradients rounded before the products that consume them). What it
# cannot replay: float32 sums and float32 gate math (the float32 path's TOL), a rounding
# landing on the other neighbour where those differ by a hair (rare; each such flip moves
# one element by one bfloat16 step and propagates from there), and the final rounding of a
# bfloat16 output (at most 2^-9 relative per element). So every output and gradient must be
# within TOL + 2^-8 of the reference: the float32 path's error plus one bfloat16 rounding.
BF16_TOL = TOL + 2.0 ** -8


def check_bf16_against_reference(rng, N, T, C, K, time_major, with_states, mixed):
    """mixed: float32 weights, bias and states with bfloat16 x (Flax's param_dtype =
    float32, dtype = bfloat16); else every input bfloat16."""
    args = make_inputs(rng, N, T, C, K, time_major)[:6 if with_states else 4]
    args = [a.astype(BF16) if (i == 0 or not mixed) else a for i, a in enumerate(args)]
    n_args = len(args)
    hs_shape = (T, N, K) if time_major else (N, T, K)
    weights = [rng.standard_normal(s).astype(np.float32) for s in (hs_shape, (N, K), (N, K))]

    def ours(*a):
        return lstm(*a, time_major=time_major)

    out = jax.jit(ours)(*args)
    grads = jax.jit(jax.grad(loss_of(ours, weights), argnums=tuple(range(n_args))))(*args)
    # Output dtypes: hs in x's, c_T in c0's (float32 without c0), h_T in h0's (x's without).
    c_dtype = args[5].dtype if with_states else np.float32
    h_dtype = args[4].dtype if with_states else BF16
    assert [o.dtype for o in jax.tree.leaves(out)] == [BF16, c_dtype, h_dtype]
    assert [g.dtype for g in grads] == [a.dtype for a in args]

    def ref(*a):
        if not with_states:
            a = a + (jnp.zeros((N, K), a[0].dtype),) * 2
        # The op casts w_ih, w_hh and h0 to bfloat16 (the compute dtype); bias and c0 stay.
        x, w_ih, w_hh, bias, h0, c0 = a
        a = (x, round_value(w_ih), round_value(w_hh), bias, round_value(h0), c0)
        hs, (c, h) = scan_lstm(*a, time_major=time_major, bf16_rounding=True)
        # The op's outputs in bfloat16 get their cotangents in bfloat16.
        c = round_cotangent(c) if c_dtype == BF16 else c
        h = round_cotangent(h) if h_dtype == BF16 else h
        return round_cotangent(hs), (c, h)

    with jax.enable_x64(True):
        args64 = [jnp.asarray(np.asarray(a, np.float64)) for a in args]
        w64 = [jnp.asarray(w, jnp.float64) for w in weights]
        out_ref = jax.jit(ref)(*args64)
        grads_ref = jax.jit(jax.grad(loss_of(ref, w64), argnums=tuple(range(n_args))))(*args64)
        out_ref, grads_ref = jax.tree.map(np.asarray, (out_ref, grads_ref))
    errors = {}
    for name, o, r in zip(("hs", "c_T", "h_T"), jax.tree.leaves(out), jax.tree.leaves(out_ref)):
        errors[name] = rel_err(o, r)
    for name, g, r in zip(("x", "w_ih", "w_hh", "bias", "h0", "c0"), grads, grads_ref):
        assert g.shape == r.shape, name
        errors["d" + name] = rel_err(g, r)
    bad = {k: v for k, v in errors.items() if not v < BF16_TOL}
    assert not bad, f"errors above {BF16_TOL:.2e}: {bad} (all: {errors})"
    return errors


@pytest.mark.parametrize(
    "N, T, C, K, time_major, with_states, mixed",
    [
        (1, 1, 1, 1, False, False, False),
        (5, 7, 17, 33, True, True, True),
        (5, 50, 3, 17, False, True, False),
        (64, 7, 100, 64, True, False, True),
        (3, 2, 65, 100, False, True, False),
    ],
)
def test_bf16_matches_reference(rng, N, T, C, K, time_major, with_states, mixed):
    check_bf16_against_reference(rng, N, T, C, K, time_major, with_states, mixed)


def test_bf16_every_isa(isa_bf16, rng):
    check_bf16_against_reference(rng, 5, 7, 17, 40, True, True, False)


def test_bf16_split_reductions_on_amx(amx, rng):
    # AMX reads B from VNNI panels in 32-row pieces, so reductions longer than one chunk
    # (1024) split at multiples of 32: C = 1100 (x W_ih), 4K = 1204 (dh and dx through the
    # W^T panels) and T N = 1110 (the weight gradients), none a multiple of 32.
    check_bf16_against_reference(rng, 37, 30, 1100, 301, False, True, False)


def test_bf16_mixed_states(rng):
    # bfloat16 x and weights with a float32 cell state and a bfloat16 hidden state (and the
    # reverse): each state's gradient and carried-out value keep its dtype.
    x, w_ih, w_hh, bias, h0, c0 = make_inputs(rng, 3, 4, 5, 7, False)
    for h_dtype, c_dtype in ((BF16, np.float32), (np.float32, BF16)):
        args = (x.astype(BF16), w_ih.astype(BF16), w_hh.astype(BF16), bias, h0.astype(h_dtype),
                c0.astype(c_dtype))
        _, (c, h) = lstm(*args)
        assert (c.dtype, h.dtype) == (c_dtype, h_dtype)
        grads = jax.grad(lambda *a: jnp.sum(lstm(*a)[1][0].astype(np.float32) ** 2),
                         argnums=(0, 1, 2, 3, 4, 5))(*args)
        assert [g.dtype for g in grads] == [a.dtype for a in args]


def test_bf16_bad_dtypes(rng):
    x, w_ih, w_hh, bias, h0, c0 = (a.astype(BF16) for a in make_inputs(rng, 2, 3, 4, 5, False))
    cases = [
        ("x", (x.astype(np.float16), w_ih, w_hh, bias)),
        ("w_ih", (x, w_ih.astype(np.int32), w_hh, bias)),
        ("w_hh", (x, w_ih, w_hh.astype(np.float64), bias)),
        ("bias", (x, w_ih, w_hh, bias.astype(np.float16))),
        ("h0", (x, w_ih, w_hh, bias, h0.astype(np.float16))),
        ("c0", (x, w_ih, w_hh, bias, h0, c0.astype(np.int8))),
    ]
    for name, args in cases:
        with pytest.raises(TypeError, match=f"{name} must be float32 or bfloat16"):
            lstm(*args)


def test_bf16_vmap_and_time_major_agree(rng):
    # vmap folds into N and the time-major layout gives the same values, in bfloat16 too.
    B, N, T, C, K = 2, 3, 4, 5, 33
    per = [make_inputs(rng, N, T, C, K, False) for _ in range(B)]
    xs = np.stack([p[0] for p in per]).astype(BF16)
    w_ih, w_hh, bias = (a.astype(BF16) for a in per[0][1:4])
    out = jax.jit(jax.vmap(lambda x: lstm(x, w_ih, w_hh, bias)))(xs)
    for b in range(B):
        expect = lstm(xs[b], w_ih, w_hh, bias)
        tm = lstm(np.swapaxes(xs[b], 0, 1), w_ih, w_hh, bias, time_major=True)
        # |h| < 1: at most one bfloat16 step (2^-8) apart, where float32 sums in another
        # order land a rounding on the other neighbour.
        for got in (out[0][b], np.swapaxes(tm[0], 0, 1)):
            np.testing.assert_allclose(np.float32(got), np.float32(expect[0]), rtol=0, atol=2.0 ** -8)


def test_second_order_derivatives_are_a_clear_error(rng):
    x = jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32)
    w_ih, w_hh, bias = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(4, 8), (2, 8), (8,)])
    grad = jax.grad(lambda x: jnp.sum(lstm(x, w_ih, w_hh, bias)[0] ** 2))
    assert grad(x).shape == x.shape  # first order works
    with pytest.raises(NotImplementedError, match="lstm: second-order"):
        jax.grad(lambda x: jnp.sum(grad(x)))(x)
