"""What every benchmark shares: timing, the measured peak, the optional PyTorch peer and
table / JSON output. Times are medians of repeated runs; report ratios, not absolutes."""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from typing import Callable, Sequence

import jax


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def core_peak_gflops(isa: str = "") -> float:
    """Single-core float32 peak measured by the packaged FMA loop (best of 3 runs)."""
    from jax_brgemm._ext import ext

    return max(ext.testing.fma_peak_gflops(isa, 0.2) for _ in range(3))


def machine_peak_gflops() -> float:
    return core_peak_gflops() * num_cores()


def median_seconds(fn: Callable[[], object], repeats: int = 7, min_seconds: float = 0.05,
                   clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time of fn() (which must block until its result is ready) by `clock`: wall
    time by default."""
    fn()  # compile / warm up
    inner = 1
    while True:
        start = clock()
        for _ in range(inner):
            fn()
        if clock() - start >= min_seconds or inner >= 1 << 16:
            break
        inner *= 2
    samples = []
    for _ in range(repeats):
        start = clock()
        for _ in range(inner):
            fn()
        samples.append((clock() - start) / inner)
    return statistics.median(samples)


def median_seconds_alternating(fns: dict, repeats: int = 7, min_seconds: float = 0.05) -> dict:
    """{name: median wall time of fns[name]()} with the functions run in alternating rounds
    (each round times every function once, over enough calls to last `min_seconds`), so a
    change in the machine's speed or load during the run reaches every function alike."""
    inner = {}
    for name, fn in fns.items():
        fn()  # compile / warm up
        inner[name] = 1
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        while inner[name] * once < min_seconds and inner[name] < 1 << 16:
            inner[name] *= 2
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def median_cpu_seconds(fn: Callable[[], object], repeats: int = 3, min_seconds: float = 0.03) -> float:
    """Median process CPU time of fn(): with XLA on one thread, the cycles it ran for,
    which other tenants of a shared machine disturb far less than wall time."""
    return median_seconds(fn, repeats, min_seconds, clock=time.process_time)


def time_jax(fn: Callable, *args, **kwargs) -> float:
    """Median seconds of a jitted call, blocking on its outputs."""
    return median_seconds(lambda: jax.block_until_ready(fn(*args)), **kwargs)


def torch_module():
    """PyTorch when installed (its CPU build uses oneDNN), else None: its column is skipped."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(num_cores())
    return torch


def gflops(flops: float, seconds: float) -> float:
    return flops / seconds * 1e-9


def print_records(records: Sequence[dict], columns: Sequence[str], as_json: bool, title: str = "") -> None:
    """One JSON list, or an aligned text table of the given columns."""
    if as_json:
        print(json.dumps(list(records), indent=1))
        return
    if title:
        print(title)
    cells = [[_fmt(r.get(c)) for c in columns] for r in records]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
