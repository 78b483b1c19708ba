"""msrun worker: ranks whose token counts straddle dispatch.decode_token_threshold.

With ``phase=None`` a rank decodes when it has at most ``decode_token_threshold`` tokens, so in
one step rank 0 (16 tokens) takes the prefill path and the other ranks (2 tokens each) the decode
path. Their operators' messages carry the operator's name, so every rank must fail at once,
naming the other rank's operator and the fix, instead of returning a silently wrong output
(issue: 48% off the single-process result before). Cases, each on a fresh layer (a failed step
leaves the window unusable; rebuilding the layer is the documented recovery):

- ``straddle/<mode>/<routing>``: the mismatch in PyNative and GRAPH_MODE, with every token
  preferring experts 0 and 1 ("hot") and with random routing;
- ``explicit_phase/<mode>``: the fix, ``phase="prefill"`` on every rank, equals an EP = 1 layer
  on the concatenated batch.

Each rank reports, per case, the error text (or None) and the seconds it took, and the scaled
error of the fixed step; tests/test_phase_agreement.py asserts on them.
"""
import os

import numpy as np

import launch  # tests/distributed/launch.py, next to this script
from checks import timed_call  # tests/distributed/checks.py

import mindspore as ms
from mindspore import Tensor
from mindspore.communication import get_group_size, get_rank, init

import mindspore_moe_ep as mee

TINY = os.path.join(launch.REPOSITORY_ROOT, "yaml_configs", "tiny.yaml")
TIMEOUT_S = 20.0          # dispatch.timeout_s: a missed detection shows as a timeout, not a hang
TOKENS_ON_RANK_0, TOKENS_ELSEWHERE = 16, 2


def config(world):
    return mee.load_config(TINY, expert_parallel=world, top_k=2, max_tokens_per_rank=32,
                           decode_token_threshold=8, timeout_s=TIMEOUT_S)


def tokens_of(rank):
    return TOKENS_ON_RANK_0 if rank == 0 else TOKENS_ELSEWHERE


def inputs(rank, hot):
    """[tokens, 16] float32 of one rank; with ``hot`` all positive (see prefer_experts_0_and_1)."""
    values = np.random.default_rng(100 + rank).standard_normal((tokens_of(rank), 16))
    return (np.abs(values) if hot else values).astype(np.float32)


def prefer_experts_0_and_1(layer):
    """Gate rows 0 and 1 positive, the others zero: positive tokens route to experts 0 and 1."""
    gate = np.zeros((8, 16), np.float32)
    gate[0], gate[1] = 1.0, 0.5
    layer.router.gate_weight.set_data(Tensor(gate))


def run_step(layer, x, phase=None):
    """(output or None, error text or None, seconds)."""
    return timed_call(lambda: layer(Tensor(x), phase=phase).asnumpy())


def main():
    ms.set_device("CPU")
    init()
    rank, world = get_rank(), get_group_size()
    report = {"rank": rank, "world": world, "cases": {}}
    for mode in ("pynative", "graph"):
        ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
        for routing in ("hot", "random"):
            layer = mee.MoELayer(config(world))
            layer.set_train(False)
            if routing == "hot":
                prefer_experts_0_and_1(layer)
            report["cases"][f"straddle/{mode}/{routing}"] = {
                "path": layer.dispatcher_for(tokens_of(rank)).__class__.__name__,
                **dict(zip(("error", "seconds"), run_step(layer, inputs(rank, routing == "hot"))[1:]))}
            del layer
        layer = mee.MoELayer(config(world))
        reference = mee.MoELayer(config(world).replace(expert_parallel=1))
        for cell in (layer, reference):
            cell.set_train(False)
            prefer_experts_0_and_1(cell)
        output, error, seconds = run_step(layer, inputs(rank, True), phase="prefill")
        everything = np.concatenate([inputs(source, True) for source in range(world)])
        expected = reference(Tensor(everything)).asnumpy()
        first = sum(tokens_of(source) for source in range(rank))
        mine = expected[first:first + tokens_of(rank)]
        scaled = (None if output is None else
                  float(np.abs(output - mine).max() / max(np.abs(mine).max(), 1e-30)))
        report["cases"][f"explicit_phase/{mode}"] = {"error": error, "seconds": seconds,
                                                     "scaled_error": scaled}
    launch.write_result(report)


if __name__ == "__main__":
    main()
