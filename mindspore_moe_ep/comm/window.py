"""Shared-memory communication windows between the ranks of one host.

A window is a POSIX shared-memory segment with one slot per ordered pair of ranks, used by the
exchange and fused expert-parallel kernels (``MoeEpExchangeRows``, ``MoeEpDeliverRows``,
``MoeEpExpertsCombine``, ``MoeEpFused*``) to move rows between processes (see
``custom_ops/cpu/comm_window.h`` for the layout, the protocol and the failure detection). Rows
travel by single copy (the receiver reads the sender's buffer with ``process_vm_readv``) where
the kernel allows it, else through the slots; ``window_transport="slots"`` or the environment
variable ``MOE_EP_WINDOW_TRANSPORT=slots`` forces the slots (:data:`WINDOW_TRANSPORTS`). This
module opens and closes windows through ctypes, from the same library file MindSpore loads for
the Custom ops, so Python and the kernels share the window registry.

Opening a window is collective. The first rank of the group creates the segment under an
unguessable name (128 random bits), which reaches the other ranks through a MindSpore AllGather
over the world group: MindSpore's CPU backend supports AllGather only on the world group, so
**every rank of the world must call** :meth:`CommWindow.open` (or :func:`group_shares_memory`)
at the same point, each with the ranks of its own group (groups of equal size, e.g. the
expert-parallel groups [0, 1] and [2, 3]). Call them eagerly (at layer construction, after
``mindspore.communication.init()``), not inside a compiled graph. A window stays open until
:meth:`CommWindow.close` or the end of the process.
"""
import ctypes
import functools
import hashlib
import os
import secrets
import socket
import weakref
from typing import Optional, Sequence

import numpy as np
from mindspore import Tensor, ops
from mindspore.common import dtype as mstype
from mindspore.communication import GlobalComm, get_group_size

from ..ops.kernel_library import library_path

DEFAULT_SLOT_BYTES = 1 << 20
# The largest slot MoELayer sizes by default so that the partial sums the fused Return (or
# Combine) sends back in a whole step fit (they are then summed where they lie:
# CommWindow::ShareRows). A window has R * (R - 1) slots, one window per layer: at most 48 MiB
# of /dev/shm per layer at EP 4.
SHARED_ROWS_MAX_SLOT_BYTES = 4 << 20
WINDOW_TRANSPORT_VARIABLE = "MOE_EP_WINDOW_TRANSPORT"
# "auto": single copy where every rank can read its peers' memory, else slots (decided per
# receiving rank when the window opens); "slots": always through the slots.
WINDOW_TRANSPORTS = ("auto", "slots")
SEGMENT_NAME_PREFIX = "moe-ep-"  # segments appear as /dev/shm/moe-ep-<32 hex digits>
JOB_TOKEN_BYTES = 16


class CommWindowError(RuntimeError):
    """Opening or using a communication window failed; the message names the cause."""


@functools.lru_cache(maxsize=None)
def _window_library() -> ctypes.CDLL:
    library = ctypes.CDLL(library_path())
    library.MoeEpWindowOpen.restype = ctypes.c_int64
    library.MoeEpWindowOpen.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_int64, ctypes.c_double, ctypes.c_double,
                                        ctypes.c_char_p, ctypes.c_int]
    library.MoeEpWindowTransport.restype = ctypes.c_int
    library.MoeEpWindowTransport.argtypes = [ctypes.c_int64]
    library.MoeEpWindowClose.restype = ctypes.c_int
    library.MoeEpWindowClose.argtypes = [ctypes.c_int64]
    library.MoeEpWindowStep.restype = ctypes.c_int64
    library.MoeEpWindowStep.argtypes = [ctypes.c_int64]
    library.MoeEpWindowSegmentBytes.restype = ctypes.c_int64
    library.MoeEpWindowSegmentBytes.argtypes = [ctypes.c_int, ctypes.c_int64]
    library.MoeEpWindowAbandon.restype = ctypes.c_int
    library.MoeEpWindowAbandon.argtypes = [ctypes.c_int64, ctypes.c_char_p]
    library.MoeEpOpenWindowCount.restype = ctypes.c_int64
    library.MoeEpOpenWindowCount.argtypes = []
    library.MoeEpLastError.restype = ctypes.c_char_p
    library.MoeEpLastError.argtypes = []
    return library


def open_window_count() -> int:
    """How many communication windows are open in this process (see :meth:`CommWindow.close`)."""
    return int(_window_library().MoeEpOpenWindowCount())


def _close_window(window_id: int) -> None:
    """Releases this rank's mapping of a window; run by close() or when the object is
    garbage-collected (a failure there is ignored: the process is letting the window go)."""
    _window_library().MoeEpWindowClose(window_id)


def _last_error() -> str:
    return _window_library().MoeEpLastError().decode("utf-8", errors="replace")


# ---- small collectives over the world group (eager) -----------------------------------------

def distributed_initialized() -> bool:
    """Whether ``mindspore.communication.init()`` has been called in this process."""
    return bool(GlobalComm.INITED)


def world_all_gather(values: np.ndarray) -> np.ndarray:
    """AllGather of a small int32 vector over the world group: [n] -> [world_size, n]."""
    values = np.ascontiguousarray(values, dtype=np.int32).reshape(-1)
    world_group = GlobalComm.WORLD_COMM_GROUP
    gathered = ops.AllGather(group=world_group)(Tensor(values, mstype.int32))
    return gathered.asnumpy().reshape(get_group_size(world_group), values.size)


def shared_memory_domain() -> str:
    """Identifies the /dev/shm this process sees: host name, kernel boot id and the mount.

    Two processes with the same domain can share a window. (Different containers on one host
    usually see different /dev/shm mounts and so get different domains.)
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as boot_id_file:
            boot_id = boot_id_file.read().strip()
    except OSError:
        boot_id = ""
    try:
        mount = os.stat("/dev/shm")
        mount_id = f"{mount.st_dev}:{mount.st_ino}"
    except OSError:
        mount_id = ""
    return f"{socket.gethostname()}|{boot_id}|{mount_id}"


def _domain_digest() -> np.ndarray:
    digest = hashlib.sha256(shared_memory_domain().encode()).digest()
    return np.frombuffer(digest, dtype=np.int32)


def group_shares_memory(group_ranks: Sequence[int]) -> bool:
    """Whether all ``group_ranks`` (global ranks) see the same /dev/shm. Collective (world)."""
    digests = world_all_gather(_domain_digest())
    return all(np.array_equal(digests[rank], digests[group_ranks[0]]) for rank in group_ranks)


def host_labels(group_ranks: Sequence[int]) -> tuple:
    """A host label per rank of ``group_ranks`` (equal labels: one /dev/shm, numbered in order
    of first appearance). Collective (world)."""
    digests = world_all_gather(_domain_digest())
    labels = {}
    return tuple(labels.setdefault(digests[member].tobytes(), len(labels))
                 for member in group_ranks)


def _share_job_token(group_ranks: Sequence[int]) -> str:
    """Every rank draws a token; each group uses its first rank's. Collective (world)."""
    own_token = np.frombuffer(secrets.token_bytes(JOB_TOKEN_BYTES), dtype=np.int32)
    tokens = world_all_gather(own_token)
    return tokens[group_ranks[0]].tobytes().hex()


# ---- the window ------------------------------------------------------------------------------

class CommWindow:
    """An open shared-memory window of one group of ranks on this host.

    ``id_tensor`` (int32 [1]) is the handle the exchange kernels take as an input. The window
    stays usable until :meth:`close`; after any failed exchange it is unusable (the ranks no
    longer agree on the exchange sequence).
    """

    def __init__(self, window_id: int, group_ranks: Sequence[int], rank: int, slot_bytes: int,
                 timeout_s: float, segment_name: str):
        """Wraps an already open window; use :meth:`open`."""
        self.window_id = window_id
        self.segment_name = segment_name  # its /dev/shm name while the ranks attached
        self.group_ranks = tuple(group_ranks)
        self.rank = rank
        self.group_rank = self.group_ranks.index(rank)
        self.slot_bytes = slot_bytes
        self.timeout_s = timeout_s
        self.id_tensor = Tensor(np.array([window_id], dtype=np.int32))
        self._open = True
        # Dropping the last reference releases the mapping, so that rebuilt layers do not
        # accumulate windows (their memory in /dev/shm is freed once every rank released it).
        self._release = weakref.finalize(self, _close_window, window_id)

    @classmethod
    def open(cls, group_ranks: Sequence[int], rank: int, slot_bytes: int = DEFAULT_SLOT_BYTES,
             timeout_s: float = 60.0, attach_timeout_s: float = 300.0, *,
             job_token: Optional[str] = None,
             timeout_setting: str = "dispatch.timeout_s",
             window_transport: Optional[str] = None) -> "CommWindow":
        """Opens the window of ``group_ranks`` (global ranks, this process being ``rank``).

        Collective over the world group unless the group is this rank alone or ``job_token``
        (32 hex digits, shared by the caller out of band, e.g. by a custom launcher) is given.
        Blocks until every rank of the group has attached, at most ``attach_timeout_s``.
        ``timeout_s`` bounds each wait for a peer during an exchange; ``timeout_setting`` is
        the configuration key named in timeout errors. ``window_transport`` is one of
        :data:`WINDOW_TRANSPORTS` (default: ``$MOE_EP_WINDOW_TRANSPORT``, else "auto"); the
        :attr:`transport` property tells what the ranks agreed on.
        """
        group_ranks = [int(member) for member in group_ranks]
        if len(set(group_ranks)) != len(group_ranks) or rank not in group_ranks:
            raise ValueError(f"group_ranks {group_ranks} must be distinct and contain rank {rank}")
        if window_transport is None:
            window_transport = os.environ.get(WINDOW_TRANSPORT_VARIABLE, "") or "auto"
        if window_transport not in WINDOW_TRANSPORTS:
            raise ValueError(f"window transport must be one of {WINDOW_TRANSPORTS} (argument "
                             f"window_transport or ${WINDOW_TRANSPORT_VARIABLE}), got "
                             f"{window_transport!r}")
        if job_token is None:
            if len(group_ranks) == 1:
                job_token = secrets.token_bytes(JOB_TOKEN_BYTES).hex()
            elif distributed_initialized():
                job_token = _share_job_token(group_ranks)
            else:
                raise CommWindowError(
                    "opening a communication window of several ranks needs "
                    "mindspore.communication.init() first (or an explicit job_token)")
        window_id = _window_library().MoeEpWindowOpen(
            job_token.encode(), len(group_ranks), group_ranks.index(rank), int(slot_bytes),
            float(timeout_s), float(attach_timeout_s), timeout_setting.encode(),
            int(window_transport == "auto"))
        if window_id < 0:
            raise CommWindowError(f"rank {rank}: {_last_error()}")
        return cls(window_id, group_ranks, rank, int(slot_bytes), float(timeout_s),
                   SEGMENT_NAME_PREFIX + job_token)

    @staticmethod
    def segment_bytes(world_size: int, slot_bytes: int = DEFAULT_SLOT_BYTES) -> int:
        """Bytes of /dev/shm the window of ``world_size`` ranks occupies (about R*(R-1) slots)."""
        return int(_window_library().MoeEpWindowSegmentBytes(world_size, slot_bytes))

    @property
    def transport(self) -> str:
        """How rows travel to and from this rank: "single_copy", "slots" or "mixed" (some pairs
        each way, when only some ranks can read their peers' memory)."""
        self._require_open()
        code = int(_window_library().MoeEpWindowTransport(self.window_id))
        if code < 0:
            raise CommWindowError(_last_error())
        return ("slots", "mixed", "single_copy")[code]

    @property
    def world_size(self) -> int:
        """Number of ranks in the window's group."""
        return len(self.group_ranks)

    @property
    def steps(self) -> int:
        """Exchange steps this rank has entered on the window (the same on every healthy rank)."""
        self._require_open()
        return int(_window_library().MoeEpWindowStep(self.window_id))

    def close(self) -> None:
        """Releases this rank's mapping (idempotent; also done when the object is garbage
        collected). Kernels using the window then fail."""
        if self._open:
            self._open = False
            self._release.detach()
            if _window_library().MoeEpWindowClose(self.window_id) != 0:
                raise CommWindowError(_last_error())

    def abandon(self, reason: str) -> None:
        """Fails the window's next step for ``reason`` without exchanging anything: peers
        waiting in it raise at once with this rank's reason. The window is unusable afterwards
        (rebuild the layer on every rank). For errors found before any exchange."""
        if self._open and _window_library().MoeEpWindowAbandon(
                self.window_id, reason.encode("utf-8", errors="replace")) != 0:
            raise CommWindowError(_last_error())

    def _require_open(self) -> None:
        if not self._open:
            raise CommWindowError(f"communication window {self.window_id} is closed")

    def __enter__(self) -> "CommWindow":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        transport = self.transport if self._open else "-"
        return (f"CommWindow(id={self.window_id}, rank={self.group_rank} of {self.world_size}, "
                f"slot_bytes={self.slot_bytes}, transport={transport}, open={self._open})")
