"""msrun worker: bad inputs refused before any work, on the offending rank and at once on its
peers; rebuilt layers release their windows.

Cases (PyNative; each on a fresh layer, since a refused step abandons the window):

- ``<case>/all``: every rank passes the bad input; ``<case>/one``: only the last rank does, the
  others pass a good [8, 16] batch. Cases: a [4, 32] batch into hidden 16 (divides: used to be
  reshaped to [8, 16] silently), [2, 4, 8] (3-D, wrong hidden), int32 values, a 1-D and a 4-D
  input, 33 tokens over max_tokens_per_rank 32.
- ``rebuild``: 10 layers built, stepped and dropped, then 5 built, stepped and closed with
  ``layer.close()``; the number of windows open in the process is reported before and after.

Each rank reports per case the error text (or None) and the seconds to fail;
tests/test_bad_input.py asserts on them.
"""
import gc
import os

import numpy as np

import launch  # tests/distributed/launch.py, next to this script
from checks import timed_call  # tests/distributed/checks.py

import mindspore as ms
from mindspore import Tensor
from mindspore.communication import get_group_size, get_rank, init

import mindspore_moe_ep as mee
from mindspore_moe_ep.comm.window import open_window_count

TINY = os.path.join(launch.REPOSITORY_ROOT, "yaml_configs", "tiny.yaml")
TIMEOUT_S = 20.0  # dispatch.timeout_s: a peer that waits for it fails the test's bound

BAD_INPUTS = {
    "hidden_divides": lambda: np.ones((4, 32), np.float32),
    "three_d_wrong_hidden": lambda: np.ones((2, 4, 8), np.float32),
    "int32": lambda: np.ones((8, 16), np.int32),
    "one_d": lambda: np.ones((16,), np.float32),
    "four_d": lambda: np.ones((1, 2, 4, 16), np.float32),
    "too_many_tokens": lambda: np.ones((33, 16), np.float32),
}


def config(world):
    return mee.load_config(TINY, expert_parallel=world, max_tokens_per_rank=32,
                           timeout_s=TIMEOUT_S)


def run_step(layer, x):
    """(error text or None, seconds)."""
    _, error, seconds = timed_call(lambda: layer(Tensor(x), phase="prefill").asnumpy())
    return error, seconds


def main():
    ms.set_device("CPU")
    init()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    rank, world = get_rank(), get_group_size()
    report = {"rank": rank, "world": world, "cases": {}}
    good = np.random.default_rng(rank).standard_normal((8, 16)).astype(np.float32)
    for name, bad in BAD_INPUTS.items():
        for who in ("all", "one"):
            layer = mee.MoELayer(config(world))
            layer.set_train(False)
            x = bad() if who == "all" or rank == world - 1 else good
            error, seconds = run_step(layer, x)
            report["cases"][f"{name}/{who}"] = {"error": error, "seconds": seconds}
            layer.close()
    gc.collect()
    before = open_window_count()
    for index in range(15):
        layer = mee.MoELayer(config(world))
        layer.set_train(False)
        layer(Tensor(good), phase="prefill").asnumpy()
        if index >= 10:
            layer.close()
        del layer
        gc.collect()
    report["windows_before_rebuilds"] = before
    report["windows_after_rebuilds"] = open_window_count()
    launch.write_result(report)


if __name__ == "__main__":
    main()
