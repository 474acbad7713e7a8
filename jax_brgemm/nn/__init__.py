"""Deep-learning primitives as loops around the brgemm kernel."""

from .conv import conv2d
from .dense import dense, mlp, mlp_init

__all__: list[str] = ["conv2d", "dense", "mlp", "mlp_init"]
