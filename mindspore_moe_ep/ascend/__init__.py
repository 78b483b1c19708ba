"""The Ascend backend: the same Cells and YAML as on CPU, with Ascend communication and kernels.

- Decode: CANN's fused ``moe_distribute_dispatch`` / ``moe_distribute_combine``
  (:class:`CannDecodeDispatcher`) when the configuration fits CANN's limits
  (:func:`cann_dispatch_arguments`); HCCL_BUFFSIZE is checked at construction.
- Prefill / training, and decode otherwise: the sparse all-to-all-v dispatcher of
  ``ep_dispatcher.py`` with an HCCL exchange (:class:`HcclExchangeRows`: AlltoAll of counts,
  AlltoAllV of rows) and the AscendC kernels of ``custom_ops/ascendc`` (same operator names and
  semantics as the CPU kernels; ``ops.kernel_func`` picks them on Ascend).
- Experts: CANN's GroupedMatmul (:class:`AscendGroupedMatmul`).

Only ``cann_limits`` and ``opp`` are importable without an NPU-related side effect; everything
here runs only with MindSpore's device target set to Ascend (see docs/ascend.md).
"""
import logging
from typing import Optional

from .cann_limits import (CannDispatchArguments, CannDoesNotFit, HcclBufferTooSmallError,
                          cann_dispatch_arguments, cann_group_name, check_hccl_buffsize,
                          hccl_buffsize_mb, soc_family)

__all__ = ["CannDispatchArguments", "CannDoesNotFit", "HcclBufferTooSmallError",
           "build_ascend_dispatchers", "cann_dispatch_arguments", "cann_group_name",
           "check_hccl_buffsize", "detect_soc", "hccl_buffsize_mb", "soc_family"]

logger = logging.getLogger(__name__)


def detect_soc() -> Optional[str]:
    """"A2" or "A3" for this host's NPU (from MindSpore's SoC version), else None."""
    try:
        from mindspore._c_expression import MSContext
        return soc_family(MSContext.get_instance().get_ascend_soc_version() or "")
    except Exception:  # no Ascend plugin, or a MindSpore without this query
        return None


def build_ascend_dispatchers(config, group, soc: Optional[str] = None):
    """(prefill dispatcher, decode dispatcher) for this rank's group on Ascend.

    EP = 1: the local dispatcher (AscendC kernels) serves both phases. EP > 1: the sparse
    all-to-all-v over HCCL for prefill / training, and CANN's fused operators for decode when
    they fit this configuration and SoC (``soc`` defaults to :func:`detect_soc`); otherwise decode
    uses the all-to-all-v too, and the reason is logged.
    """
    from ..ep_dispatcher import SparseAllToAllDispatcher
    from ..token_dispatcher import LocalTokenDispatcher
    router = config.router
    if config.dispatch.quant == "int8":
        logger.warning("dispatch.quant: int8 on Ascend: decode through CANN's fused operators "
                       "quantizes (quant mode 2); the HCCL prefill exchange and expert "
                       "parallelism 1 move rows unquantized (StepPlan.quantized says which)")
    if group.size == 1:
        return LocalTokenDispatcher(config.model.num_experts, router.top_k,
                                    router.capacity_factor), None
    from .hccl_exchange import HcclExchangeRows, ensure_hccl_group
    max_tokens_per_rank = config.dispatch.max_tokens_per_rank
    exchange = HcclExchangeRows(group.group_ranks, max_tokens_per_rank)
    prefill = SparseAllToAllDispatcher(group, router.top_k, router.capacity_factor,
                                       max_tokens_per_rank, exchange)
    soc = soc or detect_soc()
    if soc is None:
        logger.warning("decode uses the HCCL all-to-all-v: the NPU is neither Atlas A2 nor A3, "
                       "so CANN's fused MoE Dispatch/Combine are not used")
        return prefill, None
    arguments = cann_dispatch_arguments(config, group, soc)
    if isinstance(arguments, CannDoesNotFit):
        logger.warning("decode uses the HCCL all-to-all-v: %s", arguments)
        return prefill, None
    check_hccl_buffsize(arguments)
    # CANN's fused operators need a communicator of their own (see cann_group_name).
    ensure_hccl_group(arguments.group_ep, group.group_ranks)
    from .cann_dispatcher import CannDecodeDispatcher
    return prefill, CannDecodeDispatcher(arguments)
