"""msrun worker: the layer on two simulated hosts (two msrun nodes of two workers, each node in
its own mount namespace with a private /dev/shm; tests/test_two_nodes.py launches them).

Each rank reports which ranks share its /dev/shm (``group_shares_memory`` of every pair), the
exchange the layer picked (``transport: auto``: the two-level exchange; and ``allgather``
forced), and, for each and for prefill and decode, the scaled error
of its output and of the gradient of sum(y * weights) w.r.t. its input against an EP = 1 layer
over the concatenated batch (the single-process result). PyNative mode; EP 4 = the world.
"""
import os

import numpy as np

import launch  # tests/distributed/launch.py, next to this script

import mindspore as ms
from mindspore import Tensor
from mindspore.communication import get_group_size, get_rank, init

import mindspore_moe_ep as mee
from mindspore_moe_ep.comm.window import group_shares_memory, shared_memory_domain

TINY = os.path.join(launch.REPOSITORY_ROOT, "yaml_configs", "tiny.yaml")
TOKENS = {"prefill": 12, "decode": 2}   # tokens per rank (decode_token_threshold is 8)


def config(world):
    return mee.load_config(TINY, expert_parallel=world, top_k=2, max_tokens_per_rank=16,
                           decode_token_threshold=8, timeout_s=30.0, mode="pynative")


def inputs(rank, phase):
    rng = np.random.default_rng(1000 * (phase == "decode") + rank)
    return rng.standard_normal((TOKENS[phase], 16)).astype(np.float32)


def output_weights(rank, phase):
    """Fixed weights of the scalar whose gradient is compared: sum(y * weights)."""
    rng = np.random.default_rng(5000 + 1000 * (phase == "decode") + rank)
    return rng.standard_normal((TOKENS[phase], 16)).astype(np.float32)


def value_and_input_grad(layer, x, weights, phase):
    """(y, d sum(y * weights) / d x) as NumPy arrays."""
    def scalar(inp):
        return (layer(inp, phase=phase) * Tensor(weights)).sum()
    grad = ms.grad(scalar)(Tensor(x))
    return layer(Tensor(x), phase=phase).asnumpy(), grad.asnumpy()


def scaled_error(actual, expected):
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def main():
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    init()
    rank, world = get_rank(), get_group_size()
    report = {"rank": rank, "world": world, "domain": shared_memory_domain(),
              "shares_with": {}, "phases": {}}
    for peer in range(world):  # collective (a world AllGather each): every rank, same count
        report["shares_with"][str(peer)] = bool(group_shares_memory([rank, peer]))
    reference = mee.MoELayer(config(world).replace(expert_parallel=1,
                                                   max_tokens_per_rank=16 * world))
    reference.set_train(False)
    for transport in ("auto", "allgather"):
        layer = mee.MoELayer(config(world).replace(transport=transport))
        layer.set_train(False)
        key = "" if transport == "auto" else f"_{transport}"
        report[f"exchange{key}"] = type(layer.prefill_dispatcher.exchange).__name__
        report[f"decode_dispatcher{key}"] = type(layer.decode_dispatcher).__name__
        report[f"phases{key}"] = {}
        for phase in ("prefill", "decode"):
            x, weights = inputs(rank, phase), output_weights(rank, phase)
            y, dx = value_and_input_grad(layer, x, weights, phase)
            everything = np.concatenate([inputs(r, phase) for r in range(world)])
            all_weights = np.concatenate([output_weights(r, phase) for r in range(world)])
            y_ref, dx_ref = value_and_input_grad(reference, everything, all_weights, phase)
            mine = slice(rank * TOKENS[phase], (rank + 1) * TOKENS[phase])
            report[f"phases{key}"][phase] = {
                "path": layer.dispatcher_for(TOKENS[phase], phase).__class__.__name__,
                "forward_error": scaled_error(y, y_ref[mine]),
                "grad_error": scaled_error(dx, dx_ref[mine])}
        layer.close()
    launch.write_result(report)


if __name__ == "__main__":
    main()
