"""The dense SwiGLU FFN of the first ``lm.dense_layers`` layers: ``down(silu(gate(x)) * up(x))``.

Weights use the experts' layout (``gate_up_weight`` [H, 2F]: gate then up; ``down_weight``
[F, H]), so a dense layer reads like one expert of :class:`MoELayer`.
"""
from mindspore import Parameter, Tensor, nn, ops

from ..initializers import TensorId, normal_array
from .linear import linear


class DenseSwiGLU(nn.Cell):
    """A dense SwiGLU feed-forward network, float32."""

    def __init__(self, hidden_size, ffn_size, seed, layer_index):
        super().__init__()
        self.ffn_size = ffn_size
        gate_up = normal_array((hidden_size, 2 * ffn_size), std=hidden_size ** -0.5,
                               key=(seed, TensorId.DENSE_GATE_UP, layer_index))
        down = normal_array((ffn_size, hidden_size), std=ffn_size ** -0.5,
                            key=(seed, TensorId.DENSE_DOWN, layer_index))
        self.gate_up_weight = Parameter(Tensor(gate_up), name="gate_up_weight")  # [H, 2F]
        self.down_weight = Parameter(Tensor(down), name="down_weight")           # [F, H]

    def construct(self, x, phase=None):
        """x: [B, S, H] -> [B, S, H]; ``phase`` is accepted for symmetry with MoELayer."""
        gate, up = ops.split(linear(x, self.gate_up_weight), self.ffn_size, axis=-1)
        return linear(ops.silu(gate) * up, self.down_weight)
