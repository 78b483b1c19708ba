"""The planner: every (EP size, phase, tokens per rank) of a layer on a cluster, and a
recommendation with its reasons.

    plan = make_plan(config, cluster, eps=[8, 16, 32], decode_tokens=[16, 128],
                     prefill_tokens=[4096])
    plan["rows"], plan["recommendation"]

The recommendation (:func:`recommend`):

- **EP size**: among the EP sizes whose memory fits the card (with ``memory_headroom`` left for
  the rest of the model, KV cache and framework), the smallest whose decode layer time at the
  largest decode batch is within ``time_slack`` of the fastest fitting one: fewer cards per EP
  group leave more groups (data parallelism) for the same cluster.
- **decode_token_threshold**: the largest decode batch at which the fused decode path saves at
  least ``fused_min_saving`` of the unfused (prefill-path) exchange time (dispatch + combine);
  above it the saving is small and the prefill path's single buffers are the better use of
  memory.
- **max_tokens_per_rank**: the largest prefill batch asked about, as the library sizes its
  static buffers by it (R x C rows each).
- **redundant experts**: one per rank when the expected imbalance exceeds 1.2 (EPLB's remedy;
  costs one expert's weights per rank), else none.
- **buffer sizes**: the window slot (as the layer sizes it: C x H x element bytes, at most
  4 MiB) and, on Ascend, HCCL_BUFFSIZE from CANN's formula.
"""
from typing import Dict, List, Optional, Sequence

from .cluster import ClusterSpec
from .cost import MIB, BYTES_PER_ELEMENT, Estimate, LayerShape, PlanOptions, estimate

GIB = 1 << 30


def candidate_eps(shape: LayerShape, cluster: ClusterSpec) -> List[int]:
    """Powers of two from 2 that divide num_experts and fit the cluster (and whole nodes)."""
    eps, ep = [], 2
    while ep <= min(shape.num_experts, cluster.total_cards):
        if shape.num_experts % ep == 0 and (ep <= cluster.cards_per_node
                                            or ep % cluster.cards_per_node == 0):
            eps.append(ep)
        ep *= 2
    return eps


def check_eps(eps: Sequence[int], shape: LayerShape, cluster: ClusterSpec) -> None:
    """Every EP size must divide num_experts, fit the cluster and fill whole nodes."""
    for ep in eps:
        problems = []
        if ep < 1:
            problems.append("must be >= 1")
        elif shape.num_experts % ep:
            problems.append(f"must divide model.num_experts = {shape.num_experts}")
        elif ep > cluster.total_cards:
            problems.append(f"exceeds the cluster's {cluster.total_cards} cards")
        elif ep > cluster.cards_per_node and ep % cluster.cards_per_node:
            problems.append(f"must be a multiple of cluster.cards_per_node = "
                            f"{cluster.cards_per_node} above one node")
        if problems:
            raise ValueError(f"--ep value {ep} is not allowed: it {'; '.join(problems)}")


def make_plan(config, cluster: ClusterSpec, eps: Optional[Sequence[int]] = None,
              decode_tokens: Sequence[int] = (), prefill_tokens: Sequence[int] = (),
              options: PlanOptions = PlanOptions(), moe_layers: int = 1,
              memory_headroom: float = 0.3) -> Dict:
    """Rows for every (EP, phase, tokens) and the recommendation (module doc)."""
    shape = LayerShape.from_config(config) if not isinstance(config, LayerShape) else config
    eps = list(eps) if eps else candidate_eps(shape, cluster)
    check_eps(eps, shape, cluster)
    for name, values in (("decode tokens", decode_tokens), ("prefill tokens", prefill_tokens)):
        bad = [value for value in values if not isinstance(value, int) or value < 1]
        if bad or not values:
            raise ValueError(f"{name} per rank must be a non-empty list of integers >= 1, "
                             f"got {list(values)}")
    capacity = options.max_tokens_per_rank or max(prefill_tokens)
    rows: List[Estimate] = []
    for ep in eps:
        for phase, batches in (("prefill", prefill_tokens), ("decode", decode_tokens)):
            for tokens in batches:
                rows.append(estimate(shape, cluster, ep, phase, tokens, options, capacity))
    recommendation = recommend(rows, shape, cluster, options, capacity, memory_headroom,
                               moe_layers)
    return {"cluster": cluster.as_dict(), "layer": shape.__dict__, "moe_layers": moe_layers,
            "options": options.__dict__, "rows": [row.as_dict() for row in rows],
            "recommendation": recommendation}


def recommend(rows: List[Estimate], shape: LayerShape, cluster: ClusterSpec,
              options: PlanOptions, capacity: int, memory_headroom: float, moe_layers: int = 1,
              time_slack: float = 0.10, fused_min_saving: float = 0.10) -> Dict:
    """The recommended settings and the reasons (see the module doc)."""
    budget = cluster.device_memory_gib * GIB * (1 - memory_headroom)
    eps = sorted({row.ep for row in rows})
    largest_decode = max(row.tokens_per_rank for row in rows if row.phase == "decode")
    # Every MoE layer holds its own weights and buffers (one window per layer).
    peak_memory = {ep: moe_layers * max(row.memory_bytes for row in rows if row.ep == ep)
                   for ep in eps}
    decode_time = {ep: next(row.layer_us for row in rows if row.ep == ep and row.phase == "decode"
                            and row.tokens_per_rank == largest_decode) for ep in eps}
    fitting = [ep for ep in eps if peak_memory[ep] <= budget]
    reasons = []
    if not fitting:
        chosen = max(eps)
        reasons.append(f"no EP size asked about fits {(1 - memory_headroom):.0%} of the card's "
                       f"{cluster.device_memory_gib:g} GiB (EP {chosen} needs "
                       f"{peak_memory[chosen] / GIB:.1f} GiB for {moe_layers} MoE layer(s)); use more cards or fewer "
                       f"tokens per rank")
    else:
        best = min(decode_time[ep] for ep in fitting)
        chosen = min(ep for ep in fitting if decode_time[ep] <= best * (1 + time_slack))
        unfit = [ep for ep in eps if ep not in fitting]
        if unfit:
            reasons.append(f"EP {', '.join(map(str, unfit))}: over the memory budget "
                           f"({budget / GIB:.1f} GiB per card for {moe_layers} MoE layer(s))")
        reasons.append(f"EP {chosen}: decode layer step {decode_time[chosen]:.0f} us at "
                       f"{largest_decode} tokens per rank, within {time_slack:.0%} of the "
                       f"fastest fitting EP ({best:.0f} us) with the fewest cards per group; "
                       f"{peak_memory[chosen] / GIB:.2f} GiB per card for {moe_layers} MoE layer(s)")
    chosen_rows = [row for row in rows if row.ep == chosen]
    decode_rows = sorted((row for row in chosen_rows if row.phase == "decode"),
                         key=lambda row: row.tokens_per_rank)
    threshold = 0
    for row in decode_rows:
        exchange_unfused = row.unfused_decode_us and (
            row.unfused_decode_us - row.experts_us)
        if exchange_unfused and (row.unfused_decode_us - row.layer_us) >= (
                fused_min_saving * exchange_unfused):
            threshold = row.tokens_per_rank
    reasons.append(f"decode_token_threshold {threshold}: up to it the fused decode saves at least "
                   f"{fused_min_saving:.0%} of the exchange time (one exchange's fixed cost each way)"
                   if threshold else
                   "decode_token_threshold 0: at every decode batch asked about the fused path "
                   f"saves less than {fused_min_saving:.0%} (or EP = 1)")
    imbalance = max(row.imbalance for row in chosen_rows)
    redundant = 1 if imbalance > 1.2 else 0
    reasons.append(f"redundant experts per rank {redundant} (parallel.redundant_experts: "
                   f"{redundant * chosen}, then layer.rebalance() / parallel.rebalance_interval "
                   f"places them): expected busiest-rank load {imbalance:.2f}x the mean")
    slot = min(capacity * shape.hidden * BYTES_PER_ELEMENT[shape.weight_dtype], 4 * MIB)
    result = {"ep": chosen, "decode_token_threshold": threshold,
              "max_tokens_per_rank": capacity, "redundant_experts_per_rank": redundant,
              "redundant_experts": redundant * chosen,
              "window_slot_bytes": slot, "reasons": reasons}
    if options.hccl_soc:
        from ..ascend.cann_limits import hccl_buffsize_mb
        result["hccl_buffsize_mb"] = hccl_buffsize_mb(
            options.hccl_soc, min(max(threshold, 1), 512), chosen,
            shape.num_experts // chosen + redundant,
            shape.top_k, shape.hidden)
    return result
