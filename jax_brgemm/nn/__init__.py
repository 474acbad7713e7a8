"""Deep-learning primitives as loops around the brgemm kernel."""

from .conv import conv2d

__all__: list[str] = ["conv2d"]
