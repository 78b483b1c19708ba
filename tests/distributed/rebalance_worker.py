"""msrun worker (4 ranks): redundant experts and live rebalancing against the EP = 1 layer.

Every check compares with the single-process layer of the same config (same weights: each
expert's weights are a function of its id), whose routing decides where each (token, expert)
pair must go under the replica rule (ep_layer_reference.reference_slots).

Parts (all by default; choose with ``--parts a,b``):

- ``replicas``: one redundant slot per rank at EP 4 and EP 2 (two data-parallel replicas),
  prefill and decode, over the window (row-wise decode, grouped decode with the fused experts +
  combine in rounds) and over AllGather, with int8 rows, PyNative and (EP 2) GRAPH_MODE; every
  slot's weights
  are its logical expert's; the rows of every slot as the rule says (dropless).
- ``rebalance``: skewed load, ``rebalance()`` from the statistics, outputs before and after
  (a GRAPH_MODE cell compiled before runs after), the planned placement equal to
  ``plan_placement`` of the routed counts; relocation without replicas with an optimizer (its
  moments move with the weights) and training gradients after it; training gradients with
  replicas (each slot's reduced gradient its expert's whole one), before and after a rebalance.
- ``refusal``: rank 1 passes another placement, then rank 2 an invalid one: every rank raises
  naming them, and the old placement stays in force.
- ``hung``: rank 3 enters the weight exchange late: the others fail within the exchange timeout
  naming it, rank 3 fails too, and the old placement and weights stay in force.

Usage: msrun ... rebalance_worker.py [--parts a,b]
"""
import time

import numpy as np

from mindspore import Tensor

import mindspore_moe_ep as mee
from mindspore_moe_ep.load_balancing import (plan_placement, relocate_without_replicas,
                                             static_placement)
from mindspore_moe_ep.training.optimizer import AdamW

from ep_layer_common import BAD_TIMEOUT_S, graph_modes, run_parts, single_process, \
    tiny_layer_config
from ep_layer_reference import (check_gradients_against_single_process, check_phases_in_modes,
                                layer_inputs)

SHAPES = [(13,), (0,), (32,), (1,)]    # tokens per source rank (a rank without tokens included)
GRAD_SHAPES = [(12,), (7,), (3,), (10,)]


def check_slot_weights(report, case, layer, ref_layer):
    """Every slot holds the weights of the logical expert the placement puts there."""
    experts = list(layer.local_expert_indices)
    for name in ("gate_up_weight", "down_weight"):
        actual = getattr(layer.experts, name).asnumpy()
        expected = getattr(ref_layer.experts, name).asnumpy()[experts]
        report.equal(f"{case}/slot_weights/{name}", actual, expected)


def skewed_inputs(seed, world, tokens, hidden, ref_layer):
    """Inputs whose routing favours expert 0 and 1: rows pushed along their gate rows."""
    gate = ref_layer.router.gate_weight.asnumpy()                                  # [E, H]
    rng = np.random.default_rng(seed)
    xs = []
    for _ in range(world):
        x = rng.standard_normal((tokens, hidden)).astype(np.float32)
        x[: tokens * 3 // 4] += 3.0 * (gate[0] + gate[1])
        xs.append(x)
    return xs


def replicas_part(report, rank, world):
    cases = [  # name, config, modes
        ("ep4", tiny_layer_config(world, redundant_experts=world), graph_modes(world)),
        ("ep4_grouped_decode_rounds",
         tiny_layer_config(world, redundant_experts=world, decode_layout="grouped",
                           combine_round_tokens=5), ("pynative",)),
        ("ep2", tiny_layer_config(2, redundant_experts=2), graph_modes(2)),
        ("ep2_allgather", tiny_layer_config(2, redundant_experts=2, transport="allgather"),
         ("pynative",)),
        ("ep4_int8", tiny_layer_config(world, redundant_experts=world, quant="int8"),
         ("pynative",)),
    ]
    for name, config, modes in cases:
        layer = mee.MoELayer(config)
        ref_layer = mee.MoELayer(single_process(config.replace(redundant_experts=0)))
        for each in (layer, ref_layer):
            each.set_train(False)
        report.check(f"replicas/{name}/has_replicas", max(layer.placement.replicas) > 1,
                     f"placement {layer.placement.slot_experts}")
        check_slot_weights(report, f"replicas/{name}", layer, ref_layer)
        xs = [x for x, _ in layer_inputs(41, SHAPES[:world], 16)]
        check_phases_in_modes(report, f"replicas/{name}", layer, ref_layer, xs, rank, modes)
        # Another placement with replicas (planned for a skew), then the same checks.
        skew = np.arange(config.model.num_experts, 0, -1) ** 2.0
        placement = plan_placement(skew, layer.group.size, layer.group.experts_per_rank)
        report.run(f"replicas/{name}/rebalance", lambda: layer.rebalance(placement))
        report.equal(f"replicas/{name}/placement", list(layer.placement.slot_experts),
                     list(placement.slot_experts))
        check_slot_weights(report, f"replicas/{name}/after", layer, ref_layer)
        exported, expected = layer.hf_state_dict(), ref_layer.hf_state_dict()
        report.equal(f"replicas/{name}/hf_export_keys", sorted(exported), sorted(expected))
        for key in sorted(expected):
            report.equal(f"replicas/{name}/hf_export/{key}", exported.get(key), expected[key])
        check_phases_in_modes(report, f"replicas/{name}/after", layer, ref_layer, xs, rank,
                              modes)
        layer.close()


def rebalance_part(report, rank, world):
    config = tiny_layer_config(world, redundant_experts=world)
    layer = mee.MoELayer(config)
    ref_layer = mee.MoELayer(single_process(config.replace(redundant_experts=0)))
    for each in (layer, ref_layer):
        each.set_train(False)
    xs = skewed_inputs(7, world, 24, 16, ref_layer)
    routed = sum(np.bincount(ref_layer.route(Tensor(x))[0].asnumpy().reshape(-1),
                             minlength=config.model.num_experts) for x in xs)
    check_phases_in_modes(report, "rebalance/before", layer, ref_layer, xs, rank,
                          graph_modes(world, everywhere=True))
    layer.reset_load_stats()
    layer(Tensor(xs[rank]), "prefill")
    before = layer.load_stats()
    placement = layer.rebalance()
    expected = plan_placement(routed, world, layer.group.experts_per_rank)
    report.equal("rebalance/planned_placement", list(placement.slot_experts),
                 list(expected.slot_experts))
    check_slot_weights(report, "rebalance", layer, ref_layer)
    check_phases_in_modes(report, "rebalance/after", layer, ref_layer, xs, rank,
                          graph_modes(world, everywhere=True))
    layer.reset_load_stats()
    layer(Tensor(xs[rank]), "prefill")
    after = layer.load_stats()
    report.values["rank_load_max_over_mean"] = [before["rank_load_max_over_mean"],
                                                after["rank_load_max_over_mean"]]
    report.check("rebalance/balanced", after["rank_load_max_over_mean"]
                 < before["rank_load_max_over_mean"],
                 f"max/mean {before['rank_load_max_over_mean']} -> "
                 f"{after['rank_load_max_over_mean']}")
    report.equal("rebalance/dropless", after["rank_loads"].sum(),
                 int(routed.sum()))
    layer.close()

    # Training with replicas: every slot's reduced gradient is its expert's whole gradient
    # (EP 1's), so replicas take one update; then a rebalance with the optimizer and again.
    config = tiny_layer_config(world, redundant_experts=world, aux_loss_type="switch",
                               aux_loss_coeff=0.01)
    layer = mee.MoELayer(config)
    ref_layer = mee.MoELayer(single_process(config.replace(redundant_experts=0)))
    for each in (layer, ref_layer):
        each.set_train(True)
    inputs = layer_inputs(47, GRAD_SHAPES[:world], 16)
    check_gradients_against_single_process(report, "replicas/grad", layer, ref_layer, inputs,
                                           rank)
    layer.rebalance(plan_placement(routed, world, layer.group.experts_per_rank))
    check_gradients_against_single_process(report, "replicas/grad_after_rebalance", layer,
                                           ref_layer, inputs, rank)
    layer.close()

    # Relocation without replicas, with an optimizer, then training.
    config = tiny_layer_config(world, aux_loss_type="switch", aux_loss_coeff=0.01)
    layer = mee.MoELayer(config)
    ref_layer = mee.MoELayer(single_process(config))
    optimizer = AdamW(layer.trainable_params())
    weights = [layer.experts.gate_up_weight, layer.experts.down_weight]
    for state in optimizer.get_parameters():
        for weight in weights:
            if state.name.partition(".")[2] == weight.name:
                scale = 2.0 if state.name.startswith("adam_m") else 3.0
                state.set_data(Tensor(weight.asnumpy() * scale))
    placement = relocate_without_replicas(routed, world)
    report.check("relocation/moves_experts",
                 placement.slot_experts != static_placement(routed, world).slot_experts,
                 f"{placement.slot_experts}")
    layer.rebalance(placement, optimizer)
    check_slot_weights(report, "relocation", layer, ref_layer)
    checked = 0
    for state in optimizer.get_parameters():
        for weight in weights:
            if state.name.partition(".")[2] == weight.name:
                scale = 2.0 if state.name.startswith("adam_m") else 3.0
                report.equal(f"relocation/optimizer_state/{state.name}", state.asnumpy(),
                             weight.asnumpy() * scale)
                checked += 1
    report.equal("relocation/optimizer_states_checked", checked, 4)  # 2 moments x 2 weights
    layer.set_train(False)
    ref_layer.set_train(False)
    check_phases_in_modes(report, "relocation", layer, ref_layer, xs, rank, ("pynative",))
    layer.set_train(True)
    ref_layer.set_train(True)
    inputs = layer_inputs(43, GRAD_SHAPES[:world], 16)
    check_gradients_against_single_process(report, "relocation/grad", layer, ref_layer, inputs,
                                           rank)
    layer.close()


def refusal_part(report, rank, world):
    config = tiny_layer_config(world, redundant_experts=world)
    layer = mee.MoELayer(config)
    layer.set_train(False)
    old = layer.placement
    weights = layer.experts.gate_up_weight.asnumpy()
    loads = np.arange(1, config.model.num_experts + 1, dtype=np.float64)
    good = plan_placement(loads, world, layer.group.experts_per_rank)
    other = plan_placement(loads[::-1], world, layer.group.experts_per_rank)
    for case, mine, expected_text in (
            ("differs", other if rank == 1 else good, "ranks [1] differ"),
            ("invalid", plan_placement(loads, world * 2, 2) if rank == 2 else good,
             "ranks [2] refused"),
            ("not_a_placement", [0, 1, 2] if rank == 0 else good,
             "expected a load_balancing.Placement" if rank == 0 else "ranks [0] refused")):
        try:
            layer.rebalance(mine)
            report.check(f"refusal/{case}", False, "no error")
        except ValueError as error:
            report.check(f"refusal/{case}", expected_text in str(error), str(error))
        report.check(f"refusal/{case}/old_placement", layer.placement is old, "placement changed")
        report.equal(f"refusal/{case}/old_weights", layer.experts.gate_up_weight.asnumpy(),
                     weights)
    layer.close()


def hung_part(report, rank, world):
    config = tiny_layer_config(world, redundant_experts=world, timeout_s=BAD_TIMEOUT_S)
    layer = mee.MoELayer(config)
    layer.set_train(False)
    old = layer.placement
    weights = layer.experts.down_weight.asnumpy()
    exchange = layer.prefill_dispatcher.exchange
    if rank == 3:
        def late_exchange(*args):
            time.sleep(3 * BAD_TIMEOUT_S)
            return exchange(*args)
        object.__setattr__(layer.prefill_dispatcher, "exchange", late_exchange)
    loads = np.arange(1, config.model.num_experts + 1, dtype=np.float64)
    placement = plan_placement(loads, world, layer.group.experts_per_rank)
    started = time.monotonic()
    try:
        layer.rebalance(placement)
        report.check("hung/raised", False, "no error")
    except RuntimeError as error:
        seconds = time.monotonic() - started
        report.values["hung_message"] = str(error)[:600]
        report.values["hung_seconds"] = round(seconds, 2)
        named = "rank 3" in str(error) if rank != 3 else True
        report.check("hung/raised", named, str(error)[:600])
        if rank != 3:
            report.check("hung/bounded", seconds < 2 * BAD_TIMEOUT_S + 5, f"{seconds:.1f} s")
    report.check("hung/old_placement", layer.placement is old, "placement changed")
    report.equal("hung/old_weights", layer.experts.down_weight.asnumpy(), weights)
    layer.close()


PART_FUNCTIONS = {"replicas": replicas_part, "rebalance": rebalance_part,
                  "refusal": refusal_part, "hung": hung_part}

if __name__ == "__main__":
    run_parts(PART_FUNCTIONS)
