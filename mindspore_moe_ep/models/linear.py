"""``linear(x, weight)``: x [..., in] @ weight [in, out] as one 2-D MatMul.

MindSpore's ``ops.matmul`` of a 3-D x and a 2-D weight broadcasts the weight to a batch and runs
a BatchMatMul of many small products: on CPU, ~100x slower for a decode step's [B, 1, H] input
(measured: 42 ms instead of 0.3 ms for [16, 1, 256] x [256, 2304]). Flattening the leading axes
makes it one GEMM.
"""
from mindspore import ops


def linear(x, weight):
    """[..., in] -> [..., out]."""
    out = ops.matmul(x.reshape(-1, x.shape[-1]), weight)          # [N, out]
    return out.reshape(x.shape[:-1] + (weight.shape[-1],))
