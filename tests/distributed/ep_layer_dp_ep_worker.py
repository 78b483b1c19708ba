"""msrun worker (world 4): data parallel x expert parallel, two replicas of a 2-way
expert-parallel group; forward (PYNATIVE_MODE and GRAPH_MODE) and gradients against the single
process.

Usage: msrun --worker_num=4 ... ep_layer_dp_ep_worker.py
"""
import mindspore_moe_ep as mee

from ep_layer_common import run_parts, set_mode, single_process, tiny_layer_config
from ep_layer_reference import (check_gradients, check_layer_forward, layer_inputs,
                                reference_gradients)


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
    references = {}
    for mode in ("pynative", "graph"):
        set_mode(report, mode)
        for phase in ("prefill", "decode"):
            def body(phase=phase):
                _, references[phase] = check_layer_forward(
                    report, f"dp_ep/{phase}", layer, ref_layer, xs, rank, phase, mode,
                    references.get(phase))
            report.run(f"dp_ep/{phase}", body)
    set_mode(report, "pynative")
    reference = {}

    def reference_body():
        reference["value"] = reference_gradients(ref_layer, inputs)  # over the whole world

    report.run("dp_ep/grad/reference", reference_body)
    report.run("dp_ep/grad", lambda: check_gradients(
        report, "dp_ep/grad", layer, ref_layer, inputs, rank, reference["value"]))


PART_FUNCTIONS = {"dp_ep": dp_ep_part}

if __name__ == "__main__":
    run_parts(PART_FUNCTIONS)
