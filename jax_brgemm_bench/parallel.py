"""Data-parallel training step: 2 host devices (one per core) against 1 device with the same
global batch, for flax_layers and for the stock Flax model sharded the same way.

    python -m jax_brgemm bench parallel [--json] [--steps S] [--batch B]

Each configuration runs examples/data_parallel.py in its own process (the device count is
fixed when JAX starts) and reports its median step time. Needs the source tree (examples/).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from .common import print_records

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "data_parallel.py")


def step_ms(model: str, devices: int, stock: bool, steps: int, batch: int) -> float:
    args = [sys.executable, EXAMPLE, "--devices", str(devices), "--model", model,
            "--steps", str(steps), "--batch", str(batch)] + (["--stock"] if stock else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout
    return float(re.search(r"step_ms (\S+)", out).group(1))


# `bench all` arguments (see __init__.py): --quick takes a few small steps.
QUICK_ARGS = ["--steps", "3", "--batch", "64"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m jax_brgemm bench parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=512)
    args = p.parse_args(argv)
    if not os.path.exists(EXAMPLE):
        sys.exit("bench parallel needs the source tree's examples/data_parallel.py")
    records = []
    for model in ("mlp", "cnn"):
        t = {(d, s): step_ms(model, d, s, args.steps, args.batch) for d in (1, 2) for s in (False, True)}
        records.append(dict(model=model, batch=args.batch,
                            ours_1dev_ms=t[1, False], ours_2dev_ms=t[2, False],
                            scaling=t[1, False] / t[2, False],
                            stock_2dev_ms=t[2, True], vs_stock_2dev=t[2, True] / t[2, False],
                            stock_1dev_ms=t[1, True]))
    print_records(records, list(records[0]), args.json,
                  "data-parallel training step (median ms), global batch fixed; scaling = 1 device / 2 devices")


if __name__ == "__main__":
    main()
