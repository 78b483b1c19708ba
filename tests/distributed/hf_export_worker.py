"""msrun worker: MoELayer.hf_state_dict under expert parallelism (EP = world size).

Cases (tests/test_hf_families.py's family dicts and checkpoints, sizes as there): DeepSeek-V3
(expert bias, shared expert), Qwen2-MoE (Qwen names, gated shared expert), Mixtral (w1/w2/w3
names) in float32, DeepSeek-V3 in bfloat16, and, with 4 ranks, DeepSeek-V3 at expert_parallel 2
(two data-parallel replicas: each group gathers its own experts). In each, every rank:

1. imports the config (``expert_parallel`` = world, unless the case says) and loads the whole model's checkpoint (the
   same seeded arrays on every rank; each rank keeps its own experts);
2. changes its live parameters, so that the export must read them and gather them from every
   rank: each local expert i's gate/up weights are multiplied by 2 ** (i % 4 - 1) (a power of
   two: exact in every precision, so the expected values need no rounding model), and, with an
   expert bias, one forward and ``update_expert_bias()`` (collective);
3. exports ``hf_state_dict(prefix)`` (collective) and checks it: ``keys`` (the checkpoint's
   names), ``values`` (bitwise: the checkpoint with step 2's change, rounded to bfloat16 for the
   bfloat16 layer; the bias equal to the layer's own);
4. loads the export into a fresh layer and checks that both layers give bitwise identical
   outputs on this rank's tokens, in ``prefill`` and ``decode``.

Checks are reported as ``pynative/<case>/<check>``.
"""
import os
import sys
import time
import traceback

import numpy as np

import launch  # tests/distributed/launch.py, next to this script
from checks import CheckReport  # tests/distributed/checks.py

import mindspore as ms
from mindspore import Tensor
from mindspore.communication import get_group_size, get_rank, init

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import mindspore_moe_ep as mee  # noqa: E402
from mindspore_moe_ep.config import config_from_hf  # noqa: E402
from reference import numpy_moe as ref  # noqa: E402
from test_hf_families import (FAMILIES, H, family_checkpoint, family_name,  # noqa: E402
                              reference_params)

# case -> (family, dtype, expert_parallel: None = the world size)
CASES = {"deepseek_v3": ("deepseek_v3", "float32", None),
         "qwen2_moe": ("qwen2_moe", "float32", None),
         "mixtral": ("mixtral", "float32", None),
         "deepseek_v3_bfloat16": ("deepseek_v3", "bfloat16", None),
         "deepseek_v3_ep2_dp2": ("deepseek_v3", "float32", 2)}   # world 4 only: 2 EP groups
TOKENS_PER_RANK = 6


def expert_scale(index):
    return np.float32(2.0 ** (index % 4 - 1))


def scaled_checkpoint(family, checkpoint, num_experts):
    """The checkpoint with expert i's gate and up projections multiplied by expert_scale(i)."""
    scaled = dict(checkpoint)
    for index in range(num_experts):
        for projection in ("gate_proj", "up_proj"):
            key = family.prefix + family_name(family.naming,
                                              f"experts.{index}.{projection}.weight")
            scaled[key] = checkpoint[key] * expert_scale(index)
    return scaled


def scale_local_experts(layer):
    """Step 2 on the layer's Parameter: gate_up [E_local, H, 2F] of local expert i * scale(i)."""
    gate_up = layer.experts.gate_up_weight.asnumpy().astype(np.float32)
    for slot, index in enumerate(layer.local_expert_indices):
        gate_up[slot] *= expert_scale(index)
    layer.experts.gate_up_weight.set_data(
        Tensor(gate_up).astype(layer.experts.gate_up_weight.dtype))


def run_case(report, case, rank, world):
    name, dtype, expert_parallel = CASES[case]
    family = FAMILIES[name]
    config = config_from_hf(family.hf, expert_parallel=expert_parallel or world, dtype=dtype,
                            max_tokens_per_rank=16)
    params = reference_params(family, seed=300 + len(name))
    checkpoint = family_checkpoint(family, params)
    layer = mee.MoELayer(config)
    layer.load_hf_state_dict(checkpoint, prefix=family.prefix)
    x = np.random.default_rng([400, rank]).standard_normal((TOKENS_PER_RANK, H)).astype(
        np.float32)
    scale_local_experts(layer)
    bias_key = family.prefix + "gate.e_score_correction_bias"
    if config.router.expert_bias:
        layer.set_train(True)
        layer(Tensor(x), "prefill")
        layer.update_expert_bias()
    layer.set_train(False)

    exported = layer.hf_state_dict(prefix=family.prefix)
    expected = scaled_checkpoint(family, checkpoint, config.model.num_experts)
    report.check(f"{case}/keys", sorted(exported) == sorted(expected),
                 sorted(set(exported) ^ set(expected))[:6])
    wrong = []
    for key, value in expected.items():
        if key == bias_key:
            value = layer.router.expert_bias.asnumpy()      # after the update
        elif dtype == "bfloat16":
            value = ref.round_to_dtype(value, "bfloat16")
        actual = exported.get(key)
        if actual is None or actual.dtype != np.float32 or not np.array_equal(actual, value):
            wrong.append(key)
    report.check(f"{case}/values", not wrong, f"wrong: {wrong[:6]}")
    if config.router.expert_bias:
        report.check(f"{case}/bias_updated",
                     not np.array_equal(exported[bias_key], params["gate.e_score_correction_bias"]))

    reloaded = mee.MoELayer(config)
    reloaded.load_hf_state_dict(exported, prefix=family.prefix)
    reloaded.set_train(False)
    for phase in ("prefill", "decode"):
        def body(phase=phase):
            y = layer(Tensor(x), phase).astype(ms.float32).asnumpy()
            y_reloaded = reloaded(Tensor(x), phase).astype(ms.float32).asnumpy()
            report.equal(f"{case}/{phase}", y_reloaded, y)
        report.run(f"{case}/{phase}/run", body)


def main():
    started = time.monotonic()
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    init()
    rank, world = get_rank(), get_group_size()
    report = CheckReport()
    report.values["init_s"] = round(time.monotonic() - started, 2)
    for case in CASES:
        if CASES[case][2] is not None and CASES[case][2] * 2 != world:
            continue
        case_started = time.monotonic()
        try:
            run_case(report, case, rank, world)
        except Exception:  # recorded, so that the other cases still run
            report.check(f"{case}/case", False, traceback.format_exc()[-2000:])
        report.values[f"seconds/{case}"] = round(time.monotonic() - case_started, 2)
    report.values["total_s"] = round(time.monotonic() - started, 2)
    launch.write_result({"rank": rank, "world": world, "checks": report.checks,
                         **report.values})


if __name__ == "__main__":
    main()
