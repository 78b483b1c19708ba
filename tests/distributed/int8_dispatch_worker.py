"""msrun worker (4 ranks): the layer with ``dispatch.quant: int8`` under expert parallelism against
its single-process (EP = 1) counterpart, which takes the same int8 round trip of every token row.

Parts (all by default; choose with ``--parts forward,grad``):

- ``forward``: prefill and decode outputs and statistics through every path that moves token
  rows: EP 4 over the shared-memory window (prefill DeliverRows, decode FusedDeliver; rows
  pulled), the same with the rows packed (MOE_EP_DISPATCH_PULL=0), the fused experts + combine
  with the grouped decode pair (FusedDispatch), EP 2 (two data-parallel replicas) over the window
  and over MindSpore's AllGather; each repeated bitwise; the plans say ``quantized``.
- ``grad``: training gradients (straight-through) over the window and over AllGather.
- ``bad``: a NaN in token 3 of rank 1: rank 1 refuses it naming the token, and every other rank
  fails at once with that reason (prefill and decode), not after the exchange timeout; over
  AllGather every rank fails in the counts' check, which names the cause.

Usage: msrun ... int8_dispatch_worker.py [--parts a,b]
"""
import os

import numpy as np

from checks import timed_call  # tests/distributed/checks.py

from mindspore import Tensor

import mindspore_moe_ep as mee

from ep_layer_common import BAD_TIMEOUT_S, run_parts, single_process, tiny_layer_config
from ep_layer_reference import (check_gradients_against_single_process, check_phases_in_modes,
                                layer_inputs)

SHAPES = [(13,), (0,), (32,), (1,)]    # tokens per source rank (a rank without tokens included)
GRAD_SHAPES = [(12,), (7,), (3,), (10,)]


def int8_config(world, **overrides):
    return tiny_layer_config(world, quant="int8", **overrides)


def forward_part(report, rank, world):
    cases = [  # name, config, environment, modes, expected (prefill, decode) experts paths
        ("ep4", int8_config(world), {}, ("pynative", "graph"), ("rowwise", "rowwise")),
        ("ep4_packed", int8_config(world), {"MOE_EP_DISPATCH_PULL": "0"}, ("pynative",),
         ("rowwise", "rowwise")),
        ("ep4_rounds_grouped_decode",
         int8_config(world, combine_round_tokens=5, decode_layout="grouped"), {}, ("pynative",),
         ("experts_combine", "grouped")),
        ("ep2_window", int8_config(2), {}, ("pynative",), ("rowwise", "rowwise")),
        ("ep2_allgather", int8_config(2, transport="allgather"), {}, ("pynative",),
         ("rowwise", "rowwise")),
    ]
    for name, config, environment, modes, paths in cases:
        os.environ.update(environment)
        try:
            layer = mee.MoELayer(config)
            ref_layer = mee.MoELayer(single_process(config))
            for each in (layer, ref_layer):
                each.set_train(False)
            for phase, path in zip(("prefill", "decode"), paths):
                plan = layer.plan(8, phase)
                report.equal(f"forward/{name}/{phase}/path", plan.experts_path, path)
                report.equal(f"forward/{name}/{phase}/quantized", plan.quantized, True)
            report.equal(f"forward/{name}/reference_quantized",
                         ref_layer.plan(8, "prefill").quantized, True)
            xs = [x for x, _ in layer_inputs(31, SHAPES[:world], 16)]
            check_phases_in_modes(report, f"forward/{name}", layer, ref_layer, xs, rank, modes)
            layer.close()
        finally:
            for variable in environment:
                os.environ.pop(variable, None)


def grad_part(report, rank, world):
    cases = [  # name, config
        ("ep4_window", int8_config(world, aux_loss_type="switch", aux_loss_coeff=0.01)),
        ("ep2_allgather", int8_config(2, transport="allgather")),
    ]
    for name, config in cases:
        layer = mee.MoELayer(config)
        ref_layer = mee.MoELayer(single_process(config))
        for each in (layer, ref_layer):
            each.set_train(True)
            report.equal(f"grad/{name}/quantized", each.plan(4, "prefill").quantized, True)
        inputs = layer_inputs(41, GRAD_SHAPES[:world], 16)
        check_gradients_against_single_process(report, f"grad/{name}", layer, ref_layer, inputs,
                                               rank)
        layer.close()


def bad_part(report, rank, world):
    """{case: (message or None, seconds)}: a NaN in token 3 of rank 1 only."""
    messages = {}
    x = np.ones((6, 16), np.float32)
    if rank == 1:
        x[3, 5] = np.nan
    for name, phase, transport in (("prefill", "prefill", "auto"), ("decode", "decode", "auto"),
                                   ("allgather", "prefill", "allgather")):
        layer = mee.MoELayer(int8_config(world, max_tokens_per_rank=8, timeout_s=BAD_TIMEOUT_S,
                                         transport=transport))
        layer.set_train(False)
        _, message, seconds = timed_call(lambda: layer(Tensor(x), phase).asnumpy())
        messages[f"nan/{name}"] = (message, seconds)
        layer.close()
    report.values["bad_messages"] = messages


PART_FUNCTIONS = {"forward": forward_part, "grad": grad_part, "bad": bad_part}

if __name__ == "__main__":
    run_parts(PART_FUNCTIONS)
