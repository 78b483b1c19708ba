"""msrun worker (world 4): data parallel x expert parallel, two replicas of a 2-way
expert-parallel group; forward (PYNATIVE_MODE and GRAPH_MODE) and gradients against the single
process.

Usage: msrun --worker_num=4 ... ep_layer_dp_ep_worker.py
"""
import mindspore_moe_ep as mee

from ep_layer_common import run_parts, single_process, tiny_layer_config
from ep_layer_reference import (check_gradients_against_single_process, check_phases_in_modes,
                                layer_inputs)


def group_of(rank, ep_size):
    first = rank // ep_size * ep_size
    return list(range(first, first + ep_size))


def dp_ep_part(report, rank, world):
    if world % 2 or world < 4:
        return
    config = tiny_layer_config(2, aux_loss_type="switch", aux_loss_coeff=0.01)
    layer = mee.MoELayer(config)
    ref_layer = mee.MoELayer(single_process(config))
    layer.set_train(False)
    ref_layer.set_train(False)
    report.equal("dp_ep/group_ranks", list(layer.group.group_ranks), group_of(rank, 2))
    shapes = [(12,), (5,), (9,), (1,)]
    inputs = layer_inputs(4242, shapes, 16)
    xs = [x for x, _ in inputs]
    check_phases_in_modes(report, "dp_ep", layer, ref_layer, xs, rank, ("pynative", "graph"))
    check_gradients_against_single_process(report, "dp_ep/grad", layer, ref_layer, inputs, rank)


PART_FUNCTIONS = {"dp_ep": dp_ep_part}

if __name__ == "__main__":
    run_parts(PART_FUNCTIONS)
