"""Expert-parallel groups: which ranks share one copy of the experts, and which experts are local.

With ``parallel.expert_parallel = R`` and a world of W ranks, the ranks form W / R data-parallel
replicas of an R-way expert-parallel group; group g holds ranks [g*R, (g+1)*R). Each group rank
holds S = (E + N) / R physical expert slots (N = ``parallel.redundant_experts``); physical slot p
lives on group rank p // S. Which logical expert each slot holds is the layer's placement
(``load_balancing``); the static one puts expert e in slot e (rank e // S) when N = 0.
"""
import hashlib
import json
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .comm.window import distributed_initialized
from .config import MoEConfig


@dataclass(frozen=True)
class ExpertParallelGroup:
    """This process's place in the expert-parallel layout."""

    world_size: int
    rank: int                    # global rank
    group_ranks: Tuple[int, ...]  # global ranks of this expert-parallel group, in group order
    num_experts: int             # E, logical (the router's ids)
    redundant_experts: int = 0   # N, extra physical slots over the group

    @property
    def size(self) -> int:
        return len(self.group_ranks)

    @property
    def group_rank(self) -> int:
        return self.group_ranks.index(self.rank)

    @property
    def num_slots(self) -> int:
        """Physical expert slots over the group: E + N (the dispatchers' expert ids)."""
        return self.num_experts + self.redundant_experts

    @property
    def experts_per_rank(self) -> int:
        """S: the physical experts (slots) each rank holds, the dispatchers' local experts."""
        return self.num_slots // self.size


def expert_parallel_group(config: MoEConfig) -> ExpertParallelGroup:
    """The group of this process; checks the config against the launched world."""
    ep_size = config.parallel.expert_parallel
    num_experts = config.model.num_experts
    if not distributed_initialized():
        if ep_size > 1:
            raise RuntimeError(
                f"parallel.expert_parallel = {ep_size} needs a distributed launch: run under "
                f"msrun (see scripts/msrun_moe.sh) and call mindspore.communication.init() "
                f"before building MoELayer, or set expert_parallel to 1")
        return ExpertParallelGroup(1, 0, (0,), num_experts, config.parallel.redundant_experts)

    from mindspore.communication import get_group_size, get_rank
    world_size, rank = get_group_size(), get_rank()
    config.parallel.data_parallel_size(world_size)  # checks that the sizes fit
    first = rank // ep_size * ep_size
    return ExpertParallelGroup(world_size, rank, tuple(range(first, first + ep_size)), num_experts,
                               config.parallel.redundant_experts)


def _compared_settings(config: MoEConfig) -> bytes:
    """The config as sorted JSON, without its run-time-only workload section."""
    settings = config.to_dict()
    settings.pop("workload", None)
    return json.dumps(settings, sort_keys=True).encode()


def config_fingerprint(config: MoEConfig) -> np.ndarray:
    """[4] int32: a 128-bit hash of the config without its run-time-only workload section."""
    digest = hashlib.sha256(_compared_settings(config)).digest()
    return np.frombuffer(digest[:16], dtype=np.int32)


def _flat_settings(settings, path=""):
    """{"section.key": value} of a nested settings dict."""
    flat = {}
    for key, value in settings.items():
        name = f"{path}.{key}" if path else key
        flat.update(_flat_settings(value, name) if isinstance(value, dict) else {name: value})
    return flat


def _every_ranks_settings(config: MoEConfig) -> list:
    """Every rank's flattened settings (two world all-gathers: lengths, then padded bytes)."""
    from .comm.window import world_all_gather
    text = _compared_settings(config)
    lengths = world_all_gather(np.array([len(text)], np.int32))[:, 0]        # [world]
    padded = np.zeros(int(lengths.max()), np.int32)
    padded[:len(text)] = np.frombuffer(text, np.uint8)
    gathered = world_all_gather(padded)                                       # [world, max]
    return [_flat_settings(json.loads(bytes(row[:length].astype(np.uint8)).decode()))
            for row, length in zip(gathered, lengths)]


def check_same_config_on_all_ranks(config: MoEConfig, group: ExpertParallelGroup) -> None:
    """Raises on every rank (never hangs) if any rank was given a different config."""
    if group.world_size == 1:
        return
    from .comm.window import world_all_gather
    try:
        fingerprints = world_all_gather(config_fingerprint(config))         # [world, 4]
    except RuntimeError as error:
        raise RuntimeError(
            f"building MoELayer on rank {group.rank}: the config check across the "
            f"{group.world_size} ranks failed, usually because a rank did not build this layer "
            f"(every rank must build the same layers in the same order): {error}") from error
    differing = [rank for rank, value in enumerate(fingerprints)
                 if not np.array_equal(value, fingerprints[0])]
    if differing:
        settings = _every_ranks_settings(config)  # every rank sees the mismatch: collective
        details = []
        for rank in differing:
            for key in sorted(set(settings[0]) | set(settings[rank])):
                if settings[rank].get(key) != settings[0].get(key):
                    details.append(f"{key} = {settings[rank].get(key)!r} on rank {rank} but "
                                   f"{settings[0].get(key)!r} on rank 0")
        raise ValueError(f"the MoE config differs between ranks: ranks {differing} disagree with "
                         f"rank 0: {'; '.join(details[:8])}"
                         f"{' ...' if len(details) > 8 else ''} (every rank must load the same "
                         f"YAML and overrides)")
