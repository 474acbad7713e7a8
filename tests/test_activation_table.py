"""The activation set is defined once, in cpp/brgemm/activation.h: the Python checks accept
exactly the activations the compiled kernels implement, in the same order."""

from jax_brgemm import _checks
from jax_brgemm._ext import ext


def test_python_activations_match_the_cpp_table():
    names = list(ext.activation_names())
    assert names[0] == "none"
    assert tuple(None if n == "none" else n for n in names) == tuple(_checks.ACTIVATIONS)
