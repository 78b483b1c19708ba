"""Causal self-attention with rotary positions, grouped-query heads and a static KV cache.

Two phases, both with static shapes (each compiles once in GRAPH_MODE):

- ``prefill``: tokens [B, S] at positions 0 .. S-1 (a prompt, or a training sequence). Causal
  attention within the sequence; with a cache, the keys and values fill its first S positions.
- ``decode``: one token per sequence, at ``positions`` [B] (each sequence its own length). Its
  key and value are written into the cache at that position, and the query attends to cache
  positions 0 .. position; the rest of the cache (older padding, zeros) is masked out.

The cache is two Parameters [B, kv_heads, max_seq_len, head_dim] (not trained, not saved in
checkpoints: see `mindspore_moe_ep.models.checkpoint.is_model_state`). A sequence's
right padding after a prefill is overwritten by its decode steps before the mask lets it in.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..initializers import TensorId, normal_array
from .linear import linear
from .rotary import RotaryEmbedding

MASKED = -1.0e9  # additive mask: exp(MASKED - max) is exactly 0 in float32


class CausalSelfAttention(nn.Cell):
    """Multi-head causal self-attention (``lm`` config: heads, kv heads, head_dim, RoPE)."""

    def __init__(self, hidden_size, lm, seed, layer_index, cache_batch_size=0):
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = lm.num_heads, lm.kv_heads, lm.head_dim
        self.max_seq_len = lm.max_seq_len
        self.scale = self.head_dim ** -0.5
        qkv_width = (self.num_heads + 2 * self.kv_heads) * self.head_dim
        qkv = normal_array((hidden_size, qkv_width), std=hidden_size ** -0.5,
                           key=(seed, TensorId.ATTENTION_QKV, layer_index))
        out = normal_array((self.num_heads * self.head_dim, hidden_size),
                           std=(self.num_heads * self.head_dim) ** -0.5,
                           key=(seed, TensorId.ATTENTION_OUT, layer_index))
        self.qkv_weight = Parameter(Tensor(qkv), name="qkv_weight")  # [H, (heads + 2 kv) D]
        self.out_weight = Parameter(Tensor(out), name="out_weight")  # [heads D, H]
        self.rotary = RotaryEmbedding(self.head_dim, lm.max_seq_len, lm.rope_theta)
        causal = np.triu(np.full((lm.max_seq_len, lm.max_seq_len), MASKED, np.float32), k=1)
        self.causal_mask = Tensor(causal)                                  # [L, L]
        self.key_positions = Tensor(np.arange(lm.max_seq_len, dtype=np.int32))  # [L]
        self.scores_matmul = ops.BatchMatMul(transpose_b=True)   # q k^T without a transpose
        self.cache_batch_size = cache_batch_size
        if cache_batch_size:
            shape = (cache_batch_size, self.kv_heads, lm.max_seq_len, self.head_dim)
            self.k_cache = Parameter(Tensor(np.zeros(shape, np.float32)), name="k_cache",
                                     requires_grad=False)                   # [B, kv, L, D]
            self.v_cache = Parameter(Tensor(np.zeros(shape, np.float32)), name="v_cache",
                                     requires_grad=False)                   # [B, kv, L, D]
            # (batch, kv head) of each row a decode step writes: [B kv] each
            self.row_batch = Tensor(np.repeat(np.arange(cache_batch_size, dtype=np.int32),
                                              self.kv_heads))
            self.row_head = Tensor(np.tile(np.arange(self.kv_heads, dtype=np.int32),
                                           cache_batch_size))

    def construct(self, x, phase="prefill", positions=None):
        """x: [B, S, H] -> [B, S, H]; decode: S = 1 and ``positions`` [B] int32."""
        batch, seq_len, _ = x.shape
        qkv = linear(x, self.qkv_weight)                        # [B, S, (heads + 2 kv) D]
        q, k, v = ops.split(qkv, [self.num_heads * self.head_dim, self.kv_heads * self.head_dim,
                                  self.kv_heads * self.head_dim], axis=-1)
        q = q.reshape(batch, seq_len, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(batch, seq_len, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(batch, seq_len, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if phase == "decode":
            cos, sin = self.rotary.at_positions(positions)      # [B, 1, 1, D]
            q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
            k, v = self._write_at(k, v, positions)               # [B, kv, L, D]: whole cache
            mask = self._cache_mask(positions)                   # [B, 1, 1, L]
        else:
            cos, sin = self.rotary.first_positions(seq_len)      # [1, 1, S, D]
            q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
            if self.cache_batch_size:
                self._fill(k, v)
            mask = self.causal_mask[:seq_len, :seq_len]          # [S, S]
        out = self._attend(q, k, v, mask)                        # [B, heads, S, D]
        out = out.transpose(0, 2, 1, 3).reshape(batch, seq_len, self.num_heads * self.head_dim)
        return linear(out, self.out_weight)                      # [B, S, H]

    def _attend(self, q, k, v, mask):
        """softmax(q k^T / sqrt(D) + mask) v, each kv head serving ``group`` query heads.

        q [B, heads, S, D]; k, v [B, kv, Lk, D]; mask [S, Lk] or [B, 1, 1, Lk]. The query heads
        of one kv head are stacked as rows ([B, kv, group S, D]), so k and v are used as they
        are (no copy per query head) and each product is one batched GEMM.
        """
        batch, _, seq_len, dim = q.shape
        group = self.num_heads // self.kv_heads
        q = q.reshape(batch, self.kv_heads, group * seq_len, dim)          # [B, kv, g S, D]
        if group > 1 and mask.ndim == 2:
            mask = ops.tile(mask, (group, 1))                               # [g S, Lk]
        scores = self.scores_matmul(q, k) * self.scale + mask               # [B, kv, g S, Lk]
        out = ops.matmul(ops.softmax(scores, axis=-1), v)                   # [B, kv, g S, D]
        return out.reshape(batch, self.num_heads, seq_len, dim)

    def _fill(self, k, v):
        """Prefill: the cache holds k, v at positions 0 .. S-1 and zeros after."""
        batch, heads, seq_len, dim = k.shape
        if seq_len < self.max_seq_len:
            zeros = ops.zeros((batch, heads, self.max_seq_len - seq_len, dim), ms.float32)
            k, v = ops.concat((k, zeros), axis=2), ops.concat((v, zeros), axis=2)
        ops.assign(self.k_cache, k)
        ops.assign(self.v_cache, v)

    def _write_at(self, k, v, positions):
        """Decode: write k, v [B, kv, 1, D] at ``positions`` [B] into the caches (in place, one
        [D] row per sequence and kv head); returns the updated caches [B, kv, L, D]."""
        rows = ops.stack((self.row_batch, self.row_head, ops.gather(positions, self.row_batch, 0)),
                         axis=1)                                            # [B kv, 3]
        k_all = ops.scatter_nd_update(self.k_cache, rows, k.reshape(-1, self.head_dim))
        v_all = ops.scatter_nd_update(self.v_cache, rows, v.reshape(-1, self.head_dim))
        return k_all, v_all

    def _cache_mask(self, positions):
        """[B, 1, 1, L]: 0 for cache positions <= the sequence's position, MASKED after."""
        batch = positions.shape[0]
        visible = self.key_positions.reshape(1, -1) <= positions.reshape(batch, 1)   # [B, L]
        mask = (1.0 - visible.astype(ms.float32)) * MASKED
        return mask.reshape(batch, 1, 1, -1)
