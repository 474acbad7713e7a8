"""Deep-learning primitives as loops around the brgemm kernel."""

from .dense import dense, mlp, mlp_init

__all__: list[str] = ["dense", "mlp", "mlp_init"]
