"""Data parallelism: the custom calls split along the batch under jit with sharded inputs,
across host devices and across processes (each in a fresh interpreter)."""

import os
import re
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")


def run(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_four_host_devices_match_one_and_never_gather_the_batch():
    result = run("devices", 4)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "explicit ok" in result.stdout and "attention heads ok" in result.stdout
    assert "devices ok" in result.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(output):
    match = re.search(r"loss (\S+) grad_norm (\S+)", output)
    assert match, output
    return float(match.group(1)), float(match.group(2))


def test_two_processes_give_the_same_loss_as_one():
    single = run("process", 0, 1, free_port())
    assert single.returncode == 0, single.stdout + single.stderr
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, WORKER, "process", str(i), "2", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
        outputs.append(parse(out))
    want = parse(single.stdout)
    for got in outputs:
        np.testing.assert_allclose(got, want, rtol=1e-5)


EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "data_parallel.py")


def run_example(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, EXAMPLE, *map(str, args)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"final_loss (\S+)", result.stdout)
    assert match, result.stdout
    return float(match.group(1))


def test_example_training_two_devices_and_two_processes_match_one_device():
    one = run_example("--devices", 1, "--model", "cnn", "--steps", 3, "--batch", 64)
    two = run_example("--devices", 2, "--model", "cnn", "--steps", 3, "--batch", 64)
    np.testing.assert_allclose(two, one, rtol=1e-5)
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, EXAMPLE, "--model", "cnn", "--steps", "3", "--batch", "64",
                               "--num-processes", "2", "--process-id", str(i),
                               "--coordinator", f"127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out + err
    np.testing.assert_allclose(float(re.search(r"final_loss (\S+)", outputs[0][0]).group(1)), one, rtol=1e-5)
