"""The worker team (cpp/primitives/parallel.cc) under its thread settings: workers that park
at once and must be woken for every call, a team of one (XLA told to use one thread), and
calls made from several Python threads at once. Every task is also offered to XLA's pool, so
copies that start after their loop (or their call) has finished must find nothing to do.
An LSTM call runs a parallel loop per time step, a convolution several parallel loops
(weight packing, then the rows). Each setting runs in a fresh interpreter,
since the team reads its settings once per process."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import threading, time
    import numpy as np, jax, jax.numpy as jnp
    from jax_brgemm import nn

    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 300)).astype(np.float32)
    w = (rng.standard_normal((300, 260)) / 17).astype(np.float32)
    b = rng.standard_normal(260).astype(np.float32)
    want = np.maximum(x.astype(np.float64) @ w + b, 0)
    loss = jax.jit(jax.grad(lambda x, w, b: jnp.sum(nn.dense(x, w, b, activation="relu") ** 2), (0, 1, 2)))
    want_grads = [np.asarray(g) for g in jax.grad(
        lambda x, w, b: jnp.sum(jax.nn.relu(x @ w + b) ** 2), (0, 1, 2))(x, w, b)]
    xs = rng.standard_normal((5, 9, 40)).astype(np.float32)  # (N, T, C)
    w_ih = (rng.standard_normal((40, 4 * 70)) / 7).astype(np.float32)
    w_hh = (rng.standard_normal((70, 4 * 70)) / 9).astype(np.float32)
    lb = rng.standard_normal(4 * 70).astype(np.float32)

    def lstm_reference():
        sig = lambda v: 1 / (1 + np.exp(-v))
        h = c = np.zeros((5, 70))
        hs = []
        for t in range(9):
            i, f, g, o = np.split(xs[:, t].astype(np.float64) @ w_ih + h @ w_hh + lb, 4, axis=1)
            c = sig(f) * c + sig(i) * np.tanh(g)
            h = sig(o) * np.tanh(c)
            hs.append(h)
        return np.stack(hs, axis=1)

    want_hs = lstm_reference()
    lstm = jax.jit(lambda *a: nn.lstm(*a)[0])
    img = rng.standard_normal((2, 12, 12, 24)).astype(np.float32)
    kern = (rng.standard_normal((3, 3, 24, 40)) / 15).astype(np.float32)
    conv = jax.jit(lambda x, k: nn.conv2d(x, k, padding="SAME"))
    want_conv = np.asarray(jax.lax.conv_general_dilated(
        img.astype(np.float64), kern.astype(np.float64), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC")))
    failures = []

    def check(rounds):
        for _ in range(rounds):
            y = np.asarray(jax.jit(lambda x, w, b: nn.dense(x, w, b, activation="relu"))(x, w, b))
            if not np.allclose(y, want, rtol=1e-4, atol=1e-4):
                failures.append("forward")
            for got, ref in zip(loss(x, w, b), want_grads):
                if not np.allclose(np.asarray(got), ref, rtol=1e-3, atol=1e-3):
                    failures.append("gradient")
            if not np.allclose(np.asarray(lstm(xs, w_ih, w_hh, lb)), want_hs, rtol=1e-4, atol=1e-4):
                failures.append("lstm")
            if not np.allclose(np.asarray(conv(img, kern)), want_conv, rtol=1e-4, atol=1e-4):
                failures.append("conv")
            time.sleep(0.003)  # longer than the polling time below: workers park

    threads = [threading.Thread(target=check, args=(5,)) for _ in range(3)]
    for t in threads: t.start()
    check(5)
    for t in threads: t.join()
    print("failures", failures)
""")


@pytest.mark.parametrize("env", [
    {"JAX_BRGEMM_SPIN_US": "0"},        # park at once: every call wakes its workers
    {"JAX_BRGEMM_SPIN_US": "300"},      # the default polling
    {"JAX_BRGEMM_LINGER_US": "5000"},   # workers keep polling between calls
    {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"},
], ids=["park-at-once", "default-polling", "linger", "one-thread"])
def test_calls_from_many_threads_are_right_under_every_thread_setting(env):
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu", **env))
    assert result.returncode == 0, result.stderr
    assert "failures []" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("var", ["JAX_BRGEMM_SPIN_US", "JAX_BRGEMM_LINGER_US"])
@pytest.mark.parametrize("value", ["-5", "1.5", "fast", ""])
def test_bad_polling_setting_is_a_clear_error(var, value):
    result = subprocess.run([sys.executable, "-c", "import jax_brgemm"], capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu", **{var: value}))
    assert result.returncode != 0 and var in result.stderr, result.stderr


@pytest.mark.parametrize("n, threads, item_us", [
    (0, 2, 0), (1, 2, 0), (2, 2, 0), (7, 8, 0), (1000, 2, 5), (1000, 4, 5), (100003, 3, 0),
    ((1 << 16) + 1, 8, 0)])
def test_parallel_loop_runs_every_item_once(n, threads, item_us):
    from jax_brgemm._ext import ext
    runners = ext.testing.parallel_for_runners(n, threads, item_us)
    assert len(runners) == n
    assert all(0 <= r < threads for r in runners), sorted(set(runners))


def test_parallel_loop_gives_each_thread_contiguous_items():
    """Neighbouring items (rows of one image, blocks of one panel) share data: on two
    threads each runs its own half front to back and then takes the other's last items,
    so the loop is at most four runs of one thread each, whoever joins late."""
    from jax_brgemm._ext import ext
    for item_us in (0, 20):
        runners = ext.testing.parallel_for_runners(2000, 2, item_us)
        assert set(runners) <= {0, 1}
        runs = 1 + sum(a != b for a, b in zip(runners, runners[1:]))
        assert runs <= 4, runs


@pytest.mark.parametrize("threads", [2, 3])
def test_late_copies_of_a_task_add_no_thread(threads):
    """Every task is offered twice (the team and XLA's pool): the copies that start first
    take the ranges, one thread each, and a later copy returns at once instead of joining
    as an extra thief (which ran loops on three threads on two cores)."""
    from jax_brgemm._ext import ext
    runners = ext.testing.parallel_for_runners(2000, threads, 10, second_copies=True)
    assert all(r >= 0 for r in runners), "an item did not run exactly once"
    assert len(set(runners)) <= threads, sorted(set(runners))
