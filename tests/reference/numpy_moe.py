"""Independent float64 NumPy reference of the whole MoE layer.

This module deliberately shares no code with ``mindspore_moe_ep``: it is written from the math of
the layer only, so that the library can be checked against it.

Shapes: T tokens, H hidden, E experts, K top-k, F expert FFN width, Fs shared-expert FFN width,
G expert groups. Weights use the Hugging Face (DeepSeek-V3) layouts and names:

    gate.weight                          [E, H]
    gate.e_score_correction_bias         [E]     (used only if ``expert_bias``)
    experts.{i}.gate_proj.weight         [F, H]
    experts.{i}.up_proj.weight           [F, H]
    experts.{i}.down_proj.weight         [H, F]
    shared_experts.gate_proj.weight      [Fs, H] (optional)
    shared_experts.up_proj.weight        [Fs, H] (optional)
    shared_experts.down_proj.weight      [H, Fs] (optional)
    shared_expert_gate.weight            [1, H]  (optional, Qwen2-MoE: the shared output is
                                                  scaled by sigmoid(x . w) per token)

Public functions:
    route(...)                  router: expert ids, routing weights, scores, logits
    apply_capacity(...)         which (token, k) pairs an expert keeps under a capacity
    moe_forward(...)            the layer output and its statistics
    moe_loss_and_grads(...)     L = sum(y * G) + aux + z and its analytic gradients
    finite_difference_grads(...)  the same gradients by central differences (for self-checks)
"""
import dataclasses
import math
from typing import Dict, Optional

import numpy as np

GATE = "gate.weight"
BIAS = "gate.e_score_correction_bias"
SHARED_PREFIX = "shared_experts"
SHARED_GATE = "shared_expert_gate.weight"


@dataclasses.dataclass(frozen=True)
class RefConfig:
    """Routing / loss settings of the reference (sizes are read from the weights)."""
    num_experts: int
    top_k: int
    score_func: str = "softmax"          # "softmax" | "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    num_groups: int = 1                  # G; group-limited routing if > 1
    topk_groups: int = 1
    group_score: str = "top2_sum"        # "top2_sum" (DeepSeek-V3) | "max" (DeepSeek-V2)
    expert_bias: bool = False            # add gate.e_score_correction_bias to the choice scores
    aux_loss_type: str = "none"          # "none" | "switch" | "seq"
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0
    capacity_factor: Optional[float] = None  # None = dropless


# ----------------------------------------------------------------------------------------------
# Elementwise helpers
# ----------------------------------------------------------------------------------------------

def sigmoid(a):
    """Numerically stable logistic function."""
    a = np.asarray(a, dtype=np.float64)
    out = np.empty_like(a)
    pos = a >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-a[pos]))
    ea = np.exp(a[~pos])
    out[~pos] = ea / (1.0 + ea)
    return out


def softmax(a):
    """Softmax over the last axis."""
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def logsumexp(a):
    """log(sum(exp(a))) over the last axis."""
    m = a.max(axis=-1)
    return m + np.log(np.exp(a - m[..., None]).sum(axis=-1))


def silu(a):
    return a * sigmoid(a)


def silu_grad(a):
    """d silu(a) / da = sig(a) * (1 + a * (1 - sig(a)))."""
    s = sigmoid(a)
    return s * (1.0 + a * (1.0 - s))


def stable_topk_desc(values, k):
    """Indices of the k largest entries along the last axis, descending; ties -> lower index."""
    order = np.argsort(-values, axis=-1, kind="stable")
    return order[..., :k]


# ----------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------

def group_scores(grouped, cfg):
    """[T, G, E/G] selection scores -> [T, G]: each group's best score ("max", DeepSeek-V2) or
    the sum of its two best ("top2_sum", DeepSeek-V3)."""
    if cfg.group_score == "max":
        return grouped.max(axis=-1)
    best_two = -np.sort(-grouped, axis=-1)[..., :min(2, grouped.shape[-1])]  # [T, G, <=2]
    return best_two.sum(axis=-1)


def _choice_scores(scores, params, cfg):
    """Scores used for selection: scores (+ expert bias), group-limited if num_groups > 1. [T,E]"""
    choice = scores + params[BIAS][None, :] if cfg.expert_bias else scores.copy()
    if cfg.num_groups > 1:
        t, e = choice.shape
        g = cfg.num_groups
        grouped = choice.reshape(t, g, e // g)                            # [T, G, E/G]
        group_score = group_scores(grouped, cfg)                         # [T, G]
        kept_groups = stable_topk_desc(group_score, cfg.topk_groups)     # [T, topk_groups]
        group_mask = np.zeros((t, g), dtype=bool)
        np.put_along_axis(group_mask, kept_groups, True, axis=-1)
        grouped = np.where(group_mask[..., None], grouped, -np.inf)
        choice = grouped.reshape(t, e)
    return choice


def route(x, params, cfg):
    """Router of a [T, H] input.

    Returns a dict with ``logits`` [T,E], ``scores`` [T,E], ``choice`` [T,E] (selection scores),
    ``expert_ids`` [T,K] int64 and ``weights`` [T,K] float64.
    """
    x = np.asarray(x, dtype=np.float64)
    logits = x @ params[GATE].astype(np.float64).T                        # [T, E]
    if cfg.score_func == "softmax":
        scores = softmax(logits)
    elif cfg.score_func == "sigmoid":
        scores = sigmoid(logits)
    else:
        raise ValueError(f"unknown score_func {cfg.score_func!r}")
    choice = _choice_scores(scores, params, cfg)                          # [T, E]
    expert_ids = stable_topk_desc(choice, cfg.top_k)                      # [T, K]
    raw = np.take_along_axis(scores, expert_ids, axis=-1)                 # [T, K], no bias
    weights = _normalize_weights(raw, cfg)
    return {"logits": logits, "scores": scores, "choice": choice,
            "expert_ids": expert_ids, "weights": weights}


def _normalize_weights(raw, cfg):
    """Optional top-k normalisation, then the routed scaling factor. [T,K] -> [T,K]"""
    w = raw
    if cfg.norm_topk_prob and cfg.top_k > 1:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    return w * cfg.routed_scaling_factor


def routing_margin(x, params, cfg):
    """Smallest gap, over tokens, between the K-th and (K+1)-th selection score.

    A large margin means a low-precision router cannot pick different experts. Returns +inf if
    K == E. Group-limited selection also counts the gap at the kept-group boundary.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1, params[GATE].shape[1])
    r = route(x, params, cfg)
    margins = []
    e = cfg.num_experts
    if cfg.top_k < e:
        s = -np.sort(-r["choice"], axis=-1)
        gap = s[:, cfg.top_k - 1] - s[:, cfg.top_k]
        margins.append(np.where(np.isfinite(gap), gap, np.inf).min())
    if cfg.num_groups > 1 and cfg.topk_groups < cfg.num_groups:
        base = r["scores"] + params[BIAS][None, :] if cfg.expert_bias else r["scores"]
        g = cfg.num_groups
        grouped = base.reshape(len(x), g, e // g)
        gs = -np.sort(-group_scores(grouped, cfg), axis=-1)
        margins.append((gs[:, cfg.topk_groups - 1] - gs[:, cfg.topk_groups]).min())
    return min(margins) if margins else np.inf


# ----------------------------------------------------------------------------------------------
# Capacity
# ----------------------------------------------------------------------------------------------

def expert_capacity(capacity_factor, num_tokens, top_k, num_experts):
    """C = ceil(capacity_factor * T * K / E)."""
    return int(math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def apply_capacity(expert_ids, num_experts, capacity_factor):
    """Which (t, k) pairs are kept. Each expert keeps its first C pairs in (t, then k) order.

    Returns ``keep`` [T,K] bool, ``tokens_per_expert`` [E] (kept counts) and ``num_dropped``.
    """
    t, k = expert_ids.shape
    keep = np.ones((t, k), dtype=bool)
    if capacity_factor is not None:
        cap = expert_capacity(capacity_factor, t, k, num_experts)
        filled = np.zeros(num_experts, dtype=np.int64)
        for ti in range(t):
            for ki in range(k):
                e = expert_ids[ti, ki]
                if filled[e] < cap:
                    filled[e] += 1
                else:
                    keep[ti, ki] = False
    tokens_per_expert = np.bincount(expert_ids[keep], minlength=num_experts).astype(np.int64)
    return keep, tokens_per_expert, int((~keep).sum())


# ----------------------------------------------------------------------------------------------
# Auxiliary losses
# ----------------------------------------------------------------------------------------------

def _aux_loss_dprobs(scores, expert_ids, num_sequences, cfg):
    """Auxiliary load-balancing loss and d aux / d probs.

    probs = scores / scores.sum(-1); the per-expert counts come from the selection before any
    capacity drops and are constants for the gradient. Returns (aux, d_probs [T,E]).
    """
    t, e = scores.shape
    k = cfg.top_k
    probs = scores / scores.sum(axis=-1, keepdims=True)                   # [T, E]
    kind = cfg.aux_loss_type
    if kind in (None, "none") or cfg.aux_loss_coeff == 0.0:
        return 0.0, np.zeros_like(scores)
    if kind == "switch":
        f = np.bincount(expert_ids.ravel(), minlength=e) / (t * k)      # [E]
        p_mean = probs.mean(axis=0)                                       # [E]
        aux = cfg.aux_loss_coeff * e * float(f @ p_mean)
        d_probs = np.broadcast_to(cfg.aux_loss_coeff * e * f / t, (t, e)).copy()
        return aux, d_probs
    if kind == "seq":
        b = num_sequences
        s = t // b
        ids_b = expert_ids.reshape(b, s, k)
        probs_b = probs.reshape(b, s, e)
        aux = 0.0
        d_probs = np.zeros((b, s, e))
        for bi in range(b):
            f = e / (k * s) * np.bincount(ids_b[bi].ravel(), minlength=e)  # [E]
            aux += float(f @ probs_b[bi].mean(axis=0))
            d_probs[bi] = cfg.aux_loss_coeff / b * f / s
        return cfg.aux_loss_coeff * aux / b, d_probs.reshape(t, e)
    raise ValueError(f"unknown aux_loss_type {kind!r}")


def aux_loss(scores, expert_ids, num_sequences, cfg):
    """The auxiliary load-balancing loss value (see _aux_loss_dprobs)."""
    return _aux_loss_dprobs(scores, expert_ids, num_sequences, cfg)[0]


def z_loss(logits, cfg):
    """z_coeff * mean_t logsumexp(logits[t])^2."""
    return cfg.z_loss_coeff * float((logsumexp(logits) ** 2).mean())


# ----------------------------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------------------------

def swiglu(v, w_gate, w_up, w_down):
    """down( silu(gate v) * up v ) for rows v [N,H]; w_gate/w_up [F,H], w_down [H,F] -> [N,H]."""
    return (silu(v @ w_gate.T) * (v @ w_up.T)) @ w_down.T


def _expert_weights(params, i):
    p = f"experts.{i}."
    return (params[p + "gate_proj.weight"], params[p + "up_proj.weight"],
            params[p + "down_proj.weight"])


def _shared_weights(params):
    p = SHARED_PREFIX + "."
    if p + "gate_proj.weight" not in params:
        return None
    return (params[p + "gate_proj.weight"], params[p + "up_proj.weight"],
            params[p + "down_proj.weight"])


def _shared_scale(params, x2):
    """[T, 1]: sigmoid(x . w) with a shared-expert gate w [1, H], else 1."""
    if SHARED_GATE not in params:
        return np.ones((x2.shape[0], 1))
    return sigmoid(x2 @ params[SHARED_GATE].T)


def _as_float64(params):
    return {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}


def _flatten_input(x):
    """[T,H] -> ([T,H], 1); [B,S,H] -> ([B*S,H], B)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        return x, 1
    if x.ndim == 3:
        return x.reshape(-1, x.shape[-1]), x.shape[0]
    raise ValueError(f"expected [T,H] or [B,S,H], got shape {x.shape}")


# ----------------------------------------------------------------------------------------------
# Layer forward
# ----------------------------------------------------------------------------------------------

def _experts_input(expert_input, x2):
    """The rows the routed experts read: x itself, or e.g. its int8 round trip (dispatch.quant:
    int8, see numpy_quant.py); routing and the shared expert always read x."""
    if expert_input is None:
        return x2
    return np.asarray(expert_input, dtype=np.float64).reshape(x2.shape)


def moe_forward(params, x, cfg, expert_input=None):
    """Layer output y (same shape as x) and a stats dict. ``expert_input``: the rows the routed
    experts read instead of x (e.g. after an int8 round trip).

    stats: ``tokens_per_expert`` [E] (kept), ``num_dropped``, ``aux_loss``, ``z_loss``,
    ``expert_ids`` [T,K], ``weights`` [T,K], ``keep`` [T,K].
    """
    params = _as_float64(params)
    x2, num_seq = _flatten_input(x)                                        # [T, H]
    r = route(x2, params, cfg)
    ids, w = r["expert_ids"], r["weights"]                                 # [T, K]
    keep, tokens_per_expert, num_dropped = apply_capacity(ids, cfg.num_experts,
                                                          cfg.capacity_factor)
    routed_x = _experts_input(expert_input, x2)                            # [T, H]
    y = np.zeros_like(x2)                                                  # [T, H]
    for e in range(cfg.num_experts):
        rows, ks = np.nonzero((ids == e) & keep)                          # pairs routed to e
        if len(rows):
            out = swiglu(routed_x[rows], *_expert_weights(params, e))      # [n_e, H]
            np.add.at(y, rows, w[rows, ks][:, None] * out)
    shared = _shared_weights(params)
    if shared is not None:
        y = y + _shared_scale(params, x2) * swiglu(x2, *shared)
    stats = {
        "tokens_per_expert": tokens_per_expert,
        "num_dropped": num_dropped,
        "aux_loss": aux_loss(r["scores"], ids, num_seq, cfg),
        "z_loss": z_loss(r["logits"], cfg),
        "expert_ids": ids,
        "weights": w,
        "keep": keep,
    }
    return y.reshape(np.shape(x)), stats


def moe_loss(params, x, grad_out, cfg):
    """Training loss L = sum(y * grad_out) + aux + z."""
    y, stats = moe_forward(params, x, cfg)
    return float((y * grad_out).sum()) + stats["aux_loss"] + stats["z_loss"]


# ----------------------------------------------------------------------------------------------
# Analytic gradients
# ----------------------------------------------------------------------------------------------

def _swiglu_backward(v, w_gate, w_up, w_down, d_out):
    """Backward of swiglu for rows v [N,H] and d_out [N,H].

    Returns (out [N,H], d_v [N,H], d_gate [F,H], d_up [F,H], d_down [H,F]).
    """
    a = v @ w_gate.T                                                       # [N, F]
    b = v @ w_up.T                                                         # [N, F]
    u = silu(a) * b                                                        # [N, F]
    out = u @ w_down.T                                                     # [N, H]
    d_down = d_out.T @ u                                                   # [H, F]
    d_u = d_out @ w_down                                                   # [N, F]
    d_a = d_u * b * silu_grad(a)                                           # [N, F]
    d_b = d_u * silu(a)                                                    # [N, F]
    d_gate = d_a.T @ v                                                     # [F, H]
    d_up = d_b.T @ v                                                       # [F, H]
    d_v = d_a @ w_gate + d_b @ w_up                                        # [N, H]
    return out, d_v, d_gate, d_up, d_down


def moe_loss_and_grads(params, x, grad_out, cfg, expert_input=None):
    """L = sum(y * grad_out) + aux + z and its gradients (analytic backprop, float64).

    ``expert_input``: the rows the routed experts read instead of x (as in :func:`moe_forward`);
    their gradient is added to x's unchanged (straight-through, as for a quantized dispatch).

    Returns (L, grads) with grads["x"] shaped like x and grads[name] for ``gate.weight``, every
    expert weight and the shared-expert weights (not for the expert bias, which is not trained).
    Selection, capacity drops and aux-loss counts are piecewise constant and get no gradient.
    """
    params = _as_float64(params)
    x2, num_seq = _flatten_input(x)                                        # [T, H]
    g_out = np.asarray(grad_out, dtype=np.float64).reshape(x2.shape)       # [T, H]
    t = x2.shape[0]
    r = route(x2, params, cfg)
    logits, scores, ids, w = r["logits"], r["scores"], r["expert_ids"], r["weights"]
    keep, _, _ = apply_capacity(ids, cfg.num_experts, cfg.capacity_factor)
    routed_x = _experts_input(expert_input, x2)                            # [T, H]

    grads = {"x": np.zeros_like(x2)}
    y = np.zeros_like(x2)
    d_w = np.zeros_like(w)                                                 # [T, K]

    # Routed experts: y[t] += w[t,k] * expert(x[t]) for kept pairs.
    for e in range(cfg.num_experts):
        wg, wu, wd = _expert_weights(params, e)
        rows, ks = np.nonzero((ids == e) & keep)
        pre = f"experts.{e}."
        if len(rows) == 0:
            for name, ref in (("gate_proj", wg), ("up_proj", wu), ("down_proj", wd)):
                grads[pre + name + ".weight"] = np.zeros_like(ref)
            continue
        w_rows = w[rows, ks][:, None]                                      # [n_e, 1]
        out, d_v, d_g, d_u, d_d = _swiglu_backward(routed_x[rows], wg, wu, wd,
                                                   w_rows * g_out[rows])
        np.add.at(y, rows, w_rows * out)
        np.add.at(grads["x"], rows, d_v)
        d_w[rows, ks] = (g_out[rows] * out).sum(axis=-1)
        grads[pre + "gate_proj.weight"] = d_g
        grads[pre + "up_proj.weight"] = d_u
        grads[pre + "down_proj.weight"] = d_d

    # Shared expert: y += s(x) * shared(x), s = sigmoid(x . w) with a gate, else 1.
    shared = _shared_weights(params)
    if shared is not None:
        scale = _shared_scale(params, x2)                                  # [T, 1]
        out, d_v, d_g, d_u, d_d = _swiglu_backward(x2, *shared, scale * g_out)
        y += scale * out
        grads["x"] += d_v
        if SHARED_GATE in params:
            d_pre = (g_out * out).sum(axis=-1, keepdims=True) * scale * (1.0 - scale)  # [T, 1]
            grads[SHARED_GATE] = d_pre.T @ x2                              # [1, H]
            grads["x"] += d_pre @ params[SHARED_GATE]
        grads[SHARED_PREFIX + ".gate_proj.weight"] = d_g
        grads[SHARED_PREFIX + ".up_proj.weight"] = d_u
        grads[SHARED_PREFIX + ".down_proj.weight"] = d_d

    # Routing weights -> raw selected scores (scale, then optional normalisation).
    d_wn = d_w * cfg.routed_scaling_factor                                 # [T, K]
    raw = np.take_along_axis(scores, ids, axis=-1)                         # [T, K]
    if cfg.norm_topk_prob and cfg.top_k > 1:
        s = raw.sum(axis=-1, keepdims=True) + 1e-20                        # [T, 1]
        d_raw = d_wn / s - (d_wn * raw).sum(axis=-1, keepdims=True) / s ** 2
    else:
        d_raw = d_wn
    d_scores = np.zeros_like(scores)                                       # [T, E]
    np.put_along_axis(d_scores, ids, d_raw, axis=-1)   # ids in a row are distinct

    # Aux loss through probs = scores / scores.sum(-1).
    aux, d_probs = _aux_loss_dprobs(scores, ids, num_seq, cfg)
    s_sum = scores.sum(axis=-1, keepdims=True)                             # [T, 1]
    d_scores += d_probs / s_sum - (d_probs * scores).sum(axis=-1, keepdims=True) / s_sum ** 2

    # Scores -> logits.
    if cfg.score_func == "softmax":
        d_logits = scores * (d_scores - (d_scores * scores).sum(axis=-1, keepdims=True))
    else:
        d_logits = d_scores * scores * (1.0 - scores)

    # z-loss: z_coeff * mean_t lse_t^2 -> d logits[t] = z_coeff * 2 lse_t / T * softmax(logits[t]).
    lse = logsumexp(logits)                                                # [T]
    zl = z_loss(logits, cfg)
    d_logits += cfg.z_loss_coeff * 2.0 * lse[:, None] / t * softmax(logits)

    # Logits = x @ gate.weight.T.
    grads[GATE] = d_logits.T @ x2                                          # [E, H]
    grads["x"] += d_logits @ params[GATE]
    grads["x"] = grads["x"].reshape(np.shape(x))

    loss = float((y * g_out).sum()) + aux + zl
    return loss, grads


def finite_difference_grads(params, x, grad_out, cfg, eps=1e-6, names=None):
    """Central finite differences of moe_loss w.r.t. x and the named parameters (float64).

    Meant for tiny sizes; selection is piecewise constant, so eps must be far below the routing
    margins. ``names`` defaults to every trainable weight (all except the expert bias).
    """
    params = _as_float64(params)
    x = np.asarray(x, dtype=np.float64)
    if names is None:
        names = [n for n in params if n != BIAS]
    grads = {}

    def fd(array, loss_of):
        g = np.zeros_like(array)
        for idx in np.ndindex(array.shape):
            old = array[idx]
            array[idx] = old + eps
            plus = loss_of()
            array[idx] = old - eps
            minus = loss_of()
            array[idx] = old
            g[idx] = (plus - minus) / (2.0 * eps)
        return g

    x_work = x.copy()
    grads["x"] = fd(x_work, lambda: moe_loss(params, x_work, grad_out, cfg))
    for name in names:
        grads[name] = fd(params[name], lambda: moe_loss(params, x, grad_out, cfg))
    return grads


# ----------------------------------------------------------------------------------------------
# Test-data helpers
# ----------------------------------------------------------------------------------------------

def make_params(rng, hidden, ffn, num_experts, shared_ffn=None, gate_scale=1.0,
                with_bias=False, shared_gate=False) -> Dict[str, np.ndarray]:
    """Random float32 weights in the HF layout (std ~ 1/sqrt(fan_in); gate scaled by gate_scale).

    ``shared_gate`` adds a Qwen2-MoE shared-expert gate (needs ``shared_ffn``)."""
    def w(shape, fan_in, scale=1.0):
        return (rng.standard_normal(shape) * scale / np.sqrt(fan_in)).astype(np.float32)

    params = {GATE: w((num_experts, hidden), hidden, gate_scale)}
    if with_bias:
        params[BIAS] = (0.1 * rng.standard_normal(num_experts)).astype(np.float32)
    for i in range(num_experts):
        params[f"experts.{i}.gate_proj.weight"] = w((ffn, hidden), hidden)
        params[f"experts.{i}.up_proj.weight"] = w((ffn, hidden), hidden)
        params[f"experts.{i}.down_proj.weight"] = w((hidden, ffn), ffn)
    if shared_ffn:
        params["shared_experts.gate_proj.weight"] = w((shared_ffn, hidden), hidden)
        params["shared_experts.up_proj.weight"] = w((shared_ffn, hidden), hidden)
        params["shared_experts.down_proj.weight"] = w((hidden, shared_ffn), shared_ffn)
        if shared_gate:
            params[SHARED_GATE] = w((1, hidden), hidden, 2.0)
    return params


def round_to_dtype(a, dtype):
    """Round a float array to float16 / bfloat16 / float32 values, returned as float32."""
    a = np.asarray(a, dtype=np.float32)
    if dtype == "float32":
        return a.copy()
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        bits = a.view(np.uint32).astype(np.uint64)
        rounding = 0x7FFF + ((bits >> 16) & 1)                            # round half to even
        out = ((bits + rounding) >> 16 << 16).astype(np.uint32)
        return out.view(np.float32)
    raise ValueError(f"unknown dtype {dtype!r}")
