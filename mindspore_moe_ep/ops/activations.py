"""The SwiGLU activation of the grouped experts as one kernel over the used rows only.

Expert buffers are sized for the worst case (``R * C * min(K, L)`` rows under expert
parallelism) while only ``sum(tokens_per_expert)`` rows hold tokens; MindSpore's element-wise
ops would run over every row, forward and backward. ``GroupedSwiGLU`` runs the MoeEpSwiGLU
kernel (custom_ops/cpu/swiglu.cc) on the used rows and leaves the other rows unspecified, as the
grouped matmul and the combine never read them.
"""
import functools

from mindspore import ops

from .kernel_library import KernelCell, custom_op


@functools.lru_cache(maxsize=None)
def _swiglu_grad_op() -> ops.Custom:
    """(d_hidden [N, F], gate_up [N, 2F], tokens_per_expert [E]) -> d_gate_up [N, 2F]."""
    return custom_op("MoeEpSwiGLUGrad",
                     out_shape=lambda d_hidden, gate_up, counts: gate_up,
                     out_dtype=lambda d_hidden, gate_up, counts: gate_up)


class GroupedSwiGLU(KernelCell):
    """``hidden[r] = silu(gate_up[r, :F]) * gate_up[r, F:]`` for the rows that carry tokens.

    ``(gate_up [N, 2F], tokens_per_expert [E] int32)`` -> ``hidden [N, F]`` in gate_up's dtype
    (float32, float16 or bfloat16; computed in float32). Rows from ``sum(tokens_per_expert)`` on
    are unspecified. The gradient flows to ``gate_up`` (the same rows).
    """

    def __init__(self):
        super().__init__()
        swiglu_grad = _swiglu_grad_op()

        def bprop(gate_up, tokens_per_expert, out, dout):
            return (swiglu_grad(dout, gate_up, tokens_per_expert),
                    ops.zeros_like(tokens_per_expert))

        self._swiglu = custom_op(
            "MoeEpSwiGLU",
            out_shape=lambda gate_up, counts: [gate_up[0], gate_up[1] // 2],
            out_dtype=lambda gate_up, counts: gate_up,
            bprop=bprop)

    def construct(self, gate_up, tokens_per_expert):
        return self._swiglu(gate_up, tokens_per_expert)
