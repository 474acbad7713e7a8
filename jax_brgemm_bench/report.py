"""BENCHMARKS.md from the benchmarks' --json output: one section per benchmark, each stamped
with its date, commit, CPU model, versions and the exact command.

    python -m jax_brgemm bench all --json-dir DIR             (writes DIR/NAME.json, DIR/NAME.meta.json)
    python -m jax_brgemm bench report --json-dir DIR [--json-dir DIR2 ...] > BENCHMARKS.md

One --json-dir per machine kind; each gets its own top-level section.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

# Sections in this order; benchmarks not listed follow alphabetically.
ORDER = ["models", "profile", "attention", "batch_norm", "kernel", "dense", "conv", "lstm", "flax", "threshold", "parallel", "gpu"]
REGENERATE = ("python -m jax_brgemm bench all --json-dir bench_json && "
              "python -m jax_brgemm bench report --json-dir bench_json > BENCHMARKS.md")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def module_title(module) -> str:
    """A short heading from a benchmark module's docstring: its first sentence, up to a colon,
    and no longer than about 100 characters."""
    doc = " ".join((module.__doc__ or module.__name__).split("\n\n")[0].split())
    title = doc.split(". ")[0].split(": ")[0].rstrip(".")
    if len(title) > 100 and ", " in title[:100]:
        title = title[: title[:100].rindex(", ")]
    return title


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """The source tree's commit (with +dirty when tracked files differ), or 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def environment() -> dict:
    """What a table needs to be reproduced: machine, versions, commit, the ISA in use."""
    import jax

    import jax_brgemm as jb
    from .common import num_cores

    return dict(cpu=cpu_model(), cores=num_cores(), isa=jb.active_isa(), backend=jax.default_backend(),
                commit=git_commit(), python=platform.python_version(),
                versions={p: _version(p) for p in ("jax", "jaxlib", "flax", "torch")},
                isa_forced=os.environ.get("JAX_BRGEMM_ISA", ""))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        # two decimals; three significant digits below 0.1 (seconds), none from 100
        text = (f"{value:.0f}" if abs(value) >= 100 else
                f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3g}")
    elif isinstance(value, (list, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    return text.replace("|", "\\|")


def tables(records: list[dict]) -> str:
    """Markdown tables of flat records: one table per distinct set of keys, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r), []).append(r)
    out = []
    for columns, rows in groups.items():
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def stamp(meta: dict) -> str:
    v = meta.get("versions", {})
    forced = f" (JAX_BRGEMM_ISA={meta['isa_forced']})" if meta.get("isa_forced") else ""
    text = (f"{meta.get('date', 'date not recorded')}, commit `{meta.get('commit', 'unknown')}`, "
            f"{meta.get('cpu', 'CPU not recorded')} ({meta.get('cores', '?')} cores), ISA "
            f"{meta.get('isa', '?')}{forced}, jax {v.get('jax', '?')}, jaxlib {v.get('jaxlib', '?')}, "
            f"flax {v.get('flax', '?')}, torch {v.get('torch', '?')}; command: `{meta.get('command', '?')}`")
    if meta.get("quick"):
        text += " -- a --quick smoke run, not figures"
    return text


def load(json_dir: str) -> dict[str, tuple[dict, list[dict] | None]]:
    """{bench: (meta, records or None when it failed)} for one folder."""
    names = {os.path.basename(p).removesuffix(".json").removesuffix(".meta")
             for p in glob.glob(os.path.join(json_dir, "*.json"))}
    found = {}
    for name in names:
        meta_path, data_path = (os.path.join(json_dir, f"{name}{s}.json") for s in (".meta", ""))
        meta = {}
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
        else:
            print(f"bench report: {meta_path} missing; {name}'s table has no stamp", file=sys.stderr)
        records = None
        if os.path.exists(data_path):
            with open(data_path) as f:
                records = json.load(f)
        found[name] = (meta, records)
    return found


def markdown(json_dirs: list[str]) -> str:
    parts = ["# Benchmarks", "",
             "Generated from the benchmarks' `--json` output by `python -m jax_brgemm bench report`; "
             "do not edit by hand. Each table names the date, commit, machine, versions and the exact "
             "command that produced it. To refresh (on an otherwise idle machine):", "",
             f"    {REGENERATE}", ""]
    for json_dir in json_dirs:
        results = load(json_dir)
        if not results:
            raise SystemExit(f"bench report: no *.json files in {json_dir}")
        metas = [m for m, _ in results.values() if m]
        machine = metas[0].get("cpu", "machine not recorded") if metas else "machine not recorded"
        cores = f", {metas[0].get('cores')} cores" if metas else ""
        parts += [f"## {machine}{cores}", ""]
        if metas and all(m.get("quick") for m in metas):
            parts += ["These tables come from `--quick` smoke runs: they show the format, not figures.", ""]
        names = [n for n in ORDER if n in results] + sorted(set(results) - set(ORDER))
        failed = []
        for name in names:
            meta, records = results[name]
            if records is None:
                failed.append(f"`{name}` ({meta.get('error') or 'no output'})")
                continue
            parts += [f"### {name}: {meta.get('title', name)}", "", stamp(meta), "",
                      tables(records) if records else "(no records)", ""]
        if failed:
            parts += ["Not run on this machine: " + "; ".join(failed) + ".", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m jax_brgemm bench report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json-dir", action="append", required=True,
                   help="a folder written by `bench all` (repeat: one per machine kind)")
    args = p.parse_args(argv)
    print(markdown(args.json_dir), end="")
