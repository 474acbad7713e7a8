"""Benchmarks of jax_brgemm, run as ``python -m jax_brgemm bench <name>``.

This package sits above ``flax_layers`` in the layer graph (it imports jax_brgemm,
flax_layers, flax and, when installed, torch); nothing below imports it.

A benchmark is registered by being a module of this package with ``main(argv)``; it prints a
text table, or with ``--json`` one JSON list of flat records (``common.print_records``).
Optional module attributes steer ``bench all`` (defaults in ``cli.py``): ``ALL_ARGS``, the
arguments of a full run, ``QUICK_ARGS``, those of a ``--quick`` run, and ``IN_ALL = False``
to leave the module out. Modules that are not benchmarks are listed in ``cli.NOT_BENCHES``.
"""
