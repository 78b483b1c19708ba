"""Run (d) of ``lm_decode.py``: the same MoE language model in PyTorch, expert parallelism by an
index-based all-to-all-v over gloo.

Started by ``lm_decode.py`` as 4 plain processes (torch.distributed, gloo, 1 thread each); it
is not meant to be run alone. It reads what the parent exported from the MindSpore model
(``lm_decode.py``'s ``export`` role): ``weights.npz`` (every model Parameter by its name in
``MoETransformerLM``, the experts of all ranks stacked, float32) and ``meta.json`` (the config,
the prompts, the padded prompt length). Only this module imports torch; the library never does.

The architecture is ``mindspore_moe_ep.models.MoETransformerLM`` written again op for op:

- embedding; per layer: RMSNorm, causal attention (rotary "rotate half" tables computed in
  float64 and stored float32, grouped-query heads, the query heads of one key/value head stacked
  as rows, scores ``q k^T * D^-0.5`` plus an additive mask of -1e9), a static KV cache of
  ``lm.max_seq_len`` positions (prefill fills it and zeros the rest; a decode step writes its key
  and value at the sequence's position and attends over the whole cache, later positions
  masked), RMSNorm, then a dense SwiGLU (the first ``lm.dense_layers`` layers) or the MoE FFN;
  final RMSNorm, LM head;
- the MoE FFN: the router of ``mindspore_moe_ep/router.py`` (sigmoid or softmax scores, the
  expert bias added for selection only, group-limited top-k with the group score of the
  config, weights renormalised with +1e-20 and scaled), dropless; the exchange of
  ``end_to_end.py``'s ``index_based_ep_layer`` (Megatron-Core's all-to-all token dispatcher):
  (token, expert) pairs sorted by expert, the per-expert counts by ``all_to_all_single``, the
  rows by ``all_to_all_single`` with split sizes, rows regrouped by local expert, one SwiGLU per
  local expert on its contiguous rows, the reverse exchange, the weighted sum per token; plus
  the shared expert on every token.

Generation mirrors ``mindspore_moe_ep.models.generation.Generator`` (greedy, no early stop):
prompts right-padded with 0 to the longest prompt of the whole batch, one prefill, then one
decode step per new token, each followed by the ranks' agreement on stopping (an all_reduce, as
the Generator's AllGather). The decode step's split is measured as lm_decode.py's worker does
(20 alternated calls of the whole decode forward and of one MoE layer alone, minima).
"""
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist

import bench_common as bc

MASKED = -1.0e9  # the MindSpore model's additive mask


def rotary_tables(head_dim, max_seq_len, theta):
    """(cos, sin) [L, D] float32, as mindspore_moe_ep.models.rotary.rotary_tables."""
    inverse_frequency = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(max_seq_len, dtype=np.float64), inverse_frequency)
    angles = np.concatenate([angles, angles], axis=1)
    return (torch.from_numpy(np.cos(angles).astype(np.float32)),
            torch.from_numpy(np.sin(angles).astype(np.float32)))


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def swiglu(x, gate_up, down):
    """x [N, H], gate_up [H, 2F] (gate then up), down [F, H] -> [N, H]."""
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ down


class TorchMoETransformerLM:
    """MoETransformerLM in PyTorch (inference only), this rank's experts of every MoE layer."""

    def __init__(self, weights, config, rank, world, batch):
        model, router, lm = config["model"], config["router"], config["lm"]
        self.rank, self.world, self.batch = rank, world, batch
        self.hidden = model["hidden_size"]
        self.num_experts, self.local = model["num_experts"], model["num_experts"] // world
        self.top_k = router["top_k"]
        self.score_func = router["score_func"]
        self.num_groups = router["num_groups"]
        self.topk_groups = router["topk_groups"] or router["num_groups"]
        per_group = self.num_experts // self.num_groups
        self.experts_per_group = per_group
        self.scores_per_group = min(1 if router["group_score"] == "max" else 2, per_group)
        self.norm_topk_prob = router["norm_topk_prob"]
        self.scaling = router["routed_scaling_factor"]
        self.use_bias = router["expert_bias"]
        self.heads, self.head_dim = lm["num_heads"], lm["head_dim"]
        self.kv_heads = lm["num_kv_heads"] or lm["num_heads"]
        self.max_seq_len, self.eps = lm["max_seq_len"], lm["norm_eps"]
        self.cos, self.sin = rotary_tables(self.head_dim, self.max_seq_len, lm["rope_theta"])
        self.causal = torch.triu(torch.full((self.max_seq_len, self.max_seq_len), MASKED), 1)
        self.key_positions = torch.arange(self.max_seq_len)

        def tensor(name):
            return torch.from_numpy(np.ascontiguousarray(weights[name], dtype=np.float32))

        first, last = rank * self.local, (rank + 1) * self.local
        self.embedding, self.lm_head = tensor("embedding"), tensor("lm_head")
        self.final_norm = tensor("final_norm.weight")
        self.layers = []
        for index in range(lm["num_layers"]):
            prefix = f"layers.{index}."
            layer = {"attention_norm": tensor(prefix + "attention_norm.weight"),
                     "qkv": tensor(prefix + "attention.qkv_weight"),
                     "out": tensor(prefix + "attention.out_weight"),
                     "ffn_norm": tensor(prefix + "ffn_norm.weight"),
                     "is_moe": index >= lm["dense_layers"],
                     "k_cache": torch.zeros(batch, self.kv_heads, self.max_seq_len,
                                            self.head_dim),
                     "v_cache": torch.zeros(batch, self.kv_heads, self.max_seq_len,
                                            self.head_dim)}
            ffn = prefix + "ffn."
            if layer["is_moe"]:
                layer["gate"] = tensor(ffn + "router.gate_weight")                   # [E, H]
                layer["bias"] = tensor(ffn + "router.expert_bias")                   # [E]
                layer["gate_up"] = tensor(ffn + "experts.gate_up_weight")[first:last].clone()
                layer["down"] = tensor(ffn + "experts.down_weight")[first:last].clone()
                if model["num_shared_experts"]:
                    if model["shared_expert_gate"]:
                        raise NotImplementedError("a gated shared expert (Qwen2-MoE) is not "
                                                  "written in the PyTorch peer")
                    layer["shared_gate_up"] = tensor(ffn + "shared_expert.gate_up_weight")[0]
                    layer["shared_down"] = tensor(ffn + "shared_expert.down_weight")[0]
            else:
                layer["dense_gate_up"] = tensor(ffn + "gate_up_weight")
                layer["dense_down"] = tensor(ffn + "down_weight")
            self.layers.append(layer)

    # ---- the model --------------------------------------------------------------------------

    def forward(self, tokens, phase="prefill", positions=None):
        """tokens [B, S] int64 -> logits [B, S, V]; decode: S = 1 and positions [B] int64."""
        x = self.embedding[tokens]                                               # [B, S, H]
        for layer in self.layers:
            x = x + self.attention(layer, rms_norm(x, layer["attention_norm"], self.eps),
                                   phase, positions)
            normed = rms_norm(x, layer["ffn_norm"], self.eps)
            if layer["is_moe"]:
                x = x + self.moe(layer, normed.reshape(-1, self.hidden)).view_as(x)
            else:
                x = x + swiglu(normed.reshape(-1, self.hidden), layer["dense_gate_up"],
                               layer["dense_down"]).view_as(x)
        x = rms_norm(x, self.final_norm, self.eps)
        return (x.reshape(-1, self.hidden) @ self.lm_head).view(*tokens.shape, -1)

    def attention(self, layer, x, phase, positions):
        batch, seq_len, _ = x.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        qkv = (x.reshape(-1, self.hidden) @ layer["qkv"]).view(batch, seq_len, -1)
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        q = q.reshape(batch, seq_len, heads, dim).transpose(1, 2)               # [B, h, S, D]
        k = k.reshape(batch, seq_len, kv_heads, dim).transpose(1, 2)            # [B, kv, S, D]
        v = v.reshape(batch, seq_len, kv_heads, dim).transpose(1, 2)
        k_cache, v_cache = layer["k_cache"], layer["v_cache"]
        if phase == "decode":
            cos = self.cos[positions].view(batch, 1, 1, dim)
            sin = self.sin[positions].view(batch, 1, 1, dim)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            rows = torch.arange(batch)
            k_cache[rows, :, positions] = k[:, :, 0]                               # [B, kv, D]
            v_cache[rows, :, positions] = v[:, :, 0]
            k, v = k_cache, v_cache                                                # [B, kv, L, D]
            visible = self.key_positions.view(1, -1) <= positions.view(batch, 1)   # [B, L]
            mask = ((~visible).float() * MASKED).view(batch, 1, 1, -1)
        else:
            cos, sin = self.cos[:seq_len], self.sin[:seq_len]
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            k_cache.zero_()
            v_cache.zero_()
            k_cache[:, :, :seq_len] = k
            v_cache[:, :, :seq_len] = v
            mask = self.causal[:seq_len, :seq_len]
        group = heads // kv_heads
        q = q.reshape(batch, kv_heads, group * seq_len, dim)                       # [B, kv, gS, D]
        if group > 1 and mask.dim() == 2:
            mask = mask.repeat(group, 1)
        scores = q @ k.transpose(-1, -2) * dim ** -0.5 + mask
        out = (torch.softmax(scores, dim=-1) @ v).reshape(batch, heads, seq_len, dim)
        out = out.transpose(1, 2).reshape(batch * seq_len, heads * dim)
        return (out @ layer["out"]).view(batch, seq_len, self.hidden)

    def route(self, layer, x):
        """The router of mindspore_moe_ep/router.py: (ids [T, K] int64, weights [T, K])."""
        logits = x @ layer["gate"].T                                               # [T, E]
        scores = torch.sigmoid(logits) if self.score_func == "sigmoid" else \
            torch.softmax(logits, dim=-1)
        choice = scores + layer["bias"] if self.use_bias else scores
        if self.num_groups > 1:
            tokens = choice.shape[0]
            grouped = choice.view(tokens, self.num_groups, self.experts_per_group)
            group_scores = grouped.topk(self.scores_per_group, dim=-1).values.sum(-1)  # [T, G]
            kept = group_scores.topk(self.topk_groups, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
            expert_mask = group_mask.repeat_interleave(self.experts_per_group, dim=1)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        ids = choice.topk(self.top_k, dim=-1).indices                              # [T, K]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling

    def moe(self, layer, x):
        """x [T, H] -> [T, H]: route, exchange (index-based all-to-all-v), experts, return."""
        tokens, world, local, top_k = x.shape[0], self.world, self.local, self.top_k
        ids, weights = self.route(layer, x)
        flat_ids = ids.reshape(-1)                                                 # [T K]
        order = torch.argsort(flat_ids, stable=True)
        rows = x[order // top_k]                                                   # [T K, H]
        per_expert = torch.bincount(flat_ids, minlength=self.num_experts)          # [E]
        received_per_expert = torch.empty_like(per_expert)
        dist.all_to_all_single(received_per_expert, per_expert)                    # [R L]
        send_splits = per_expert.view(world, local).sum(1).tolist()
        recv_counts = received_per_expert.view(world, local)                       # [R, L]
        recv_splits = recv_counts.sum(1).tolist()
        received = x.new_empty((sum(recv_splits), self.hidden))
        dist.all_to_all_single(received, rows, recv_splits, send_splits)
        # rows arrive grouped by source rank, then by expert: regroup by local expert
        source_expert = torch.arange(local).repeat(world)
        by_expert = torch.argsort(source_expert.repeat_interleave(recv_counts.reshape(-1)),
                                  stable=True)
        grouped = received[by_expert]
        chunks = grouped.split(recv_counts.sum(0).tolist())
        outputs = torch.cat([swiglu(chunk, layer["gate_up"][e], layer["down"][e])
                             for e, chunk in enumerate(chunks)])
        restored = torch.empty_like(outputs).index_copy_(0, by_expert, outputs)
        returned = x.new_empty((tokens * top_k, self.hidden))
        dist.all_to_all_single(returned, restored, send_splits, recv_splits)
        pair_out = torch.empty_like(returned).index_copy_(0, order, returned)
        out = (pair_out.view(tokens, top_k, self.hidden) * weights.unsqueeze(-1)).sum(1)
        if "shared_gate_up" in layer:
            out = out + swiglu(x, layer["shared_gate_up"], layer["shared_down"])
        return out

    def moe_layers(self):
        return [layer for layer in self.layers if layer["is_moe"]]


def agree_to_continue(active_count):
    """The Generator's per-step agreement on stopping: any rank still generating."""
    count = torch.tensor([active_count], dtype=torch.int64)
    dist.all_reduce(count)
    return int(count.item()) > 0


def generate(model, prompts, new_tokens, prompt_length):
    """Greedy generation as Generator.generate with end_of_sequence=None: (tokens per prompt,
    prefill_s, step_times, forward_times)."""
    batch = model.batch
    tokens = np.zeros((batch, prompt_length), np.int64)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    lengths = [len(prompt) for prompt in prompts]
    positions = torch.tensor(lengths + [1] * (batch - len(prompts)), dtype=torch.int64)
    started = time.perf_counter()
    logits = model.forward(torch.from_numpy(tokens), "prefill").numpy()           # [B, P, V]
    next_tokens = np.zeros(batch, np.int64)
    for row, length in enumerate(lengths):
        next_tokens[row] = int(np.argmax(logits[row, length - 1]))
    generated = [[int(next_tokens[row])] for row in range(len(prompts))]
    prefill_s = time.perf_counter() - started
    step_times, forward_times = [], []
    keep_going = agree_to_continue(int(new_tokens > 1) * len(prompts))
    while keep_going:
        step_started = time.perf_counter()
        logits = model.forward(torch.from_numpy(next_tokens.reshape(-1, 1)), "decode",
                               positions).numpy()[:, 0]                            # [B, V]
        forward_times.append(time.perf_counter() - step_started)
        positions += 1
        for row in range(len(prompts)):
            next_tokens[row] = int(np.argmax(logits[row]))
            generated[row].append(int(next_tokens[row]))
        active = sum(len(g) < new_tokens for g in generated)
        keep_going = agree_to_continue(active)
        step_times.append(time.perf_counter() - step_started)
    return generated, prefill_s, step_times, forward_times


def worker(args):
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with open(os.path.join(args.weights, "meta.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    texts, longest = meta["prompts"], meta["prompt_length"]
    batch = len(texts) // world
    with np.load(os.path.join(args.weights, "weights.npz")) as weights:
        model = TorchMoETransformerLM(weights, meta["config"], rank, world, batch)
    ids = list(range(rank, len(texts), world))
    local = [texts[index] for index in ids]
    with torch.inference_mode():
        generate(model, local, 3, longest)                                         # warm-up
        dist.barrier()
        tokens, prefill_s, step_times, forward_times = generate(model, local, args.new_tokens,
                                                                longest)
        # The split, as lm_decode.py's MindSpore worker measures it.
        layer = model.moe_layers()[0]
        x = torch.from_numpy(np.random.default_rng(0).standard_normal(
            (batch, model.hidden)).astype(np.float32))
        step_tokens = torch.ones((batch, 1), dtype=torch.int64)
        step_positions = torch.full((batch,), longest, dtype=torch.int64)
        forward_samples, layer_samples = [], []
        for repeat in range(21):
            started = time.perf_counter()
            model.forward(step_tokens, "decode", step_positions).numpy()
            middle = time.perf_counter()
            model.moe(layer, x).numpy()
            if repeat:
                forward_samples.append(middle - started)
                layer_samples.append(time.perf_counter() - middle)
    dist.destroy_process_group()
    bc.write_worker_result({
        "rank": rank, "sequences": len(local), "prompt_ids": ids,
        "decode_steps": len(step_times), "decode_s": float(sum(step_times)),
        "prefill_s": prefill_s, "step_median_s": float(np.median(step_times)),
        "forward_median_s": float(np.median(forward_times)),
        "forward_min_s": float(np.min(forward_samples)),
        "moe_layer_min_s": float(np.min(layer_samples)),
        "moe_layers": len(model.moe_layers()),
        "dispatcher": "gloo all_to_all_single", "experts_path": "SwiGLU per expert",
        "threads": torch.get_num_threads(), "tokens": tokens,
    })
