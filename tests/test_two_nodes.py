"""The layer on two hosts, simulated on one machine: two msrun launches (``--node_rank`` 0 and
1, the same master) of two workers each, each launch in its own mount namespace with a private
tmpfs on /dev/shm, so the two "hosts" share no shared memory, as two machines would not.

The layer must see which ranks share a host (ranks 0-1 and 2-3) and, with ``transport: auto``
(which picks the two-level exchange: a window per host, AllGather for the rows crossing hosts)
and with ``allgather`` forced, give the single-process result (an EP = 1 layer over the concatenated batch) in prefill and
decode, forward and backward. Workers: tests/distributed/two_node_worker.py. Needs
``unshare --mount`` (root or user namespaces); where the sandbox refuses it the test is skipped
with the reason, since then two hosts cannot be simulated on one machine.
"""
import os
import shlex
import subprocess
import sys

import pytest

from distributed import launch

# msrun starts the scheduler on every node whose addresses include --master_addr; on one machine
# that is every node, so the second node's launcher is told it is not the master, as on a real
# second host (the same msrun code otherwise).
MSRUN_AS_REMOTE_NODE = (
    "import sys; import mindspore.parallel.cluster.process_entity._api as api; "
    "api._is_local_ip = lambda address: False; "
    "from mindspore.parallel.cluster.run import main; sys.argv[0] = 'msrun'; sys.exit(main())")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed",
                      "two_node_worker.py")
NODES, WORKERS_PER_NODE = 2, 2
LAYER_REL_TOL = 1e-5  # EP vs EP = 1: the same float32 arithmetic up to summation order


def private_shm_prefix():
    """The command prefix that runs a command with a private /dev/shm, or None and why not."""
    probe = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             "mount -t tmpfs -o size=256m none /dev/shm && test -z \"$(ls -A /dev/shm)\""]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"unshare is not available: {error}"
    if done.returncode != 0:
        return None, (f"'unshare --mount' with a tmpfs on /dev/shm is refused here "
                      f"({done.stderr.strip() or done.returncode}); two hosts cannot be simulated")
    return True, ""


def run_two_nodes(timeout_s=300.0):
    """Both msrun launches, each in its own namespace; returns the LaunchResult of the job."""
    import tempfile
    import time
    started = time.monotonic()
    work_dir = tempfile.mkdtemp(prefix="moe_ep_two_nodes_")
    result_dir = os.path.join(work_dir, "results")
    os.makedirs(result_dir)
    environment = launch._worker_environment(result_dir, None)
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    port = launch.free_port()
    processes = []
    for node in range(NODES):
        log_dir = os.path.join(work_dir, f"logs_node{node}")
        os.makedirs(log_dir)
        launcher = [msrun] if node == 0 else [sys.executable, "-c", MSRUN_AS_REMOTE_NODE]
        command = [*launcher, f"--worker_num={NODES * WORKERS_PER_NODE}",
                   f"--local_worker_num={WORKERS_PER_NODE}", f"--node_rank={node}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", f"--log_dir={log_dir}",
                   "--join=True", WORKER]
        shell = ("mount -t tmpfs -o size=1g none /dev/shm && exec "
                 + " ".join(shlex.quote(part) for part in command))
        log = open(os.path.join(work_dir, f"msrun_node{node}.log"), "w", encoding="utf-8")
        processes.append((subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell],
            env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=launch.REPOSITORY_ROOT,
            start_new_session=True), log))
    returncode = 0
    for process, log in processes:
        try:
            status = process.wait(timeout=max(timeout_s - (time.monotonic() - started), 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            status = process.wait()
        log.close()
        returncode = returncode or status
    # log_dir must be a directory *inside* work_dir: remove_launch_files deletes its parent
    # (with work_dir itself that parent is /tmp).
    results = launch._collect(result_dir, os.path.join(work_dir, "logs_node0"), returncode,
                              started)
    for node in range(NODES):  # the workers' logs, for failure messages
        results.logs.update(launch._collect(result_dir, os.path.join(work_dir, f"logs_node{node}"),
                                            returncode, started).logs)
    return results


@pytest.fixture(scope="module")
def two_node_run():
    available, reason = private_shm_prefix()
    if not available:
        pytest.skip(f"two hosts with private /dev/shm cannot be simulated here: {reason}")
    result = run_two_nodes()
    try:
        assert result.returncode == 0 and len(result.results) == NODES * WORKERS_PER_NODE, \
            result.describe()
        yield result
    finally:
        launch.remove_launch_files(result)


def host_of(rank):
    return rank // WORKERS_PER_NODE


def test_the_layer_sees_which_ranks_share_a_host(two_node_run):
    for rank, report in two_node_run.results.items():
        expected = {str(peer): host_of(peer) == host_of(rank)
                    for peer in range(NODES * WORKERS_PER_NODE)}
        assert report["shares_with"] == expected, (rank, report["shares_with"])
    domains = {rank: report["domain"] for rank, report in two_node_run.results.items()}
    assert domains[0] == domains[1] and domains[2] == domains[3] and domains[0] != domains[2]


def test_auto_transport_picks_the_cross_host_exchange(two_node_run):
    for rank, report in two_node_run.results.items():
        # No window can span the hosts, so no fused decode operators either.
        assert report["exchange"] == "TwoLevelExchangeRows", report
        assert report["exchange_allgather"] == "AllGatherExchangeRows", report
        assert report["decode_dispatcher"] == "NoneType", report


@pytest.mark.parametrize("transport", ["auto", "allgather"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_two_hosts_give_the_single_process_result(two_node_run, phase, transport):
    """auto: the two-level exchange (window inside a host, AllGather across); allgather forced."""
    key = "phases" if transport == "auto" else f"phases_{transport}"
    for rank, report in two_node_run.results.items():
        case = report[key][phase]
        assert case["forward_error"] <= LAYER_REL_TOL, (rank, phase, case)
        assert case["grad_error"] <= LAYER_REL_TOL, (rank, phase, case)
