"""CPU host settings applied when the package is imported, so that a user's own script runs as
fast as the benchmarks without calling anything.

Three process-wide settings matter when several msrun workers share a CPU host (measured in
docs/performance.md):

- ``MS_DEV_HOST_BLOCKING_RUN=1``: MindSpore runs host tasks on the calling thread instead of
  handing each launch to a worker thread while the caller spins (with 4 ranks on 2 cores, 40% of
  all CPU samples were in that spin). MindSpore reads it once, when it first queues host work,
  so it must be set before that: importing this package first does it.
- the library's kernel threads per process: unless ``MOE_EP_NUM_THREADS`` says, the usable
  cores shared evenly by the msrun workers on this host (more threads than that only contend
  for the cores), handed to the kernel library when it is loaded.
- MindSpore's CPU operator threads (``mindspore.device_context.cpu.op_tuning.threads_num``):
  the same count as the kernel threads. MindSpore's kernel thread pool spins (``sched_yield``)
  between the operators of a graph; with more ranks than cores that spin takes the cores from
  the ranks doing the work (one MoE layer's decode step at EP 4 on 2 cores ran 1.4x faster
  with one thread per rank). Set when the first kernel is built (MindSpore takes it at any
  time, also after graphs have run) unless the script has set it already. MindSpore refuses a
  second ``threads_num`` call: a script that wants its own value calls it before building a
  layer (or sets ``MOE_EP_NUM_THREADS``, which both counts follow).

Each is set only where the environment does not already say (an explicit setting always wins),
and only on CPU hosts (no Ascend toolkit in the environment). ``MOE_EP_HOST_DEFAULTS=0`` turns
all of this off. :func:`applied_host_defaults` tells what was set.
"""
import os
import time
from typing import Dict

OPT_OUT_VARIABLE = "MOE_EP_HOST_DEFAULTS"
HOST_BLOCKING_RUN_VARIABLE = "MS_DEV_HOST_BLOCKING_RUN"
KERNEL_THREADS_VARIABLE = "MOE_EP_NUM_THREADS"
# Set by CANN's environment scripts (set_env.sh) on Ascend hosts.
ASCEND_TOOLKIT_VARIABLES = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_OPP_PATH")

_applied: Dict[str, str] = {}
_active = False  # the host defaults apply to this process (a CPU host, not opted out)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ranks_on_this_host(wait_s: float = 0.5) -> int:
    """How many msrun workers of this job run on this host: the processes whose environment
    has MS_ROLE=MS_WORKER and this process's MS_SCHED_HOST / MS_SCHED_PORT (1 outside msrun).
    msrun starts its local workers within milliseconds of each other; a worker waits up to
    ``wait_s`` for all MS_WORKER_NUM of them (a worker of a multi-host job, which never sees
    them all, waits that once)."""
    if os.environ.get("MS_ROLE") != "MS_WORKER" or "MS_WORKER_NUM" not in os.environ:
        return 1
    deadline = time.monotonic() + wait_s
    while True:
        found = _workers_of_this_job()
        if found >= int(os.environ["MS_WORKER_NUM"]) or time.monotonic() >= deadline:
            return found
        time.sleep(0.02)


def _workers_of_this_job() -> int:
    """msrun workers (distinct RANK_IDs) on this host with this job's scheduler address, this
    one included."""
    markers = [f"{name}={os.environ.get(name, '')}".encode()
               for name in ("MS_ROLE", "MS_SCHED_HOST", "MS_SCHED_PORT")]
    ranks = set()  # by RANK_ID: processes a worker starts inherit its environment
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environment:
                variables = environment.read().split(b"\0")
        except OSError:  # ended meanwhile, or another user's
            continue
        if all(marker in variables for marker in markers):
            ranks.update(item for item in variables if item.startswith(b"RANK_ID="))
    return max(1, len(ranks))


def on_ascend_host() -> bool:
    return any(os.environ.get(name) for name in ASCEND_TOOLKIT_VARIABLES)


def apply_host_defaults() -> Dict[str, str]:
    """Sets the CPU host defaults that the environment does not set (see the module docstring);
    returns what it set."""
    global _active
    if os.environ.get(OPT_OUT_VARIABLE, "1") == "0" or on_ascend_host():
        return {}
    _active = True
    if HOST_BLOCKING_RUN_VARIABLE not in os.environ:
        os.environ[HOST_BLOCKING_RUN_VARIABLE] = "1"  # child processes (workers) want it too
        _applied[HOST_BLOCKING_RUN_VARIABLE] = "1"
    if not os.environ.get(KERNEL_THREADS_VARIABLE):
        # Not put into the environment, which child processes would inherit (their share of
        # the cores differs): the kernel library asks default_kernel_threads() when it loads.
        _applied["kernel_threads"] = "auto"
    return dict(_applied)


def default_kernel_threads() -> int:
    """The kernel thread count this process's kernels take when MOE_EP_NUM_THREADS is not set
    (0: none chosen; the kernels then use every core). Decided when first asked, which is when
    the first kernel is built: after mindspore.communication.init(), so every msrun worker of
    the host has started and is counted."""
    if _applied.get("kernel_threads") == "auto":
        _applied["kernel_threads"] = str(max(1, usable_cores() // ranks_on_this_host()))
    return int(_applied.get("kernel_threads", 0))


def apply_operator_threads() -> int:
    """Sets MindSpore's CPU operator threads to this process's kernel thread count
    (``MOE_EP_NUM_THREADS`` when set, else :func:`default_kernel_threads`) where the host
    defaults apply and the script has not set them; returns the count set (0: none)."""
    if not _active or "operator_threads" in _applied:
        return 0
    explicit = os.environ.get(KERNEL_THREADS_VARIABLE, "")
    threads = int(explicit) if explicit.isdigit() else default_kernel_threads()
    from mindspore._c_expression import RuntimeConf
    from mindspore.device_context.cpu.op_tuning import threads_num
    if threads <= 0 or RuntimeConf.get_instance().is_op_threads_num_configured():
        return 0
    threads_num(threads)
    _applied["operator_threads"] = str(threads)
    return threads


def applied_host_defaults() -> Dict[str, str]:
    """What this package set: MS_DEV_HOST_BLOCKING_RUN at import, the kernel threads
    ("kernel_threads": "auto" until the first kernel is built) and MindSpore's operator threads
    ("operator_threads", when the first kernel is built), where it set them (empty if opted
    out)."""
    return dict(_applied)
