"""Arguments and limits of CANN's fused MoE operators (``moe_distribute_dispatch`` / ``_combine``).

:func:`cann_dispatch_arguments` is the one place that turns a config and an expert-parallel group
into the operators' arguments, or into the list of CANN limits the configuration breaks (then the
decode path uses the HCCL all-to-all-v instead). :func:`hccl_buffsize_mb` gives the communication
window the operators need and :func:`check_hccl_buffsize` compares it with ``HCCL_BUFFSIZE``.

Pure Python (no mindspore import), so all of it is unit-tested on any machine.

Sources of the limits (checked 2025; "A2" = Atlas A2 / Ascend910B, "A3" = Atlas A3 / Ascend910_93):

- MindSpore 2.10 docstrings of ``mindspore.ops.auto_generate.moe_distribute_dispatch`` and
  ``moe_distribute_combine`` (H, BS, ep_world_size lists, moe_expert_num <= 256, dtypes,
  expert_scales only on A2, global_bs);
- CANN's ``aclnnMoeDistributeDispatch`` documentation, "constraints" section (A2: K <= 16;
  HCCL_BUFFSIZE formulas), and the operator's tiling checks in CANN's open ``ops-transformer``
  sources (A2: at most 24 experts per rank without HCCL_INTRA_PCIE_ENABLE=1; A3:
  ep_world_size * maxBs * H * 2 * 2 * localExpertNum bytes must fit the window; A3: the current
  tiling accepts only sharedExpertNum = 1, which with sharedExpertRankNum = 0 places no shared
  expert on any rank).
  MindSpore's docstring states K <= 8 for both SoCs; CANN's documentation and tiling allow
  K <= 16 on A2. We follow CANN (DeepSeek-V3 uses K = 8, which fits either reading).
"""
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

SOCS = ("A2", "A3")
SOC_NAMES = {"A2": "Atlas A2 (Ascend910B)", "A3": "Atlas A3 (Ascend910_93)"}
DEFAULT_HCCL_BUFFSIZE_MB = 200   # CANN's default when HCCL_BUFFSIZE is unset
# dispatch.quant -> moe_distribute_dispatch's quant_mode (2: dynamic quantization, one int8
# scale per token, returned as dynamic_scales; the window formulas below assume 16-bit rows,
# an upper bound for int8 ones)
CANN_QUANT_MODES = {"none": 0, "int8": 2}
_MIB = 1024 * 1024


@dataclass(frozen=True)
class SocLimits:
    """What one SoC's fused operators accept."""

    max_hidden: int
    hidden_multiple: int
    exact_hidden: Optional[int]        # A3 accepts exactly one hidden size
    max_batch: int                     # BS: tokens per rank
    max_top_k: int
    ep_world_sizes: Tuple[int, ...]
    max_experts: int = 256             # moe_expert_num (MindSpore 2.10 docstring)
    max_local_experts: Optional[int] = None
    dtypes: Tuple[str, ...] = ("float16", "bfloat16")


LIMITS: Dict[str, SocLimits] = {
    "A2": SocLimits(max_hidden=7168, hidden_multiple=32, exact_hidden=None, max_batch=256,
                    max_top_k=16, ep_world_sizes=(16, 32, 64), max_local_experts=24),
    "A3": SocLimits(max_hidden=7168, hidden_multiple=1, exact_hidden=7168, max_batch=512,
                    max_top_k=8, ep_world_sizes=(8, 16, 32, 64, 128, 144, 256, 288)),
}


def cann_group_name(group_ranks: Sequence[int]) -> str:
    """Name of the communicator reserved for the fused operators of this group.

    CANN requires that Dispatch / Combine have their EP communicator to themselves ("no other
    operator in that communication domain"), so it is never the world group nor the group of
    the prefill all-to-all-v, even with the same ranks.
    """
    return f"moe_ep_cann_{group_ranks[0]}_{len(group_ranks)}"


@dataclass(frozen=True)
class CannDispatchArguments:
    """Everything ``moe_distribute_dispatch`` / ``moe_distribute_combine`` need besides tensors."""

    soc: str
    group_ep: str
    ep_world_size: int
    ep_rank_id: int
    moe_expert_num: int
    local_expert_num: int
    top_k: int
    hidden_size: int
    max_bs: int                  # tokens per rank the static buffers hold (dispatch.max_tokens_per_rank)
    global_bs: int               # max_bs * ep_world_size: ranks may hold different token counts
    expand_rows: int             # A = global_bs * min(local_expert_num, top_k): rows of expand_x
    shared_expert_num: int       # A2: 0 ("unsupported, pass 0"); A3: 1 with no shared-expert ranks
    hccl_buffsize_mb: int        # the least HCCL_BUFFSIZE that fits (see hccl_buffsize_mb)
    quant_mode: int = 0          # 0: none; 2: dynamic per-token int8 (dispatch.quant: int8)

    @property
    def expert_scales_in_dispatch(self) -> bool:
        """A2 takes the routing weights in Dispatch (and returns expand_scales); A3 does not."""
        return self.soc == "A2"

    def _common_kwargs(self) -> Dict[str, Any]:
        return dict(group_ep=self.group_ep, tp_world_size=0, tp_rank_id=0, expert_shard_type=0,
                    shared_expert_num=self.shared_expert_num, global_bs=self.global_bs)

    def dispatch_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``moe_distribute_dispatch`` after (x, expert_ids, ep_world_size,
        ep_rank_id, moe_expert_num)."""
        return dict(self._common_kwargs(), shared_expert_rank_num=0, quant_mode=self.quant_mode,
                    expert_token_nums_type=1)    # 1: per-expert counts, not prefix sums

    def combine_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``moe_distribute_combine`` after its positional tensors.

        MindSpore 2.10 spells the shared-rank argument ``shared_export_rank_num`` here.
        """
        return dict(self._common_kwargs(), shared_export_rank_num=0)


@dataclass(frozen=True)
class CannDoesNotFit:
    """Why the fused operators cannot serve a configuration: one message per broken limit."""

    soc: str
    reasons: Tuple[str, ...]

    def __str__(self) -> str:
        return (f"CANN's fused MoE Dispatch/Combine on {SOC_NAMES.get(self.soc, self.soc)} do not "
                f"fit this configuration: " + "; ".join(self.reasons))


def _one_of(values: Sequence[int]) -> str:
    return "{" + ", ".join(str(value) for value in values) + "}"


def limit_violations(config, soc: str) -> Tuple[str, ...]:
    """Every CANN limit that ``config`` breaks on ``soc``, each naming the field and the limit."""
    if soc not in LIMITS:
        raise ValueError(f"soc must be one of {SOCS}, got {soc!r}")
    limits = LIMITS[soc]
    model, router = config.model, config.router
    hidden, batch, top_k = model.hidden_size, config.dispatch.max_tokens_per_rank, router.top_k
    # moe_expert_num: the physical expert slots (experts + parallel.redundant_experts); the
    # operators see slot ids, so replicas need nothing of them.
    ep = config.parallel.expert_parallel
    experts = model.num_experts + config.parallel.redundant_experts
    reasons = []
    if limits.exact_hidden is not None and hidden != limits.exact_hidden:
        reasons.append(f"model.hidden_size = {hidden}: {soc} needs exactly {limits.exact_hidden}")
    elif not (0 < hidden <= limits.max_hidden and hidden % limits.hidden_multiple == 0):
        reasons.append(f"model.hidden_size = {hidden}: {soc} needs a multiple of "
                       f"{limits.hidden_multiple} in [{limits.hidden_multiple}, {limits.max_hidden}]")
    if not 1 <= batch <= limits.max_batch:
        reasons.append(f"dispatch.max_tokens_per_rank = {batch} (BS, tokens per rank): {soc} "
                       f"allows 1..{limits.max_batch}")
    if not 1 <= top_k <= limits.max_top_k:
        reasons.append(f"router.top_k = {top_k} (K): {soc} allows 1..{limits.max_top_k}")
    if ep not in limits.ep_world_sizes:
        reasons.append(f"parallel.expert_parallel = {ep} (ep_world_size): {soc} allows "
                       f"{_one_of(limits.ep_world_sizes)}")
    if not 0 < experts <= limits.max_experts:
        reasons.append(f"model.num_experts + parallel.redundant_experts = {experts} "
                       f"(moe_expert_num): at most {limits.max_experts}")
    if experts % ep:
        reasons.append(f"model.num_experts + parallel.redundant_experts = {experts} "
                       f"(moe_expert_num) must be divisible by parallel.expert_parallel = {ep}")
    elif limits.max_local_experts is not None and experts // ep > limits.max_local_experts:
        reasons.append(f"expert slots per rank = {experts // ep} ((model.num_experts + "
                       f"parallel.redundant_experts) / parallel.expert_parallel): {soc} allows "
                       f"at most {limits.max_local_experts}")
    if config.runtime.dtype not in limits.dtypes:
        reasons.append(f"runtime.dtype = {config.runtime.dtype!r}: the fused operators take "
                       f"{' or '.join(limits.dtypes)}")
    if router.capacity_factor is not None:
        reasons.append(f"router.capacity_factor = {router.capacity_factor}: the fused operators "
                       f"never drop tokens (use null, dropless)")
    return tuple(reasons)


def hccl_buffsize_mb(soc: str, max_bs: int, ep_world_size: int, local_expert_num: int,
                     top_k: int, hidden_size: int) -> int:
    """The least ``HCCL_BUFFSIZE`` (MB = MiB) for Dispatch / Combine, from CANN's formulas.

    A2 (aclnnMoeDistributeDispatch constraints)::

        HCCL_BUFFSIZE >= 2 * (BS * ep * min(L, K) * H * sizeof(uint16) + 2 MB)

    A3, the larger of the documented rule and the operator's own window check::

        1024^2 * (HCCL_BUFFSIZE - 2) / 2 >= BS * 2 * (H + 128) * (ep * L + K + 1)
        HCCL_BUFFSIZE * 1024^2           >= ep * BS * H * 2 * 2 * L

    with BS the most tokens per rank, L the experts per rank, K top-k and H the hidden size.
    """
    if soc == "A2":
        window_bytes = 2 * (max_bs * ep_world_size * min(local_expert_num, top_k) * hidden_size * 2
                            + 2 * _MIB)
        return math.ceil(window_bytes / _MIB)
    if soc == "A3":
        documented = 2 + math.ceil(2 * max_bs * 2 * (hidden_size + 128)
                                   * (ep_world_size * local_expert_num + top_k + 1) / _MIB)
        tiling_check = math.ceil(ep_world_size * max_bs * hidden_size * 2 * 2 * local_expert_num
                                 / _MIB)
        return max(documented, tiling_check)
    raise ValueError(f"soc must be one of {SOCS}, got {soc!r}")


def cann_dispatch_arguments(config, group, soc: str,
                            group_name: Optional[str] = None
                            ) -> Union[CannDispatchArguments, CannDoesNotFit]:
    """The fused operators' arguments for this rank, or why they do not fit ``config``.

    ``group`` is this rank's :class:`~mindspore_moe_ep.parallel_state.ExpertParallelGroup` (its
    size must be ``parallel.expert_parallel``); ``group_name`` defaults to
    :func:`cann_group_name`. ``soc`` is "A2" or "A3" (see :func:`soc_family`).
    """
    if group.size != config.parallel.expert_parallel:
        raise ValueError(f"the group has {group.size} ranks but parallel.expert_parallel = "
                         f"{config.parallel.expert_parallel}")
    reasons = limit_violations(config, soc)
    if reasons:
        return CannDoesNotFit(soc, reasons)
    ep, top_k = group.size, config.router.top_k
    local_experts = config.num_local_experts  # slots per rank
    max_bs = config.dispatch.max_tokens_per_rank
    return CannDispatchArguments(
        soc=soc, group_ep=group_name or cann_group_name(group.group_ranks), ep_world_size=ep,
        ep_rank_id=group.group_rank, moe_expert_num=config.num_expert_slots,
        local_expert_num=local_experts, top_k=top_k, hidden_size=config.model.hidden_size,
        max_bs=max_bs, global_bs=max_bs * ep, expand_rows=max_bs * ep * min(local_experts, top_k),
        shared_expert_num=1 if soc == "A3" else 0,
        hccl_buffsize_mb=hccl_buffsize_mb(soc, max_bs, ep, local_experts, top_k,
                                          config.model.hidden_size),
        quant_mode=CANN_QUANT_MODES[config.dispatch.quant])


class HcclBufferTooSmallError(ValueError):
    """HCCL_BUFFSIZE is below what the fused operators need (they would fail obscurely)."""


def configured_hccl_buffsize_mb(environ: Mapping[str, str] = os.environ) -> int:
    """``HCCL_BUFFSIZE`` in MB (CANN's default 200 when unset); a bad value raises, naming it."""
    raw = environ.get("HCCL_BUFFSIZE")
    if raw is None or raw.strip() == "":
        return DEFAULT_HCCL_BUFFSIZE_MB
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise HcclBufferTooSmallError(f"HCCL_BUFFSIZE = {raw!r} is not allowed; expected an "
                                      f"integer >= 1 (MB)")
    return value


def check_hccl_buffsize(arguments: CannDispatchArguments,
                        environ: Mapping[str, str] = os.environ) -> None:
    """Raise :class:`HcclBufferTooSmallError`, stating the value to set, if the window is short."""
    configured = configured_hccl_buffsize_mb(environ)
    required = arguments.hccl_buffsize_mb
    if configured < required:
        origin = "set" if environ.get("HCCL_BUFFSIZE") else "unset, CANN's default"
        raise HcclBufferTooSmallError(
            f"HCCL_BUFFSIZE = {configured} MB ({origin}) is smaller than the {required} MB the "
            f"fused MoE Dispatch/Combine need on {arguments.soc} for BS = {arguments.max_bs} "
            f"tokens per rank, ep_world_size = {arguments.ep_world_size}, "
            f"{arguments.local_expert_num} experts per rank, top_k = {arguments.top_k}, hidden = "
            f"{arguments.hidden_size} (docs/ascend.md gives the formula). Set "
            f"HCCL_BUFFSIZE={required} in every worker's environment before launching (e.g. "
            f"'export HCCL_BUFFSIZE={required}'), or lower dispatch.max_tokens_per_rank.")


def soc_family(soc_version: str) -> Optional[str]:
    """"A2" / "A3" for a SoC name such as "Ascend910B2", "ascend910b", "Ascend910_9391", else None."""
    name = soc_version.strip().lower()
    if name.startswith("ascend910b"):
        return "A2"
    if name.startswith("ascend910_93"):
        return "A3"
    return None
