"""Starting distributed test workers and collecting what they report.

Two ways to start a group of worker processes running one script:

- :func:`run_msrun`: MindSpore's launcher (``msrun``), with ``mindspore.communication`` usable
  in the workers. msrun kills all workers as soon as one exits with a non-zero status, so the
  fault-injection tests use the other way.
- :func:`run_local`: plain child processes with ``RANK_ID`` / ``RANK_SIZE`` set and a shared
  window token in ``MOE_EP_TEST_JOB_TOKEN`` (no MindSpore collectives).

Workers report by writing one JSON file per rank with :func:`write_result`; the launcher returns
them keyed by rank. This module does not import MindSpore, so workers load it cheaply.
"""
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

RESULT_DIR_VARIABLE = "MOE_EP_TEST_RESULT_DIR"
JOB_TOKEN_VARIABLE = "MOE_EP_TEST_JOB_TOKEN"
REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class LaunchResult:
    """What a launch produced: the exit status, each rank's report and the logs."""

    returncode: int
    results: Dict[int, dict]
    log_dir: str
    elapsed_s: float
    logs: Dict[str, str] = field(default_factory=dict)
    exit_codes: Dict[int, int] = field(default_factory=dict)  # per rank (run_local only)

    def describe(self, max_chars_per_log: int = 3000) -> str:
        """The exit status and the end of every log, for assertion messages."""
        parts = [f"returncode {self.returncode} after {self.elapsed_s:.1f} s; "
                 f"reports from ranks {sorted(self.results)}"]
        for name, text in sorted(self.logs.items()):
            parts.append(f"---- {name} (last {max_chars_per_log} chars) ----\n"
                         f"{text[-max_chars_per_log:]}")
        return "\n".join(parts)


# ---- worker side -----------------------------------------------------------------------------

def worker_rank() -> int:
    """This worker's rank, as set by msrun or run_local."""
    return int(os.environ["RANK_ID"])


def write_result(payload: dict) -> None:
    """Writes this worker's report (a JSON-serialisable dict) for the launcher to collect."""
    directory = os.environ[RESULT_DIR_VARIABLE]
    path = os.path.join(directory, f"rank_{worker_rank()}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as report:
        json.dump(payload, report)
    os.replace(path + ".tmp", path)  # the launcher never sees half a report


# ---- launcher side ---------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port that was free a moment ago (for msrun's scheduler)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker_environment(result_dir: str, extra: Optional[Dict[str, str]]) -> Dict[str, str]:
    environment = dict(os.environ)
    # msrun starts workers with the `python` found on PATH: make it this interpreter's.
    environment["PATH"] = os.path.dirname(sys.executable) + os.pathsep + environment.get("PATH", "")
    environment["PYTHONPATH"] = REPOSITORY_ROOT + os.pathsep + environment.get("PYTHONPATH", "")
    environment[RESULT_DIR_VARIABLE] = result_dir
    # What setup_runtime does for the library (runtime.host_blocking_run): without it the
    # workers' MindSpore threads busy-wait and take the cores of the workers that compute.
    environment.setdefault("MS_DEV_HOST_BLOCKING_RUN", "1")
    environment.update(extra or {})
    return environment


def _collect(result_dir: str, log_dir: str, returncode: int, started: float) -> LaunchResult:
    results = {}
    for name in os.listdir(result_dir):
        if name.startswith("rank_") and name.endswith(".json"):
            with open(os.path.join(result_dir, name), encoding="utf-8") as report:
                results[int(name[len("rank_"):-len(".json")])] = json.load(report)
    logs = {}
    for name in sorted(os.listdir(log_dir)):
        if name.endswith(".log"):
            with open(os.path.join(log_dir, name), encoding="utf-8", errors="replace") as log:
                logs[name] = log.read()
    return LaunchResult(returncode, results, log_dir, time.monotonic() - started, logs)


def _run_process_group(command: List[str], environment: Dict[str, str], timeout_s: float,
                       log_path: str) -> int:
    """Runs a command in its own process group; kills the whole group on timeout."""
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=REPOSITORY_ROOT, start_new_session=True)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return -signal.SIGKILL


def run_msrun(script: str, worker_num: int, args: Sequence[str] = (), timeout_s: float = 180.0,
              env: Optional[Dict[str, str]] = None) -> LaunchResult:
    """Runs ``script args`` on ``worker_num`` local workers with msrun and collects reports."""
    started = time.monotonic()
    work_dir = tempfile.mkdtemp(prefix="moe_ep_msrun_")
    result_dir = os.path.join(work_dir, "results")
    log_dir = os.path.join(work_dir, "logs")
    os.makedirs(result_dir)
    os.makedirs(log_dir)
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    command = [msrun, f"--worker_num={worker_num}", f"--local_worker_num={worker_num}",
               f"--master_port={free_port()}", f"--log_dir={log_dir}", "--join=True",
               script, *args]
    returncode = _run_process_group(command, _worker_environment(result_dir, env), timeout_s,
                                    os.path.join(log_dir, "msrun.log"))
    return _collect(result_dir, log_dir, returncode, started)


def run_local(script: str, world_size: int, args: Sequence[str] = (), timeout_s: float = 120.0,
              env: Optional[Dict[str, str]] = None) -> LaunchResult:
    """Runs ``script args`` as ``world_size`` plain processes sharing a fresh window token.

    Returns once all have exited (or, after ``timeout_s``, killed). The return code is the
    first non-zero worker exit status, or 0.
    """
    started = time.monotonic()
    work_dir = tempfile.mkdtemp(prefix="moe_ep_local_")
    result_dir = os.path.join(work_dir, "results")
    log_dir = os.path.join(work_dir, "logs")
    os.makedirs(result_dir)
    os.makedirs(log_dir)
    shared = {JOB_TOKEN_VARIABLE: secrets.token_hex(16), "RANK_SIZE": str(world_size)}
    shared.update(env or {})
    processes = []
    for rank in range(world_size):
        environment = _worker_environment(result_dir, {**shared, "RANK_ID": str(rank)})
        log = open(os.path.join(log_dir, f"worker_{rank}.log"), "w", encoding="utf-8")
        processes.append((subprocess.Popen([sys.executable, script, *args], env=environment,
                                           stdout=log, stderr=subprocess.STDOUT,
                                           cwd=REPOSITORY_ROOT), log))
    deadline = started + timeout_s
    exit_codes = {}
    for rank, (process, log) in enumerate(processes):
        try:
            exit_codes[rank] = process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            exit_codes[rank] = process.wait()
        log.close()
    returncode = next((status for status in exit_codes.values() if status != 0), 0)
    result = _collect(result_dir, log_dir, returncode, started)
    result.exit_codes = exit_codes
    return result


@contextlib.contextmanager
def msrun_reports(script: str, worker_num: int, args: Sequence[str] = (),
                  timeout_s: float = 180.0, env: Optional[Dict[str, str]] = None):
    """run_msrun that must succeed with a report from every rank; yields the LaunchResult and
    removes its files afterwards (for module-scoped test fixtures)."""
    result = run_msrun(script, worker_num, args, timeout_s, env)
    try:
        assert result.returncode == 0 and len(result.results) == worker_num, result.describe()
        yield result
    finally:
        remove_launch_files(result)


def remove_launch_files(result: LaunchResult) -> None:
    """Deletes a launch's temporary directory (logs and reports): the parent of its log_dir,
    never the system's temporary directory itself."""
    work_dir = os.path.dirname(os.path.abspath(result.log_dir))
    if os.path.realpath(work_dir) == os.path.realpath(tempfile.gettempdir()):
        raise ValueError(f"remove_launch_files: log_dir {result.log_dir} lies directly in the "
                         f"temporary directory; its launch directory must be one level below")
    shutil.rmtree(work_dir, ignore_errors=True)
