"""msrun worker: every row-exchange case, in PYNATIVE_MODE and then GRAPH_MODE, in one launch.

Each rank checks what it receives against what it can compute on its own (every rank's send
buffers are deterministic functions of the sender's rank), records one (case, ok, detail) entry
per check, and writes its report with launch.write_result. Values that the pytest side compares
across ranks (window steps, segment names) are reported too.

Windows open with the transport of $MOE_EP_WINDOW_TRANSPORT (single copy by default, the
slots when it is "slots"), except the "slots" window (always slots) and the "mixed" window (rank 0
receives through slots, the others by single copy).

Usage: msrun ... exchange_worker.py
"""
import os
import time

import numpy as np

import launch  # tests/distributed/launch.py, next to this script
from checks import CheckReport  # tests/distributed/checks.py

import mindspore as ms
from mindspore import Tensor, nn
from mindspore.communication import get_group_size, get_rank, init

from mindspore_moe_ep.comm import (AllGatherExchangeRows, CommWindow, ExchangeRows,
                                   make_exchange)
from mindspore_moe_ep.comm.two_level import TwoLevelExchangeRows
from mindspore_moe_ep.ops.kernel_library import explain_kernel_errors

CAPACITY = 6       # rows per peer block
WIDTH = 5          # elements per row
TINY_SLOT = 64     # bytes: forces several chunks per peer (and rows wider than a slot)
TIMEOUT_S = 30.0
DTYPES = {"int32": ms.int32, "float32": ms.float32, "float16": ms.float16,
          "bfloat16": ms.bfloat16}
LARGE_WIDTH = 50_000  # float32: 200 kB rows, blocks of up to 1.2 MB > the 1 MiB default slot
TAIL_FILL = -7     # what senders put after their counted rows: it must never arrive
PLAN_SEEDS = {"random": 1, "last_rank_silent": 2, "full": 3}


# ---- deterministic inputs ---------------------------------------------------------------------

def send_counts_of(source: int, world: int, plan: str) -> np.ndarray:
    """[R] int32 counts rank `source` sends under a named plan."""
    rng = np.random.default_rng([PLAN_SEEDS[plan], source])
    counts = rng.integers(0, CAPACITY + 1, size=world)
    if plan == "full":
        counts[:] = CAPACITY
    elif plan == "last_rank_silent" and source == world - 1:
        counts[:] = 0
    elif plan == "random":
        counts[(source + 1) % world] = 0       # some zero counts ...
        counts[source] = CAPACITY              # ... and some full blocks
    return counts.astype(np.int32)


def row_code(source, destination, row, world, width):
    """[width] codes identifying (source, destination, row, column)."""
    return (((source * world + destination) * CAPACITY + row) * width + np.arange(width))


def send_rows_of(source: int, world: int, plan: str, width: int = WIDTH, modulo: int = 0,
                 offset: int = 0) -> np.ndarray:
    """[R*C, width] float64 codes (mod `modulo` for narrow dtypes, plus `offset`); tails are
    TAIL_FILL."""
    counts = send_counts_of(source, world, plan)
    rows = np.full((world * CAPACITY, width), TAIL_FILL, dtype=np.float64)
    for destination in range(world):
        for row in range(counts[destination]):
            code = row_code(source, destination, row, world, width)
            rows[destination * CAPACITY + row] = (code % modulo if modulo else code) + offset
    return rows


def expected_recv(rank: int, world: int, plan: str, width: int = WIDTH, modulo: int = 0,
                  offset: int = 0):
    """What `rank` must receive: ([R*C, width] codes with zero tails, [R] counts)."""
    rows = np.zeros((world * CAPACITY, width), dtype=np.float64)
    counts = np.zeros(world, dtype=np.int32)
    for source in range(world):
        counts[source] = send_counts_of(source, world, plan)[rank]
        sent = send_rows_of(source, world, plan, width, modulo, offset)
        block = slice(source * CAPACITY, source * CAPACITY + counts[source])
        rows[block] = sent[rank * CAPACITY:rank * CAPACITY + counts[source]]
    return rows, counts


def modulo_for(dtype_name: str) -> int:
    """Codes must be exact in the dtype: bfloat16 holds integers up to 256, float16 up to 2048."""
    return {"bfloat16": 251, "float16": 2039}.get(dtype_name, 0)


def to_tensor(values: np.ndarray, dtype_name: str) -> Tensor:
    return Tensor(values.astype(np.float32)).astype(DTYPES[dtype_name])


def to_numpy(tensor: Tensor) -> np.ndarray:
    """A tensor's values as float64 (exact for all dtypes used here)."""
    if tensor.dtype == ms.bfloat16:
        tensor = tensor.astype(ms.float32)
    return tensor.asnumpy().astype(np.float64)


# ---- checks -----------------------------------------------------------------------------------

# ---- cells and functions compiled in graph mode -----------------------------------------------

class ThreeExchanges(nn.Cell):
    """Three exchanges, the second one's output unused: all three must run, in order."""

    def __init__(self, exchange):
        super().__init__()
        self.exchange = exchange

    def construct(self, rows, counts):
        first, first_counts = self.exchange(rows, counts)
        self.exchange(rows * 2, counts)  # result unused
        third, _ = self.exchange(first, first_counts)
        return third


def make_weighted_sum(exchange, weights):
    """sum(recv_rows * weights) as a named function of send_rows (for mindspore.grad)."""

    def weighted_sum(send_rows, send_counts):
        recv_rows, _ = exchange(send_rows, send_counts)
        return (recv_rows * weights).sum()

    return weighted_sum


# ---- the cases --------------------------------------------------------------------------------

def pair_of(rank: int) -> list:
    """The two-rank expert-parallel group of `rank`: [0, 1], [2, 3], ..."""
    first = rank - rank % 2
    return [first, first + 1]


def run_cases(report: CheckReport, windows: dict, pair_exchanges: dict, two_level,
              rank: int, world: int) -> None:
    main = ExchangeRows(windows["main"], CAPACITY)
    tiny = ExchangeRows(windows["tiny"], CAPACITY)
    gathered = AllGatherExchangeRows(CAPACITY)

    def two_level_placement(dtype_name):
        modulo = modulo_for(dtype_name)
        for name, exchange in (("zero_tail", two_level), ("keep_tail", two_level.keep_tail())):
            rows = to_tensor(send_rows_of(rank, world, "random", modulo=modulo), dtype_name)
            counts = Tensor(send_counts_of(rank, world, "random"))
            recv_rows, recv_counts = exchange(rows, counts)
            expected_rows, expected_counts = expected_recv(rank, world, "random", modulo=modulo)
            received = to_numpy(recv_rows)
            if name == "keep_tail":  # only the counted rows are specified
                keep = np.zeros(world * CAPACITY, bool)
                for source, count in enumerate(expected_counts):
                    keep[source * CAPACITY:source * CAPACITY + count] = True
                received, expected_rows = received[keep], expected_rows[keep]
            report.equal(f"two_level/{dtype_name}/{name}/rows", received, expected_rows)
            report.equal(f"two_level/{dtype_name}/{name}/counts", recv_counts.asnumpy(),
                         expected_counts)

    two_level_dtypes = DTYPES if report.mode == "pynative" else ("float32", "bfloat16")
    for dtype_name in two_level_dtypes:
        report.run(f"two_level/{dtype_name}", lambda: two_level_placement(dtype_name))

    def placement(dtype_name, plan):
        modulo = modulo_for(dtype_name)
        rows = to_tensor(send_rows_of(rank, world, plan, modulo=modulo), dtype_name)
        counts = Tensor(send_counts_of(rank, world, plan))
        recv_rows, recv_counts = main(rows, counts)
        expected_rows, expected_counts = expected_recv(rank, world, plan, modulo=modulo)
        report.equal(f"placement/{dtype_name}/{plan}/rows", to_numpy(recv_rows), expected_rows)
        report.equal(f"placement/{dtype_name}/{plan}/counts", recv_counts.asnumpy(),
                    expected_counts)
        report.check(f"placement/{dtype_name}/{plan}/dtype", recv_rows.dtype == rows.dtype,
                     str(recv_rows.dtype))

    for dtype_name in DTYPES:
        report.run(f"placement/{dtype_name}", lambda: placement(dtype_name, "random"))
    for plan in ("last_rank_silent", "full"):
        report.run(f"placement/{plan}", lambda: placement("float32", plan))

    def other_window_transports():
        # The same exchange through a window forced to the slots and through a mixed window.
        for name in ("slots", "mixed"):
            exchange = ExchangeRows(windows[name], CAPACITY)
            for plan in ("random", "full"):
                rows = Tensor(send_rows_of(rank, world, plan).astype(np.float32))
                recv_rows, recv_counts = exchange(rows, Tensor(send_counts_of(rank, world, plan)))
                expected_rows, expected_counts = expected_recv(rank, world, plan)
                report.equal(f"window_transports/{name}/{plan}/rows", recv_rows.asnumpy(),
                             expected_rows)
                report.equal(f"window_transports/{name}/{plan}/counts", recv_counts.asnumpy(),
                             expected_counts)

    report.run("window_transports", other_window_transports)

    def large_payload():
        # Blocks larger than the 1 MiB slot: several chunks, or one single-copy read.
        rows = Tensor(send_rows_of(rank, world, "full", LARGE_WIDTH).astype(np.float32))
        recv_rows, _ = main(rows, Tensor(send_counts_of(rank, world, "full")))
        expected_rows, _ = expected_recv(rank, world, "full", LARGE_WIDTH)
        report.equal("large_payload", recv_rows.asnumpy(), expected_rows)

    report.run("large_payload", large_payload)

    def keep_tail():
        # zero_tail=False: counted rows and counts exact; nothing is assumed about the tails.
        kept = {"shm": ExchangeRows(windows["main"], CAPACITY, zero_tail=False),
                "shm_chunked": ExchangeRows(windows["tiny"], CAPACITY, zero_tail=False),
                "allgather": AllGatherExchangeRows(CAPACITY, zero_tail=False)}
        rows = Tensor(send_rows_of(rank, world, "random").astype(np.float32))
        counts = Tensor(send_counts_of(rank, world, "random"))
        expected_rows, expected_counts = expected_recv(rank, world, "random")
        counted = np.arange(world * CAPACITY) % CAPACITY < np.repeat(expected_counts, CAPACITY)
        for name, exchange in kept.items():
            for repeat in range(2):  # the second call may reuse the first one's output memory
                recv_rows, recv_counts = exchange(rows, counts)
                report.equal(f"keep_tail/{name}/{repeat}/rows", recv_rows.asnumpy()[counted],
                             expected_rows[counted])
                report.equal(f"keep_tail/{name}/{repeat}/counts", recv_counts.asnumpy(),
                             expected_counts)

    report.run("keep_tail", keep_tail)

    def chunked_equals_unchunked():
        for width in (WIDTH, 40):  # 40 float32 = 160-byte rows: wider than the 64-byte slot
            rows = Tensor(send_rows_of(rank, world, "random", width).astype(np.float32))
            counts = Tensor(send_counts_of(rank, world, "random"))
            whole_rows, whole_counts = main(rows, counts)
            chunked_rows, chunked_counts = tiny(rows, counts)
            report.equal(f"chunked/width{width}/rows", chunked_rows.asnumpy(),
                        whole_rows.asnumpy())
            report.equal(f"chunked/width{width}/counts", chunked_counts.asnumpy(),
                        whole_counts.asnumpy())
            expected_rows, _ = expected_recv(rank, world, "random", width)
            report.equal(f"chunked/width{width}/expected", chunked_rows.asnumpy(), expected_rows)

    report.run("chunked", chunked_equals_unchunked)

    def multidimensional_rows():
        rows = Tensor(send_rows_of(rank, world, "random", 6, modulo_for("float16"))
                      .reshape(world * CAPACITY, 2, 3).astype(np.float16))
        recv_rows, _ = tiny(rows, Tensor(send_counts_of(rank, world, "random")))
        expected_rows, _ = expected_recv(rank, world, "random", 6, modulo_for("float16"))
        report.equal("multidimensional_rows", recv_rows.asnumpy().reshape(-1, 6), expected_rows)

    report.run("multidimensional_rows", multidimensional_rows)

    def repeated_runs_identical():
        rows = Tensor(np.random.default_rng(rank).standard_normal((world * CAPACITY, WIDTH))
                      .astype(np.float32))
        counts = Tensor(send_counts_of(rank, world, "random"))
        first = main(rows, counts)[0].asnumpy()
        for _ in range(3):
            report.equal("repeated_runs_identical", main(rows, counts)[0].asnumpy(), first)

    report.run("repeated_runs_identical", repeated_runs_identical)

    def gradient_is_reverse_exchange():
        plan = "random"
        rows = Tensor(np.random.default_rng(10 + rank).standard_normal(
            (world * CAPACITY, WIDTH)).astype(np.float32))
        counts = Tensor(send_counts_of(rank, world, plan))

        def weights_of(member):  # every rank's loss weights, known to all ranks
            return np.random.default_rng(100 + member).standard_normal(
                (world * CAPACITY, WIDTH)).astype(np.float32)

        # d send_rows[d*C + i] = weights of rank d at block `rank`, row i (i < count), else 0.
        expected = np.zeros((world * CAPACITY, WIDTH), dtype=np.float32)
        own_counts = send_counts_of(rank, world, plan)
        for destination in range(world):
            count = own_counts[destination]
            expected[destination * CAPACITY:destination * CAPACITY + count] = \
                weights_of(destination)[rank * CAPACITY:rank * CAPACITY + count]
        weights = Tensor(weights_of(rank))
        for name, exchange in (("shm", main), ("shm_chunked", tiny), ("allgather", gathered),
                               ("two_level", two_level)):
            gradient = ms.grad(make_weighted_sum(exchange, weights), grad_position=0)
            report.equal(f"gradient/{name}", gradient(rows, counts).asnumpy(), expected)
        # zero_tail=False: the gradient's rows past the send counts are unspecified like the
        # forward's tails (the reverse exchange does not write them); the sent rows' are exact.
        keep_tail = ExchangeRows(windows["main"], CAPACITY, zero_tail=False)
        sent = np.zeros(world * CAPACITY, bool)
        for destination in range(world):
            start = destination * CAPACITY
            sent[start:start + own_counts[destination]] = True
        gradient = ms.grad(make_weighted_sum(keep_tail, weights), grad_position=0)
        report.equal("gradient/shm_keep_tail", gradient(rows, counts).asnumpy()[sent],
                     expected[sent])

    report.run("gradient", gradient_is_reverse_exchange)

    def allgather_equals_shm():
        # Graph mode compiles one graph per dtype (~1.7 s each): two dtypes suffice there.
        dtype_names = ("float32", "int32", "float16", "bfloat16") if report.mode == "pynative" \
            else ("float32", "bfloat16")
        for dtype_name in dtype_names:
            modulo = modulo_for(dtype_name)
            rows = to_tensor(send_rows_of(rank, world, "random", modulo=modulo), dtype_name)
            counts = Tensor(send_counts_of(rank, world, "random"))
            shm_rows, shm_counts = main(rows, counts)
            gathered_rows, gathered_counts = gathered(rows, counts)
            report.equal(f"allgather_equals_shm/{dtype_name}/rows", to_numpy(gathered_rows),
                        to_numpy(shm_rows))
            report.equal(f"allgather_equals_shm/{dtype_name}/counts", gathered_counts.asnumpy(),
                        shm_counts.asnumpy())

    report.run("allgather_equals_shm", allgather_equals_shm)

    def no_exchange_pruned_or_reordered():
        rows = Tensor(send_rows_of(rank, world, "random").astype(np.float32))
        counts = Tensor(send_counts_of(rank, world, "random"))
        steps_before = windows["main"].steps
        third = ThreeExchanges(main)(rows, counts).asnumpy()
        report.values[f"{report.mode}/three_exchanges_steps"] = windows["main"].steps - steps_before
        # Exchanging twice sends every row home: the result is the input with zeroed tails.
        expected = send_rows_of(rank, world, "random")
        expected[expected == TAIL_FILL] = 0
        report.equal("three_exchanges/round_trip", third, expected)

    report.run("three_exchanges", no_exchange_pruned_or_reordered)

    def two_rank_groups():
        # Exchanges inside [0, 1] and [2, 3] at once; the offset tells the groups' rows apart.
        pair = pair_of(rank)
        group_rank, offset = pair.index(rank), 1000 * (pair[0] // 2)
        rows = Tensor(send_rows_of(group_rank, 2, "random", offset=offset).astype(np.float32))
        counts = Tensor(send_counts_of(group_rank, 2, "random"))
        expected_rows, expected_counts = expected_recv(group_rank, 2, "random", offset=offset)
        for name, exchange in pair_exchanges.items():
            recv_rows, recv_counts = exchange(rows, counts)
            report.equal(f"two_rank_groups/{name}/rows", recv_rows.asnumpy(), expected_rows)
            report.equal(f"two_rank_groups/{name}/counts", recv_counts.asnumpy(), expected_counts)

    report.run("two_rank_groups", two_rank_groups)

    def bad_counts_fail_clearly():
        bad = ExchangeRows(windows[f"bad_{report.mode}"], CAPACITY)
        rows = Tensor(np.zeros((world * CAPACITY, WIDTH), np.float32))
        counts = send_counts_of(rank, world, "random")
        if rank == 0:
            counts[1] = CAPACITY + 1
        # A failing graph costs ~3 s in MindSpore; the Assert of the allgather path behaves the
        # same in both modes, so it is exercised in PyNative only.
        transports = [("shm", bad)] + ([("allgather", gathered)] if report.mode == "pynative" else [])
        for name, exchange in transports:
            try:
                with explain_kernel_errors():
                    exchange(rows, Tensor(counts))[0].asnumpy()
                message = "no error"
            except Exception as error:  # the message is what is checked
                message = str(error)
            report.values[f"{report.mode}/bad_counts_message/{name}"] = message

    report.run("bad_counts", bad_counts_fail_clearly)


def measure_bandwidth(window: CommWindow, rank: int, world: int) -> dict:
    """Seconds per exchange of full 4 MiB blocks (float32 [R*1024, 1024]), PyNative."""
    capacity, width = 1024, 1024
    exchange = ExchangeRows(window, capacity)
    rows = Tensor(np.full((world * capacity, width), rank, np.float32))
    counts = Tensor(np.full(world, capacity, np.int32))
    exchange(rows, counts)[0].asnumpy()  # warm-up
    repeats = 10
    started = time.perf_counter()
    for _ in range(repeats):
        recv_rows, _ = exchange(rows, counts)
    recv_rows.asnumpy()  # waits for the queued exchanges
    seconds = (time.perf_counter() - started) / repeats
    sent_bytes = (world - 1) * capacity * width * 4
    return {"seconds_per_exchange": seconds, "gbytes_per_s_sent": sent_bytes / seconds / 1e9}


def main() -> None:
    started = time.monotonic()
    ms.set_device("CPU")
    init()
    rank, world = get_rank(), get_group_size()
    ranks = list(range(world))
    windows = {
        "main": CommWindow.open(ranks, rank, timeout_s=TIMEOUT_S),
        "tiny": CommWindow.open(ranks, rank, slot_bytes=TINY_SLOT, timeout_s=TIMEOUT_S),
        "bad_pynative": CommWindow.open(ranks, rank, timeout_s=TIMEOUT_S),
        "bad_graph": CommWindow.open(ranks, rank, timeout_s=TIMEOUT_S),
        "slots": CommWindow.open(ranks, rank, timeout_s=TIMEOUT_S, window_transport="slots"),
        "mixed": CommWindow.open(ranks, rank, timeout_s=TIMEOUT_S,
                                 window_transport="slots" if rank == 0 else "auto"),
    }
    # make_exchange is collective over the world: every rank builds the same exchanges.
    values = {"auto_transport": type(make_exchange(CAPACITY, timeout_s=TIMEOUT_S)).__name__}
    pair_exchanges = {
        "shm": make_exchange(CAPACITY, transport="shm", group_ranks=pair_of(rank),
                             timeout_s=TIMEOUT_S),
        "allgather": make_exchange(CAPACITY, transport="allgather", group_ranks=pair_of(rank)),
    }
    # Two simulated hosts of two ranks each (all on this machine; one host at world 2): the
    # pairs' rows through a window each, the rest through AllGather.
    two_level = TwoLevelExchangeRows(CAPACITY, ranks, rank, [r // 2 for r in ranks],
                                     slot_bytes=TINY_SLOT * 16, timeout_s=TIMEOUT_S,
                                     attach_timeout_s=TIMEOUT_S)
    windows["pair"] = pair_exchanges["shm"].window
    windows["two_level_host"] = two_level.host_window
    values.update({
        "segment_names": [window.segment_name for window in windows.values()],
        "names_left_after_open": [window.segment_name for window in windows.values()
                                  if os.path.exists("/dev/shm/" + window.segment_name)],
        "setup_s": time.monotonic() - started,
        "window_transports": {name: window.transport for name, window in windows.items()},
    })
    checks = []
    for mode_name, mode in (("pynative", ms.PYNATIVE_MODE), ("graph", ms.GRAPH_MODE)):
        ms.set_context(mode=mode)
        mode_started = time.monotonic()
        report = CheckReport(mode_name)
        run_cases(report, windows, pair_exchanges, two_level, rank, world)
        checks += report.checks
        values.update(report.values)
        values[f"{mode_name}_s"] = time.monotonic() - mode_started
    ms.set_context(mode=ms.PYNATIVE_MODE)
    if os.environ.get("MOE_EP_TEST_BANDWIDTH") == "1":
        values["bandwidth"] = measure_bandwidth(windows["main"], rank, world)
    values["steps"] = {name: window.steps for name, window in windows.items()}
    for window in windows.values():
        window.close()
    values["total_s"] = time.monotonic() - started
    launch.write_result({"rank": rank, "world": world, "checks": checks, **values})


if __name__ == "__main__":
    main()
