"""Deep-learning primitives as loops around the brgemm kernel."""

from .dense import dense, mlp, mlp_init
from .conv import conv2d
from .conv_transpose import conv_transpose
from .lstm import lstm
from .attention import dot_product_attention
from .batch_norm import batch_norm
from .pool import max_pool

__all__: list[str] = ["dense", "mlp", "mlp_init", "conv2d", "conv_transpose", "lstm", "dot_product_attention", "batch_norm", "max_pool"]
