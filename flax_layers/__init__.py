"""Flax NNX modules on the jax_brgemm kernel, drop-ins for the stock ones.

    from flax import nnx
    import flax_layers as fl

    layer = fl.Dense(784, 128, rngs=nnx.Rngs(0))       # was nnx.Linear(784, 128, ...)
    conv = fl.Conv(3, 32, (3, 3), rngs=nnx.Rngs(0))     # was nnx.Conv(...)
    lstm = fl.LSTM(64, 256, rngs=nnx.Rngs(0))           # was nnx.RNN(nnx.OptimizedLSTMCell(64, 256, ...))

Each takes the stock module's arguments with the same defaults and creates the same
parameters (names, shapes, initial values for the same rngs), so a model switches by
changing an import and loads states saved with the stock modules (and the other way).
What the kernel does not serve (compute dtypes the ops do not take, such as float16,
1-D/3-D convolutions, input dilation, custom dot_general, ...) runs the stock Flax
computation: the result is then the stock module's; only the speed differs. In bfloat16
the kernel adds the bias in float32 and rounds once, so results can differ from the stock
module's (which rounds after the product and again after the bias) by bfloat16 rounding. Dense and Conv take one
extra keyword, ``activation``, fused into the kernel's epilogue.

``fl.MultiHeadAttention`` is ``nnx.MultiHeadAttention`` with its attention on the kernel;
``fl.BatchNorm`` is ``nnx.BatchNorm`` on the fused batch normalisation (relu and a residual
add optionally fused); ``fl.max_pool`` is ``nnx.max_pool`` on the kernel's pooling loop nest.

Linen equivalents: :mod:`flax_layers.linen` (Dense, Conv, ConvTranspose, OptimizedLSTMCell,
MultiHeadDotProductAttention).
"""

from .attention import MultiHeadAttention
from .linear import Conv, ConvTranspose, Dense
from .normalization import BatchNorm
from .pooling import max_pool
from .recurrent import LSTM, RNN, OptimizedLSTMCell

__all__ = ["Dense", "Conv", "ConvTranspose", "OptimizedLSTMCell", "RNN", "LSTM", "MultiHeadAttention", "BatchNorm", "max_pool"]
