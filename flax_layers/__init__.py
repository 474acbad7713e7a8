"""Flax modules built on jax_brgemm (coming with the Flax issue)."""
