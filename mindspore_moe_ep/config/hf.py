"""Importing a :class:`MoEConfig` from a Hugging Face ``config.json`` dict.

Three families of MoE block are understood, recognised by ``model_type`` or, for another model
type, by a key only that family uses:

- DeepSeek: ``deepseek_v2``, ``deepseek_v3``, ``kimi_k2`` (Kimi K2 ships that model_type for
  the DeepSeek-V3 architecture, ``DeepseekV3ForCausalLM``) and ``glm4_moe`` (GLM-4.5 / 4.6:
  DeepSeek-V3 routing with a shared expert); key ``n_routed_experts``.
- Qwen-MoE: ``qwen2_moe``, ``qwen3_moe``; keys ``moe_intermediate_size`` and ``num_experts``
  (or ``num_local_experts``, as newer transformers write it).
- Mixtral: ``mixtral``; key ``num_local_experts``.

Only the MoE layer is imported; keys about attention, dense layers, the vocabulary and so on are
ignored.

Absent keys. transformers' config classes do not write every key of DeepSeek's original
``config.json`` files: for ``deepseek_v3``, ``kimi_k2`` and ``glm4_moe`` its modelling code
always scores with a sigmoid and selects with ``e_score_correction_bias`` and the group
top-2-sum rule (DeepSeek's ``scoring_func: sigmoid``, ``topk_method: noaux_tc``) and has no
auxiliary loss; for ``deepseek_v2`` it always scores with a softmax, computes no auxiliary loss,
and ``topk_method`` defaults to ``greedy``. When such a key is absent (or null), the import takes
what transformers does for that ``model_type`` and logs one line (INFO, this module's logger)
naming the key and the value taken; so do the keys with a documented default (e.g.
``routed_scaling_factor`` -> 1.0). The other keys that decide sizes or routing
(``norm_topk_prob``, ``n_group`` ...) are written by every transformers config class, so a dict
without them was not written by transformers: they are required, not guessed. Where the
``model_type`` does not settle a key (a model type recognised by its keys only), it is required
too.

DeepSeek-V2 and ``norm_topk_prob``: DeepSeek's original DeepSeek-V2 code renormalises the top-k
weights when ``norm_topk_prob`` is true (and top-k > 1), and then does not apply
``routed_scaling_factor``; transformers' DeepseekV2 never renormalises and always applies it.
The import follows DeepSeek's code, the one the checkpoints were trained with, and logs a warning
when the two differ (``norm_topk_prob`` true and ``num_experts_per_tok`` > 1), naming the
overrides that give transformers' arithmetic instead.

Qwen2-MoE's shared expert is scaled by a learned sigmoid gate (``shared_expert_gate``); the import
sets ``model.shared_expert_gate`` whenever a Qwen-MoE config has a shared expert. The import sets
``model.hf_weight_names`` to the family's weight naming, which ``MoELayer.hf_state_dict`` uses.
"""
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from .errors import ConfigError, located_in
from .schema import FIELD_PATHS, MoEConfig, apply_overrides, resolve_field_name

HF_SOURCE = "<Hugging Face config>"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Imported:
    """One MoEConfig value and the Hugging Face key it came from (None for a fixed value).

    ``taken_for_absent``: the key was absent (or null) and the value is the one taken for it.
    """

    value: Any
    hf_key: Optional[str] = None
    taken_for_absent: bool = False


Translation = Dict[str, _Imported]
"""Bare MoEConfig field name -> imported value."""


@dataclass(frozen=True)
class _ModelType:
    """What a known ``model_type`` settles.

    ``absent``: Hugging Face key -> (value, why) for keys its transformers config class does not
    write (the modelling code hard-codes the behaviour) or writes with a default the import uses.
    """

    family: str
    absent: Mapping[str, Tuple[Any, str]] = field(default_factory=dict)


def _deepseek_v3_routing(code: str) -> Dict[str, Tuple[Any, str]]:
    """The keys transformers' DeepSeek-V3-style router (in ``code``) hard-codes."""
    return {
        "scoring_func": ("sigmoid", f"transformers' {code} router always scores with a sigmoid"),
        "topk_method": ("noaux_tc", f"transformers' {code} router always selects with "
                                    f"e_score_correction_bias and the group top-2-sum rule"),
        "aux_loss_alpha": (0.0, f"transformers' {code} has no auxiliary loss"),
    }


_MODEL_TYPES: Dict[str, _ModelType] = {
    "deepseek_v2": _ModelType("DeepSeek", {
        "scoring_func": ("softmax", "transformers' DeepseekV2 gate always scores with a softmax"),
        "topk_method": ("greedy", "the default of transformers' DeepseekV2Config"),
        "aux_loss_alpha": (0.0, "transformers' DeepseekV2 computes no auxiliary loss"),
    }),
    "deepseek_v3": _ModelType("DeepSeek", _deepseek_v3_routing("DeepseekV3")),
    "kimi_k2": _ModelType("DeepSeek", _deepseek_v3_routing("DeepseekV3 (Kimi K2's architecture)")),
    "glm4_moe": _ModelType("DeepSeek", _deepseek_v3_routing("Glm4Moe")),
    "mixtral": _ModelType("Mixtral"),
    "qwen2_moe": _ModelType("Qwen-MoE"),
    "qwen3_moe": _ModelType("Qwen-MoE"),
}
"""Every model_type the importer knows (README.md and the unknown-model_type error list them)."""

_WEIGHT_NAMES = {"DeepSeek": "deepseek", "Mixtral": "mixtral", "Qwen-MoE": "qwen"}


class _Reader:
    """Reads the keys of one Hugging Face config dict, naming the key and family in errors."""

    def __init__(self, hf: Mapping[str, Any], family: str, model_type: Optional[_ModelType],
                 model_type_name: Any):
        self.hf = hf
        self.family = family
        self.model_type = model_type
        self.model_type_name = model_type_name

    @property
    def known_model_type(self) -> Optional[str]:
        """The model_type, if the importer knows it (None for a family told by its keys)."""
        return self.model_type_name if self.model_type is not None else None

    def _absent(self, key: str, value: Any, why: str) -> _Imported:
        """``value`` for the absent ``key``, logged."""
        who = (f"model_type {self.model_type_name!r}" if self.model_type is not None
               else f"{self.family} config")
        logger.info("config_from_hf: %s sets no '%s'; taking %r (%s)", who, key, value, why)
        return _Imported(value, key, taken_for_absent=True)

    def _settled(self, key: str) -> Optional[Tuple[Any, str]]:
        return None if self.model_type is None else self.model_type.absent.get(key)

    def required(self, key: str, allowed: str) -> _Imported:
        """The value of ``key``; if absent or null, what the model_type settles, else an error."""
        if self.hf.get(key) is not None:
            return _Imported(self.hf[key], key)
        settled = self._settled(key)
        if settled is not None:
            return self._absent(key, *settled)
        unsettled = (f"; model_type {self.model_type_name!r} does not settle it"
                     if self.model_type is not None else
                     f"; model_type {self.model_type_name!r} is not one the importer knows, so "
                     f"it settles nothing")
        null = " (it is null)" if key in self.hf else ""
        raise ConfigError(f"missing key '{key}'{null}, which {self.family} configs need "
                          f"({allowed}){unsettled}")

    def optional(self, key: str, default: Any, why: str) -> _Imported:
        """The value of ``key``; if absent or null, what the model_type settles, else
        ``default`` (``why`` says what it means); both logged."""
        if self.hf.get(key) is not None:
            return _Imported(self.hf[key], key)
        settled = self._settled(key)
        return self._absent(key, *(settled if settled is not None else (default, why)))

    def choice(self, key: str, supported: Sequence[Any]) -> _Imported:
        """The value of the required ``key``, which must be one of ``supported``."""
        expected = f"one of {', '.join(repr(value) for value in supported)}"
        imported = self.required(key, expected)
        if imported.value not in supported:
            raise ConfigError(f"{key} = {imported.value!r} is not supported; expected {expected}")
        return imported


def _aux_loss(coeff: _Imported, loss_type: _Imported) -> Translation:
    """The aux-loss fields: ``loss_type`` with ``coeff`` if the coefficient is non-zero."""
    if coeff.value == 0:
        return {"aux_loss_type": _Imported("none", coeff.hf_key, coeff.taken_for_absent),
                "aux_loss_coeff": _Imported(0.0, coeff.hf_key, coeff.taken_for_absent)}
    return {"aux_loss_type": loss_type, "aux_loss_coeff": coeff}


_SIZE = "an integer > 0"
_TOP_K = "an integer >= 1"
_BOOL = "true or false"


def _from_deepseek(hf: _Reader) -> Translation:
    """DeepSeek-V2/V3 (and GLM-4.5, Kimi K2): ``topk_method`` decides the group limit and bias."""
    method = hf.choice("topk_method", ("greedy", "group_limited_greedy", "noaux_tc"))
    top_k = hf.required("num_experts_per_tok", _TOP_K)
    norm = hf.required("norm_topk_prob", _BOOL)
    scale = hf.optional("routed_scaling_factor", 1.0, "no scaling of the routing weights")
    translation = {
        "hidden_size": hf.required("hidden_size", _SIZE),
        "num_experts": hf.required("n_routed_experts", _SIZE),
        "expert_ffn_size": hf.required("moe_intermediate_size", _SIZE),
        "num_shared_experts": hf.optional("n_shared_experts", 0, "no shared experts"),
        "top_k": top_k,
        "score_func": hf.choice("scoring_func", ("softmax", "sigmoid")),
        "norm_topk_prob": norm,
        "routed_scaling_factor": scale,
        "expert_bias": _Imported(method.value == "noaux_tc", method.hf_key,
                                 method.taken_for_absent),
    }
    if method.value == "greedy":
        translation["num_groups"] = _Imported(1, method.hf_key, method.taken_for_absent)
    else:
        groups = "an integer >= 1, the number of expert groups of topk_method " \
                 f"{method.value!r}"
        translation["num_groups"] = hf.required("n_group", groups)
        translation["topk_groups"] = hf.required(
            "topk_group", f"an integer >= 1, the groups a token may use with topk_method "
                          f"{method.value!r}")
        translation["group_score"] = _Imported(
            "max" if method.value == "group_limited_greedy" else "top2_sum", method.hf_key,
            method.taken_for_absent)
    if (hf.known_model_type == "deepseek_v2" and method.value != "noaux_tc"
            and norm.value is True and isinstance(top_k.value, int) and top_k.value > 1):
        logger.warning(
            "config_from_hf: model_type 'deepseek_v2' with norm_topk_prob = true and "
            "num_experts_per_tok = %d: following DeepSeek's original DeepSeek-V2 code, the top-k "
            "weights are renormalised to sum to 1 and routed_scaling_factor (%r) is not applied "
            "(router.routed_scaling_factor = 1.0); transformers' DeepseekV2 never renormalises "
            "and always applies routed_scaling_factor. For transformers' arithmetic pass the "
            "overrides norm_topk_prob=False, routed_scaling_factor=%r",
            top_k.value, scale.value, scale.value)
        translation["routed_scaling_factor"] = _Imported(1.0, norm.hf_key)
    alpha = hf.optional("aux_loss_alpha", 0.0, "no auxiliary loss")
    if alpha.value != 0:
        per_sequence = hf.choice("seq_aux", (True, False))
        loss_type = _Imported("seq" if per_sequence.value else "switch", per_sequence.hf_key)
        translation.update(_aux_loss(alpha, loss_type))
    return translation


def _from_mixtral(hf: _Reader) -> Translation:
    """Mixtral: softmax over the top-k logits, i.e. softmax scores renormalised over the top k."""
    return {
        "hidden_size": hf.required("hidden_size", _SIZE),
        "num_experts": hf.required("num_local_experts", _SIZE),
        "expert_ffn_size": hf.required("intermediate_size", _SIZE),
        "top_k": hf.required("num_experts_per_tok", _TOP_K),
        "score_func": _Imported("softmax"),
        "norm_topk_prob": _Imported(True),
        **_aux_loss(hf.optional("router_aux_loss_coef", 0.0, "no auxiliary loss"),
                    _Imported("switch")),
    }


def _qwen_num_experts(hf: _Reader) -> _Imported:
    """``num_experts``, or ``num_local_experts`` where newer transformers write that instead."""
    if hf.hf.get("num_experts") is None and hf.hf.get("num_local_experts") is not None:
        return hf.required("num_local_experts", _SIZE)
    return hf.required("num_experts", f"{_SIZE}; 'num_local_experts' is read in its place")


def _from_qwen_moe(hf: _Reader) -> Translation:
    """Qwen2-MoE / Qwen3-MoE: softmax routing, optionally one sigmoid-gated shared expert."""
    translation = {
        "hidden_size": hf.required("hidden_size", _SIZE),
        "num_experts": _qwen_num_experts(hf),
        "expert_ffn_size": hf.required("moe_intermediate_size", _SIZE),
        "top_k": hf.required("num_experts_per_tok", _TOP_K),
        "score_func": _Imported("softmax"),
        "norm_topk_prob": hf.required("norm_topk_prob", _BOOL),
        **_aux_loss(hf.optional("router_aux_loss_coef", 0.0, "no auxiliary loss"),
                    _Imported("switch")),
    }
    shared_size = hf.optional("shared_expert_intermediate_size", 0, "no shared expert")
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


def _family(hf: Mapping[str, Any]) -> str:
    """The family of ``hf``: by ``model_type`` if known, else by a distinctive key."""
    model_type = hf.get("model_type")
    if isinstance(model_type, str) and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type].family
    if "n_routed_experts" in hf:
        return "DeepSeek"
    if "moe_intermediate_size" in hf and ("num_experts" in hf or "num_local_experts" in hf):
        return "Qwen-MoE"
    if "num_local_experts" in hf:
        return "Mixtral"
    raise ConfigError(
        f"cannot tell the MoE family of model_type = {model_type!r}; supported are model_type "
        f"{', '.join(repr(name) for name in _MODEL_TYPES)}, or configs with the key "
        f"'n_routed_experts' (DeepSeek), 'moe_intermediate_size' with 'num_experts' or "
        f"'num_local_experts' (Qwen-MoE), or 'num_local_experts' (Mixtral)")


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> MoEConfig:
    """Translate a Hugging Face MoE config dict into a validated :class:`MoEConfig`.

    ``hf`` is a parsed ``config.json`` or ``AutoConfig.from_pretrained(...).to_dict()``. Keys
    that transformers' config class for the ``model_type`` does not write take what its modelling
    code does, logged (see the module docstring). ``overrides`` are keyed like
    :meth:`MoEConfig.replace` (e.g. ``expert_parallel=4``) and applied before validation, so they
    can also fill in or fix what the import produced. A value the importer copied that turns out
    invalid is reported with its Hugging Face key.
    """
    with located_in(HF_SOURCE):
        if not isinstance(hf, Mapping):
            raise ConfigError(f"expected a dict (the parsed config.json), got "
                              f"{type(hf).__name__}")
        family = _family(hf)
        model_type = hf.get("model_type")
        known = _MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
        translation = _FAMILIES[family](_Reader(hf, family, known, model_type))
        translation["hf_weight_names"] = _Imported(_WEIGHT_NAMES[family])
        imported = {name: item.value for name, item in translation.items()}
        tree = apply_overrides(apply_overrides({}, imported), overrides)
    origins = {FIELD_PATHS[name]: (f"the value taken for the absent Hugging Face key "
                                   f"'{item.hf_key}'" if item.taken_for_absent else
                                   f"Hugging Face key '{item.hf_key}'")
               for name, item in translation.items() if item.hf_key is not None}
    origins.update({resolve_field_name(name): "override" for name in overrides})
    try:
        return MoEConfig.from_dict(tree, source=HF_SOURCE)
    except ConfigError as error:
        if error.key not in origins:
            raise
        raise ConfigError(f"{error.message} (from {origins[error.key]})", source=HF_SOURCE,
                          key=error.key) from None
