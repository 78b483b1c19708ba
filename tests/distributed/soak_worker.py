"""msrun worker: a soak of the decode path and of layer rebuilds.

    msrun ... soak_worker.py [--steps N] [--rebuilds M]

GRAPH_MODE decode steps of the tiny layer (phase="decode": the fused operators), then M
rebuilds (build, one prefill and one decode step, close). Reports per rank: the resident set
size after a warm-up and after the steps, the windows open in the process and the bytes of
window segments it maps, before and after the rebuilds, and the seconds taken. The CI test
(tests/test_soak.py) runs it short; scripts/soak.py runs it long.
"""
import argparse
import gc
import os
import time

import numpy as np

import launch  # tests/distributed/launch.py, next to this script

import mindspore as ms
from mindspore import Tensor
from mindspore.communication import get_group_size, get_rank, init

import mindspore_moe_ep as mee
from mindspore_moe_ep.comm.window import open_window_count

TINY = os.path.join(launch.REPOSITORY_ROOT, "yaml_configs", "tiny.yaml")
WARMUP_STEPS = 50


def resident_bytes():
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mapped_window_bytes():
    """Bytes of communication-window segments this process still maps (/proc/self/maps; the
    segments' names are unlinked once every rank attached, so /dev/shm itself lists nothing)."""
    mapped = 0
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        for line in maps:
            if "/dev/shm/moe-ep-" in line:
                start, end = line.split()[0].split("-")
                mapped += int(end, 16) - int(start, 16)
    return mapped


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rebuilds", type=int, default=10)
    args = parser.parse_args()
    ms.set_device("CPU")
    init()
    rank, world = get_rank(), get_group_size()
    config = mee.load_config(TINY, expert_parallel=world, mode="graph")
    ms.set_context(mode=ms.GRAPH_MODE)
    x = Tensor(np.random.default_rng(rank).standard_normal((4, 16)).astype(np.float32))
    started = time.monotonic()
    layer = mee.MoELayer(config)
    layer.set_train(False)
    first = layer(x, phase="decode").asnumpy()
    for _ in range(WARMUP_STEPS):
        layer(x, phase="decode")
    ms.runtime.synchronize()
    rss_after_warmup = resident_bytes()
    for _ in range(args.steps):
        output = layer(x, phase="decode")
    last = output.asnumpy()
    rss_after_steps = resident_bytes()
    layer.close()
    del layer
    gc.collect()
    windows_before, shm_before = open_window_count(), mapped_window_bytes()
    for _ in range(args.rebuilds):
        layer = mee.MoELayer(config)
        layer.set_train(False)
        layer(x, phase="prefill").asnumpy()
        layer(x, phase="decode").asnumpy()
        layer.close()
        del layer
        gc.collect()
    launch.write_result({
        "rank": rank, "world": world, "steps": args.steps, "rebuilds": args.rebuilds,
        "same_output": bool(np.array_equal(first, last)),
        "rss_after_warmup": rss_after_warmup, "rss_after_steps": rss_after_steps,
        "windows_before_rebuilds": windows_before, "windows_after_rebuilds": open_window_count(),
        "shm_before_rebuilds": shm_before, "shm_after_rebuilds": mapped_window_bytes(),
        "seconds": round(time.monotonic() - started, 2)})


if __name__ == "__main__":
    main()
