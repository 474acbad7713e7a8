"""Benchmarks, run as ``python -m jax_brgemm bench <name>``; each module has ``main(argv)``."""
