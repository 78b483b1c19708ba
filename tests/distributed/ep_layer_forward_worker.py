"""msrun worker: MoELayer(EP = W) forward against an EP = 1 layer with the same weights on the
concatenated batch.

Parts (all by default; choose with ``--parts layer,capacity``):

- ``layer``: prefill and decode outputs and statistics (tiny.yaml in float32 and bfloat16, and
  the DeepSeek-V3 routing shrunk to hidden 64: shared expert, sigmoid, group-limited top-8,
  expert bias; inference prefill unfused and in the fused experts + combine in rounds), each
  repeated bitwise; also
  both layers loaded from one Hugging Face-named checkpoint of the whole model (each EP rank
  loads only its own experts).
- ``capacity``: capacity_factor under EP: output, per-expert counts and the group's dropped
  pairs against EP = 1 on the concatenated batch.

Usage: msrun ... ep_layer_forward_worker.py [--parts a,b]
"""
import numpy as np

import mindspore_moe_ep as mee

from ep_layer_common import (BF16_LAYER_REL_TOL, MASTER_SEED, deepseek_layer_config,
                             graph_modes, run_parts, set_mode, single_process, tiny_layer_config)
from ep_layer_reference import (check_layer_forward, check_phases_in_modes, layer_inputs,
                                set_expert_bias)


# Token shapes per source rank (indexed by rank; uneven on purpose: a rank with no tokens, one
# with max_tokens_per_rank = 32, one with a single token).
TINY_SHAPES = [(13,), (0,), (32,), (1,)]
DEEPSEEK_SHAPES = [(2, 5), (1, 3), (3, 4), (1, 1)]


def layer_part(report, rank, world):
    cases = [  # name, config, token shapes per source, hidden, input seed, set expert bias,
               # modes
        ("tiny", tiny_layer_config(world), TINY_SHAPES, 16, 1, False, graph_modes(world)),
        ("deepseek", deepseek_layer_config(world), DEEPSEEK_SHAPES, 64, 2, True,
         graph_modes(world, everywhere=True)),
        # Prefill inference runs the fused experts + combine in rounds of 5 rows per source (up
        # to 7 rounds); the other cases, whose rounds would hold as much as the unfused partial
        # sums (max_tokens_per_rank = 32 < combine_round_tokens), run the unfused steps. Its
        # decode takes the grouped fused operators, the others' the row-wise ones.
        ("tiny_rounds",
         tiny_layer_config(world, combine_round_tokens=5, decode_layout="grouped"),
         TINY_SHAPES, 16, 4, False, graph_modes(world)),
        # bfloat16 weights and activations: equal to EP = 1 within BF16_LAYER_REL_TOL (routing
        # and statistics exactly)
        ("tiny_bf16", tiny_layer_config(world, dtype="bfloat16"), TINY_SHAPES, 16, 1, False,
         ("pynative",)),
    ]
    for name, config, shapes, hidden, seed, bias, modes in cases:
        layer = mee.MoELayer(config)
        ref_layer = mee.MoELayer(single_process(config))
        layer.set_train(False)
        ref_layer.set_train(False)
        fused = name == "tiny_rounds"
        report.equal(f"layer/{name}/prefill_path", layer.experts_path(8, "prefill"),
                     "experts_combine" if fused else "rowwise")
        report.equal(f"layer/{name}/decode_path", layer.experts_path(8, "decode"),
                     "grouped" if fused else "rowwise")
        report.values["window_transport"] = layer.prefill_dispatcher.exchange.window.transport
        if fused:
            report.equal(f"layer/{name}/combine_round_rows", int(
                layer.prefill_dispatcher.experts_combine_kernel._round_rows.asnumpy()[0]), 5)
        if bias:
            set_expert_bias([layer, ref_layer], 7, config.model.num_experts)
        xs = [x for x, _ in layer_inputs(seed, shapes[:world], hidden)]
        tolerance = ({"rel_tol": BF16_LAYER_REL_TOL, "kind": "layer_output_bfloat16"}
                     if config.runtime.dtype == "bfloat16" else {})
        check_phases_in_modes(report, f"layer/{name}", layer, ref_layer, xs, rank, modes,
                              **tolerance)
        report.check(f"layer/{name}/decode_path_is_fused",
                     type(layer.decode_dispatcher).__name__ == "FusedDecodeDispatcher",
                     type(layer.decode_dispatcher).__name__)
    set_mode(report, "pynative")
    report.run("layer/hf_checkpoint", lambda: checkpoint_part(report, rank, world))


def random_checkpoint(full_layer, seed):
    """A Hugging Face-named state dict of the whole model (every expert), random values."""
    from mindspore_moe_ep.state_dict import _expected_shapes  # the keys an EP = 1 layer loads
    rng = np.random.default_rng([MASTER_SEED, seed])
    return {key: (rng.standard_normal(shape) * 0.2).astype(np.float32)
            for key, shape in _expected_shapes(full_layer).items()}


def checkpoint_part(report, rank, world):
    """Both layers load one checkpoint: EP output must equal EP = 1 (the right experts loaded)."""
    config = deepseek_layer_config(world)
    layer = mee.MoELayer(config)
    ref_layer = mee.MoELayer(single_process(config))
    checkpoint = random_checkpoint(ref_layer, seed=11)
    for each in (layer, ref_layer):
        each.load_hf_state_dict(checkpoint)
        each.set_train(False)
    report.check("layer/hf_checkpoint/loaded_experts",
                 len(layer.local_expert_indices) == config.model.num_experts // world,
                 f"local experts {list(layer.local_expert_indices)}")
    xs = [x for x, _ in layer_inputs(3, DEEPSEEK_SHAPES[:world], 64)]
    for phase in ("prefill", "decode"):
        case = f"layer/hf_checkpoint/{phase}"
        report.run(case, lambda case=case, phase=phase: check_layer_forward(
            report, case, layer, ref_layer, xs, rank, phase, "pynative"))


def capacity_part(report, rank, world):
    cases = [  # capacity_factor, token shapes per rank, modes
        (1.0, [(16,)] * 4, graph_modes(world)),
        (0.5, [(16,)] * 4, ("pynative",)),
        (1.5, [(9,)] * 4, ("pynative",)),
        (1.0, [(16,), (4,), (9,), (1,)], ("pynative",)),  # uneven: capacity of the group batch
    ]
    for factor, shapes, modes in cases:
        name = f"capacity/{factor}/{shapes[1][0]}"
        config = tiny_layer_config(world, capacity_factor=factor)
        layer = mee.MoELayer(config)
        ref_layer = mee.MoELayer(single_process(config))
        report.check(f"{name}/no_fused_decode", layer.decode_dispatcher is None,
                     "the fused decode path never drops: capacity must use the prefill path")
        xs = [x for x, _ in layer_inputs(int(factor * 100), shapes[:world], 16)]
        reference = {}
        for mode in modes:
            set_mode(report, mode)

            def body():
                _, reference["value"] = check_layer_forward(
                    report, name, layer, ref_layer, xs, rank, "prefill", mode,
                    reference.get("value"))
                report.values[f"{name}/ref_num_dropped"] = reference["value"][1]["num_dropped"]
            report.run(name, body)
    set_mode(report, "pynative")


PART_FUNCTIONS = {"layer": layer_part, "capacity": capacity_part}

if __name__ == "__main__":
    run_parts(PART_FUNCTIONS)
