"""msrun worker: bad inputs to an expert-parallel MoELayer give a clear error on every rank within
the exchange timeout (dispatch.timeout_s = BAD_TIMEOUT_S): configs differing between ranks, too
many tokens (on every rank, or on one rank only: its peers fail at once naming it, and a rebuilt
layer works), an expert id out of range through each dispatcher. It breaks windows, so a launch
running other parts runs it last.

Usage: msrun ... ep_layer_bad_input_worker.py
"""
import numpy as np

from checks import timed_call  # tests/distributed/checks.py

from mindspore import Tensor

import mindspore_moe_ep as mee

from ep_layer_common import BAD_TIMEOUT_S, run_parts, tiny_layer_config


def error_message(body):
    """(message or None, seconds) of running body()."""
    _, message, seconds = timed_call(body)
    return message, seconds


def bad_input_part(report, rank, world):
    """Every case records each rank's error message and how long it took to arrive."""
    messages = {}
    last = world - 1

    def record(name, body):
        messages[name] = error_message(body)

    # Ranks loading different configs: every rank fails while building the layer.
    record("config_differs", lambda: mee.MoELayer(
        tiny_layer_config(world, top_k=3 if rank == 1 else 2)))

    # More tokens than dispatch.max_tokens_per_rank on every rank: a ValueError before any
    # exchange (the window's next step is failed for the peers); a rebuilt layer works.
    too_many = Tensor(np.ones((9, 16), np.float32))
    for phase in ("prefill", "decode"):
        layer = mee.MoELayer(tiny_layer_config(world, max_tokens_per_rank=8,
                                               timeout_s=BAD_TIMEOUT_S))
        record(f"too_many_tokens_all/{phase}", lambda phase=phase: layer(too_many, phase))
        layer.close()
    layer = mee.MoELayer(tiny_layer_config(world, max_tokens_per_rank=8, timeout_s=BAD_TIMEOUT_S))
    fits = Tensor(np.ones((8, 16), np.float32))
    record("usable_after_rebuild", lambda: layer(fits, "prefill").asnumpy())

    # Only the last rank has too many tokens: it fails at once, and so do the others, with its
    # reason (the refused input fails the window's next step).
    layer = mee.MoELayer(tiny_layer_config(world, max_tokens_per_rank=8, timeout_s=BAD_TIMEOUT_S))
    tokens = 9 if rank == last else 4
    record("too_many_tokens_one_rank",
           lambda: layer(Tensor(np.ones((tokens, 16), np.float32)), "prefill").asnumpy())

    # An expert id out of range on rank 1 only, through each dispatcher directly. The rows are
    # read before combine is queued, so that the error explained is the dispatch's own; the
    # "unsynced" case queues both (as inside a layer): PyNative then runs combine on the
    # failed dispatch's outputs, and its failure may replace the explanation.
    for phase, synced in (("prefill", True), ("decode", True), ("decode_rowwise", True),
                          ("decode_unsynced", False)):
        layer = mee.MoELayer(tiny_layer_config(world, max_tokens_per_rank=8,
                                               timeout_s=BAD_TIMEOUT_S))
        dispatcher = (layer.prefill_dispatcher if phase == "prefill"
                      else layer.decode_dispatcher)
        ids = np.array([[0, 5], [3, 1], [7, 2]], np.int32)
        if rank == 1:
            ids[1, 1] = 99

        def bad_dispatch(dispatcher=dispatcher, ids=ids, synced=synced,
                         rowwise=phase == "decode_rowwise"):
            inputs = (Tensor(np.ones((3, 16), np.float32)), Tensor(ids),
                      Tensor(np.full((3, 2), 0.5, np.float32)))
            if rowwise:
                rows, _, _, row_counts, route = dispatcher.deliver(*inputs)
                rows.asnumpy()
                dispatcher.return_rows(rows, row_counts, route).asnumpy()
                return
            rows, _, _, handle = dispatcher.dispatch(*inputs)
            if synced:
                rows.asnumpy()
            dispatcher.combine(rows, handle).asnumpy()

        record(f"bad_expert_id/{phase}", bad_dispatch)
    report.values["bad_messages"] = messages


PART_FUNCTIONS = {"bad": bad_input_part}

if __name__ == "__main__":
    run_parts(PART_FUNCTIONS)
