"""The benchmark runner and the BENCHMARKS.md generator: registration, the tables made from
real --json output (a fixture saved from a `bench all --quick` run, and a fresh run of the
kernel benchmark) and the stamps each table carries."""

import json
import os
import subprocess
import sys

from jax_brgemm_bench import cli, report

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "bench_quick")


def _rows(markdown: str, header: list[str]) -> list[list[str]]:
    """The body rows of the markdown table whose header is `header`."""
    lines = markdown.splitlines()
    start = lines.index("| " + " | ".join(header) + " |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_registered_benchmarks():
    names = cli.available_benchmarks()
    assert {"kernel", "dense", "conv", "lstm", "flax", "parallel", "gpu"} <= set(names)
    assert not set(names) & cli.NOT_BENCHES
    assert cli.bench_command("kernel", quick=False) == ["--dtype", "all"]
    assert cli.bench_command("conv", quick=True) == ["--quick"]  # the default


def test_tables_one_per_key_set():
    records = [dict(a=1, b=2.5), dict(a=3, b=1234.5), dict(a=4, b=0.00123), dict(c="x|y", d=None, e=True)]
    md = report.tables(records)
    assert _rows(md, ["a", "b"]) == [["1", "2.50"], ["3", "1234"], ["4", "0.00123"]]
    assert _rows(md, ["c", "d", "e"]) == [["x\\|y", "-", "true"]]


def test_report_from_saved_quick_run():
    md = report.markdown([FIXTURE])
    for name in os.listdir(FIXTURE):
        if name.endswith(".meta.json"):
            continue
        bench = name[: -len(".json")]
        with open(os.path.join(FIXTURE, name)) as f:
            records = json.load(f)
        with open(os.path.join(FIXTURE, f"{bench}.meta.json")) as f:
            meta = json.load(f)
        section = md.split(f"### {bench}: ")[1].split("\n### ")[0]
        # the stamp: date, commit, CPU, versions and the exact command
        for text in (meta["date"], meta["commit"], meta["cpu"], meta["versions"]["jax"],
                     meta["versions"]["torch"], f"`{meta['command']}`", "--quick smoke run"):
            assert text in section, (bench, text)
        # every record is one row of the table with its keys as header, in order
        by_keys = {}
        for r in records:
            by_keys.setdefault(tuple(r), []).append([report._cell(r[c]) for c in r])
        for keys, rows in by_keys.items():
            assert _rows(section, list(keys)) == rows


def test_bench_all_then_report(tmp_path):
    out = tmp_path / "json"
    done = subprocess.run([sys.executable, "-m", "jax_brgemm", "bench", "all", "--quick", "--only", "kernel",
                           "--json-dir", str(out), "--markdown"], capture_output=True, text=True, check=True)
    with open(out / "kernel.json") as f:
        records = json.load(f)
    with open(out / "kernel.meta.json") as f:
        meta = json.load(f)
    assert meta["returncode"] == 0 and meta["quick"]
    assert meta["command"] == "python -m jax_brgemm bench kernel --json " + " ".join(cli.bench_command("kernel", True))
    assert [(r["m"], r["n"], r["k"], r["count"]) for r in records] == [(64, 64, 64, 4)]
    assert all(r["gflops"] > 0 for r in records)
    assert done.stdout == report.markdown([str(out)])
    assert _rows(done.stdout, list(records[0]))[0][:4] == ["64", "64", "64", "4"]
    assert report.cpu_model() in done.stdout


def test_profile_sorts_each_target_into_its_kind():
    """Every target carries the jax_brgemm_ prefix: batch norm must not read as a brgemm call."""
    from jax_brgemm_bench import profile

    def line(target):
        return f'%ffi_call.1 = f32[8,64]{{1,0}} custom-call(%x), custom_call_target="{target}"'

    assert profile._kind_of_instruction(line("jax_brgemm_batch_norm_apply")) == "batch norm (ours)"
    assert profile._kind_of_instruction(line("jax_brgemm_brgemm_indexed")) == "brgemm (ours)"
    assert profile._kind_of_instruction(line("jax_brgemm_conv2d_weight_update")) == "conv weight update (ours)"
    assert profile._kind_of_instruction(line("jax_brgemm_attention_backward")) == "attention (ours)"
    assert profile._kind_of_instruction(line("jax_brgemm_max_pool_backward")) == "pooling (ours)"
    assert profile._kind_of_instruction("%f = f32[8] fusion(%a), kind=kLoop") == "elementwise fusions (XLA)"
