"""Expert FFNs: SwiGLU, ``down(silu(gate(x)) * up(x))``.

Routed experts keep their weights stacked ([experts, in, out]) and run in one of two ways, with
no Python loop over experts, so one graph serves any routing:

- grouped: two grouped GEMMs over rows that the dispatcher has already grouped by expert (one
  row per (token, expert) pair; training, and CANN's decode contract);
- row-wise (``weighted_sum``, CPU kernel ``ExpertsWeightedSum``): over delivered rows, one per
  (token, rank), each row's weighted sum of its local experts' outputs, with no buffer holding
  a row per (token, expert) pair (inference, and training with ``runtime.recompute_experts``).

The shared expert is the same computation with a single group holding every token.

Weight layout (per expert, relative to Hugging Face ``*_proj.weight`` [out, in]):
``gate_up_weight[e] = concat(gate_proj.weight.T, up_proj.weight.T, axis=1)``  # [H, 2F]
``down_weight[e]    = down_proj.weight.T``                                     # [F, H]
"""
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from .initializers import TensorId, normal_array, stacked_expert_normal
from .ops import ExpertsWeightedSum, GroupedMatmul, GroupedSwiGLU
from .runtime import ascend_backend_active


def grouped_matmul_for_device():
    """The grouped GEMM Cell of the device: the C++ AOT kernel on CPU, CANN's on Ascend."""
    if ascend_backend_active():
        from .ascend.grouped_matmul import AscendGroupedMatmul
        return AscendGroupedMatmul()
    return GroupedMatmul()


class ElementwiseSwiGLU(nn.Cell):
    """SwiGLU with MindSpore's element-wise ops over every row (used where the kernel is absent).

    ``(gate_up [N, 2F], tokens_per_expert)`` -> ``[N, F]`` in gate_up's dtype, computed in float32.
    """

    def construct(self, gate_up, tokens_per_expert):
        dtype = gate_up.dtype
        # ops.split, not gate_up[:, :F]: MindSpore 2.10 GRAPH_MODE dies with SIGFPE compiling a
        # column slice of a tensor with zero rows (a rank with no tokens in this step).
        gate, up = ops.split(gate_up.astype(ms.float32), gate_up.shape[1] // 2, axis=1)
        return (ops.silu(gate) * up).astype(dtype)


def swiglu_for_device():
    """The SwiGLU Cell of the device: on CPU the kernel over the used rows only (the worst-case
    buffers are mostly unused rows), on Ascend MindSpore's element-wise ops."""
    if ascend_backend_active():
        return ElementwiseSwiGLU()
    return GroupedSwiGLU()


class GroupedSwiGLUExperts(nn.Cell):
    """This rank's routed SwiGLU experts (``expert_indices``): two grouped GEMMs over
    expert-grouped rows (``construct``), or :meth:`weighted_sum` over delivered rows in one
    kernel."""

    def __init__(self, expert_indices, hidden_size, ffn_size, param_dtype=ms.float32, seed=0):
        super().__init__()
        self.ffn_size = ffn_size
        self.param_dtype = param_dtype
        gate_up = stacked_expert_normal(expert_indices, (hidden_size, 2 * ffn_size),
                                        std=hidden_size ** -0.5, key=(seed, TensorId.EXPERT_GATE_UP))
        down = stacked_expert_normal(expert_indices, (ffn_size, hidden_size),
                                     std=ffn_size ** -0.5, key=(seed, TensorId.EXPERT_DOWN))
        self.gate_up_weight = Parameter(Tensor(gate_up).astype(param_dtype),
                                        name="gate_up_weight")  # [E_local, H, 2F]
        self.down_weight = Parameter(Tensor(down).astype(param_dtype),
                                     name="down_weight")        # [E_local, F, H]
        self.grouped_matmul = grouped_matmul_for_device()
        self.swiglu = swiglu_for_device()
        # Without per-pair buffers: the CPU kernel (on Ascend, the grouped path).
        self.weighted_sum_kernel = (None if ascend_backend_active()
                                    else ExpertsWeightedSum())

    def weighted_sum(self, rows, local_ids, weights, row_counts):
        """Each row's weighted sum of its local experts' outputs, in one kernel.

        rows: [N, H] in blocks (``row_counts[b]`` used rows each), or quantized rows (int32 [N,
        W], ``dispatch.quant: int8`` in inference: dequantized as the experts read them, no
        gradient); local_ids, weights: [N, K] (-1: no local expert) -> ``(out [N, H],
        tokens_per_expert [E_local] int32)``. No buffer holds a row per (token, expert) pair;
        the gradient recomputes the experts (see ExpertsWeightedSum).
        """
        return self.weighted_sum_kernel(rows, local_ids, weights, row_counts,
                                        self.gate_up_weight, self.down_weight)

    def construct(self, rows, tokens_per_expert):
        """rows: [N, H] grouped by expert; tokens_per_expert: [E_local] int32 -> [N, H].

        Rows past sum(tokens_per_expert) are unspecified, in ``rows`` and in every buffer
        derived from it: the grouped GEMMs and the SwiGLU kernel read and write only the used
        rows (on Ascend, the element-wise SwiGLU runs over all rows; its tail is never read).
        """
        gate_up = self.grouped_matmul(rows, self.gate_up_weight, tokens_per_expert)   # [N, 2F]
        hidden = self.swiglu(gate_up, tokens_per_expert)                             # [N, F]
        return self.grouped_matmul(hidden, self.down_weight, tokens_per_expert)       # [N, H]


class SharedExpert(nn.Cell):
    """The always-on SwiGLU expert(s) of DeepSeek-V3 / Qwen-MoE, as one wide FFN.

    With ``gated`` (Qwen2-MoE), each token's output is scaled by ``sigmoid(x . gate_weight)``;
    the gate is a float32 [H, 1] Parameter (HF ``shared_expert_gate.weight`` [1, H], transposed).
    """

    def __init__(self, hidden_size, ffn_size, param_dtype=ms.float32, seed=0, gated=False):
        super().__init__()
        self.hidden_size = hidden_size
        self.ffn_size = ffn_size
        self.param_dtype = param_dtype
        # Stored with a leading group axis of 1 so the grouped GEMM needs no reshape (MindSpore
        # CPU cannot reshape bfloat16 tensors).
        gate_up = normal_array((1, hidden_size, 2 * ffn_size), std=hidden_size ** -0.5,
                               key=(seed, TensorId.SHARED_GATE_UP))
        down = normal_array((1, ffn_size, hidden_size), std=ffn_size ** -0.5,
                            key=(seed, TensorId.SHARED_DOWN))
        self.gate_up_weight = Parameter(Tensor(gate_up).astype(param_dtype),
                                        name="gate_up_weight")  # [1, H, 2Fs]
        self.down_weight = Parameter(Tensor(down).astype(param_dtype),
                                     name="down_weight")        # [1, Fs, H]
        self.grouped_matmul = grouped_matmul_for_device()
        self.swiglu = swiglu_for_device()
        self.gated = gated
        if gated:
            gate = normal_array((hidden_size, 1), std=hidden_size ** -0.5,
                                key=(seed, TensorId.SHARED_GATE))
            self.gate_weight = Parameter(Tensor(gate), name="gate_weight")       # [H, 1] float32

    def construct(self, x):
        """x: [T, H] float32 -> [T, H] float32."""
        all_rows = ops.full((1,), x.shape[0], dtype=ms.int32)                        # [1]
        gate_up = self.grouped_matmul(x.astype(self.param_dtype), self.gate_up_weight,
                                      all_rows)                                        # [T, 2Fs]
        hidden = self.swiglu(gate_up, all_rows)                                      # [T, Fs]
        out = self.grouped_matmul(hidden, self.down_weight, all_rows).astype(ms.float32)  # [T, H]
        if self.gated:
            out = out * ops.sigmoid(ops.matmul(x, self.gate_weight))                 # [T, 1]
        return out
