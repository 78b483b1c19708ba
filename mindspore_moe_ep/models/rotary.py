"""Rotary position embedding (RoPE, Su et al. 2021), in the "rotate half" layout of Llama/HF.

Channel i of the first half and channel i of the second half of a head form a pair that is
rotated by the angle ``position * theta^(-2i / head_dim)``. The cos/sin tables for every position
up to ``max_seq_len`` are computed once (NumPy float64, stored float32), so prefill slices them
and decode gathers one row per sequence: shapes stay static.
"""
import numpy as np
from mindspore import Tensor, nn, ops


def rotary_tables(head_dim, max_seq_len, theta):
    """(cos, sin), each [max_seq_len, head_dim] float32, the two halves of a row equal."""
    inverse_frequency = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(max_seq_len, dtype=np.float64), inverse_frequency)  # [L, D/2]
    angles = np.concatenate([angles, angles], axis=1)                              # [L, D]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate_half(x):
    """[..., D] -> [..., D]: (x1, x2) -> (-x2, x1) for the two halves x1, x2."""
    first, second = ops.split(x, x.shape[-1] // 2, axis=-1)
    return ops.concat((-second, first), axis=-1)


class RotaryEmbedding(nn.Cell):
    """Applies RoPE to queries and keys laid out [batch, heads, seq, head_dim]."""

    def __init__(self, head_dim, max_seq_len, theta):
        super().__init__()
        cos, sin = rotary_tables(head_dim, max_seq_len, theta)
        self.cos = Tensor(cos)  # [L, D]
        self.sin = Tensor(sin)  # [L, D]

    def first_positions(self, seq_len):
        """(cos, sin) for positions 0 .. seq_len-1, each [1, 1, seq_len, D] (prefill)."""
        return self.cos[:seq_len].reshape(1, 1, seq_len, -1), \
            self.sin[:seq_len].reshape(1, 1, seq_len, -1)

    def at_positions(self, positions):
        """(cos, sin) at one position per sequence, positions [B] int32 -> [B, 1, 1, D]."""
        batch = positions.shape[0]
        cos = ops.gather(self.cos, positions, 0).reshape(batch, 1, 1, -1)
        sin = ops.gather(self.sin, positions, 0).reshape(batch, 1, 1, -1)
        return cos, sin

    def construct(self, x, cos, sin):
        """x: [B, heads, S, D] float32, rotated by the angles of (cos, sin) -> same shape."""
        return x * cos + rotate_half(x) * sin
