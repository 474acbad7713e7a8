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
