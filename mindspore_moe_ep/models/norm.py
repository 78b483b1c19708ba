"""RMSNorm: ``x / sqrt(mean(x^2) + eps) * weight`` over the last axis (no mean subtraction)."""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops


class RMSNorm(nn.Cell):
    """Root-mean-square normalisation with a learned per-channel scale (initialised to 1)."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(Tensor(np.ones(hidden_size, np.float32)), name="weight")  # [H]

    def construct(self, x):
        """x: [..., H] float32 -> [..., H]."""
        variance = ops.mean(ops.square(x), axis=-1, keep_dims=True)                 # [..., 1]
        return x * ops.rsqrt(variance + self.eps) * self.weight.astype(ms.float32)
