"""Hugging Face MoE weights in and out of an MoELayer (DeepSeek, Qwen-MoE and Mixtral naming).

Checkpoint names, relative to ``prefix`` (e.g. ``"model.layers.3.mlp."``; Mixtral's is
``"model.layers.3.block_sparse_moe."``):

| DeepSeek-V2/V3, GLM-4.5, Kimi K2 | Qwen2/3-MoE | Mixtral | shape |
| --- | --- | --- | --- |
| ``gate.weight`` | the same | the same | [E, H] |
| ``gate.e_score_correction_bias`` (1) | (none) | (none) | [E] |
| ``experts.{i}.gate_proj.weight`` | the same | ``experts.{i}.w1.weight`` | [F, H] |
| ``experts.{i}.up_proj.weight`` | the same | ``experts.{i}.w3.weight`` | [F, H] |
| ``experts.{i}.down_proj.weight`` | the same | ``experts.{i}.w2.weight`` | [H, F] |
| ``shared_experts.{gate,up}_proj.weight`` | ``shared_expert.*`` | (none) | [Fs, H] |
| ``shared_experts.down_proj.weight`` | ``shared_expert.*`` | (none) | [H, Fs] |
| ``shared_expert_gate.weight`` (2) | the same | (none) | [1, H] |

(1) only with ``router.expert_bias``; (2) only with ``model.shared_expert_gate``.

Loading (:func:`load_hf_moe_state_dict`) accepts every naming, whatever the config says; one
weight given under two names is an error. Keys outside ``prefix`` belong to other layers and are
ignored. Under expert parallelism a rank loads only its own experts; entries for other experts
are accepted and skipped.

Export (:func:`export_hf_moe_state_dict`) writes the naming of ``model.hf_weight_names`` (set by
``config_from_hf`` from the model's family; DeepSeek naming by default). A weight the family does
not have (a shared expert in a Mixtral-named layer, an expert bias in a Qwen- or Mixtral-named
one) is exported under its DeepSeek name, which loading accepts.
"""
import logging
import re

import numpy as np
from mindspore import Tensor

logger = logging.getLogger(__name__)

_EXPERT_KEY = re.compile(r"^experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MIXTRAL_EXPERT_KEY = re.compile(r"^experts\.(\d+)\.(w1|w2|w3)\.weight$")
_MIXTRAL_PROJECTION = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

# Names per model.hf_weight_names: (expert projection names, shared-expert prefix).
_EXPORT_NAMING = {
    "deepseek": ({"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
                 "shared_experts"),
    "qwen": ({"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
             "shared_expert"),
    "mixtral": ({"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}, "shared_experts"),
}


class StateDictError(KeyError):
    """Missing, unexpected or mis-shaped checkpoint entries (the message lists every one)."""

    def __str__(self):
        return str(self.args[0])


def _expected_shapes(layer):
    """{relative key: shape} for every entry this rank must load (DeepSeek naming)."""
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
    """The DeepSeek name of ``key``: Qwen-MoE's ``shared_expert.*`` -> ``shared_experts.*``,
    Mixtral's ``experts.{i}.w1`` / ``w3`` / ``w2`` -> ``gate_proj`` / ``up_proj`` /
    ``down_proj``; others unchanged."""
    qwen_prefix = "shared_expert."
    if key.startswith(qwen_prefix):
        return "shared_experts." + key[len(qwen_prefix):]
    match = _MIXTRAL_EXPERT_KEY.match(key)
    if match is not None:
        return f"experts.{match.group(1)}.{_MIXTRAL_PROJECTION[match.group(2)]}.weight"
    return key


def _family_key(key, naming):
    """The name of the DeepSeek-named ``key`` in ``naming`` (a ``model.hf_weight_names``)."""
    projection_names, shared_prefix = _EXPORT_NAMING[naming]
    match = _EXPERT_KEY.match(key)
    if match is not None:
        return f"experts.{match.group(1)}.{projection_names[match.group(2)]}.weight"
    if key.startswith("shared_experts."):
        return f"{shared_prefix}.{key[len('shared_experts.'):]}"
    return key


def _is_other_ranks_expert(key, num_experts):
    match = _EXPERT_KEY.match(key)
    return match is not None and int(match.group(1)) < num_experts


def load_hf_moe_state_dict(layer, state_dict, prefix=""):
    """Validate every entry first, then copy into the layer's Parameters (all or nothing)."""
    expected = _expected_shapes(layer)
    arrays, problems, seen = {}, [], {}
    for full_key, value in state_dict.items():
        if not full_key.startswith(prefix):
            continue
        key = _canonical_key(full_key[len(prefix):])
        if key in seen:
            problems.append(f"'{full_key}' is given twice (also as '{seen[key]}': both name "
                            f"'{prefix}{key}')")
            continue
        seen[key] = full_key
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
    naming = layer.config.model.hf_weight_names
    missing = [prefix + _family_key(key, naming) for key in expected if key not in seen]
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


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

def _parameter_array(parameter):
    """A Parameter's values as NumPy: float16 stays float16; float32 and bfloat16 become float32
    (bfloat16 -> float32 is exact: the float32 array holds exactly the bfloat16 values)."""
    array = parameter.asnumpy()
    return array if array.dtype == np.float16 else array.astype(np.float32)


def _gather_group(layer, arrays):
    """{name: array} of every rank of this rank's expert-parallel group -> {name: [R, ...]}.

    Collective over the world (one AllGather of the arrays' float32 bits, so nothing is
    rounded); every rank must call it with arrays of the same names and shapes.
    """
    group = layer.group
    if group.size == 1:
        return {name: array[None] for name, array in arrays.items()}
    from .comm.window import world_all_gather
    flat = np.concatenate([np.asarray(array, np.float32).reshape(-1) for array in arrays.values()])
    gathered = world_all_gather(flat.view(np.int32))                        # [world, n] int32
    rows = np.ascontiguousarray(gathered[list(group.group_ranks)]).view(np.float32)  # [R, n]
    out, offset = {}, 0
    for name, array in arrays.items():
        out[name] = rows[:, offset:offset + array.size].reshape(
            (group.size,) + array.shape).astype(array.dtype)
        offset += array.size
    return out


def _replicated(group, name, stacked):
    """The group's first rank's copy of a replicated weight; warns if the ranks disagree."""
    differing = [group.group_ranks[index] for index in range(1, len(stacked))
                 if not np.array_equal(stacked[index], stacked[0])]
    if differing:
        logger.warning("hf_state_dict: ranks %s hold a different %s than rank %d of their "
                       "expert-parallel group (replicated weights should be equal: see "
                       "ExpertParallelGradReducer); exporting rank %d's", differing, name,
                       group.group_ranks[0], group.group_ranks[0])
    return stacked[0]


def export_hf_moe_state_dict(layer, prefix=""):
    """The whole layer's weights in Hugging Face naming, gathered from the expert-parallel group.

    See :meth:`MoELayer.hf_state_dict`: {prefix + name: NumPy array}, the names of
    ``model.hf_weight_names`` (table in this module's docstring), every expert of the layer.
    """
    model = layer.config.model
    if not isinstance(prefix, str):
        raise TypeError(f"hf_state_dict: prefix = {prefix!r}; expected a string, e.g. "
                        f"'model.layers.3.mlp.'")
    local = {"gate.weight": _parameter_array(layer.router.gate_weight),
             "experts.gate_up": _parameter_array(layer.experts.gate_up_weight),  # [E_loc, H, 2F]
             "experts.down": _parameter_array(layer.experts.down_weight)}        # [E_loc, F, H]
    if layer.config.router.expert_bias:
        local["gate.e_score_correction_bias"] = layer.router.expert_bias.asnumpy().astype(
            np.float32)
    if layer.shared_expert is not None:
        local["shared_experts.gate_up"] = _parameter_array(
            layer.shared_expert.gate_up_weight)[0]
        local["shared_experts.down"] = _parameter_array(layer.shared_expert.down_weight)[0]
        if model.shared_expert_gate:
            local["shared_expert_gate.weight"] = np.ascontiguousarray(
                layer.shared_expert.gate_weight.asnumpy().astype(np.float32).T)   # [1, H]
    stacked = _gather_group(layer, local)
    replicated = {name: _replicated(layer.group, name, value) for name, value in stacked.items()
                  if name not in ("experts.gate_up", "experts.down")}
    # Slot p of the group holds logical expert placement.slot_experts[p] (replicas are equal
    # copies: the first one of each expert is exported).
    slot_experts = list(layer.placement.slot_experts)
    first_slot = [slot_experts.index(expert) for expert in range(model.num_experts)]
    gate_up = stacked["experts.gate_up"]                                    # [R, S, H, 2F]
    gate_up = gate_up.reshape((-1,) + gate_up.shape[2:])[first_slot]        # [E, H, 2F]
    down = stacked["experts.down"]
    down = down.reshape((-1,) + down.shape[2:])[first_slot]                 # [E, F, H]

    exported = {}

    def put(key, array):
        exported[prefix + _family_key(key, model.hf_weight_names)] = np.ascontiguousarray(array)

    def put_swiglu(name, gate_up_rows, down_rows):
        """gate [F, H], up [F, H], down [H, F] from [H, 2F] and [F, H]."""
        width = gate_up_rows.shape[1] // 2
        put(f"{name}.gate_proj.weight", gate_up_rows[:, :width].T)
        put(f"{name}.up_proj.weight", gate_up_rows[:, width:].T)
        put(f"{name}.down_proj.weight", down_rows.T)

    put("gate.weight", replicated["gate.weight"])
    if "gate.e_score_correction_bias" in replicated:
        put("gate.e_score_correction_bias", replicated["gate.e_score_correction_bias"])
    for index in range(model.num_experts):
        put_swiglu(f"experts.{index}", gate_up[index], down[index])
    if "shared_experts.gate_up" in replicated:
        put_swiglu("shared_experts", replicated["shared_experts.gate_up"],
                   replicated["shared_experts.down"])
    if "shared_expert_gate.weight" in replicated:
        put("shared_expert_gate.weight", replicated["shared_expert_gate.weight"])
    return exported
