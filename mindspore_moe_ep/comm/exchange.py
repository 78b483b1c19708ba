"""All-to-all-v of rows between the ranks of an expert-parallel group, with gradients.

Both transports have the same interface::

    recv_rows, recv_counts = exchange(send_rows, send_counts)

``send_rows`` [R*C, ...] holds, for every destination rank d of the group, a block of C rows
(C = ``max_tokens_per_rank``) of which the first ``send_counts[d]`` are sent. ``recv_rows``
[R*C, ...] holds, in block s, the rows received from source rank s (``recv_counts[s]`` of them) and, after
them, zeros. The gradient is the reverse exchange: ``d send_rows = exchange(d recv_rows,
recv_counts)[0]``.

Tail contract: with ``zero_tail=False`` the rows past ``recv_counts[s]`` in block s are
*unspecified* (whatever the output buffer held; the exchange does not write them), which saves
writing them when the caller reads only the counted rows. The gradient ignores those rows (they
were never sent), and its own reverse exchange always zeroes its tails: the gradient of a send
row that was not sent is exactly zero, whoever reads it.

- :class:`ExchangeRows`: ranks on one host, through a shared-memory :class:`CommWindow`
  (the ``MoeEpExchangeRows`` / ``MoeEpExchangeRowsKeepTail`` kernels). Any dtype; rows travel
  by single copy or, in chunks, through the window's slots.
- :class:`AllGatherExchangeRows`: any placement, with MindSpore's AllGather (R times more data).
- :class:`~.two_level.TwoLevelExchangeRows` (``two_level.py``): groups spanning hosts, the
  rows between ranks of one host through a window, only the others through AllGather.
- :func:`make_exchange` picks one ("auto": shared memory when every group is on one host, two
  levels when every host holds several ranks of each group, AllGather otherwise).

Graph mode (measured with MindSpore 2.10 on CPU): the exchange kernel acts on other processes,
so it is marked ``side_effect_io``. Without that mark GRAPH_MODE dropped kernels whose outputs
were unused (under ``grad``, even forward kernels whose outputs the backward pass did not need)
and ran independent kernels in another order than the program's, so ranks would disagree on the
exchange sequence. With the mark, forward exchanges run in program order, and each backward
exchange waits for its forward output (``depend``), so every rank runs the same sequence: the
forward exchanges in order, then the backward ones in reverse order. A backward exchange whose
gradient nobody needs is pruned, identically on every rank.

MindSpore's CPU AllGather works only on the world group and only for float32, float16 and int32;
:class:`AllGatherExchangeRows` is built around both limits.
"""
from typing import Optional, Sequence

from mindspore import Tensor, nn, ops
from mindspore.common import dtype as mstype
from mindspore.communication import GlobalComm, get_group_size, get_rank

from ..ops.kernel_library import KernelCell, KernelError, custom_op
from .window import DEFAULT_SLOT_BYTES, CommWindow, host_labels, world_all_gather

TRANSPORTS = ("auto", "shm", "two_level", "allgather")


def _check_max_tokens_per_rank(max_tokens_per_rank: int) -> None:
    if not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < 0:
        raise ValueError(f"max_tokens_per_rank must be an int >= 0, got {max_tokens_per_rank!r}")


def exchange_kernel(world_size: int, max_tokens_per_rank: int, bprop=None,
                    zero_tail: bool = True) -> ops.Custom:
    """The exchange Custom op: (send_rows, send_counts, window_id) -> (rows, counts).

    ``zero_tail``: MoeEpExchangeRows (tails zeroed) or MoeEpExchangeRowsKeepTail (unspecified).
    """

    def output_shapes(send_rows, send_counts, window_id):
        rows = send_rows[0]
        if rows >= 0 and rows != world_size * max_tokens_per_rank:
            raise ValueError(f"send_rows has {rows} rows; expected world_size * "
                             f"max_tokens_per_rank = {world_size} * {max_tokens_per_rank}")
        return list(send_rows), [world_size]

    kernel_name = "MoeEpExchangeRows" if zero_tail else "MoeEpExchangeRowsKeepTail"
    return custom_op(kernel_name, out_shape=output_shapes,
                     out_dtype=lambda send_rows, send_counts, window_id:
                     (send_rows, mstype.int32),
                     bprop=bprop, shape_key={"world_size": world_size,
                                             "max_tokens_per_rank": max_tokens_per_rank},
                     side_effect=True)  # never pruned, never reordered (module doc)


class ExchangeRows(KernelCell):
    """All-to-all-v of rows through a shared-memory window (ranks of one host).

    ``(send_rows [R*C, ...] any dtype, send_counts [R] int32) -> (recv_rows [R*C, ...],
    recv_counts [R] int32)`` with R = ``window.world_size`` and C = ``max_tokens_per_rank``.
    Counts outside [0, C] fail with a message naming the value. Differentiable w.r.t. send_rows
    (reverse exchange) in PYNATIVE and GRAPH_MODE. ``zero_tail=False``: rows past
    ``recv_counts[s]`` in block s are unspecified (module doc), and so are the gradient's rows
    past ``send_counts``.
    """

    def __init__(self, window: CommWindow, max_tokens_per_rank: int, zero_tail: bool = True):
        super().__init__()
        _check_max_tokens_per_rank(max_tokens_per_rank)
        self.window = window
        self.max_tokens_per_rank = max_tokens_per_rank
        self.zero_tail = bool(zero_tail)
        self._window_id = window.id_tensor  # [1] int32, read by the kernel
        # With zero_tail, the reverse exchange zeroes its tails too: the gradient of unsent send
        # rows (0). Without, they stay unspecified like the forward's: a step then touches only
        # the rows it sends, whatever the buffers' worst-case size.
        reverse_exchange = exchange_kernel(window.world_size, max_tokens_per_rank,
                                           zero_tail=self.zero_tail)

        def bprop(send_rows, send_counts, window_id, out, dout):
            recv_rows, recv_counts = out
            d_recv_rows = ops.depend(dout[0], recv_rows)  # after the forward exchange
            d_send_rows, _ = reverse_exchange(d_recv_rows, recv_counts, window_id)
            return d_send_rows, ops.zeros_like(send_counts), ops.zeros_like(window_id)

        self._exchange = exchange_kernel(window.world_size, max_tokens_per_rank, bprop,
                                         self.zero_tail)

    def construct(self, send_rows, send_counts):
        return self._exchange(send_rows, send_counts, self._window_id)

    def keep_tail(self) -> "ExchangeRows":
        """The same exchange (same window, same step sequence) with unspecified tails."""
        return ExchangeRows(self.window, self.max_tokens_per_rank, zero_tail=False)

    def extend_repr(self):
        return (f"window={self.window!r}, max_tokens_per_rank={self.max_tokens_per_rank}, "
                f"zero_tail={self.zero_tail}")


class _GroupAllGather(nn.Cell):
    """Base of the two halves of AllGatherExchangeRows: a world AllGather plus the group layout."""

    def __init__(self, world_size: int, group_ranks: Sequence[int], group_rank: int,
                 max_tokens_per_rank: int):
        super().__init__()
        self._world_size = world_size
        self._group_size = len(group_ranks)
        self._group_rank = group_rank
        self._max_tokens_per_rank = max_tokens_per_rank
        self._sources = Tensor(list(group_ranks), mstype.int32)  # [R] world ranks of the group
        self._all_gather = ops.AllGather(group=GlobalComm.WORLD_COMM_GROUP)


class _AllGatherCounts(_GroupAllGather):
    """send_counts [R] -> recv_counts [R]; checks every rank's counts (all ranks fail alike)."""

    def __init__(self, *layout):
        super().__init__(*layout)
        self._require_in_range = ops.Assert(summarize=self._world_size * self._group_size)

    def construct(self, send_counts):
        all_counts = self._all_gather(send_counts).reshape(self._world_size, self._group_size)
        in_range = ops.logical_and(all_counts >= 0, all_counts <= self._max_tokens_per_rank).all()
        self._require_in_range(in_range, [all_counts])
        return ops.gather(all_counts, self._sources, 0)[:, self._group_rank]


class _AllGatherRows(_GroupAllGather):
    """(send_rows [R*C, ...], send_counts [R], recv_counts [R]) -> recv_rows [R*C, ...]
    (``send_counts`` unused: the signature of every exchange's rows half, _ReversibleRows).

    Runs after the counts' AllGather on every rank (``depend`` on recv_counts), so all ranks
    issue the collectives in the same order. Works in float32 for bfloat16 payloads (CPU
    AllGather, Gather and Reshape lack bfloat16; the round trip is exact). With
    ``zero_tail=False`` the tails keep whatever the senders had there (unspecified).
    """

    def __init__(self, *layout, zero_tail: bool = True):
        super().__init__(*layout)
        self._zero_tail = zero_tail

    def construct(self, send_rows, send_counts, recv_counts):
        world, group_size, rows_per_rank = (self._world_size, self._group_size,
                                             self._max_tokens_per_rank)
        payload_dtype = send_rows.dtype
        rows = ops.depend(send_rows, recv_counts)
        if payload_dtype == mstype.bfloat16:
            rows = rows.astype(mstype.float32)
        row_shape = rows.shape[1:]
        gathered = self._all_gather(rows)  # [world*R*C, ...]
        blocks = gathered.reshape((world, group_size, rows_per_rank) + row_shape)
        blocks = ops.gather(blocks, self._sources, 0)[:, self._group_rank]  # [R, C, ...]
        if self._zero_tail:
            keep = (ops.arange(rows_per_rank).reshape(1, rows_per_rank)
                    < recv_counts.reshape(group_size, 1))
            keep = keep.reshape((group_size, rows_per_rank) + (1,) * len(row_shape))  # [R,C,1..]
            blocks = ops.where(keep, blocks, ops.zeros_like(blocks))
        recv_rows = blocks.reshape((group_size * rows_per_rank,) + row_shape)
        if payload_dtype == mstype.bfloat16:
            recv_rows = recv_rows.astype(mstype.bfloat16)
        return recv_rows


class _ReversibleRows(nn.Cell):
    """The rows half of a collective exchange (``rows(send_rows, send_counts, recv_counts)``:
    _AllGatherRows, two_level._TwoLevelRows) with the reverse exchange as its gradient (CPU has
    no ReduceScatter): ``reverse_rows(d_recv_rows, recv_counts, counts(recv_counts))``.

    A separate single-output Cell because a custom Cell bprop with a tuple output fails in
    GRAPH_MODE ("The func graph is empty ... zeros_like"). The reverse exchange always zeroes
    its tails (the gradient of unsent rows is zero).
    """

    def __init__(self, counts: _AllGatherCounts, rows: nn.Cell, reverse_rows: nn.Cell):
        super().__init__()
        self._counts = counts
        self._rows = rows
        self._reverse_rows = reverse_rows

    def construct(self, send_rows, send_counts, recv_counts):
        return self._rows(send_rows, send_counts, recv_counts)

    def bprop(self, send_rows, send_counts, recv_counts, out, dout):
        d_recv_rows = ops.depend(dout, out)  # after the forward exchange
        reverse_counts = self._counts(recv_counts)
        return (self._reverse_rows(d_recv_rows, recv_counts, reverse_counts),
                ops.zeros_like(send_counts), ops.zeros_like(recv_counts))


class AllGatherExchangeRows(nn.Cell):
    """The same exchange with MindSpore's AllGather, for ranks on several hosts.

    Every rank gathers all send buffers (R times the data of a true all-to-all) and keeps the
    blocks addressed to it. MindSpore's CPU AllGather works only on the world group, so the
    gather spans the world and each rank picks the rows of its own ``group_ranks``; every rank of
    the world must run the same exchanges. Payloads: float32, float16, int32 (what CPU AllGather
    supports) and bfloat16 (gathered as float32, exactly). Counts outside [0, C] fail on every
    rank through MindSpore's Assert. The gradient is the reverse exchange. ``zero_tail=False``:
    rows past ``recv_counts[s]`` in block s are unspecified (module doc).
    """

    def __init__(self, max_tokens_per_rank: int, group_ranks: Optional[Sequence[int]] = None,
                 rank: Optional[int] = None, zero_tail: bool = True):
        super().__init__()
        _check_max_tokens_per_rank(max_tokens_per_rank)
        world_group = GlobalComm.WORLD_COMM_GROUP
        world_size = get_group_size(world_group)
        rank = get_rank(world_group) if rank is None else rank
        group_ranks = list(range(world_size)) if group_ranks is None else list(group_ranks)
        if rank not in group_ranks:
            raise ValueError(f"group_ranks {group_ranks} must contain rank {rank}")
        self.max_tokens_per_rank = max_tokens_per_rank
        self.group_ranks = tuple(group_ranks)
        self.rank = rank
        self.zero_tail = bool(zero_tail)
        layout = (world_size, group_ranks, group_ranks.index(rank), max_tokens_per_rank)
        self._counts = _AllGatherCounts(*layout)
        self._rows = _ReversibleRows(self._counts,
                                     _AllGatherRows(*layout, zero_tail=self.zero_tail),
                                     _AllGatherRows(*layout))

    def construct(self, send_rows, send_counts):
        recv_counts = self._counts(send_counts)
        return self._rows(send_rows, send_counts, recv_counts), recv_counts

    def keep_tail(self) -> "AllGatherExchangeRows":
        """The same exchange (same group) with unspecified tails."""
        return AllGatherExchangeRows(self.max_tokens_per_rank, self.group_ranks, self.rank,
                                     zero_tail=False)

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except RuntimeError as error:
            if "assert failed" not in str(error):
                raise
            raise KernelError(f"AllGatherExchangeRows: a send_counts value on some rank is outside "
                              f"[0, {self.max_tokens_per_rank}] (max_tokens_per_rank); MindSpore's "
                              f"Assert printed the gathered counts [world, R] above. Counts of "
                              f"-1 on every destination: that rank's layer input holds NaN or "
                              f"infinity, which dispatch.quant: int8 refuses") from error

    def extend_repr(self):
        return (f"group_ranks={self.group_ranks}, max_tokens_per_rank={self.max_tokens_per_rank}, "
                f"zero_tail={self.zero_tail}")


def _group_hosts(group_ranks: Sequence[int], rank: int):
    """(a host label per rank of this group, [world] the ranks each rank's group has on that
    rank's host): two world AllGathers, so every rank decides the transport alike."""
    host_of_rank = host_labels(group_ranks)
    own = host_of_rank.count(host_of_rank[list(group_ranks).index(rank)])
    return host_of_rank, world_all_gather([own])[:, 0]


def make_exchange(max_tokens_per_rank: int, *, transport: str = "auto",
                  group_ranks: Optional[Sequence[int]] = None, rank: Optional[int] = None,
                  slot_bytes: int = DEFAULT_SLOT_BYTES, timeout_s: float = 60.0,
                  attach_timeout_s: float = 300.0,
                  timeout_setting: str = "dispatch.timeout_s", zero_tail: bool = True,
                  window_transport: Optional[str] = None) -> nn.Cell:
    """The row exchange of this rank's expert-parallel group (``group_ranks``, default: world).

    ``transport``: "shm" (:class:`ExchangeRows` over a new window), "allgather"
    (:class:`AllGatherExchangeRows`) or "auto" (shm when every group's ranks share this host's
    /dev/shm, else allgather; decided identically on every rank). Collective over the world
    group: every rank must call it, eagerly, after ``mindspore.communication.init()``.
    ``zero_tail=False``: rows past the counts are unspecified (module doc).
    ``window_transport``: how the shm window moves rows (:meth:`CommWindow.open`).
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    _check_max_tokens_per_rank(max_tokens_per_rank)
    world_group = GlobalComm.WORLD_COMM_GROUP
    rank = get_rank(world_group) if rank is None else rank
    if group_ranks is None:
        group_ranks = list(range(get_group_size(world_group)))
    host_of_rank = None
    if transport != "allgather":
        host_of_rank, ranks_per_host = _group_hosts(group_ranks, rank)
        all_local = bool((ranks_per_host == len(group_ranks)).all())
        # Two levels: every rank's group has the same L > 1 ranks on each of its hosts.
        two_level = bool((ranks_per_host == ranks_per_host[0]).all() and ranks_per_host[0] > 1)
        if transport == "shm" and not all_local:
            raise ValueError("transport 'shm' needs the ranks of every expert-parallel group on "
                             "one host (sharing /dev/shm); use 'auto', 'two_level' or "
                             "'allgather'")
        if transport == "two_level" and not (two_level or all_local):
            raise ValueError(f"transport 'two_level' needs every host to hold the same number "
                             f"(> 1) of each expert-parallel group's ranks; ranks per host of "
                             f"each rank's group: {ranks_per_host.tolist()}; use 'auto' or "
                             f"'allgather'")
        if transport == "auto":
            transport = "shm" if all_local else "two_level" if two_level else "allgather"
    if transport == "two_level":
        from .two_level import TwoLevelExchangeRows
        return TwoLevelExchangeRows(max_tokens_per_rank, group_ranks, rank, host_of_rank,
                                    slot_bytes, timeout_s, attach_timeout_s, timeout_setting,
                                    zero_tail)
    if transport == "shm":
        window = CommWindow.open(group_ranks, rank, slot_bytes, timeout_s, attach_timeout_s,
                                 timeout_setting=timeout_setting,
                                 window_transport=window_transport)
        return ExchangeRows(window, max_tokens_per_rank, zero_tail)
    return AllGatherExchangeRows(max_tokens_per_rank, group_ranks, rank, zero_tail)
