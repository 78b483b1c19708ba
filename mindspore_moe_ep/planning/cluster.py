"""A cluster, as the planner sees it: nodes of cards, two kinds of link, memory and compute.

A cluster file is YAML with one section, ``cluster:`` (see ``yaml_configs/clusters/``). Every
field is declared with :func:`~mindspore_moe_ep.config.schema.option` (meaning, default, lower
bound), so a wrong value is refused naming ``cluster.<field>``, the value and what is allowed,
exactly like the MoE config. Units are in the field names: GB/s are 10^9 bytes per second,
``_us`` microseconds, ``_gib`` 2^30 bytes, TFLOP/s 10^12 operations per second.

Pure Python (PyYAML only): no mindspore import.
"""
import os
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Dict, Literal, Mapping, Optional, Union

import yaml

from ..config.errors import ConfigError, located_in
from ..config.schema import checked_value, option, suggestion

# What the cards compute with: the dtypes whose throughput a cluster file may give.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "int8", "fp8")
ComputeSharing = Literal["per_card", "per_node"]


@dataclass(frozen=True)
class ClusterSpec:
    """Nodes of ``cards_per_node`` cards; intra-node and inter-node links; memory; compute."""

    SECTION: ClassVar[str] = "cluster"

    name: str = option("A short name for tables and plots.")
    cards_per_node: int = option(
        "Cards (ranks) that share the intra-node link (NVLink, HCCS, or one host's shared "
        "memory). A SuperPoD whose HCCS spans all its cards counts as one node.", gt=0)
    num_nodes: int = option("Nodes available; the planner never proposes more cards than "
                            "cards_per_node * num_nodes.", gt=0)
    intra_node_gbps: float = option(
        "Bandwidth of one card's intra-node link, one direction, GB/s (what one rank can send "
        "to its node's peers per second).", gt=0)
    intra_node_latency_us: float = option(
        "Latency of one intra-node message, microseconds.", ge=0)
    inter_node_gbps: float = option(
        "Bandwidth of one card's share of the inter-node network (its NIC), one direction, GB/s.",
        gt=0)
    inter_node_latency_us: float = option(
        "Latency of one inter-node message, microseconds.", ge=0)
    device_memory_gib: float = option("Memory of one card, GiB.", gt=0)
    memory_gbps: float = option(
        "Bandwidth of one card's memory, GB/s (bounds the experts' time when they read more "
        "weight bytes than they compute on, as in decode).", gt=0)
    operator_overhead_us: float = option(
        "Fixed cost of one dispatch or combine operator, whatever it moves: launch, "
        "synchronisation with the peers, bookkeeping; microseconds.", default=0.0, ge=0)
    tflops_float32: Optional[float] = option("Dense matmul throughput of one card in float32, "
                                             "TFLOP/s; null: not supported.", default=None, gt=0)
    tflops_bfloat16: Optional[float] = option("The same in bfloat16.", default=None, gt=0)
    tflops_float16: Optional[float] = option("The same in float16.", default=None, gt=0)
    tflops_int8: Optional[float] = option("The same in int8 (TOP/s).", default=None, gt=0)
    tflops_fp8: Optional[float] = option("The same in fp8.", default=None, gt=0)
    compute_sharing: ComputeSharing = option(
        "per_card: each card has the throughput above; per_node: the node's ranks share it "
        "(a CPU host running several ranks on the same cores): the TFLOP/s, memory_gbps, "
        "weight_pack_gbps and intra_node_gbps are then the node's, divided among the ranks of "
        "the node that take part.", default="per_card")
    cores_per_node: Optional[int] = option(
        "CPU hosts: the cores the node's ranks share. Where more ranks than cores take part, "
        "each rank's fixed CPU work (operator_overhead_us) takes ranks / cores longer, and the "
        "oversubscribed_* figures apply; null: no such effect (devices).", default=None, gt=0)
    weight_pack_gbps: Optional[float] = option(
        "CPU hosts: the rate, GB/s, at which a GEMM call of two or more rows reads an expert's "
        "weights (oneDNN packs the whole weight matrix in every call; memory_gbps is then the "
        "rate of one-row calls, which read each weight once). Set, the experts' time is the "
        "weight reads plus the FLOPs (a call packs, then computes, on the same core); null: one "
        "roofline, max(FLOPs, weights at memory_gbps), over all experts (devices).",
        default=None, gt=0)
    step_overhead_us: float = option(
        "Fixed cost of one layer step besides its dispatch, experts and combine: the graph "
        "launch, the router and the framework's other operators, the ranks' skew at the start; "
        "microseconds, with at most one rank per core.", default=0.0, ge=0)
    oversubscribed_step_overhead_us: Optional[float] = option(
        "The same with cards_per_node ranks on cores_per_node cores (a rank that waits for a "
        "peer then waits for a core too); between cores_per_node and cards_per_node ranks "
        "interpolated; null: step_overhead_us.", default=None, ge=0)
    token_overhead_ns: float = option(
        "CPU hosts: cost of one step per token of the rank's batch and hidden element, besides "
        "the experts' GEMMs and the exchange's copies: the framework's element-wise operators "
        "over [T, H] (casts, the router, the output sum), the exchange kernels' per-row work, "
        "the sums at the source; nanoseconds at one rank per core (CPU work: ranks / cores "
        "longer where ranks outnumber cores).", default=0.0, ge=0)
    oversubscribed_operator_overhead_us: Optional[float] = option(
        "operator_overhead_us with cards_per_node ranks on cores_per_node cores; interpolated "
        "in between; null: operator_overhead_us times ranks / cores.", default=None, ge=0)
    oversubscribed_compute_efficiency: float = option(
        "The node's compute throughput with cards_per_node ranks on cores_per_node cores, as a "
        "fraction of that with one rank per core (context switches between the ranks).",
        default=1.0, gt=0)
    shared_memory_window: bool = option(
        "The ranks of a node exchange through this library's shared-memory window (CPU hosts): "
        "its R(R-1) slots count in the memory per rank.", default=False)
    source: str = option("Where the figures come from (vendor documents, a paper, or the "
                         "calibration command that measured them).", default="")

    def __post_init__(self) -> None:
        for spec in fields(self):
            path = f"{self.SECTION}.{spec.name}"
            object.__setattr__(self, spec.name, checked_value(path, getattr(self, spec.name), spec))
        if not any(getattr(self, f"tflops_{dtype}") for dtype in COMPUTE_DTYPES):
            raise ConfigError("cluster: no compute throughput given; set at least one of "
                              + ", ".join(f"cluster.tflops_{dtype}" for dtype in COMPUTE_DTYPES))

    @property
    def total_cards(self) -> int:
        return self.cards_per_node * self.num_nodes

    def sharers(self, ep: int) -> int:
        """Ranks of an EP-``ep`` group that share one node's throughput (1 per card)."""
        return min(ep, self.cards_per_node) if self.compute_sharing == "per_node" else 1

    def oversubscription(self, ep: int) -> float:
        """Ranks per core on a node of an EP-``ep`` group, at least 1 (1 without
        cores_per_node): how much longer a rank's fixed CPU work takes than on a core of its
        own."""
        if self.cores_per_node is None:
            return 1.0
        return max(1.0, min(ep, self.cards_per_node) / self.cores_per_node)

    def _oversubscribed_share(self, ep: int) -> Optional[float]:
        """Where an EP-``ep`` group's ranks on a node lie between cores_per_node (0) and
        cards_per_node (1) ranks; None with at most one rank per core (or no cores_per_node)."""
        ranks = min(ep, self.cards_per_node)
        if (self.cores_per_node is None or ranks <= self.cores_per_node
                or self.cards_per_node <= self.cores_per_node):
            return None
        return (ranks - self.cores_per_node) / (self.cards_per_node - self.cores_per_node)

    def step_overhead(self, ep: int) -> float:
        """step_overhead_us for an EP-``ep`` group: oversubscribed_step_overhead_us at
        cards_per_node ranks per node, interpolated between cores_per_node and it."""
        share = self._oversubscribed_share(ep)
        if share is None or self.oversubscribed_step_overhead_us is None:
            return self.step_overhead_us
        return (self.step_overhead_us
                + share * (self.oversubscribed_step_overhead_us - self.step_overhead_us))

    def operator_overhead(self, ep: int) -> float:
        """operator_overhead_us for an EP-``ep`` group: the oversubscribed figure at
        cards_per_node ranks per node (interpolated), else times the ranks per core."""
        share = self._oversubscribed_share(ep)
        if share is None or self.oversubscribed_operator_overhead_us is None:
            return self.operator_overhead_us * self.oversubscription(ep)
        return (self.operator_overhead_us
                + share * (self.oversubscribed_operator_overhead_us - self.operator_overhead_us))

    def compute_efficiency(self, ep: int) -> float:
        """oversubscribed_compute_efficiency at cards_per_node ranks per node, interpolated
        from 1 at cores_per_node ranks."""
        share = self._oversubscribed_share(ep)
        return 1.0 if share is None else 1.0 + share * (self.oversubscribed_compute_efficiency
                                                        - 1.0)

    def tflops(self, dtype: str) -> float:
        """Matmul TFLOP/s of one card in ``dtype``; an unsupported dtype raises, naming both."""
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype = {dtype!r} is not allowed; expected one of {COMPUTE_DTYPES}")
        value = getattr(self, f"tflops_{dtype}")
        if value is None:
            given = [name for name in COMPUTE_DTYPES if getattr(self, f"tflops_{name}")]
            raise ConfigError(f"cluster {self.name!r} gives no cluster.tflops_{dtype}; it gives "
                              f"{', '.join('tflops_' + name for name in given)}")
        return value

    def as_dict(self) -> Dict[str, Any]:
        return {spec.name: getattr(self, spec.name) for spec in fields(self)}

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> "ClusterSpec":
        """Builds a spec from the ``cluster:`` mapping; unknown or missing keys are named."""
        if not isinstance(body, Mapping):
            raise ConfigError(f"cluster must be a mapping of fields, got {type(body).__name__}")
        known = [spec.name for spec in fields(cls)]
        for key in body:
            if key not in known:
                raise ConfigError(f"cluster.{key} is not a cluster field"
                                  f"{suggestion(key, known)}; fields: {', '.join(known)}",
                                  key=f"cluster.{key}")
        required = [spec.name for spec in fields(cls)
                    if _is_required(spec) and spec.name not in body]
        if required:
            raise ConfigError(f"cluster is missing {', '.join('cluster.' + k for k in required)}")
        return cls(**dict(body))


def _is_required(spec) -> bool:
    """Whether a field has no default (the file must give it)."""
    return spec.default is MISSING and spec.default_factory is MISSING


def load_cluster(path: Union[str, "os.PathLike[str]"]) -> ClusterSpec:
    """Reads a cluster YAML file (one ``cluster:`` section); errors name the file and field."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as stream:
            document = yaml.safe_load(stream)
    except OSError as error:
        raise ConfigError(f"cannot read cluster file: {error.strerror}", source=source) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"not valid YAML: {error}", source=source) from None
    with located_in(source):
        if not isinstance(document, Mapping) or set(document) != {"cluster"}:
            keys = sorted(document) if isinstance(document, Mapping) else type(document).__name__
            raise ConfigError(f"a cluster file holds exactly one section, 'cluster:'; found {keys}")
        return ClusterSpec.from_dict(document["cluster"])


def save_cluster(spec: ClusterSpec, path: Union[str, "os.PathLike[str]"],
                 header: Optional[str] = None) -> None:
    """Writes ``spec`` as a cluster file (what the calibration command does)."""
    with open(os.fspath(path), "w", encoding="utf-8") as stream:
        if header:
            stream.write("".join(f"# {line}\n" for line in header.splitlines()))
        yaml.safe_dump({"cluster": spec.as_dict()}, stream, sort_keys=False)
