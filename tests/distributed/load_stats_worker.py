"""msrun worker (2 ranks): the expert-load window summed over the world.

Two layers on tiny.yaml with load_window_steps 3: EP 2 (one group of two ranks) and EP 1 on both
ranks (two data-parallel replicas). Each rank runs 4 forwards of its own tokens (so the window
drops the first) and reports, per layout, ``load_stats()`` as JSON and its own NumPy counts of
the router's choices in the last 3 forwards; tests/test_load_stats.py checks the sums.
"""
import os

import numpy as np

import launch  # tests/distributed/launch.py, next to this script

import mindspore as ms
from mindspore import Tensor
from mindspore.communication import get_rank, init

import mindspore_moe_ep as mee
from mindspore_moe_ep.load_balancing import load_stats_to_json

TINY = os.path.join(launch.REPOSITORY_ROOT, "yaml_configs", "tiny.yaml")
WINDOW, FORWARDS, TOKENS = 3, 4, 10


def run(layer, rank):
    """(load_stats as JSON, [WINDOW, E] NumPy counts of the last WINDOW forwards)."""
    rng = np.random.default_rng(10 + rank)
    counts = []
    for _ in range(FORWARDS):
        x = rng.standard_normal((TOKENS, 16)).astype(np.float32)
        layer(Tensor(x), phase="prefill")
        expert_ids, _ = layer.route(Tensor(x))
        counts.append(np.bincount(expert_ids.asnumpy().reshape(-1), minlength=8).tolist())
    return {"stats": load_stats_to_json(layer.load_stats()), "counts": counts[-WINDOW:]}


def main():
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    init()
    rank = get_rank()
    report = {}
    for layout, expert_parallel in (("ep2", 2), ("dp2", 1)):
        config = mee.load_config(TINY, expert_parallel=expert_parallel, load_window_steps=WINDOW)
        layer = mee.MoELayer(config)
        layer.set_train(False)
        report[layout] = run(layer, rank)
        layer.close()
    launch.write_result(report)


if __name__ == "__main__":
    main()
