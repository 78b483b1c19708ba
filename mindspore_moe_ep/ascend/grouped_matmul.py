"""Grouped matmul of the experts on Ascend: CANN's GroupedMatmul, behind the CPU Cell's interface.

``(rows [N, K_in], weights [E, K_in, N_out], tokens_per_expert [E] int32) -> [N, N_out]``: rows
of group e (consecutive, in order) times ``weights[e]``; rows past the total are zero (as in
``ops.GroupedMatmul``'s contract). CANN's operator (``grouped_matmul_v4`` with a single tensor,
split on the M axis, counts as group sizes) has its own gradient in that configuration.
"""
import mindspore as ms
from mindspore import nn, ops


class AscendGroupedMatmul(nn.Cell):
    """CANN GroupedMatmul with the interface of :class:`mindspore_moe_ep.ops.GroupedMatmul`."""

    def __init__(self):
        super().__init__()
        from mindspore.ops.auto_generate import grouped_matmul_v4
        self._grouped_matmul = grouped_matmul_v4

    def construct(self, rows, weights, tokens_per_expert):
        group_sizes = tokens_per_expert.astype(ms.int64)
        out = self._grouped_matmul([rows], [weights], group_list=group_sizes, split_item=3,
                                   group_type=0, group_list_type=1)[0]             # [N, N_out]
        used = ops.arange(rows.shape[0]).reshape(-1, 1) < tokens_per_expert.sum()
        return ops.where(used, out, ops.zeros_like(out))
