"""A decoder-only MoE language model built from MindSpore Cells and :class:`MoELayer`.

    config = mee.load_config("yaml_configs/lm_tiny.yaml")   # sections model/router/... + lm
    model = MoETransformerLM(config)                        # training (no KV cache)
    logits = model(tokens)                                  # [B, S] int32 -> [B, S, vocab]

Modules: ``norm`` (RMSNorm), ``rotary`` (RoPE), ``attention`` (causal GQA attention with a static
KV cache), ``feed_forward`` (dense SwiGLU), ``transformer`` (decoder layer, model, loss),
``checkpoint`` (per-rank files, resharding), ``generation`` (prefill + decode).
"""
from .transformer import (DecoderLayer, MoETransformerLM, NextTokenLoss, cross_entropy,
                          dense_ffn_size)

__all__ = ["DecoderLayer", "MoETransformerLM", "NextTokenLoss", "cross_entropy",
           "dense_ffn_size"]
