"""Dense and Conv: drop-ins for flax.nnx.Linear and flax.nnx.Conv on the brgemm kernel."""

from __future__ import annotations

from jax import lax
from flax import nnx

from . import _common


class Dense(nnx.Linear):
    """:class:`flax.nnx.Linear` computed by :func:`jax_brgemm.nn.dense`.

    Takes exactly ``nnx.Linear``'s arguments with the same defaults, and creates the same
    parameters (``kernel`` ``(in, out)``, ``bias`` ``(out,)``) with the same initial
    values for the same ``rngs``, so states move freely between the two. One extra
    keyword, ``activation`` (None, "relu", "gelu" (tanh form), "sigmoid", "tanh"), is
    fused into the kernel's epilogue; ``Dense(..., activation="relu")(x)`` equals
    ``nnx.relu(nnx.Linear(...)(x))``.

    The kernel serves the computations :func:`jax_brgemm.nn.dense` takes (after
    ``promote_dtype`` with ``dtype``; see ``_common.SERVED_DTYPES``) with the default
    ``dot_general``, no ``out_sharding`` and ``preferred_element_type`` None or the compute
    dtype. Anything else (float16 compute, a custom ``dot_general``, ...) runs the stock
    ``nnx.Linear`` computation, followed by the activation.
    """

    def __init__(self, in_features: int, out_features: int, *, activation: str | None = None, **kwargs):
        _common.activation_name(activation)
        super().__init__(in_features, out_features, **kwargs)
        self.activation = activation

    def __call__(self, inputs, out_sharding=None):
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        if (self.dot_general is not lax.dot_general or out_sharding is not None
                or _common.served_dtype("dense", x, kernel, bias,
                                        preferred_element_type=self.preferred_element_type) is None):
            return _common.activate(self.activation, super().__call__(inputs, out_sharding))
        return _common.dense(x, kernel, bias, self.activation)


class Conv(nnx.Conv):
    """:class:`flax.nnx.Conv` computed by :func:`jax_brgemm.nn.conv2d`.

    Takes exactly ``nnx.Conv``'s arguments with the same defaults and creates the same
    parameters (``kernel`` HWIO ``(*kernel_size, in // groups, out)``, ``bias`` ``(out,)``)
    with the same initial values for the same ``rngs``. Extra keyword ``activation`` as in
    :class:`Dense`, fused into the kernel's epilogue.

    The kernel serves 2-D float32 and bfloat16 convolutions (bias added in float32 before
    the one rounding of the output): any strides, kernel dilation, groups and mask, padding
    "SAME", "VALID", "CIRCULAR", "REFLECT", ints or (low, high) pairs, inputs with any
    number of batch dims. Anything else (1-D or 3-D kernels, ``input_dilation``, "CAUSAL"
    or negative padding, float16 compute, a custom ``conv_general_dilated``,
    ``out_sharding``) runs the stock ``nnx.Conv`` computation, followed by the activation.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size, strides=1, *,
                 activation: str | None = None, **kwargs):
        _common.activation_name(activation)
        super().__init__(in_features, out_features, kernel_size, strides, **kwargs)
        self.activation = activation

    def __call__(self, inputs, out_sharding=None):
        plan = None
        if (self.conv_general_dilated is lax.conv_general_dilated and out_sharding is None
                and (self.mask is None or self.mask.shape == self.kernel_shape)):
            plan = _common.conv_plan(self.kernel_size, self.strides, self.padding,
                                     self.input_dilation, self.kernel_dilation)
        if plan is not None:
            kernel = self.kernel[...]
            if self.mask is not None:
                kernel = kernel * self.mask
            bias = self.bias[...] if self.bias is not None else None
            x, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
            if _common.served_dtype("conv", x, kernel, bias,
                                    preferred_element_type=self.preferred_element_type):
                return _common.conv(plan, x, kernel, bias, self.feature_group_count, self.activation)
        return _common.activate(self.activation, super().__call__(inputs, out_sharding))
