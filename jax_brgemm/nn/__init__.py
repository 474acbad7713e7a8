"""Deep-learning primitives as loops around the brgemm kernel."""

from .dense import dense, mlp, mlp_init
from .conv import conv2d
from .lstm import lstm
from .attention import dot_product_attention

__all__: list[str] = ["dense", "mlp", "mlp_init", "conv2d", "lstm", "dot_product_attention"]
