"""The cost of one MoE layer at one EP size, phase and batch: bytes, times and memory per rank.

Model (per rank, the busiest one):

- **Bytes.** A token row is ``hidden * bytes_per_element`` plus its scales (fp8: 4 bytes per
  128 elements, DeepEP's; int8: 4 bytes per token, CANN's dynamic quantisation). How many
  rows a token sends depends on the send unit (:data:`SEND_UNITS`): once per destination rank
  (this library; DeepEP's normal kernels inside a node), once per destination node over the
  network and forwarded inside the node (DeepEP's normal kernels across nodes; the two-level
  exchange), or once per (token, expert) (DeepEP's low-latency kernels; CANN's grouped Dispatch).
  The combine returns the same number of rows at ``combine`` bytes per element. The busiest
  rank receives ``imbalance`` times the mean.
- **Time** of one dispatch or combine: ``operator_overhead + max(t_intra, t_inter)`` with
  ``t_link = latency + bytes / bandwidth`` for the bytes crossing that link (the two links work
  at once, as DeepEP's NVLink and RDMA traffic do); rows to the rank itself cross no link,
  except over a CPU host's shared-memory window, where the receiver copies its own rows too.
- **Experts**: 6 * hidden * ffn FLOPs per (token, expert) pair (gate/up and down GEMMs), at the
  card's throughput, or the weight bytes they must read at the memory bandwidth if that is
  slower (decode); the busiest rank computes ``imbalance`` times the mean pairs and reads the
  weights of the most touched experts (a binomial maximum over the ranks). On a CPU host
  (``cluster.weight_pack_gbps`` set) the kernel runs one GEMM call per expert after another on
  the rank's core, and each call reads its expert's weights before it computes (a one-row call
  streams them once at ``memory_gbps``; a call of more rows first packs the whole matrix, as
  oneDNN does in every call, at ``weight_pack_gbps``), so the time is the sum of the weight
  reads and the FLOPs, not their maximum.
- **Sharing** (``compute_sharing: per_node``, CPU hosts): the node's throughput, weight and
  copy bandwidths are divided among its ranks in the group; with more ranks than
  ``cores_per_node``, a rank's fixed CPU work (``operator_overhead_us``) takes ranks / cores
  longer and the node computes at ``oversubscribed_compute_efficiency``.
- **Step**: ``step_overhead_us`` (graph launch, router and other operators; its oversubscribed
  value where ranks outnumber cores) + T * H * ``token_overhead_ns`` (the step's element-wise
  work per token, CPU hosts) + dispatch + experts + combine. On a CPU host the prefill
  combine of the fused experts + combine is ceil(C / B) exchanges, one per round.
- **Memory**: the rank's expert weights (with redundant copies), the shared expert, the
  library's pre-allocated buffers (received rows and returned partial sums: R x C rows each;
  the window of R(R-1) slots inside a node), the experts' activations, and, on Ascend, CANN's
  HCCL_BUFFSIZE for the fused decode operators.

Everything is a closed formula of its inputs, so the tests can check it against hand-derived
numbers and against published measurements (docs/scaling.md).
"""
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

from .cluster import ClusterSpec
from .routing import Destinations, Routing, busiest, destinations, miss_probability

BYTES_PER_ELEMENT = {"fp8": 1, "int8": 1, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
                     "fp32": 4, "float32": 4}
SEND_UNITS = ("rank", "node", "expert")
PHASES = ("prefill", "decode")
GB = 1e9
MIB = 1 << 20


def row_bytes(hidden: int, dtype: str) -> float:
    """Bytes of one token row sent in ``dtype``, scales included."""
    if dtype not in BYTES_PER_ELEMENT:
        raise ValueError(f"dtype = {dtype!r} is not allowed; expected one of "
                         f"{sorted(BYTES_PER_ELEMENT)}")
    scales = {"fp8": 4 * math.ceil(hidden / 128), "int8": 4}.get(dtype, 0)
    return hidden * BYTES_PER_ELEMENT[dtype] + scales


@dataclass(frozen=True)
class LayerShape:
    """The sizes of one MoE layer that the cost depends on."""

    hidden: int
    num_experts: int
    expert_ffn: int
    top_k: int
    shared_ffn: int = 0
    num_groups: int = 1
    topk_groups: int = 1
    weight_dtype: str = "bfloat16"
    # The library's static buffers and fused experts + combine rounds (dispatch section); they
    # decide how many GEMM calls and exchanges the CPU kernels make (cpu_rounds,
    # cpu_combine_exchanges); None: not known (one round).
    max_tokens_per_rank: Optional[int] = None
    combine_round_tokens: Optional[int] = None

    @property
    def routing(self) -> Routing:
        return Routing(self.num_experts, self.top_k, self.num_groups, self.topk_groups)

    @classmethod
    def from_config(cls, config) -> "LayerShape":
        """From a :class:`~mindspore_moe_ep.config.MoEConfig`."""
        model, router = config.model, config.router
        return cls(hidden=model.hidden_size, num_experts=model.num_experts,
                   expert_ffn=model.expert_ffn_size, top_k=router.top_k,
                   shared_ffn=model.shared_ffn_size, num_groups=router.num_groups,
                   topk_groups=router.effective_topk_groups, weight_dtype=config.runtime.dtype,
                   max_tokens_per_rank=config.dispatch.max_tokens_per_rank,
                   combine_round_tokens=config.dispatch.combine_round_tokens)


@dataclass(frozen=True)
class Traffic:
    """Rows one rank sends in one dispatch (per token of its batch), split by link."""

    to_self: float
    intra_node: float   # rows over the intra-node link (forwarded rows included)
    inter_node: float   # rows over the network

    @property
    def total(self) -> float:
        return self.to_self + self.intra_node + self.inter_node


def traffic_per_token(shape: LayerShape, ep: int, cards_per_node: int, send_unit: str) -> Traffic:
    """Rows per token of the batch, by link, for one of :data:`SEND_UNITS`."""
    if send_unit not in SEND_UNITS:
        raise ValueError(f"send_unit = {send_unit!r} is not allowed; expected one of {SEND_UNITS}")
    where: Destinations = destinations(shape.routing, ep, cards_per_node)
    if send_unit == "rank":
        return Traffic(where.self_rank, where.same_node_peers, where.remote_ranks)
    if send_unit == "node":
        # One row per remote node over the network; there it is forwarded to the node's other
        # ranks that need it (remote ranks per remote node, minus the one it landed on).
        forwarded = max(where.remote_ranks - where.remote_nodes, 0.0)
        return Traffic(where.self_rank, where.same_node_peers + forwarded, where.remote_nodes)
    node_ranks = min(ep, cards_per_node)
    # One row per (token, expert): K rows, spread over ranks in proportion to their experts.
    return Traffic(shape.top_k / ep, shape.top_k * (node_ranks - 1) / ep,
                   shape.top_k * (ep - node_ranks) / ep)


def link_time_us(rows: float, bytes_per_row: float, gbps: float, latency_us: float) -> float:
    """latency + bytes / bandwidth, or 0 for no rows."""
    if rows <= 0:
        return 0.0
    return latency_us + rows * bytes_per_row / (gbps * GB) * 1e6


@dataclass(frozen=True)
class Direction:
    """One dispatch or one combine."""

    time_us: float
    bytes_sent: float          # every row the rank sends, its own included (DeepEP's count)
    intra_bytes: float
    inter_bytes: float
    bottleneck: str            # "intra" or "inter": the link that takes longer

    @property
    def gbps(self) -> float:
        """Bytes sent per second, GB/s, as DeepEP's low-latency table counts them."""
        return self.bytes_sent / (self.time_us * 1e-6) / GB if self.time_us > 0 else 0.0

    @property
    def inter_gbps(self) -> float:
        """Network bytes per second, GB/s (DeepEP's "RDMA bandwidth")."""
        return self.inter_bytes / (self.time_us * 1e-6) / GB if self.time_us > 0 else 0.0

    @property
    def bottleneck_gbps(self) -> float:
        """Bytes over the slower link per second, as DeepEP's normal-kernel table counts them."""
        moved = self.inter_bytes if self.bottleneck == "inter" else self.intra_bytes
        return moved / (self.time_us * 1e-6) / GB if self.time_us > 0 else 0.0


def direction_cost(traffic: Traffic, tokens: int, bytes_per_row: float, imbalance: float,
                   cluster: ClusterSpec, ep: int = 1, operators: int = 1) -> Direction:
    """The time of one exchange of ``tokens`` rows' worth of ``traffic`` (busiest rank) in an
    EP-``ep`` group (``ep`` matters on nodes whose ranks share cores and copy bandwidth), in
    ``operators`` exchange operators (each with its fixed cost)."""
    intra_rows = traffic.intra_node * tokens * imbalance
    inter_rows = traffic.inter_node * tokens * imbalance
    copied = intra_rows
    if cluster.shared_memory_window:  # the receiver copies its own rows out of the window too
        copied += traffic.to_self * tokens * imbalance
    t_intra = link_time_us(copied, bytes_per_row, cluster.intra_node_gbps / cluster.sharers(ep),
                           cluster.intra_node_latency_us)
    t_inter = link_time_us(inter_rows, bytes_per_row, cluster.inter_node_gbps,
                           cluster.inter_node_latency_us)
    overhead = cluster.operator_overhead(ep) * operators
    return Direction(time_us=overhead + max(t_intra, t_inter),
                     bytes_sent=traffic.total * tokens * imbalance * bytes_per_row,
                     intra_bytes=intra_rows * bytes_per_row, inter_bytes=inter_rows * bytes_per_row,
                     bottleneck="inter" if t_inter > t_intra else "intra")


@dataclass(frozen=True)
class PlanOptions:
    """What the user asked about, besides the layer and the cluster."""

    dispatch_dtype: str = "bf16"
    combine_dtype: str = "bf16"
    compute_dtype: str = "bfloat16"
    send_unit: str = "rank"
    redundant_experts_per_rank: int = 0
    imbalance: Optional[float] = None   # None: uniform routing's binomial maximum
    max_tokens_per_rank: Optional[int] = None  # None: the largest batch asked about
    window_slot_bytes: int = 4 * MIB
    hccl_soc: Optional[str] = None      # "A2" / "A3": add CANN's HCCL_BUFFSIZE to the memory


@dataclass
class Estimate:
    """One row of the plan: one EP size, phase and tokens per rank."""

    ep: int
    phase: str
    tokens_per_rank: int
    nodes: int
    dispatch_us: float
    combine_us: float
    experts_us: float
    layer_us: float            # step_us + dispatch_us + experts_us + combine_us
    dispatch_gbps: float
    combine_gbps: float
    dispatch_bottleneck_gbps: float
    combine_bottleneck_gbps: float
    dispatch_inter_node_gbps: float   # network bytes per second (DeepEP's "RDMA bandwidth")
    combine_inter_node_gbps: float
    bottleneck_link: str
    dispatch_bytes: float
    combine_bytes: float
    inter_node_bytes: float
    imbalance: float
    memory_bytes: int
    memory: Dict[str, int] = field(default_factory=dict)
    unfused_decode_us: Optional[float] = None
    step_us: float = 0.0       # the step's own cost: step overhead + tokens x token overhead

    def as_dict(self) -> dict:
        return asdict(self)


# This library's CPU experts kernels (custom_ops/cpu/expert_ffn.cc, experts_combine.cc): an
# expert's rows of one call run in chunks of at most CPU_CHUNK_ROWS rows (fewer for wide
# layers: CPU_CHUNK_BYTES of scratch per chunk, at least CPU_MIN_CHUNK_ROWS), one GEMM call
# each; prefill inference over the shared-memory window runs the experts in rounds of
# dispatch.combine_round_tokens rows per source (the fused experts + combine), where that holds
# less memory than the unfused path (comm/window_sizing.py, combine_round_rows).
CPU_CHUNK_ROWS, CPU_MIN_CHUNK_ROWS, CPU_CHUNK_BYTES = 512, 32, 16 * MIB


def cpu_chunk_rows(shape: LayerShape) -> int:
    """Rows per GEMM call of the CPU experts kernel at most (kernel's ChunkRows)."""
    row_bytes = (shape.hidden + 3 * shape.expert_ffn) * BYTES_PER_ELEMENT[shape.weight_dtype]
    return min(max(CPU_CHUNK_BYTES // max(row_bytes, 1), CPU_MIN_CHUNK_ROWS), CPU_CHUNK_ROWS)


def cpu_rounds(shape: LayerShape, ep: int, tokens: int, phase: str,
               cluster: ClusterSpec) -> int:
    """Rounds of the CPU experts in one step: those of the fused experts + combine (prefill
    inference over the window, where it holds less memory), enough for the busiest source's
    rows to this rank; otherwise 1."""
    capacity, round_tokens = shape.max_tokens_per_rank, shape.combine_round_tokens
    if (phase != "prefill" or ep == 1 or not cluster.shared_memory_window or capacity is None
            or round_tokens is None):
        return 1
    round_rows = min(round_tokens, capacity)
    if 2 * ep * round_rows + capacity >= ep * capacity:  # the unfused row-wise path
        return 1
    hit = 1 - miss_probability(shape.routing, shape.num_experts // ep)
    return max(1, math.ceil(min(busiest(tokens, hit, ep), tokens) / round_rows))


def cpu_combine_exchanges(shape: LayerShape, ep: int, phase: str,
                          cluster: ClusterSpec) -> int:
    """Exchange operators of a CPU host's combine: the fused experts + combine exchanges once
    per round, and every rank runs ceil(C / B) rounds, with rows or not (experts_combine.cc);
    otherwise one."""
    capacity, round_tokens = shape.max_tokens_per_rank, shape.combine_round_tokens
    if (cluster.weight_pack_gbps is None or phase != "prefill" or ep == 1
            or not cluster.shared_memory_window or capacity is None or round_tokens is None):
        return 1
    round_rows = min(round_tokens, capacity)
    if 2 * ep * round_rows + capacity >= ep * capacity:
        return 1
    return math.ceil(capacity / round_rows)


def experts_time_us(shape: LayerShape, ep: int, tokens: int, imbalance: float,
                    cluster: ClusterSpec, compute_dtype: str, redundant: int,
                    phase: str = "decode") -> float:
    """The busiest rank's routed and shared experts: compute- or weight-read-bound (module doc).

    The group's ``ep * tokens * top_k`` pairs fall on the experts uniformly, so an expert gets
    Binomial(n, 1/E) rows: none (no weights read), one, or more; the busiest rank holds the
    largest of the ranks' counts (:func:`~.routing.busiest`)."""
    pairs = tokens * shape.top_k * imbalance                     # (token, expert) pairs
    expert_flops = 6.0 * shape.hidden * shape.expert_ffn         # per pair
    shared_flops = 6.0 * shape.hidden * shape.shared_ffn * tokens
    sharers = cluster.sharers(ep)
    rate = cluster.tflops(compute_dtype) * 1e12 * cluster.compute_efficiency(ep) / sharers
    memory = cluster.memory_gbps * GB / sharers
    element = BYTES_PER_ELEMENT[shape.weight_dtype]
    expert_bytes = 3 * shape.hidden * shape.expert_ffn * element
    shared_bytes = 3 * shape.hidden * shape.shared_ffn * element
    local = shape.num_experts // ep + redundant
    group_pairs = ep * tokens * shape.top_k
    p = 1.0 / shape.num_experts
    none = (1 - p) ** group_pairs                                # P(an expert gets no row)
    one = group_pairs * p * (1 - p) ** (group_pairs - 1)         # P(exactly one row)
    if cluster.weight_pack_gbps is None:
        touched = busiest(local, 1 - none, ep)
        weight_bytes = touched * expert_bytes + shared_bytes
        return max((expert_flops * pairs + shared_flops) / rate, weight_bytes / memory) * 1e6
    # GEMM calls one after another on the rank's core(s) (CPU kernels): a one-row call reads
    # the weights once, a call of more rows packs them first, then computes. An expert with
    # several rows makes one call per round and chunk (cpu_rounds, cpu_chunk_rows).
    pack = cluster.weight_pack_gbps * GB / sharers
    single = busiest(local, one, ep)
    several = busiest(local, max(1 - none - one, 0.0), ep)
    calls = 0.0
    if several > 0:
        rounds = cpu_rounds(shape, ep, tokens, phase, cluster)
        rows_per_round = max(pairs - single, 0.0) / several / rounds
        calls = several * rounds * max(1, math.ceil(rows_per_round / cpu_chunk_rows(shape)))
    weights_s = single * expert_bytes / memory + calls * expert_bytes / pack
    if shape.shared_ffn:
        weights_s += shared_bytes / (memory if tokens == 1 else pack)
    return (weights_s + (expert_flops * max(pairs, single) + shared_flops) / rate) * 1e6


def memory_per_rank(shape: LayerShape, ep: int, tokens: int, capacity: int, cluster: ClusterSpec,
                    options: PlanOptions) -> Dict[str, int]:
    """Bytes one rank holds for this layer, by item (see the module doc)."""
    element = BYTES_PER_ELEMENT[shape.weight_dtype]
    local = shape.num_experts // ep + options.redundant_experts_per_rank
    items = {
        "expert_weights": local * 3 * shape.hidden * shape.expert_ffn * element,
        "shared_expert_weights": 3 * shape.hidden * shape.shared_ffn * element,
        # R x C received rows and R x C returned partial sums (the sparse all-to-all-v's buffers)
        "exchange_buffers": 2 * ep * capacity * shape.hidden * element if ep > 1 else 0,
        # gate/up and hidden activations of the received (token, expert) pairs, float32
        "expert_activations": int(tokens * shape.top_k * 3 * shape.expert_ffn * 4),
    }
    node_ranks = min(ep, cluster.cards_per_node)
    slot = min(capacity * shape.hidden * element, options.window_slot_bytes)  # as MoELayer sizes it
    items["window"] = (node_ranks * (node_ranks - 1) * slot
                       if ep > 1 and cluster.shared_memory_window else 0)
    if options.hccl_soc:
        from ..ascend.cann_limits import hccl_buffsize_mb
        items["hccl_buffsize"] = hccl_buffsize_mb(options.hccl_soc, min(capacity, 512), ep,
                                                  shape.num_experts // ep, shape.top_k,
                                                  shape.hidden) * MIB
    return {name: int(value) for name, value in items.items()}


def estimate(shape: LayerShape, cluster: ClusterSpec, ep: int, phase: str, tokens: int,
             options: PlanOptions = PlanOptions(), capacity: Optional[int] = None) -> Estimate:
    """The cost of one layer step (see the module doc)."""
    if phase not in PHASES:
        raise ValueError(f"phase = {phase!r} is not allowed; expected one of {PHASES}")
    if tokens < 1:
        raise ValueError(f"tokens per rank = {tokens} is not allowed; expected >= 1")
    from .routing import receive_imbalance
    imbalance = (options.imbalance if options.imbalance is not None
                 else receive_imbalance(shape.routing, ep, tokens))
    traffic = traffic_per_token(shape, ep, cluster.cards_per_node, options.send_unit)
    dispatch = direction_cost(traffic, tokens, row_bytes(shape.hidden, options.dispatch_dtype),
                              imbalance, cluster, ep)
    combine = direction_cost(traffic, tokens, row_bytes(shape.hidden, options.combine_dtype),
                             imbalance, cluster, ep,
                             operators=cpu_combine_exchanges(shape, ep, phase, cluster))
    experts = experts_time_us(shape, ep, tokens, imbalance, cluster, options.compute_dtype,
                              options.redundant_experts_per_rank, phase)
    if ep == 1:
        dispatch = combine = Direction(0.0, 0.0, 0.0, 0.0, "intra")
    step = (cluster.step_overhead(ep) + tokens * shape.hidden * cluster.token_overhead_ns * 1e-3
            * cluster.oversubscription(ep))
    capacity = capacity or max(tokens, options.max_tokens_per_rank or 0)
    memory = memory_per_rank(shape, ep, tokens, capacity, cluster, options)
    row = Estimate(
        ep=ep, phase=phase, tokens_per_rank=tokens,
        nodes=max(1, math.ceil(ep / cluster.cards_per_node)),
        dispatch_us=dispatch.time_us, combine_us=combine.time_us, experts_us=experts,
        layer_us=step + dispatch.time_us + experts + combine.time_us, step_us=step,
        dispatch_gbps=dispatch.gbps, combine_gbps=combine.gbps,
        dispatch_bottleneck_gbps=dispatch.bottleneck_gbps,
        combine_bottleneck_gbps=combine.bottleneck_gbps,
        dispatch_inter_node_gbps=dispatch.inter_gbps, combine_inter_node_gbps=combine.inter_gbps,
        bottleneck_link=dispatch.bottleneck,
        dispatch_bytes=dispatch.bytes_sent, combine_bytes=combine.bytes_sent,
        inter_node_bytes=dispatch.inter_bytes + combine.inter_bytes, imbalance=imbalance,
        memory_bytes=sum(memory.values()), memory=memory)
    if phase == "decode" and ep > 1:
        # Unfused decode = the prefill path: one more exchange (the counts) before the rows,
        # each with its fixed cost; the fused operators send counts with the rows.
        extra = cluster.operator_overhead(ep) + max(
            cluster.intra_node_latency_us,
            cluster.inter_node_latency_us if row.nodes > 1 else 0.0)
        row.unfused_decode_us = row.layer_us + 2 * extra
    return row
