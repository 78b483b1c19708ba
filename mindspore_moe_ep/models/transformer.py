"""A decoder-only MoE language model: the pattern to copy into one's own model.

    embedding -> N x [x + attention(norm(x)); x + ffn(norm(x))] -> norm -> lm_head

The first ``lm.dense_layers`` FFNs are dense SwiGLUs, the others :class:`MoELayer` (DeepSeek-V3's
layout). Everything a model needs from the library is the MoELayer call with an explicit phase:

- training and prompts: ``moe(x, "prefill")`` (the sparse all-to-all-v, differentiable);
- generation steps: ``moe(x, "decode")`` (the fused Dispatch/Combine, inference only).

Under expert parallelism every rank of a group must call each MoE layer the same number of times
with the same phase; a model that runs its layers in order on every rank does. The router's aux
losses join the backward pass by themselves; the gradients go through
:class:`ExpertParallelGradReducer` (see ``mindspore_moe_ep.training``).

The model computes in float32 (MindSpore's CPU MatMul has no bfloat16); each MoE layer runs in
``runtime.dtype`` inside.
"""
from mindspore import Parameter, Tensor, nn, ops

from ..initializers import TensorId, normal_array
from ..layer import MoELayer
from .attention import CausalSelfAttention
from .feed_forward import DenseSwiGLU
from .linear import linear
from .norm import RMSNorm

PHASES = ("prefill", "decode")


def dense_ffn_size(config):
    """``lm.dense_ffn_size``, or the MoE layer's active width when null."""
    if config.lm.dense_ffn_size is not None:
        return config.lm.dense_ffn_size
    return config.model.expert_ffn_size * (config.router.top_k + config.model.num_shared_experts)


def moe_layer_config(config, layer_index):
    """The config of layer ``layer_index``'s MoELayer: the model's, with a seed of its own (so
    that layers start from different weights; every EP size draws the same ones)."""
    return config.replace(seed=config.runtime.seed * 1000 + layer_index)


class DecoderLayer(nn.Cell):
    """Pre-norm residual block: attention, then a dense or MoE SwiGLU FFN."""

    def __init__(self, config, layer_index, cache_batch_size=0, moe_decode_phase="decode"):
        super().__init__()
        hidden, lm = config.model.hidden_size, config.lm
        self.attention_norm = RMSNorm(hidden, lm.norm_eps)
        self.attention = CausalSelfAttention(hidden, lm, config.runtime.seed, layer_index,
                                             cache_batch_size)
        self.ffn_norm = RMSNorm(hidden, lm.norm_eps)
        self.is_moe = layer_index >= lm.dense_layers
        if self.is_moe:
            self.ffn = MoELayer(moe_layer_config(config, layer_index))
        else:
            self.ffn = DenseSwiGLU(hidden, dense_ffn_size(config), config.runtime.seed,
                                   layer_index)
        # The MoE phase of generation steps: "decode" (fused operators), or "prefill" to force
        # the all-to-all-v path (for comparisons, see scripts/benchmarks/lm_decode.py).
        self.moe_decode_phase = moe_decode_phase

    def construct(self, x, phase="prefill", positions=None):
        """x: [B, S, H] -> [B, S, H]."""
        x = x + self.attention(self.attention_norm(x), phase, positions)
        ffn_phase = self.moe_decode_phase if phase == "decode" else "prefill"
        return x + self.ffn(self.ffn_norm(x), ffn_phase)


class MoETransformerLM(nn.Cell):
    """``model(tokens, phase, positions)`` -> logits [B, S, vocab] float32.

    - ``phase="prefill"``: tokens [B, S] int32 at positions 0 .. S-1 (training, prompts);
    - ``phase="decode"``: tokens [B, 1], one new token per sequence at ``positions`` [B] int32;
      needs the KV cache: build the model with ``cache_batch_size`` = B.
    """

    def __init__(self, config, cache_batch_size=0, moe_decode_phase="decode"):
        super().__init__()
        if moe_decode_phase not in PHASES:
            raise ValueError(f"moe_decode_phase must be one of {PHASES}, got {moe_decode_phase!r}")
        self.config = config
        hidden, lm, seed = config.model.hidden_size, config.lm, config.runtime.seed
        self.cache_batch_size = cache_batch_size
        self.embedding = Parameter(Tensor(normal_array((lm.vocab_size, hidden), 1.0,
                                                       (seed, TensorId.EMBEDDING, 0))),
                                   name="embedding")                               # [V, H]
        self.layers = nn.CellList([DecoderLayer(config, index, cache_batch_size, moe_decode_phase)
                                   for index in range(lm.num_layers)])
        self.final_norm = RMSNorm(hidden, lm.norm_eps)
        self.lm_head = Parameter(Tensor(normal_array((hidden, lm.vocab_size), hidden ** -0.5,
                                                     (seed, TensorId.LM_HEAD, 0))),
                                 name="lm_head")                                   # [H, V]

    def construct(self, tokens, phase="prefill", positions=None):
        x = ops.gather(self.embedding, tokens, 0)                     # [B, S, H]
        for layer in self.layers:
            x = layer(x, phase, positions)                            # [B, S, H]
        return linear(self.final_norm(x), self.lm_head)               # [B, S, V]

    def moe_layers(self):
        """The MoELayers, in layer order."""
        return [layer.ffn for layer in self.layers if layer.is_moe]


def cross_entropy(logits, targets):
    """Mean next-token loss in nats: logits [B, S, V] float32, targets [B, S] int32 -> []."""
    log_normalizer = ops.logsumexp(logits, -1)                                     # [B, S]
    target_logits = ops.gather_elements(logits, 2, targets.expand_dims(-1)).squeeze(-1)
    return (log_normalizer - target_logits).mean()


class NextTokenLoss(nn.Cell):
    """``loss(tokens, targets)``: the model's prefill forward and the mean cross-entropy."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, tokens, targets):
        return cross_entropy(self.model(tokens, "prefill"), targets)
