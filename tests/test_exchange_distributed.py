"""Multi-process tests of the row exchange (shared-memory window and AllGather fallback).

- One msrun launch per world size (2 and 4) and window transport (single copy, the default,
  and the slots, forced with MOE_EP_WINDOW_TRANSPORT=slots) runs every exchange case of
  distributed/exchange_worker.py in PYNATIVE_MODE and then GRAPH_MODE; the tests below read the
  per-rank reports.
- One plain-process launch per window transport (distributed/fault_worker.py) injects a stalled
  and a killed rank: msrun would kill the survivors as soon as the victim dies, so it cannot
  show what they report.
- Segment validation (stale or foreign segments, missing peers, /dev/shm space) runs in this
  process with one-rank and would-be two-rank windows.
"""
import os
import re
import secrets
import struct
import sys

import pytest

from distributed import launch

MSRUN = os.path.join(os.path.dirname(sys.executable), "msrun")
SHM_DIR = "/dev/shm"
FAULT_TIMEOUT_S = 3.0
SLACK_S = 5.0  # scheduling slack on a loaded 2-core machine
TRANSPORT_VARIABLE = "MOE_EP_WINDOW_TRANSPORT"

pytestmark = pytest.mark.skipif(not os.path.exists(MSRUN), reason="msrun is not installed")


def segment_exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


def single_copy_expected() -> bool:
    """Whether windows here should use single copy: Yama's ptrace_scope >= 2 forbids it."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope", encoding="ascii") as scope:
            return int(scope.read()) <= 1
    except OSError:
        return True  # no Yama


# ---- msrun launches ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[(2, "auto"), (4, "auto"), (2, "slots"), (4, "slots")],
                ids=lambda param: f"world{param[0]}-{param[1]}")
def exchange_run(request):
    world, transport = request.param
    result = launch.run_msrun(os.path.join("tests", "distributed", "exchange_worker.py"),
                              world, timeout_s=300, env={TRANSPORT_VARIABLE: transport})
    assert result.returncode == 0 and len(result.results) == world, result.describe()
    result.transport = transport
    yield result
    launch.remove_launch_files(result)


def test_every_exchange_case_passes_on_every_rank(exchange_run):
    failures = [f"rank {rank}: {name}: {detail}"
                for rank, report in sorted(exchange_run.results.items())
                for name, ok, detail in report["checks"] if not ok]
    assert not failures, "\n".join(failures)
    for report in exchange_run.results.values():
        cases = {name.split("/")[1] for name, _, _ in report["checks"]}
        assert {"placement", "chunked", "gradient", "allgather_equals_shm",
                "repeated_runs_identical", "three_exchanges", "two_rank_groups",
                "window_transports", "large_payload", "keep_tail", "two_level"} <= cases
        assert report["auto_transport"] == "ExchangeRows"  # all ranks on this host


def test_windows_use_the_requested_transport(exchange_run):
    default = "slots" if exchange_run.transport == "slots" else "single_copy"
    if default == "single_copy" and not single_copy_expected():
        pytest.skip("Yama ptrace_scope >= 2: single copy is unavailable on this machine")
    for report in exchange_run.results.values():
        transports = report["window_transports"]
        # "tiny" (64-byte slots) under single copy: payloads larger than a slot in one read
        for name in ("main", "tiny", "pair"):
            assert transports[name] == default, transports
        assert transports["slots"] == "slots", transports
        assert transports["mixed"] == "mixed", transports  # explicit arguments, not the env


def test_graph_mode_neither_prunes_nor_reorders_exchanges(exchange_run):
    reports = exchange_run.results.values()
    for mode in ("pynative", "graph"):
        # three exchanges, one with an unused result, all executed
        assert {report[f"{mode}/three_exchanges_steps"] for report in reports} == {3}
    # every rank went through the same number of steps on every window
    assert len({tuple(sorted(report["steps"].items())) for report in reports}) == 1


def test_out_of_range_count_names_the_value_on_every_rank(exchange_run):
    value_text = "send_counts[1] = 7 is out of range [0, 6]"
    for rank, report in exchange_run.results.items():
        for mode in ("pynative", "graph"):
            message = report[f"{mode}/bad_counts_message/shm"]
            assert value_text in message, message
            if rank != 0:  # the peers are told which rank failed instead of timing out
                assert "rank 0 failed in exchange step 1" in message, message
        message = report["pynative/bad_counts_message/allgather"]
        assert "outside [0, 6]" in message, message


def test_no_segment_is_left_in_dev_shm(exchange_run):
    for report in exchange_run.results.values():
        assert report["names_left_after_open"] == []  # unlinked once all ranks attached
        assert not [name for name in report["segment_names"] if segment_exists(name)]


# ---- faults (plain processes) -----------------------------------------------------------------

@pytest.fixture(scope="module", params=["auto", "slots"])
def fault_run(request):
    result = launch.run_local(os.path.join("tests", "distributed", "fault_worker.py"), 3,
                              [str(FAULT_TIMEOUT_S)], timeout_s=120,
                              env={TRANSPORT_VARIABLE: request.param})
    assert len(result.results) == 3, result.describe()
    yield result
    launch.remove_launch_files(result)


def survivors(result):
    return [report for report in result.results.values() if report["rank"] != report["victim"]]


def test_ranks_disagreeing_on_row_size_all_fail(fault_run):
    for report in fault_run.results.values():
        message = report["mismatch"]["error"] or ""
        assert re.search(r"sends rows of \d+ bytes .* but this rank uses rows of \d+ bytes",
                         message), message


def test_stalled_peer_is_named_after_the_timeout(fault_run):
    for report in survivors(fault_run):
        stall = report["stall"]
        assert re.search(r"rank 2 did not reach exchange step 2 within 3\.0 s "
                         r"\(dispatch\.timeout_s\); its last exchange step was 1",
                         stall["error"] or ""), stall
        assert FAULT_TIMEOUT_S <= stall["seconds"] < FAULT_TIMEOUT_S + SLACK_S, stall
    late = fault_run.results[2]["stall"]["error"] or ""
    assert re.search(r"rank [01] failed in exchange step 2: rank 2 did not reach", late), late


# (case, exchange step the survivors wait in when the victim dies: the same for both transports,
# or {transport: step} where the slot path takes more steps)
KILL_CASES = [("kill", 2), ("dispatch_kill", 2), ("combine_kill", 4), ("deliver_kill", 2),
              ("return_kill", 4), ("prefill_deliver_kill", {"single_copy": 2, "slots": 3})]


@pytest.mark.parametrize("case, step", KILL_CASES, ids=[case for case, _ in KILL_CASES])
def test_killed_peer_is_named_at_once(fault_run, case, step):
    victim_pid = fault_run.results[2]["pid"]
    assert fault_run.exit_codes == {0: 0, 1: 0, 2: -9}, fault_run.describe()
    for report in fault_run.results.values():
        assert report[f"{case}_warmup"]["error"] is None, report[f"{case}_warmup"]
    for report in survivors(fault_run):
        if isinstance(step, dict):
            step = step[report["transport"]]
        failed = report[case]
        assert f"rank 2 (pid {victim_pid}) exited during exchange step {step}" in \
            (failed["error"] or ""), failed
        assert failed["seconds"] < SLACK_S, failed


def test_no_segment_is_left_after_kill_9(fault_run):
    names = fault_run.results[0]["segment_names"]
    assert not [name for name in names if segment_exists(name)]


# ---- segment validation (this process) --------------------------------------------------------

SEGMENT_MAGIC = 0x4E49575045454F4D  # "MOEEPWIN"
LAYOUT_VERSION = 4  # comm_window_segment.h kLayoutVersion
SLOT_BYTES = 4096


@pytest.fixture(scope="module")
def window_api():
    # CPU is MindSpore's default device here; setting it again would fail once an earlier test
    # module has initialised the runtime.
    from mindspore_moe_ep.comm import window
    return window


def plant_segment(token: str, size: int, header: bytes = b"") -> str:
    """Creates /dev/shm/moe-ep-<token> (mode 0600) of `size` bytes starting with `header`."""
    name = "moe-ep-" + token
    descriptor = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.ftruncate(descriptor, size)
        os.write(descriptor, header)
    finally:
        os.close(descriptor)
    return name


def segment_header(world_size: int, token: bytes, magic: int = SEGMENT_MAGIC) -> bytes:
    """The SegmentHeader (comm_window_segment.h): magic, version, world size, token, slot size,
    ready."""
    return struct.pack("<QII16sQI", magic, LAYOUT_VERSION, world_size, token, SLOT_BYTES, 1)


@pytest.mark.parametrize("header_kind, expected", [
    ("foreign_token", "its job token differs"),
    ("wrong_magic", "wrong magic number"),
    ("wrong_size", "its size is"),
])
def test_attaching_rank_refuses_a_stale_segment(window_api, header_kind, expected):
    token = secrets.token_hex(16)
    size = window_api.CommWindow.segment_bytes(2, SLOT_BYTES)
    if header_kind == "foreign_token":
        name = plant_segment(token, size, segment_header(2, secrets.token_bytes(16)))
    elif header_kind == "wrong_magic":
        name = plant_segment(token, size, segment_header(2, bytes.fromhex(token), magic=1))
    else:
        name = plant_segment(token, size + 4096, segment_header(2, bytes.fromhex(token)))
    with pytest.raises(window_api.CommWindowError, match=expected):
        window_api.CommWindow.open([0, 1], 1, SLOT_BYTES, attach_timeout_s=0.5, job_token=token)
    assert not segment_exists(name)


def test_creating_rank_replaces_a_stale_segment(window_api):
    import numpy as np
    from mindspore import Tensor
    from mindspore_moe_ep.comm import ExchangeRows

    token = secrets.token_hex(16)
    name = plant_segment(token, 12345, b"stale")
    with window_api.CommWindow.open([0], 0, SLOT_BYTES, job_token=token) as window:
        assert not segment_exists(name)
        rows = np.arange(12, dtype=np.float32).reshape(4, 3)
        recv_rows, recv_counts = ExchangeRows(window, 4)(Tensor(rows), Tensor(np.array([3], np.int32)))
        expected = rows.copy()
        expected[3] = 0
        assert (recv_rows.asnumpy() == expected).all() and recv_counts.asnumpy().tolist() == [3]


def test_unknown_window_transport_is_refused(window_api):
    with pytest.raises(ValueError, match=r"window transport must be one of \('auto', 'slots'\)"):
        window_api.CommWindow.open([0], 0, SLOT_BYTES, job_token=secrets.token_hex(16),
                                   window_transport="fast")


def test_keep_tail_in_a_group_of_one(window_api):
    import numpy as np
    from mindspore import Tensor
    from mindspore_moe_ep.comm import ExchangeRows

    with window_api.CommWindow.open([0], 0, SLOT_BYTES, job_token=secrets.token_hex(16)) as window:
        rows = np.arange(12, dtype=np.float32).reshape(4, 3)
        recv_rows, recv_counts = ExchangeRows(window, 4, zero_tail=False)(
            Tensor(rows), Tensor(np.array([3], np.int32)))
        assert (recv_rows.asnumpy()[:3] == rows[:3]).all()  # row 3: unspecified
        assert recv_counts.asnumpy().tolist() == [3]


def test_missing_peer_fails_attach_and_leaves_nothing(window_api):
    token = secrets.token_hex(16)
    with pytest.raises(window_api.CommWindowError,
                       match=r"rank\(s\) 1 did not attach .* within 0\.5 s \(attach_timeout_s\)"):
        window_api.CommWindow.open([0, 1], 0, SLOT_BYTES, attach_timeout_s=0.5, job_token=token)
    assert not segment_exists("moe-ep-" + token)


def test_too_small_dev_shm_names_required_and_available_bytes(window_api):
    with pytest.raises(window_api.CommWindowError,
                       match=r"needs \d+ bytes .* but only \d+ bytes .* are available"):
        window_api.CommWindow.open([0, 1], 0, 1 << 40, job_token=secrets.token_hex(16))
