"""msrun worker: gradients of an expert-parallel MoELayer against the single process.

Part ``grad``: gradients of L = sum over ranks of L_r = sum(y_r * G_r) (+ the router losses),
after ExpertParallelGradReducer, against the sum over sources s of the EP = 1 gradients of L_s
(each rank's router losses cover its own tokens, so the sum of the L_s, not the loss of the
concatenated batch, is the single-process counterpart; with a capacity factor and no router
losses, the EP = 1 gradient of the concatenated batch). Cases: switch aux + z loss (grouped and
recomputed experts), DeepSeek-V3 seq aux loss with expert bias (the eval path), a rank without
tokens, capacity factor; each repeated bitwise.

Usage: msrun ... ep_layer_gradients_worker.py
"""
import mindspore_moe_ep as mee

from ep_layer_common import (deepseek_layer_config, graph_modes, run_parts, set_mode,
                             single_process, tiny_layer_config)
from ep_layer_reference import (check_gradients, layer_inputs, reference_gradients,
                                set_expert_bias)


def grad_part(report, rank, world):
    # Each case takes one of the experts' paths (see layer.py): "grouped" (training), "eval"
    # (not training: the fused experts + combine under EP, ExpertsWeightedSum in the reference;
    # the gradients of both recompute the experts) or "recompute" (training with
    # runtime.recompute_experts: ExpertsWeightedSum in both).
    cases = [  # name, config, token shapes per source, hidden, seed, expert bias, modes,
               # concatenated reference, experts' path
        ("tiny_switch_aux_z",
         tiny_layer_config(world, aux_loss_type="switch", aux_loss_coeff=0.01, z_loss_coeff=0.001),
         [(12,), (7,), (3,), (10,)], 16, 1001, False, graph_modes(world), False, "grouped"),
        ("tiny_switch_aux_z_recompute",
         tiny_layer_config(world, aux_loss_type="switch", aux_loss_coeff=0.01, z_loss_coeff=0.001,
                           recompute_experts=True),
         [(12,), (7,), (3,), (10,)], 16, 1001, False, graph_modes(world), False, "recompute"),
        ("deepseek_seq_aux", deepseek_layer_config(world, combine_round_tokens=4),
         [(2, 4), (1, 4), (3, 4), (1, 4)],
         64, 1002, True, ("pynative",), False, "eval"),
        ("tiny_zero_tokens_no_aux", tiny_layer_config(world, recompute_experts=True),
         [(9,), (0,), (5,), (1,)], 16, 1003, False, ("pynative",), False, "recompute"),
        ("tiny_capacity", tiny_layer_config(world, capacity_factor=1.0),
         [(12,), (5,), (9,), (2,)], 16, 1004, False, ("pynative",), True, "grouped"),
    ]
    for name, config, shapes, hidden, seed, bias, modes, concatenate, path in cases:
        layer = mee.MoELayer(config)
        ref_layer = mee.MoELayer(single_process(config))
        expected_paths = {"grouped": ("grouped", "grouped"), "recompute": ("rowwise", "rowwise"),
                          "eval": ("experts_combine", "rowwise")}[path]
        for each, expected in zip((layer, ref_layer), expected_paths):
            each.set_train(path != "eval")
            report.equal(f"grad/{name}/path", each.plan(4, "prefill").experts_path, expected)
        if bias:
            set_expert_bias([layer, ref_layer], 11, config.model.num_experts)
        inputs = layer_inputs(seed, shapes[:world], hidden)
        reference = {}

        def reference_body():
            reference["value"] = reference_gradients(ref_layer, inputs, concatenate)

        set_mode(report, "pynative")
        report.run(f"grad/{name}/reference", reference_body)
        for mode in modes:
            set_mode(report, mode)
            report.run(f"grad/{name}", lambda: check_gradients(
                report, f"grad/{name}", layer, ref_layer, inputs, rank, reference["value"]))
    set_mode(report, "pynative")


PART_FUNCTIONS = {"grad": grad_part}

if __name__ == "__main__":
    run_parts(PART_FUNCTIONS)
