"""python -m jax_brgemm                 what this machine has, a correctness check, a short benchmark
python -m jax_brgemm bench NAME [...]  one benchmark (kernel, dense, conv, lstm, ...; --help each)
python -m jax_brgemm bench all [...]   every benchmark, --json files and BENCHMARKS.md tables
python -m jax_brgemm bench report ...  BENCHMARKS.md tables from a folder of --json files

The benchmarks live in the jax_brgemm_bench package, above flax_layers in the layer graph;
this entry point imports it only when run, so the ops layer never imports it.
"""

import sys


def main(argv: list[str]) -> None:
    from jax_brgemm_bench.cli import main as bench_main

    bench_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
