"""Loading Hugging Face MoE weights (DeepSeek-V3 and Qwen-MoE naming) into an MoELayer.

Checkpoint names, relative to ``prefix`` (e.g. ``"model.layers.3.mlp."``):

| name | shape |
| --- | --- |
| ``gate.weight`` | [E, H] |
| ``gate.e_score_correction_bias`` | [E] (only with ``router.expert_bias``) |
| ``experts.{i}.gate_proj.weight`` / ``up_proj.weight`` | [F, H] |
| ``experts.{i}.down_proj.weight`` | [H, F] |
| ``shared_experts.{gate,up,down}_proj.weight`` | [Fs, H] / [Fs, H] / [H, Fs] |
| ``shared_expert_gate.weight`` | [1, H] (only with ``model.shared_expert_gate``) |

Qwen-MoE names its shared expert ``shared_expert.`` (singular); both spellings are accepted.

Keys outside ``prefix`` belong to other layers and are ignored. Under expert parallelism a rank
loads only its own experts; entries for other experts are accepted and skipped.
"""
import re

import numpy as np
from mindspore import Tensor

_EXPERT_KEY = re.compile(r"^experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class StateDictError(KeyError):
    """Missing, unexpected or mis-shaped checkpoint entries (the message lists every one)."""

    def __str__(self):
        return str(self.args[0])


def _expected_shapes(layer):
    """{relative key: shape} for every entry this rank must load."""
    model = layer.config.model
    hidden, ffn = model.hidden_size, model.expert_ffn_size
    shapes = {"gate.weight": (model.num_experts, hidden)}
    if layer.config.router.expert_bias:
        shapes["gate.e_score_correction_bias"] = (model.num_experts,)
    for index in layer.local_expert_indices:
        shapes[f"experts.{index}.gate_proj.weight"] = (ffn, hidden)
        shapes[f"experts.{index}.up_proj.weight"] = (ffn, hidden)
        shapes[f"experts.{index}.down_proj.weight"] = (hidden, ffn)
    if layer.shared_expert is not None:
        shared = model.shared_ffn_size
        shapes["shared_experts.gate_proj.weight"] = (shared, hidden)
        shapes["shared_experts.up_proj.weight"] = (shared, hidden)
        shapes["shared_experts.down_proj.weight"] = (hidden, shared)
        if model.shared_expert_gate:
            shapes["shared_expert_gate.weight"] = (1, hidden)
    return shapes


def _canonical_key(key):
    """Qwen-MoE's ``shared_expert.*`` -> this module's ``shared_experts.*``; others unchanged."""
    qwen_prefix = "shared_expert."
    return "shared_experts." + key[len(qwen_prefix):] if key.startswith(qwen_prefix) else key


def _is_other_ranks_expert(key, num_experts):
    match = _EXPERT_KEY.match(key)
    return match is not None and int(match.group(1)) < num_experts


def load_hf_moe_state_dict(layer, state_dict, prefix=""):
    """Validate every entry first, then copy into the layer's Parameters (all or nothing)."""
    expected = _expected_shapes(layer)
    arrays, problems, seen = {}, [], set()
    for full_key, value in state_dict.items():
        if not full_key.startswith(prefix):
            continue
        key = _canonical_key(full_key[len(prefix):])
        if key in seen:
            problems.append(f"'{full_key}' is given twice (as shared_expert. and "
                            f"shared_experts.)")
            continue
        seen.add(key)
        if key not in expected:
            if not _is_other_ranks_expert(key, layer.config.model.num_experts):
                problems.append(f"unexpected key '{full_key}'")
            continue
        array = np.asarray(value)
        if array.shape != expected[key]:
            problems.append(f"'{full_key}' has shape {tuple(array.shape)}; expected "
                            f"{expected[key]}")
        elif not np.issubdtype(array.dtype, np.floating):
            problems.append(f"'{full_key}' has dtype {array.dtype}; expected a floating type")
        else:
            arrays[key] = array.astype(np.float32)
    missing = [prefix + key for key in expected if key not in seen]
    problems += [f"missing key '{key}'" for key in missing]
    if problems:
        raise StateDictError("load_hf_state_dict: " + "; ".join(problems))

    def assign(parameter, array):
        parameter.set_data(Tensor(np.ascontiguousarray(array)).astype(parameter.dtype))

    assign(layer.router.gate_weight, arrays["gate.weight"])
    if "gate.e_score_correction_bias" in arrays:
        layer.router.expert_bias.set_data(Tensor(arrays["gate.e_score_correction_bias"]))
    experts = layer.local_expert_indices

    def gate_up(name):
        # [F, H] gate and up -> [H, 2F]
        return np.concatenate([arrays[f"{name}.gate_proj.weight"].T,
                               arrays[f"{name}.up_proj.weight"].T], axis=1)
    assign(layer.experts.gate_up_weight, np.stack([gate_up(f"experts.{i}") for i in experts]))
    assign(layer.experts.down_weight,
           np.stack([arrays[f"experts.{i}.down_proj.weight"].T for i in experts]))
    if layer.shared_expert is not None:
        assign(layer.shared_expert.gate_up_weight, gate_up("shared_experts")[None])
        assign(layer.shared_expert.down_weight, arrays["shared_experts.down_proj.weight"].T[None])
        if "shared_expert_gate.weight" in arrays:
            assign(layer.shared_expert.gate_weight, arrays["shared_expert_gate.weight"].T)
