"""Importing a :class:`MoEConfig` from a Hugging Face ``config.json`` dict.

Three families are understood, recognised by ``model_type`` or, failing that, by a key only
that family uses:

- DeepSeek-V2 / V3 (``deepseek_v2``, ``deepseek_v3``; key ``n_routed_experts``),
- Mixtral (``mixtral``; key ``num_local_experts``),
- Qwen2-MoE / Qwen3-MoE (``qwen2_moe``, ``qwen3_moe``; keys ``num_experts`` and
  ``moe_intermediate_size``).

Only the MoE layer is imported; keys about attention, dense layers, the vocabulary and so on are
ignored. The keys that decide the routing arithmetic (DeepSeek's ``scoring_func``,
``topk_method`` and ``norm_topk_prob``, Qwen's ``norm_topk_prob``) must be present: their
transformers defaults differ between model versions, so they are not guessed.

Qwen2-MoE's shared expert is scaled by a learned sigmoid gate (``shared_expert_gate``); the import
sets ``model.shared_expert_gate`` whenever a Qwen-MoE config has a shared expert.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from .errors import ConfigError, located_in
from .schema import FIELD_PATHS, MoEConfig, apply_overrides, resolve_field_name

HF_SOURCE = "<Hugging Face config>"


@dataclass(frozen=True)
class _Imported:
    """One MoEConfig value and the Hugging Face key it came from (None for a fixed value)."""

    value: Any
    hf_key: Optional[str] = None


Translation = Dict[str, _Imported]
"""Bare MoEConfig field name -> imported value."""


class _Reader:
    """Reads the keys of one Hugging Face config dict, naming the key and family in errors."""

    def __init__(self, hf: Mapping[str, Any], family: str):
        self.hf = hf
        self.family = family

    def required(self, key: str) -> _Imported:
        """The value of ``key``, which must be present and not null."""
        if self.hf.get(key) is None:
            raise ConfigError(f"missing key '{key}', which {self.family} configs need")
        return _Imported(self.hf[key], key)

    def optional(self, key: str, default: Any) -> _Imported:
        """The value of ``key``, or ``default`` when it is absent or null."""
        value = self.hf.get(key)
        return _Imported(default if value is None else value, key)

    def choice(self, key: str, supported: Sequence[Any]) -> _Imported:
        """The value of the required ``key``, which must be one of ``supported``."""
        imported = self.required(key)
        if imported.value not in supported:
            raise ConfigError(f"{key} = {imported.value!r} is not supported; expected one of "
                              f"{', '.join(repr(value) for value in supported)}")
        return imported


def _aux_loss(coeff: _Imported, loss_type: _Imported) -> Translation:
    """The aux-loss fields: ``loss_type`` with ``coeff`` if the coefficient is non-zero."""
    if coeff.value == 0:
        return {"aux_loss_type": _Imported("none", coeff.hf_key),
                "aux_loss_coeff": _Imported(0.0, coeff.hf_key)}
    return {"aux_loss_type": loss_type, "aux_loss_coeff": coeff}


def _from_deepseek(hf: _Reader) -> Translation:
    """DeepSeek-V2/V3: ``topk_method`` decides the group limit and the expert bias."""
    method = hf.choice("topk_method", ("greedy", "group_limited_greedy", "noaux_tc"))
    translation = {
        "hidden_size": hf.required("hidden_size"),
        "num_experts": hf.required("n_routed_experts"),
        "expert_ffn_size": hf.required("moe_intermediate_size"),
        "num_shared_experts": hf.optional("n_shared_experts", 0),
        "top_k": hf.required("num_experts_per_tok"),
        "score_func": hf.choice("scoring_func", ("softmax", "sigmoid")),
        "norm_topk_prob": hf.required("norm_topk_prob"),
        "routed_scaling_factor": hf.optional("routed_scaling_factor", 1.0),
        "expert_bias": _Imported(method.value == "noaux_tc", method.hf_key),
    }
    if method.value == "greedy":
        translation["num_groups"] = _Imported(1, method.hf_key)
    else:
        translation["num_groups"] = hf.required("n_group")
        translation["topk_groups"] = hf.required("topk_group")
        translation["group_score"] = _Imported(
            "max" if method.value == "group_limited_greedy" else "top2_sum", method.hf_key)
    alpha = hf.optional("aux_loss_alpha", 0.0)
    if alpha.value != 0:
        per_sequence = hf.choice("seq_aux", (True, False))
        loss_type = _Imported("seq" if per_sequence.value else "switch", per_sequence.hf_key)
        translation.update(_aux_loss(alpha, loss_type))
    return translation


def _from_mixtral(hf: _Reader) -> Translation:
    """Mixtral: softmax over the top-k logits, i.e. softmax scores renormalised over the top k."""
    return {
        "hidden_size": hf.required("hidden_size"),
        "num_experts": hf.required("num_local_experts"),
        "expert_ffn_size": hf.required("intermediate_size"),
        "top_k": hf.required("num_experts_per_tok"),
        "score_func": _Imported("softmax"),
        "norm_topk_prob": _Imported(True),
        **_aux_loss(hf.optional("router_aux_loss_coef", 0.0), _Imported("switch")),
    }


def _from_qwen_moe(hf: _Reader) -> Translation:
    """Qwen2-MoE / Qwen3-MoE: softmax routing, optionally one sigmoid-gated shared expert."""
    translation = {
        "hidden_size": hf.required("hidden_size"),
        "num_experts": hf.required("num_experts"),
        "expert_ffn_size": hf.required("moe_intermediate_size"),
        "top_k": hf.required("num_experts_per_tok"),
        "score_func": _Imported("softmax"),
        "norm_topk_prob": hf.required("norm_topk_prob"),
        **_aux_loss(hf.optional("router_aux_loss_coef", 0.0), _Imported("switch")),
    }
    shared_size = hf.optional("shared_expert_intermediate_size", 0)
    if shared_size.value != 0:
        translation["num_shared_experts"] = _Imported(1, shared_size.hf_key)
        translation["shared_expert_ffn_size"] = shared_size
        translation["shared_expert_gate"] = _Imported(True, shared_size.hf_key)
    return translation


_FAMILIES: Dict[str, Callable[[_Reader], Translation]] = {
    "DeepSeek": _from_deepseek,
    "Mixtral": _from_mixtral,
    "Qwen-MoE": _from_qwen_moe,
}
_FAMILY_OF_MODEL_TYPE = {
    "deepseek_v2": "DeepSeek", "deepseek_v3": "DeepSeek", "mixtral": "Mixtral",
    "qwen2_moe": "Qwen-MoE", "qwen3_moe": "Qwen-MoE",
}


def _family(hf: Mapping[str, Any]) -> str:
    """The family of ``hf``: by ``model_type`` if known, else by a distinctive key."""
    model_type = hf.get("model_type")
    if isinstance(model_type, str) and model_type in _FAMILY_OF_MODEL_TYPE:
        return _FAMILY_OF_MODEL_TYPE[model_type]
    if "n_routed_experts" in hf:
        return "DeepSeek"
    if "num_local_experts" in hf:
        return "Mixtral"
    if "num_experts" in hf and "moe_intermediate_size" in hf:
        return "Qwen-MoE"
    raise ConfigError(
        f"cannot tell the MoE family of model_type = {model_type!r}; supported are model_type "
        f"{', '.join(repr(name) for name in _FAMILY_OF_MODEL_TYPE)}, or configs with the key "
        f"'n_routed_experts' (DeepSeek), 'num_local_experts' (Mixtral) or 'num_experts' and "
        f"'moe_intermediate_size' (Qwen-MoE)")


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> MoEConfig:
    """Translate a Hugging Face MoE config dict into a validated :class:`MoEConfig`.

    ``overrides`` are keyed like :meth:`MoEConfig.replace` (e.g. ``expert_parallel=4``) and
    applied before validation, so they can also fill in or fix what the import produced. A value
    the importer copied that turns out invalid is reported with its Hugging Face key.
    """
    with located_in(HF_SOURCE):
        if not isinstance(hf, Mapping):
            raise ConfigError(f"expected a dict (the parsed config.json), got "
                              f"{type(hf).__name__}")
        family = _family(hf)
        translation = _FAMILIES[family](_Reader(hf, family))
        imported = {name: item.value for name, item in translation.items()}
        tree = apply_overrides(apply_overrides({}, imported), overrides)
    origins = {FIELD_PATHS[name]: f"Hugging Face key '{item.hf_key}'"
               for name, item in translation.items() if item.hf_key is not None}
    origins.update({resolve_field_name(name): "override" for name in overrides})
    try:
        return MoEConfig.from_dict(tree, source=HF_SOURCE)
    except ConfigError as error:
        if error.key not in origins:
            raise
        raise ConfigError(f"{error.message} (from {origins[error.key]})", source=HF_SOURCE,
                          key=error.key) from None
