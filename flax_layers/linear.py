"""Dense, Conv and ConvTranspose: drop-ins for flax.nnx.Linear, Conv and ConvTranspose on the
brgemm kernel.

Each runs the stock module's own computation through the rewrite `jax_brgemm.optimize`
uses, so Flax's argument handling (padding modes, masks, dtype promotion, kernel flips) is
Flax's, and the convolution or matmul goes to the kernel by the one rule set both share.
"""

from __future__ import annotations

import numpy as np
from jax import lax
from flax import nnx

from . import _common


class Dense(nnx.Linear):
    """:class:`flax.nnx.Linear` computed by :func:`jax_brgemm.nn.dense`.

    Takes exactly ``nnx.Linear``'s arguments with the same defaults, and creates the same
    parameters (``kernel`` ``(in, out)``, ``bias`` ``(out,)``) with the same initial
    values for the same ``rngs``, so states move freely between the two. One extra
    keyword, ``activation`` (None, "relu", "gelu" (tanh form), "sigmoid", "tanh"), is
    fused into the kernel's epilogue where the rules fuse it (relu, sigmoid, tanh);
    ``Dense(..., activation="relu")(x)`` equals ``nnx.relu(nnx.Linear(...)(x))``.

    The kernel serves what the rules serve (float32 and bfloat16 compute with the result in
    the compute dtype); a custom ``dot_general`` and anything else (float16 compute, ...)
    runs the stock ``nnx.Linear`` computation, followed by the activation.
    """

    def __init__(self, in_features: int, out_features: int, *, activation: str | None = None, **kwargs):
        _common.activation_name(activation)
        super().__init__(in_features, out_features, **kwargs)
        self.activation = activation

    def __call__(self, inputs, out_sharding=None):
        if np.shape(inputs)[-1:] != (self.in_features,):
            raise ValueError(f"inputs' last dim must equal the kernel's in_features ({self.in_features}), "
                             f"got inputs of shape {np.shape(inputs)}")

        def stock(x):
            return _common.activate(self.activation, nnx.Linear.__call__(self, x, out_sharding))

        if self.dot_general is not lax.dot_general:  # the user's own function: left alone
            return stock(inputs)
        return _common.serve(stock, inputs)


class Conv(nnx.Conv):
    """:class:`flax.nnx.Conv` computed by :func:`jax_brgemm.nn.conv2d`.

    Takes exactly ``nnx.Conv``'s arguments with the same defaults and creates the same
    parameters (``kernel`` ``(*kernel_size, in // groups, out)``, ``bias`` ``(out,)``) with
    the same initial values for the same ``rngs``. Extra keyword ``activation`` as in
    :class:`Dense`.

    The kernel serves 1-D and 2-D float32 and bfloat16 convolutions: any strides, kernel
    and input dilation (``input_dilation`` runs as a transposed convolution), groups and
    mask, every padding mode (``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"``,
    ``"CAUSAL"``, ints, pairs; negative padding excepted), any number of batch dims.
    Anything else (3-D kernels, float16 compute, a custom ``conv_general_dilated``) runs the
    stock ``nnx.Conv`` computation, followed by the activation.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size, strides=1, *,
                 activation: str | None = None, **kwargs):
        _common.activation_name(activation)
        super().__init__(in_features, out_features, kernel_size, strides, **kwargs)
        self.activation = activation

    def __call__(self, inputs, out_sharding=None):
        def stock(x):
            return _common.activate(self.activation, nnx.Conv.__call__(self, x, out_sharding))

        if self.conv_general_dilated is not lax.conv_general_dilated:
            return stock(inputs)
        return _common.serve(stock, inputs)


class ConvTranspose(nnx.ConvTranspose):
    """:class:`flax.nnx.ConvTranspose` on the kernel: its input-dilated convolution runs as
    conv2d's backward-data loop nest (see :func:`jax_brgemm.nn.conv_transpose`), its
    gradients on the forward and weight-update loop nests.

    Same arguments, defaults, parameters and initial values as ``nnx.ConvTranspose``, plus
    ``activation``. 1-D and 2-D, float32 and bfloat16, every padding mode, kernel dilation
    and ``transpose_kernel``; what the rules do not serve runs the stock computation.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size, strides=None, *,
                 activation: str | None = None, **kwargs):
        _common.activation_name(activation)
        super().__init__(in_features, out_features, kernel_size, strides, **kwargs)
        self.activation = activation

    def __call__(self, inputs):
        def stock(x):
            return _common.activate(self.activation, nnx.ConvTranspose.__call__(self, x))

        return _common.serve(stock, inputs)
