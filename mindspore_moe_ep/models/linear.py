"""``linear(x, weight)``: x [..., in] @ weight [in, out] as one 2-D MatMul.

MindSpore's ``ops.matmul`` of a 3-D x and a 2-D weight broadcasts the weight to a batch and runs
a BatchMatMul of many small products, far slower on CPU for a decode step's [B, 1, H] input
(figures: docs/performance.md). Flattening the leading axes makes it one GEMM.
"""
from mindspore import ops


def linear(x, weight):
    """[..., in] -> [..., out]."""
    out = ops.matmul(x.reshape(-1, x.shape[-1]), weight)          # [N, out]
    return out.reshape(x.shape[:-1] + (weight.shape[-1],))
