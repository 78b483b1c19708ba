"""Shared helpers of the benchmarks: arguments, machine information, timing, tables, JSON, plots,
and launching groups of worker processes (msrun for MindSpore, plain processes for PyTorch).

Nothing here imports MindSpore or PyTorch at module level: workers of either framework load it
cheaply, and the library never depends on the benchmarks' optional requirements.
"""
import argparse
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPOSITORY_ROOT = os.path.dirname(os.path.dirname(HERE))
RESULT_DIR_VARIABLE = "MOE_EP_BENCH_RESULT_DIR"
DEFAULT_OUT = "bench_results"
CPU_FLAGS_OF_INTEREST = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
                         "avx512vl", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile",
                         "amx_bf16", "amx_int8")


# ---- arguments -------------------------------------------------------------------------------

def argument_parser(description: str, worker_roles: bool = False) -> argparse.ArgumentParser:
    """The options every benchmark has: --out DIR, --quick, --no-plot; with ``worker_roles`` the
    hidden --role {ms,torch} by which a benchmark starts its own worker processes."""
    parser = argparse.ArgumentParser(description=description)
    if worker_roles:
        parser.add_argument("--role", choices=["ms", "torch"], default=None,
                            help=argparse.SUPPRESS)
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"directory for the JSON results and plots (default {DEFAULT_OUT}/)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer sizes and repetitions (about 2 minutes)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG plot")
    return parser


def random_routing(tokens: int, top_k: int, experts: int, seed: int = 0):
    """[T, K] distinct uniformly random experts per token (int32) and normalised weights
    (float32): balanced loads, the same for every benchmark."""
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((tokens, experts)), axis=1)[:, :top_k].astype(np.int32)
    weights = rng.random((tokens, top_k)).astype(np.float32)
    return ids, weights / weights.sum(axis=1, keepdims=True)


# ---- machine information ---------------------------------------------------------------------

def _cpu_info():
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def _proc_kib_field_bytes(path, field):
    """Bytes of a "<field>: <n> kB" line of a /proc file (None if absent or unreadable)."""
    try:
        with open(path, encoding="ascii") as proc_file:
            for line in proc_file:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _memory_bytes():
    return _proc_kib_field_bytes("/proc/meminfo", "MemTotal")


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_revision():
    try:
        head = subprocess.run(["git", "-C", REPOSITORY_ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPOSITORY_ROOT, "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+uncommitted changes" if dirty else "") if head else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """CPU model and flags, cores, memory, load, library versions: stored with every result."""
    model, flags = _cpu_info()
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cores = os.cpu_count()
    return {
        "cpu_model": model,
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS_OF_INTEREST},
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores,
        "memory_bytes": _memory_bytes(),
        "load_average_1m_at_start": os.getloadavg()[0],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in
                     ("mindspore", "numpy", "torch", "fairscale", "matplotlib",
                      "mindspore-moe-ep")},
        "git_revision": _git_revision(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def describe_machine(info: dict) -> str:
    flags = ", ".join(flag for flag, present in info["cpu_flags"].items() if present) or "none"
    memory = info["memory_bytes"] / 2 ** 30 if info["memory_bytes"] else float("nan")
    return (f"{info['cpu_model']}, {info['usable_cores']} cores, {memory:.0f} GiB; flags: {flags}; "
            f"load {info['load_average_1m_at_start']:.2f}; mindspore {info['versions']['mindspore']}"
            f", torch {info['versions']['torch']}, numpy {info['versions']['numpy']}")


# ---- output ----------------------------------------------------------------------------------

class Progress:
    """One line per step of a long run: ``[name] 3/12 hidden=1024 (41 s)``."""

    def __init__(self, name: str, total: int):
        self.name, self.total, self.done = name, total, 0
        self.started = time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        print(f"[{self.name}] {self.done}/{self.total} {what} "
              f"({time.monotonic() - self.started:.0f} s)", flush=True)


def format_value(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
        return f"{value:.3g}"
    return "n/a" if value is None else str(value)


def table(headers, rows) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[format_value(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_results(out_dir: str, name: str, payload: dict) -> str:
    """Writes ``out_dir/name.json`` (with machine info) and returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), **payload}
    path = os.path.join(out_dir, f"{name}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, default=_json_default)
    os.replace(path + ".tmp", path)
    print(f"[{name}] wrote {path}", flush=True)
    return path


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def save_plot(out_dir: str, name: str, draw) -> str:
    """Calls ``draw(plt)`` and saves ``out_dir/name.png``; skips with a message without matplotlib."""
    if not plot_available():
        print(f"[{name}] matplotlib is not installed: plot skipped "
              f"(pip install -r scripts/benchmarks/requirements.txt)", flush=True)
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure = plt.figure(figsize=(7.5, 4.5))
    try:
        draw(plt)
        plt.grid(True, alpha=0.3)
        plt.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        figure.savefig(path, dpi=110)
        print(f"[{name}] wrote {path}", flush=True)
        return path
    finally:
        plt.close(figure)


# ---- timing ----------------------------------------------------------------------------------

def time_calls(fn, repeats: int, warmup: int = 1, inner: int = 1) -> dict:
    """Seconds per call of ``fn`` (which itself does ``inner`` operations): min and median over
    ``repeats`` timed calls after ``warmup`` untimed ones. The minimum is the figure least
    disturbed by other processes on a shared machine; the median is kept alongside."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) / inner)
    return {"min_s": float(np.min(samples)), "median_s": float(np.median(samples)),
            "repeats": repeats, "inner": inner}


_MEMMOVE = ctypes.memmove  # a foreign call: releases the GIL, so threads copy in parallel


def make_memcpy(nbytes: int, threads: int = 1):
    """A callable doing one copy of ``nbytes`` (libc memcpy through ctypes, split over
    ``threads`` threads) between two page-faulted buffers."""
    source = np.ones(max(nbytes, 1), dtype=np.uint8)
    destination = np.zeros_like(source)
    source_address, destination_address = source.ctypes.data, destination.ctypes.data
    bounds = [nbytes * share // threads for share in range(threads + 1)]

    def copy_share(share):
        begin, end = bounds[share], bounds[share + 1]
        _MEMMOVE(destination_address + begin, source_address + begin, end - begin)

    def copy():
        if threads == 1:
            copy_share(0)
            return
        helpers = [threading.Thread(target=copy_share, args=(share,))
                   for share in range(1, threads)]
        for helper in helpers:
            helper.start()
        copy_share(0)
        for helper in helpers:
            helper.join()

    copy.buffers = (source, destination)  # kept alive with the callable
    return copy


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def make_cross_memory_copy(nbytes: int):
    """A callable doing one copy of ``nbytes`` with process_vm_readv from this process's own
    memory: the kernel's copy routine that the single-copy exchange uses, without the exchange
    (on CPUs without fast string moves it is well below a user-space memcpy)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.process_vm_readv.restype = ctypes.c_ssize_t
    source = np.ones(max(nbytes, 1), dtype=np.uint8)
    destination = np.zeros_like(source)
    local = _IoVec(destination.ctypes.data, nbytes)
    remote = _IoVec(source.ctypes.data, nbytes)
    pid = os.getpid()

    def copy():
        copied = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if copied != nbytes:
            raise OSError(ctypes.get_errno(), f"process_vm_readv copied {copied} of {nbytes}")

    copy.buffers = (source, destination)
    return copy


def memcpy_seconds(nbytes: int, threads: int = 1, repeats: int = 7,
                   cross_memory: bool = False) -> dict:
    """Time of one copy of ``nbytes`` (see make_memcpy, or make_cross_memory_copy with
    ``cross_memory``); small copies are repeated per sample."""
    copy = make_cross_memory_copy(nbytes) if cross_memory else make_memcpy(nbytes, threads)
    inner = max(1, int(2 ** 24 // max(nbytes, 1)))

    def copies():
        for _ in range(inner):
            copy()

    return time_calls(copies, repeats=repeats, warmup=2, inner=inner)


def interleaved_times(functions: dict, repeats: int, warmup: int = 1, inner=None) -> dict:
    """Times several callables in alternation (a, b, a, b, ...), so that load from other processes
    on a shared machine hits them alike; returns {name: {min_s, median_s}} per call.
    ``inner``: {name: operations per call} (default 1)."""
    inner = inner or {}
    for _ in range(warmup):
        for function in functions.values():
            function()
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            samples[name].append((time.perf_counter() - start) / inner.get(name, 1))
    return {name: {"min_s": float(np.min(values)), "median_s": float(np.median(values))}
            for name, values in samples.items()}


# ---- worker processes ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_rank() -> int:
    return int(os.environ.get("RANK_ID", os.environ.get("RANK", "0")))


def write_worker_result(payload: dict) -> None:
    """A worker's report, collected by launch_msrun / launch_processes."""
    directory = os.environ[RESULT_DIR_VARIABLE]
    path = os.path.join(directory, f"rank_{worker_rank()}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(payload, handle, default=_json_default)
    os.replace(path + ".tmp", path)


class LaunchError(RuntimeError):
    pass


def _environment(result_dir, extra):
    environment = dict(os.environ)
    environment["PATH"] = os.path.dirname(sys.executable) + os.pathsep + environment.get("PATH", "")
    environment["PYTHONPATH"] = os.pathsep.join(
        [REPOSITORY_ROOT, HERE, environment.get("PYTHONPATH", "")])
    environment[RESULT_DIR_VARIABLE] = result_dir
    environment.setdefault("GLOG_v", "3")
    environment.update(extra or {})
    return environment


def _collect(result_dir, world_size, log_paths, returncode, what):
    results = {}
    for rank in range(world_size):
        path = os.path.join(result_dir, f"rank_{rank}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                results[rank] = json.load(handle)
    if returncode != 0 or len(results) != world_size:
        tails = []
        for path in log_paths:
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as handle:
                    lines = [line for line in handle.read().splitlines()
                             if not line.startswith("[WARNING]")]
                tails.append(f"---- {path}\n" + "\n".join(lines[-25:]))
        raise LaunchError(f"{what} failed (exit {returncode}, reports from ranks "
                          f"{sorted(results)} of {world_size})\n" + "\n".join(tails))
    return [results[rank] for rank in range(world_size)]


def launch_msrun(script: str, world_size: int, args=(), timeout_s: float = 900.0,
                 env=None) -> list:
    """Runs ``script args`` on ``world_size`` local msrun workers; returns their reports."""
    work_dir = tempfile.mkdtemp(prefix="moe_ep_bench_msrun_")
    result_dir, log_dir = os.path.join(work_dir, "results"), os.path.join(work_dir, "logs")
    os.makedirs(result_dir)
    os.makedirs(log_dir)
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    command = [msrun, f"--worker_num={world_size}", f"--local_worker_num={world_size}",
               f"--master_port={free_port()}", f"--log_dir={log_dir}", "--join=True",
               script, *[str(a) for a in args]]
    log_path = os.path.join(log_dir, "msrun.out")
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, env=_environment(result_dir, env), stdout=log,
                                   stderr=subprocess.STDOUT, cwd=REPOSITORY_ROOT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = -signal.SIGKILL
    logs = [log_path] + [os.path.join(log_dir, f"worker_{r}.log") for r in range(world_size)]
    reports = _collect(result_dir, world_size, logs, returncode,
                       f"msrun of {os.path.basename(script)} on {world_size} workers")
    shutil.rmtree(work_dir, ignore_errors=True)  # kept (with the logs) only on failure
    return reports


def launch_processes(script: str, world_size: int, args=(), timeout_s: float = 900.0,
                     env=None) -> list:
    """Runs ``world_size`` plain processes of ``script args`` with torch.distributed's variables
    (MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE); returns their reports."""
    work_dir = tempfile.mkdtemp(prefix="moe_ep_bench_procs_")
    result_dir = os.path.join(work_dir, "results")
    os.makedirs(result_dir)
    port = free_port()
    processes, logs = [], []
    for rank in range(world_size):
        extra = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                 "WORLD_SIZE": str(world_size), **(env or {})}
        log_path = os.path.join(work_dir, f"worker_{rank}.log")
        logs.append(log_path)
        log = open(log_path, "w", encoding="utf-8")
        processes.append((subprocess.Popen([sys.executable, script, *[str(a) for a in args]],
                                           env=_environment(result_dir, extra), stdout=log,
                                           stderr=subprocess.STDOUT, cwd=REPOSITORY_ROOT,
                                           start_new_session=True), log))
    deadline = time.monotonic() + timeout_s
    returncode = 0
    for process, log in processes:
        try:
            status = process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            status = process.wait()
        log.close()
        returncode = returncode or status
        if status != 0:  # one worker failed: the others would wait forever
            for other, _ in processes:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
    reports = _collect(result_dir, world_size, logs, returncode,
                       f"{os.path.basename(script)} on {world_size} processes")
    shutil.rmtree(work_dir, ignore_errors=True)  # kept (with the logs) only on failure
    return reports


def start_mindspore(mode: str = "graph", distributed: bool = False) -> int:
    """MindSpore set up as the library's ``setup_runtime`` does (host blocking run on CPU), in
    ``mode`` ("graph" or "pynative") on the CPU; with ``distributed``, the msrun collective
    initialised. Returns this worker's rank (0 when not distributed)."""
    import mindspore as ms
    from mindspore_moe_ep.runtime import apply_host_blocking_run
    apply_host_blocking_run(True)
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    if not distributed:
        return 0
    from mindspore.communication import get_rank, init
    init()
    return get_rank()


def world_barrier() -> None:
    """Waits until every msrun worker arrives (a one-value AllGather over the world)."""
    from mindspore_moe_ep.comm.window import world_all_gather
    world_all_gather(np.zeros(1, np.int32))


def repeat_exchange(exchange, calls: int):
    """A Cell ``(rows, counts) -> received counts`` running ``exchange`` ``calls`` times in one
    launch, each after the previous one's rows (``ops.depend``), so none is pruned."""
    from mindspore import nn, ops

    class RepeatExchange(nn.Cell):
        def __init__(self):
            super().__init__()
            self.exchange = exchange

        def construct(self, rows, counts):
            received_counts = counts
            for _ in range(calls):
                received, received_counts = self.exchange(rows, counts)
                rows = ops.depend(rows, received)
            return received_counts
    return RepeatExchange()


def threads_per_process(world_size: int) -> int:
    """The same policy for every framework: the usable cores shared evenly by the processes."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // world_size)


def reset_peak_rss() -> bool:
    """Starts a new peak: the kernel's high-water RSS (VmHWM) becomes the current RSS (Linux:
    "5" written to /proc/self/clear_refs). Without it a peak reached earlier (building a layer,
    say) hides the peak of the step measured next. False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started or since reset_peak_rss (VmHWM;
    ru_maxrss where /proc is missing)."""
    peak = _proc_kib_field_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- other jobs on the machine ---------------------------------------------------------------

def _busy_and_steal_seconds():
    """(busy, steal) CPU seconds of the whole machine since boot (/proc/stat, every core)."""
    with open("/proc/stat", encoding="ascii") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


class OtherLoad:
    """The CPU that processes other than this one and its finished children used while the block
    ran, in cores (0.0: the machine was ours alone)::

        with bc.OtherLoad() as other:
            reports = bc.launch_msrun(...)      # children must have exited by the block's end
        other.cores, other.steal_cores

    The machine's busy time (/proc/stat) minus this process's and its waited-for descendants'
    CPU time (os.times), over the block's wall time. ``steal_cores``: time the hypervisor gave
    to other guests."""

    def __enter__(self):
        self._busy, self._steal = _busy_and_steal_seconds()
        times = os.times()
        self._own = times.user + times.system + times.children_user + times.children_system
        self._wall = time.monotonic()
        return self

    def __exit__(self, *exc):
        busy, steal = _busy_and_steal_seconds()
        times = os.times()
        own = times.user + times.system + times.children_user + times.children_system
        wall = max(time.monotonic() - self._wall, 1e-9)
        self.wall_s = wall
        self.cores = max(0.0, (busy - self._busy) - (own - self._own)) / wall
        self.steal_cores = (steal - self._steal) / wall
        return False
