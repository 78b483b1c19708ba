"""Expert FFNs: SwiGLU, ``down(silu(gate(x)) * up(x))``.

Routed experts keep their weights stacked ([experts, in, out]) and run as grouped GEMMs over rows
that the dispatcher has already grouped by expert, so there is no Python loop over experts and one
graph serves any routing. The shared expert is the same computation with a single group holding
every token.

Weight layout (per expert, relative to Hugging Face ``*_proj.weight`` [out, in]):
``gate_up_weight[e] = concat(gate_proj.weight.T, up_proj.weight.T, axis=1)``  # [H, 2F]
``down_weight[e]    = down_proj.weight.T``                                     # [F, H]
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from .initializers import stacked_expert_normal
from .ops import GroupedMatmul


def swiglu(gate_up):
    """[rows, 2F] -> [rows, F]; computed in float32 (MindSpore CPU has no bf16 elementwise ops)."""
    gate, up = ops.chunk(gate_up.astype(ms.float32), 2, axis=-1)
    return ops.silu(gate) * up


class GroupedSwiGLUExperts(nn.Cell):
    """``num_experts`` SwiGLU experts applied to expert-grouped rows with two grouped GEMMs."""

    def __init__(self, expert_indices, hidden_size, ffn_size, param_dtype=ms.float32, seed=(0, 1)):
        super().__init__()
        self.ffn_size = ffn_size
        self.param_dtype = param_dtype
        gate_up = stacked_expert_normal(expert_indices, (hidden_size, 2 * ffn_size),
                                        std=hidden_size ** -0.5, seed=seed)
        down = stacked_expert_normal(expert_indices, (ffn_size, hidden_size),
                                     std=ffn_size ** -0.5, seed=(*seed, -1))
        self.gate_up_weight = Parameter(Tensor(gate_up).astype(param_dtype),
                                        name="gate_up_weight")  # [E_local, H, 2F]
        self.down_weight = Parameter(Tensor(down).astype(param_dtype),
                                     name="down_weight")        # [E_local, F, H]
        self.grouped_matmul = GroupedMatmul()

    def construct(self, rows, tokens_per_expert):
        """rows: [N, H] grouped by expert (tail unused); tokens_per_expert: [E_local] int32."""
        gate_up = self.grouped_matmul(rows, self.gate_up_weight, tokens_per_expert)   # [N, 2F]
        hidden = swiglu(gate_up).astype(self.param_dtype)                             # [N, F]
        return self.grouped_matmul(hidden, self.down_weight, tokens_per_expert)       # [N, H]


class SharedExpert(nn.Cell):
    """The always-on SwiGLU expert(s) of DeepSeek-V3 / Qwen-MoE, as one wide FFN."""

    def __init__(self, hidden_size, ffn_size, param_dtype=ms.float32, seed=(0, 2)):
        super().__init__()
        self.hidden_size = hidden_size
        self.ffn_size = ffn_size
        self.param_dtype = param_dtype
        gate_up = stacked_expert_normal([0], (hidden_size, 2 * ffn_size),
                                        std=hidden_size ** -0.5, seed=seed)[0]
        down = stacked_expert_normal([0], (ffn_size, hidden_size),
                                     std=ffn_size ** -0.5, seed=(*seed, -1))[0]
        self.gate_up_weight = Parameter(Tensor(gate_up).astype(param_dtype),
                                        name="gate_up_weight")  # [H, 2Fs]
        self.down_weight = Parameter(Tensor(down).astype(param_dtype),
                                     name="down_weight")        # [Fs, H]
        self.grouped_matmul = GroupedMatmul()

    def construct(self, x):
        """x: [T, H] -> [T, H]."""
        all_rows = ops.full((1,), x.shape[0], dtype=ms.int32)                        # [1]
        gate_up = self.grouped_matmul(
            x, self.gate_up_weight.reshape(1, self.hidden_size, 2 * self.ffn_size), all_rows)
        hidden = swiglu(gate_up).astype(self.param_dtype)                             # [T, Fs]
        return self.grouped_matmul(
            hidden, self.down_weight.reshape(1, self.ffn_size, self.hidden_size), all_rows)
