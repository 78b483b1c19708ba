"""The row exchange of a group that spans hosts: shared memory inside a host, AllGather between.

DeepEP moves a token over NVLink to the GPUs of its own node and over RDMA to the others. The
CPU analogue here: the ranks of the expert-parallel group that share this host's /dev/shm
exchange their rows through a shared-memory window of their own (the same kernel as
:class:`~.exchange.ExchangeRows`, over that host's L ranks), and only the blocks addressed to
other hosts go through MindSpore's AllGather, the one collective CPU ranks on different hosts
have (it has no all-to-all, and gathers over the world group only). Each rank contributes its
R - L remote blocks, so the AllGather moves (R - L) / R of what :class:`~.exchange.
AllGatherExchangeRows` moves (half, for two hosts), and rows between ranks of one host never
touch it.

Same interface and contract as the other exchanges (module doc of ``exchange.py``): ``(send_rows
[R*C, ...], send_counts [R]) -> (recv_rows [R*C, ...], recv_counts [R])``, gradient = the reverse
exchange. Every host must hold the same number L of the group's ranks (the AllGather's buffers
have one shape on every rank).
"""
from typing import Sequence

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.common import dtype as mstype
from mindspore.communication import GlobalComm, get_group_size

from .exchange import (_AllGatherCounts, _ReversibleRows, _check_max_tokens_per_rank,
                       exchange_kernel)
from .window import CommWindow


def host_blocks(host_of_rank: Sequence[int], group_rank: int):
    """(local group ranks, remote group ranks) of ``group_rank``: the group's ranks on its host
    and on the other hosts, ascending. Raises ValueError unless every host holds as many."""
    hosts = list(host_of_rank)
    sizes = {host: hosts.count(host) for host in hosts}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"a two-level exchange needs the same number of the group's ranks on "
                         f"every host; hosts of the group's ranks: {hosts}")
    local = [r for r, host in enumerate(hosts) if host == hosts[group_rank]]
    remote = [r for r, host in enumerate(hosts) if host != hosts[group_rank]]
    return local, remote


class _TwoLevelRows(nn.Cell):
    """(send_rows [R*C, ...], send_counts [R], recv_counts [R]) -> recv_rows [R*C, ...].

    The local blocks through the host window, the remote ones through one world AllGather of
    every rank's remote blocks ([(R - L)*C, ...] each), after the counts' AllGather (``depend``
    on recv_counts), so that every rank issues the collectives in the same order.
    """

    def __init__(self, window, group_ranks, group_rank, host_of_rank, max_tokens_per_rank,
                 zero_tail):
        super().__init__()
        local, remote = host_blocks(host_of_rank, group_rank)
        self._rows_per_rank = max_tokens_per_rank
        self._zero_tail = zero_tail
        self._local_exchange = exchange_kernel(len(local), max_tokens_per_rank,
                                               zero_tail=zero_tail)
        self._window_id = window.id_tensor
        self._local_blocks = Tensor(np.array(local, np.int32))                     # [L]
        self._remote_blocks = Tensor(np.array(remote, np.int32))                   # [R-L]
        # Rows of the gathered [world * (R-L), C, ...] addressed to this rank: source s sends
        # its remote blocks in ascending destination order; this rank is one of them.
        remote_count = len(remote)
        sources = []
        for source in remote:
            _, source_remote = host_blocks(host_of_rank, source)
            sources.append(group_ranks[source] * remote_count + source_remote.index(group_rank))
        self._gathered_blocks = Tensor(np.array(sources, np.int32))                # [R-L]
        # recv blocks: the local ones first, then the remote ones -> source order.
        order = np.argsort(np.array(local + remote))
        self._source_order = Tensor(order.astype(np.int32))                         # [R]
        self._all_gather = ops.AllGather(group=GlobalComm.WORLD_COMM_GROUP)
        self._has_remote = bool(remote)

    def _blocks(self, rows, indices):
        """rows [n*C, ...] -> the blocks ``indices`` [len*C, ...]."""
        shape = rows.shape[1:]
        blocks = rows.reshape((-1, self._rows_per_rank) + shape)
        return ops.gather(blocks, indices, 0).reshape((-1,) + shape)

    def construct(self, send_rows, send_counts, recv_counts):
        if not self._has_remote:  # the whole group on this host: the window alone
            return self._local_exchange(send_rows, send_counts, self._window_id)[0]
        payload_dtype = send_rows.dtype
        rows = send_rows
        if payload_dtype == mstype.bfloat16:  # CPU Gather / Reshape / AllGather lack bfloat16
            rows = rows.astype(mstype.float32)
        shape = rows.shape[1:]
        local_counts = ops.gather(send_counts, self._local_blocks, 0)
        local_recv, _ = self._local_exchange(self._blocks(rows, self._local_blocks),
                                             local_counts, self._window_id)       # [L*C, ...]
        remote_send = ops.depend(self._blocks(rows, self._remote_blocks), recv_counts)
        remote_send = ops.depend(remote_send, local_recv)
        gathered = self._all_gather(remote_send)                    # [world*(R-L)*C, ...]
        remote_recv = self._blocks(gathered, self._gathered_blocks)                # [(R-L)*C]
        recv = ops.concat((local_recv, remote_recv), 0)                            # [R*C, ...]
        recv = self._blocks(recv, self._source_order)
        if self._zero_tail:  # remote tails hold what the senders had there; local ones are 0
            keep = (ops.arange(self._rows_per_rank).reshape(1, -1)
                    < recv_counts.reshape(-1, 1))                                  # [R, C]
            keep = keep.reshape((-1,) + (1,) * len(shape))
            recv = ops.where(keep, recv, ops.zeros_like(recv))
        if payload_dtype == mstype.bfloat16:
            recv = recv.astype(mstype.bfloat16)
        return recv


class TwoLevelExchangeRows(nn.Cell):
    """All-to-all-v of rows for a group spanning hosts (module doc): the host's ranks through a
    shared-memory window, the other hosts through AllGather. ``host_of_rank``: a host label per
    group rank (``window.host_labels``). Collective over the world: every rank builds
    it, with its own group. ``zero_tail=False``: rows past the counts are unspecified."""

    def __init__(self, max_tokens_per_rank: int, group_ranks: Sequence[int], rank: int,
                 host_of_rank: Sequence[int], slot_bytes: int, timeout_s: float,
                 attach_timeout_s: float, timeout_setting: str = "dispatch.timeout_s",
                 zero_tail: bool = True, host_window: CommWindow = None):
        super().__init__()
        _check_max_tokens_per_rank(max_tokens_per_rank)
        group_ranks = list(group_ranks)
        group_rank = group_ranks.index(rank)
        local, _ = host_blocks(host_of_rank, group_rank)
        if host_window is None:
            host_window = CommWindow.open([group_ranks[r] for r in local], rank, slot_bytes,
                                          timeout_s, attach_timeout_s,
                                          timeout_setting=timeout_setting)
        self.host_window = host_window  # not ``window``: the fused kernels need the whole group's
        self.max_tokens_per_rank = max_tokens_per_rank
        self.group_ranks = tuple(group_ranks)
        self.rank = rank
        self.host_of_rank = tuple(host_of_rank)
        self.zero_tail = bool(zero_tail)
        world_size = get_group_size(GlobalComm.WORLD_COMM_GROUP)
        layout = (world_size, group_ranks, group_rank, max_tokens_per_rank)
        self._counts = _AllGatherCounts(*layout)

        def rows(tail):
            return _TwoLevelRows(host_window, group_ranks, group_rank, host_of_rank,
                                 max_tokens_per_rank, tail)
        self._rows = _ReversibleRows(self._counts, rows(self.zero_tail), rows(True))

    def construct(self, send_rows, send_counts):
        recv_counts = self._counts(send_counts)
        return self._rows(send_rows, send_counts, recv_counts), recv_counts

    def keep_tail(self) -> "TwoLevelExchangeRows":
        """The same exchange (same host window) with unspecified tails."""
        return TwoLevelExchangeRows(self.max_tokens_per_rank, self.group_ranks, self.rank,
                                    self.host_of_rank, 0, 0.0, 0.0, zero_tail=False,
                                    host_window=self.host_window)

    def extend_repr(self):
        return (f"group_ranks={self.group_ranks}, hosts={self.host_of_rank}, "
                f"max_tokens_per_rank={self.max_tokens_per_rank}, zero_tail={self.zero_tail}")
