"""Independent float64 NumPy reference of the decoder-only MoE language model.

Written from the math only (it shares no code with ``mindspore_moe_ep``); the MoE layers use the
reference of ``numpy_moe``. Parameters are keyed by the model's parameter names
(``MoETransformerLM.parameters_and_names()``), whose layouts are:

    embedding                        [V, H]
    layers.{l}.attention_norm.weight [H]          RMSNorm scale (also ffn_norm, final_norm)
    layers.{l}.attention.qkv_weight  [H, (h + 2 kv) D]   x @ W -> q | k | v, heads major
    layers.{l}.attention.out_weight  [h D, H]
    layers.{l}.ffn.gate_up_weight    [H, 2 F]     dense layers: x @ W -> gate | up
    layers.{l}.ffn.down_weight       [F, H]
    layers.{l}.ffn.router.gate_weight, .router.expert_bias, .experts.gate_up_weight [E, H, 2F],
    .experts.down_weight [E, F, H], .shared_expert.gate_up_weight [1, H, 2Fs],
    .shared_expert.down_weight [1, Fs, H]                               MoE layers
    lm_head                          [H, V]

Rotary embedding: channel i and channel i + D/2 of a head form a pair rotated by
``position * theta^(-2i/D)``; attention is causal softmax(q k^T / sqrt(D)) v, each key/value head
serving h / kv consecutive query heads.
"""
import dataclasses

import numpy as np

from . import numpy_moe


@dataclasses.dataclass(frozen=True)
class LMRefConfig:
    num_layers: int
    dense_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    norm_eps: float
    moe: numpy_moe.RefConfig


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rotate(x, positions, theta):
    """x [S, D] at positions [S]: each pair (i, i + D/2) rotated by pos * theta^(-2i/D)."""
    half = x.shape[-1] // 2
    angle = positions[:, None] * theta ** (-2.0 * np.arange(half) / x.shape[-1])  # [S, D/2]
    first, second = x[:, :half], x[:, half:]
    return np.concatenate([first * np.cos(angle) - second * np.sin(angle),
                           second * np.cos(angle) + first * np.sin(angle)], axis=1)


def attention(x, qkv_weight, out_weight, cfg):
    """Causal GQA self-attention of one sequence x [S, H] -> [S, H]."""
    seq_len, dim = x.shape[0], cfg.head_dim
    qkv = x @ qkv_weight
    q = qkv[:, :cfg.num_heads * dim].reshape(seq_len, cfg.num_heads, dim)
    k = qkv[:, cfg.num_heads * dim:(cfg.num_heads + cfg.kv_heads) * dim]
    v = qkv[:, (cfg.num_heads + cfg.kv_heads) * dim:]
    k = k.reshape(seq_len, cfg.kv_heads, dim)
    v = v.reshape(seq_len, cfg.kv_heads, dim)
    positions = np.arange(seq_len, dtype=np.float64)
    heads = []
    for head in range(cfg.num_heads):
        kv = head // (cfg.num_heads // cfg.kv_heads)
        q_h = rotate(q[:, head], positions, cfg.rope_theta)
        k_h = rotate(k[:, kv], positions, cfg.rope_theta)
        scores = q_h @ k_h.T / np.sqrt(dim)
        scores[np.triu_indices(seq_len, 1)] = -np.inf
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        heads.append(probs @ v[:, kv])
    return np.concatenate(heads, axis=1) @ out_weight


def silu(a):
    return a / (1.0 + np.exp(-a))


def moe_params(params, prefix):
    """The MoE layer's weights in numpy_moe's (Hugging Face) names."""
    gate_up = params[prefix + "experts.gate_up_weight"]
    down = params[prefix + "experts.down_weight"]
    ffn = down.shape[1]
    result = {numpy_moe.GATE: params[prefix + "router.gate_weight"],
              numpy_moe.BIAS: params[prefix + "router.expert_bias"]}
    for expert in range(gate_up.shape[0]):
        result[f"experts.{expert}.gate_proj.weight"] = gate_up[expert][:, :ffn].T
        result[f"experts.{expert}.up_proj.weight"] = gate_up[expert][:, ffn:].T
        result[f"experts.{expert}.down_proj.weight"] = down[expert].T
    shared_key = prefix + "shared_expert.gate_up_weight"
    if shared_key in params:
        shared_gate_up = params[shared_key][0]
        shared_down = params[prefix + "shared_expert.down_weight"][0]
        shared = shared_down.shape[0]
        result["shared_experts.gate_proj.weight"] = shared_gate_up[:, :shared].T
        result["shared_experts.up_proj.weight"] = shared_gate_up[:, shared:].T
        result["shared_experts.down_proj.weight"] = shared_down.T
    return result


def lm_forward(params, tokens, cfg):
    """Logits [B, S, V] float64 of token ids [B, S]."""
    params = {name: np.asarray(value, np.float64) for name, value in params.items()}
    x = params["embedding"][tokens]                                         # [B, S, H]
    for layer in range(cfg.num_layers):
        prefix = f"layers.{layer}."
        normed = rms_norm(x, params[prefix + "attention_norm.weight"], cfg.norm_eps)
        x = x + np.stack([attention(sequence, params[prefix + "attention.qkv_weight"],
                                    params[prefix + "attention.out_weight"], cfg)
                          for sequence in normed])
        normed = rms_norm(x, params[prefix + "ffn_norm.weight"], cfg.norm_eps)
        if layer < cfg.dense_layers:
            gate_up = normed @ params[prefix + "ffn.gate_up_weight"]
            ffn = gate_up.shape[-1] // 2
            x = x + (silu(gate_up[..., :ffn]) * gate_up[..., ffn:]) @ params[prefix +
                                                                             "ffn.down_weight"]
        else:
            out, _ = numpy_moe.moe_forward(moe_params(params, prefix + "ffn."), normed, cfg.moe)
            x = x + out
    return rms_norm(x, params["final_norm.weight"], cfg.norm_eps) @ params["lm_head"]
