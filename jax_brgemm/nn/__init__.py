"""Deep-learning primitives as loops around the brgemm kernel."""

from .lstm import lstm

__all__: list[str] = ["lstm"]
