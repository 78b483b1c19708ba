"""Fault-injection worker, started by launch.run_local (plain processes, not msrun).

msrun kills every worker as soon as one exits with a non-zero status, which would hide what the
survivors observe; plain processes let the survivors report. The last rank is the victim:

0. window "mismatch": rank 0 sends wider rows than the others; every rank must fail naming
   the row sizes.
1. window "stall": the victim sleeps past the timeout before its exchange; the survivors must
   fail with "rank <victim> did not reach exchange step ..." after about TIMEOUT_S. The victim,
   arriving late, must be told that a survivor failed.
2. window "kill": after one good exchange the victim SIGKILLs itself while the survivors wait in
   the next exchange; they must fail with "rank <victim> (pid <pid>) exited during exchange
   step 2" at once.
3. window "dispatch_kill": the same with the fused decode Dispatch (one good Dispatch before
   the victim dies, then the survivors' next one), whose rows (96 kB per peer) the peers pull
   straight from the sender's memory where single copy is possible.
4. window "combine_kill": the same with the fused decode Combine, whose partial rows the ranks
   write into the window and read where they lie (ShareRows): one good Dispatch + Combine and a
   Dispatch with the victim, then the victim dies and the survivors wait in the Combine (step 4).
5. windows "deliver_kill", "return_kill", "prefill_deliver_kill": the same for the operators of
   the default paths: the row-wise decode pair (FusedDeliver, pulled like the Dispatch;
   FusedReturn, summed in the window like the Combine) and the prefill delivery (DeliverRows,
   pulled where single copy is possible, else packed and exchanged in two steps).

Every rank reports messages and timings with launch.write_result (the victim before dying).
Usage: fault_worker.py <timeout_s>
"""
import hashlib
import os
import signal
import sys
import time

import numpy as np

import launch  # tests/distributed/launch.py, next to this script

import mindspore as ms
from mindspore import Tensor

from mindspore_moe_ep.comm import CommWindow, ExchangeRows
from mindspore_moe_ep.ops.ep_kernels import (DeliverRows, FusedCombine, FusedDeliver,
                                             FusedDispatch, FusedReturn)
from mindspore_moe_ep.ops.kernel_library import explain_kernel_errors

CAPACITY = 4
WIDTH = 6000  # float32: 96 kB per peer block, above the 64 KiB that always take the slot, so
              # that windows using single copy really read across processes
VICTIM_DELAY_S = 0.5  # how long the survivors wait before the victim dies


def window_token(name: str) -> str:
    """A distinct token per window, derived from the launch's shared token."""
    shared = os.environ[launch.JOB_TOKEN_VARIABLE]
    return hashlib.sha256(f"{shared}/{name}".encode()).hexdigest()[:32]


def dispatch_inputs(world: int) -> tuple:
    """(x, expert_ids, weights) of a fused Dispatch sending every token to every rank."""
    return (Tensor(np.ones((CAPACITY, WIDTH), np.float32)),
            Tensor(np.tile(np.arange(0, 2 * world, 2, dtype=np.int32), (CAPACITY, 1))),
            Tensor(np.full((CAPACITY, world), 1.0 / world, np.float32)))


def prefill_delivery_inputs(world: int) -> tuple:
    """(x, send_token_index, send_counts, token_slot, notes) of a DeliverRows sending every
    token to every rank."""
    tokens = np.arange(CAPACITY, dtype=np.int32)
    return (Tensor(np.ones((CAPACITY, WIDTH), np.float32)),
            Tensor(np.tile(tokens, (world, 1))),                                  # [R, C]
            Tensor(np.full(world, CAPACITY, np.int32)),                           # [R]
            Tensor(tokens[:, None] + CAPACITY * np.arange(world, dtype=np.int32)),  # [T, R]
            Tensor(np.ones((world * CAPACITY, 2), np.float32)))                   # [R*C, 2]


def timed(call) -> dict:
    """Runs call(); returns the error message (or None) and the seconds it took."""
    started = time.monotonic()
    try:
        with explain_kernel_errors():
            call()
        message = None
    except Exception as error:  # the message is what the test checks
        message = str(error)
    return {"error": message, "seconds": time.monotonic() - started}


def timed_exchange(exchange: ExchangeRows, world: int, width: int = WIDTH) -> dict:
    """Runs one exchange; returns the error message (or None) and the seconds it took."""
    rows = Tensor(np.ones((world * CAPACITY, width), np.float32))
    counts = Tensor(np.full(world, CAPACITY, np.int32))
    return timed(lambda: exchange(rows, counts)[0].asnumpy())


def timed_dispatch(dispatch: FusedDispatch, world: int) -> dict:
    """Runs one fused Dispatch sending every token to every rank; like timed_exchange."""
    return timed(lambda: dispatch(*dispatch_inputs(world))[0].asnumpy())


def timed_combine(combine: FusedCombine, dispatched: tuple) -> dict:
    """Runs the fused Combine of a Dispatch's outputs (identity experts); like timed_exchange."""
    expand_x, _, *handle = dispatched
    return timed(lambda: combine(expand_x, *handle).asnumpy())


def main() -> None:
    timeout_s = float(sys.argv[1])
    rank, world = launch.worker_rank(), int(os.environ["RANK_SIZE"])
    victim = world - 1
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    ranks = list(range(world))
    windows = {name: CommWindow.open(ranks, rank, timeout_s=timeout_s, attach_timeout_s=60.0,
                                     job_token=window_token(name))
               for name in ("mismatch", "stall", "kill", "dispatch_kill", "combine_kill",
                            "deliver_kill", "return_kill", "prefill_deliver_kill")}
    report = {"rank": rank, "pid": os.getpid(), "victim": victim,
              "transport": windows["kill"].transport,
              "segment_names": [window.segment_name for window in windows.values()]}

    mismatch = ExchangeRows(windows["mismatch"], CAPACITY)
    report["mismatch"] = timed_exchange(mismatch, world, WIDTH if rank else WIDTH + 1)

    stall = ExchangeRows(windows["stall"], CAPACITY)
    report["stall_warmup"] = timed_exchange(stall, world)
    if rank == victim:
        time.sleep(timeout_s + 1.0)
    report["stall"] = timed_exchange(stall, world)

    kill = ExchangeRows(windows["kill"], CAPACITY)
    dispatch = FusedDispatch(world, CAPACITY, 2, world, windows["dispatch_kill"])
    combine_dispatch = FusedDispatch(world, CAPACITY, 2, world, windows["combine_kill"])
    combine = FusedCombine(windows["combine_kill"])
    report["kill_warmup"] = timed_exchange(kill, world)
    report["dispatch_kill_warmup"] = timed_dispatch(dispatch, world)
    report["combine_kill_warmup"] = timed_combine(combine,
                                                  combine_dispatch(*dispatch_inputs(world)))
    dispatched = combine_dispatch(*dispatch_inputs(world))  # step 3, with the victim
    report["combine_kill_dispatch"] = timed(lambda: dispatched[0].asnumpy())

    deliver = FusedDeliver(world, CAPACITY, 2, windows["deliver_kill"])
    return_deliver = FusedDeliver(world, CAPACITY, 2, windows["return_kill"])
    return_rows = FusedReturn(windows["return_kill"])
    prefill_deliver = DeliverRows(windows["prefill_deliver_kill"], CAPACITY)

    def deliver_once():
        deliver(*dispatch_inputs(world))[0].asnumpy()

    def return_delivered(delivered):  # identity experts: the delivered rows go back
        rows, _, _, counts, token_slot = delivered
        return_rows(rows, counts, token_slot).asnumpy()

    def prefill_deliver_once():
        prefill_deliver(*prefill_delivery_inputs(world))[0].asnumpy()

    report["deliver_kill_warmup"] = timed(deliver_once)
    report["return_kill_warmup"] = timed(
        lambda: return_delivered(return_deliver(*dispatch_inputs(world))))
    delivered = return_deliver(*dispatch_inputs(world))  # step 3, with the victim
    report["return_kill_deliver"] = timed(lambda: delivered[0].asnumpy())
    report["prefill_deliver_kill_warmup"] = timed(prefill_deliver_once)
    if rank == victim:
        launch.write_result(report)
        time.sleep(VICTIM_DELAY_S)
        os.kill(os.getpid(), signal.SIGKILL)
    report["kill"] = timed_exchange(kill, world)
    report["dispatch_kill"] = timed_dispatch(dispatch, world)
    report["combine_kill"] = timed_combine(combine, dispatched)
    report["deliver_kill"] = timed(deliver_once)
    report["return_kill"] = timed(lambda: return_delivered(delivered))
    report["prefill_deliver_kill"] = timed(prefill_deliver_once)
    launch.write_result(report)


if __name__ == "__main__":
    main()
