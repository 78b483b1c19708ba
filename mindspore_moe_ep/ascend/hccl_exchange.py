"""All-to-all-v of rows between the ranks of an expert-parallel group, over HCCL (Ascend).

Same interface and gradient as the CPU exchanges of ``comm/exchange.py``::

    recv_rows, recv_counts = exchange(send_rows, send_counts)

``send_rows`` [R*C, ...] holds one block of C rows per destination rank, of which the first
``send_counts[d]`` travel; ``recv_rows`` [R*C, ...] holds in block s the rows from source s
(``recv_counts[s]`` of them) and zeros after them. The gradient w.r.t. ``send_rows`` is the reverse
exchange.

How: an HCCL ``AlltoAll`` of the counts, then an ``AlltoAllV`` of only the counted rows. AlltoAllV
reads one contiguous buffer cut into per-destination segments, so the counted rows are first
gathered into a compact buffer (:class:`AlltoAllVPacking`), and the received segments are spread
back into the static [R*C] layout afterwards. Every segment carries one extra (zero) row, so no
rank ever receives an empty buffer (MindSpore returns a shape-() tensor for an empty AlltoAllV).
The packing is plain MindSpore ops, so its index arithmetic is tested on CPU by simulating the
AlltoAllV (tests/test_ascend.py); the HCCL collectives themselves run only on Ascend.
"""
from typing import Sequence

import mindspore as ms
from mindspore import nn, ops
from mindspore.communication import GlobalComm, create_group, get_group_size


class AlltoAllVPacking(nn.Cell):
    """Index arithmetic between the static [R*C] block layout and AlltoAllV's segments."""

    def __init__(self, group_size: int, max_tokens_per_rank: int):
        super().__init__()
        self.group_size = group_size
        self.capacity = max_tokens_per_rank
        slots = group_size * max_tokens_per_rank
        # Static per-slot coordinates of the [R*C] layout: block (rank) and row inside it.
        self._slot_block = ops.arange(slots, dtype=ms.int32) // max_tokens_per_rank       # [R*C]
        self._slot_row = ops.arange(slots, dtype=ms.int32) % max_tokens_per_rank          # [R*C]
        self._compact_row = ops.arange(slots + group_size, dtype=ms.int32)              # [R*C+R]

    def segment_lengths(self, counts):
        """[R] rows per AlltoAllV segment: the counted rows plus one padding row."""
        return counts + 1

    def send_index(self, send_counts):
        """[R*C + R] int32: slot of ``send_rows`` for each row of the compact send buffer.

        Segment d holds slots d*C .. d*C + send_counts[d] - 1, then the padding row; the padding
        row and the unused tail read index R*C (a zero row appended to ``send_rows``).
        """
        lengths = self.segment_lengths(send_counts)                                     # [R]
        ends = ops.cumsum(lengths, 0)                                                   # [R]
        segment = ops.searchsorted(ends, self._compact_row, right=True, out_int32=True)  # [R*C+R]
        in_range = segment < self.group_size
        segment = ops.minimum(segment, self.group_size - 1)
        row = self._compact_row - ops.gather(ends - lengths, segment, 0)
        is_row = ops.logical_and(in_range, row < ops.gather(send_counts, segment, 0))
        padding = ops.full_like(row, self.group_size * self.capacity)
        return ops.where(is_row, segment * self.capacity + row, padding)

    def pack(self, send_rows, send_counts):
        """send_rows [R*C, W] -> compact [R*C + R, W] in AlltoAllV segment order."""
        zero_row = ops.zeros((1, send_rows.shape[1]), send_rows.dtype)
        rows = ops.concat([send_rows, zero_row], axis=0)                                # [R*C+1, W]
        return ops.gather(rows, self.send_index(send_counts), 0)

    def unpack(self, received, recv_counts):
        """received [sum(recv_counts + 1), W] (segments in source order) -> [R*C, W] blocks."""
        lengths = self.segment_lengths(recv_counts)
        starts = ops.cumsum(lengths, 0) - lengths                                       # [R]
        valid = self._slot_row < ops.gather(recv_counts, self._slot_block, 0)           # [R*C]
        source_row = ops.gather(starts, self._slot_block, 0) + self._slot_row
        rows = ops.gather(received, ops.where(valid, source_row, ops.zeros_like(source_row)), 0)
        return ops.where(valid.reshape(-1, 1), rows, ops.zeros_like(rows))


class _OneWayRows(nn.Cell):
    """(send_rows [R*C, ...], send_counts [R], recv_counts [R]) -> recv_rows [R*C, ...]."""

    def __init__(self, group: str, group_size: int, max_tokens_per_rank: int):
        super().__init__()
        self.packing = AlltoAllVPacking(group_size, max_tokens_per_rank)
        self.all_to_all_v = ops.AlltoAllV(group=group, block_size=1)
        # AlltoAllV reads its split sizes on the host; MindFormers moves them there with MoveTo,
        # which exists in GRAPH_MODE only (PyNative passes device tensors directly).
        self.counts_to_host = ms.get_context("mode") == ms.GRAPH_MODE
        self.move_to = ops.MoveTo()

    def construct(self, send_rows, send_counts, recv_counts):
        row_shape = send_rows.shape[1:]
        width = 1
        for dim in row_shape:
            width *= dim
        flat_rows = send_rows.reshape(send_rows.shape[0], width)
        compact = self.packing.pack(flat_rows, send_counts)                             # [R*C+R, W]
        send_numel = (self.packing.segment_lengths(send_counts) * width).astype(ms.int64)
        recv_numel = (self.packing.segment_lengths(recv_counts) * width).astype(ms.int64)
        if self.counts_to_host:
            send_numel = self.move_to(send_numel, "CPU", True)
            recv_numel = self.move_to(recv_numel, "CPU", True)
        received = self.all_to_all_v(compact.reshape(-1), send_numel, recv_numel)
        recv_rows = self.packing.unpack(received.reshape(-1, width), recv_counts)       # [R*C, W]
        return recv_rows.reshape((send_rows.shape[0],) + row_shape)


class _ReversibleRows(nn.Cell):
    """_OneWayRows whose gradient is the reverse exchange (counts swapped).

    A single-output Cell: a Cell bprop with a tuple output fails in GRAPH_MODE (see
    comm/exchange.py).
    """

    def __init__(self, one_way: _OneWayRows):
        super().__init__()
        self._rows = one_way

    def construct(self, send_rows, send_counts, recv_counts):
        return self._rows(send_rows, send_counts, recv_counts)

    def bprop(self, send_rows, send_counts, recv_counts, out, dout):
        d_recv_rows = ops.depend(dout, out)  # after the forward exchange
        d_send_rows = self._rows(d_recv_rows, recv_counts, send_counts)
        return d_send_rows, ops.zeros_like(send_counts), ops.zeros_like(recv_counts)


_CREATED_GROUPS = set()


def ensure_hccl_group(name: str, group_ranks: Sequence[int]) -> str:
    """Create the HCCL communicator ``name`` over ``group_ranks`` once per process; returns name.

    Every rank creates the group it belongs to (as MindFormers does for its EP groups).
    """
    if name not in _CREATED_GROUPS:
        create_group(name, list(group_ranks))
        _CREATED_GROUPS.add(name)
    return name


def exchange_group_name(group_ranks: Sequence[int]) -> str:
    """The communicator of the all-to-all-v: the world group when the ranks are the whole world."""
    if list(group_ranks) == list(range(get_group_size(GlobalComm.WORLD_COMM_GROUP))):
        return GlobalComm.WORLD_COMM_GROUP
    return f"moe_ep_a2a_{group_ranks[0]}_{len(group_ranks)}"


class HcclExchangeRows(nn.Cell):
    """All-to-all-v of rows over HCCL: AlltoAll of counts, then AlltoAllV of the counted rows.

    ``(send_rows [R*C, ...], send_counts [R] int32) -> (recv_rows [R*C, ...], recv_counts [R])``
    with R = ``len(group_ranks)`` and C = ``max_tokens_per_rank``. Differentiable w.r.t. send_rows
    (reverse exchange). Ascend only; build after ``mindspore.communication.init()``.
    """

    def __init__(self, group_ranks: Sequence[int], max_tokens_per_rank: int):
        super().__init__()
        if not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank <= 0:
            raise ValueError(f"max_tokens_per_rank must be a positive int, got "
                             f"{max_tokens_per_rank!r}")
        self.group_ranks = tuple(group_ranks)
        self.max_tokens_per_rank = max_tokens_per_rank
        group = exchange_group_name(self.group_ranks)
        if group != GlobalComm.WORLD_COMM_GROUP:
            ensure_hccl_group(group, self.group_ranks)
        size = len(self.group_ranks)
        self._counts = ops.AlltoAll(split_count=size, split_dim=0, concat_dim=0, group=group)
        self._rows = _ReversibleRows(_OneWayRows(group, size, max_tokens_per_rank))

    def construct(self, send_rows, send_counts):
        recv_counts = self._counts(send_counts)
        return self._rows(send_rows, send_counts, recv_counts), recv_counts

    def keep_tail(self) -> "HcclExchangeRows":
        """Tails are always zeroed here (the unpacking gathers a zero row): the exchange itself."""
        return self

    def extend_repr(self):
        return f"group_ranks={self.group_ranks}, max_tokens_per_rank={self.max_tokens_per_rank}"
