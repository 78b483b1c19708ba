"""Decode dispatcher over CANN's fused MoeDistributeDispatch / MoeDistributeCombine (Ascend only).

The dispatcher interface of ``token_dispatcher.py``:

- ``dispatch(x, expert_ids, routing_weights)``: one ``moe_distribute_dispatch`` packs every
  token for its experts' ranks and delivers it; this rank gets ``expand_x`` [A, H] grouped by
  local expert and the per-expert counts (``expert_token_nums_type = 1``).
- ``combine(expert_out, handle)``: one ``moe_distribute_combine`` returns every expert output to
  its token's rank and forms the weighted sum over the K experts there.

The arguments come from :func:`~mindspore_moe_ep.ascend.cann_limits.cann_dispatch_arguments`;
the handle carries the outputs of Dispatch that Combine must receive unchanged (expand_idx,
ep_recv_counts and, on A2, expand_scales). Inference only (the fused operators have no gradient).
With ``dispatch.quant: int8`` Dispatch runs in quant mode 2: ``expand_x`` arrives as int8 with
one scale per row (``dynamic_scales``), dequantized here into the input's dtype for the experts.
"""
from mindspore import ops
import mindspore as ms

from ..dispatcher import DispatcherCapabilities, TokenDispatcher, check_tokens_fit
from .cann_limits import CannDispatchArguments


class CannDecodeDispatcher(TokenDispatcher):
    """Fused Dispatch / Combine of CANN for the decode phase (the grouped contract)."""

    capabilities = DispatcherCapabilities(grouped=True, rowwise=False, experts_combine=False,
                                          differentiable=False)

    def __init__(self, arguments: CannDispatchArguments):
        super().__init__()
        from mindspore.ops.auto_generate import moe_distribute_combine, moe_distribute_dispatch
        self.arguments = arguments
        self._dispatch_op = moe_distribute_dispatch
        self._combine_op = moe_distribute_combine
        # Plain int / str attributes: graph mode reads them as constants.
        self._max_bs = arguments.max_bs
        self._group_ep = arguments.group_ep
        self._ep_world_size = arguments.ep_world_size
        self._ep_rank_id = arguments.ep_rank_id
        self._moe_expert_num = arguments.moe_expert_num
        self._global_bs = arguments.global_bs
        self._shared_expert_num = arguments.shared_expert_num
        self._scales_in_dispatch = arguments.expert_scales_in_dispatch
        self._quant_mode = arguments.quant_mode
        self.quantized = arguments.quant_mode == 2
        # The keyword arguments below spell out CannDispatchArguments.dispatch_kwargs() /
        # combine_kwargs(); tests/test_cann_arguments.py checks the two stay equal.

    def dispatch(self, x, expert_ids, routing_weights):
        """x [T, H] float16/bfloat16 -> rows [A, H] grouped by local expert, counts [L] int32."""
        check_tokens_fit(x.shape[0], self._max_bs)
        expert_scales = routing_weights if self._scales_in_dispatch else None
        outputs = self._dispatch_op(
            x, expert_ids, self._ep_world_size, self._ep_rank_id, self._moe_expert_num,
            expert_scales=expert_scales, group_ep=self._group_ep, tp_world_size=0, tp_rank_id=0,
            expert_shard_type=0, shared_expert_num=self._shared_expert_num,
            shared_expert_rank_num=0, quant_mode=self._quant_mode, global_bs=self._global_bs,
            expert_token_nums_type=1)
        expand_x, expand_idx, expert_token_nums = outputs[0], outputs[2], outputs[3]
        if self._quant_mode == 2:  # int8 rows, dynamic_scales [A]: one scale per row
            dynamic_scales = outputs[1].astype(ms.float32).reshape(-1, 1)
            expand_x = (expand_x.astype(ms.float32) * dynamic_scales).astype(x.dtype)
        ep_recv_counts, expand_scales = outputs[4], outputs[6]
        tokens_per_expert = expert_token_nums.astype(ms.int32)
        no_drops = ops.zeros((1,), ms.int32)
        # GroupedHandle layout: (positions, weights, row_counts, route)
        handle = (expand_idx, routing_weights, ep_recv_counts, (expert_ids, expand_scales))
        return expand_x, tokens_per_expert, no_drops, handle

    def combine(self, expert_out, handle):
        """expert_out [A, H] -> y [T, H]: sum over k of routing_weights[t, k] * expert output."""
        expand_idx, routing_weights, ep_recv_counts, route = handle
        expert_ids, expand_scales = route
        expand_scales = expand_scales if self._scales_in_dispatch else None
        return self._combine_op(
            expert_out, expert_ids, expand_idx, ep_recv_counts, routing_weights,
            self._ep_world_size, self._ep_rank_id, self._moe_expert_num,
            expand_scales=expand_scales, group_ep=self._group_ep, tp_world_size=0, tp_rank_id=0,
            expert_shard_type=0, shared_expert_num=self._shared_expert_num,
            shared_export_rank_num=0, global_bs=self._global_bs)
