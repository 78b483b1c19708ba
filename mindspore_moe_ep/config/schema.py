"""The typed configuration of an expert-parallel MoE layer, and its validation.

Each YAML section is a frozen dataclass. Every field is declared once, with :func:`option`, and
carries its meaning and numeric lower bound in the field metadata; the type checks, the error
messages and the key tables of ``docs/config_reference.md`` (:func:`reference_markdown`) are all
derived from those declarations, so they cannot drift apart.

Validation happens on construction: a section checks its own fields, :class:`MoEConfig` checks the
rules that span sections. Every problem raises :class:`ConfigError` naming the ``section.field``
path, the value and what is allowed.

This module is pure Python: it must not import mindspore.
"""
import dataclasses
import difflib
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Dict, Literal, Mapping, Optional, Sequence, Tuple, Type, Union
from typing import get_args, get_origin

from .errors import ConfigError, located_in

ScoreFunc = Literal["softmax", "sigmoid"]
AuxLossType = Literal["none", "switch", "seq"]
GroupScore = Literal["top2_sum", "max"]
Transport = Literal["auto", "shm", "two_level", "allgather"]
DecodeLayout = Literal["rowwise", "grouped"]
DispatchQuant = Literal["none", "int8"]
ExecutionMode = Literal["graph", "pynative"]
DType = Literal["float32", "float16", "bfloat16"]
HFWeightNames = Literal["deepseek", "qwen", "mixtral"]


def option(doc: str, *, default: Any = MISSING, ge: Optional[float] = None,
           gt: Optional[float] = None) -> Any:
    """Declare a config field: its meaning, its default (none given = required) and lower bound.

    ``ge`` is an inclusive lower bound and ``gt`` an exclusive one; both apply to numbers only.
    """
    return field(default=default, metadata={"doc": doc, "ge": ge, "gt": gt})


# ----------------------------------------------------------------------------------------------
# Checking one value against its field declaration
# ----------------------------------------------------------------------------------------------

def _split_optional(annotation: Any) -> Tuple[Any, bool]:
    """The annotation without ``Optional[...]``, and whether it allowed None."""
    if get_origin(annotation) is Union:
        kinds = [kind for kind in get_args(annotation) if kind is not type(None)]
        return kinds[0], len(kinds) < len(get_args(annotation))
    return annotation, False


def allowed_values(spec: dataclasses.Field) -> str:
    """What a field accepts, in words, e.g. ``an integer >= 1 or null``."""
    kind, nullable = _split_optional(spec.type)
    if get_origin(kind) is Literal:
        text = "one of " + ", ".join(repr(choice) for choice in get_args(kind))
    elif kind is bool:
        text = "true or false"
    else:
        text = {int: "an integer", float: "a number", str: "a string"}[kind]
        if spec.metadata["ge"] is not None:
            text += f" >= {spec.metadata['ge']:g}"
        if spec.metadata["gt"] is not None:
            text += f" > {spec.metadata['gt']:g}"
    return text + " or null" if nullable else text


def _has_type(value: Any, kind: Any) -> bool:
    """Whether ``value`` is of the (non-optional) annotated type; bools are not numbers here."""
    if get_origin(kind) is Literal:
        return any(type(value) is type(choice) and value == choice for choice in get_args(kind))
    if kind is bool:
        return type(value) is bool
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _within_bounds(value: Any, spec: dataclasses.Field) -> bool:
    """Whether a value of the right type respects the field's lower bound (NaN never does)."""
    ge, gt = spec.metadata["ge"], spec.metadata["gt"]
    return (ge is None or value >= ge) and (gt is None or value > gt)


def _hint(value: Any, kind: Any) -> str:
    """A parenthesised hint for the common mistakes behind a rejected value, or ''."""
    if isinstance(value, bool) and kind in (int, float):
        return " (true/false is not a number)"
    if isinstance(value, str) and kind in (int, float) and _parses_as_float(value):
        mantissa, _, exponent = value.lower().partition("e")
        if exponent and "." not in mantissa:
            return f" (YAML reads {value} as a string; write {mantissa}.0e{exponent})"
        return " (a quoted number is a string; remove the quotes)"
    if isinstance(value, str) and get_origin(kind) is Literal:
        return suggestion(value, [str(choice) for choice in get_args(kind)])
    return ""


def _parses_as_float(text: str) -> bool:
    """Whether Python reads ``text`` as a number."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def checked_value(path: str, value: Any, spec: dataclasses.Field) -> Any:
    """``value`` if the field allows it (ints widened to float for float fields); else raise."""
    kind, nullable = _split_optional(spec.type)
    if value is None and nullable:
        return None
    if _has_type(value, kind) and _within_bounds(value, spec):
        return float(value) if kind is float else value
    raise ConfigError(f"{path} = {value!r} is not allowed; expected {allowed_values(spec)}"
                      f"{_hint(value, kind)}", key=path)


def suggestion(name: str, candidates: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the candidate nearest to ``name``, or '' if none is close."""
    nearest = difflib.get_close_matches(str(name), list(candidates), n=1)
    return f" (did you mean '{nearest[0]}'?)" if nearest else ""


def _require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition`` holds (for rules between fields).

    The error has no single ``key``: it is about the combination, not about where one value
    was set.
    """
    if not condition:
        raise ConfigError(message)


# ----------------------------------------------------------------------------------------------
# The sections
# ----------------------------------------------------------------------------------------------

class _Section:
    """What every section does on construction: check each field, then the rules between them."""

    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        for spec in fields(self):
            path = f"{self.SECTION}.{spec.name}"
            object.__setattr__(self, spec.name, checked_value(path, getattr(self, spec.name), spec))
        self._check_consistency()

    def _check_consistency(self) -> None:
        """Rules between fields of this section (none by default)."""


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Sizes of the MoE layer."""

    SECTION: ClassVar[str] = "model"

    hidden_size: int = option("Width of the token vectors entering and leaving the layer.", gt=0)
    num_experts: int = option("Number of routed experts in the layer, over all ranks.", gt=0)
    expert_ffn_size: int = option("Intermediate size of each routed SwiGLU expert.", gt=0)
    num_shared_experts: int = option(
        "Number of shared experts, which see every token; together they act as one dense SwiGLU "
        "of intermediate size `shared_ffn_size`, added to the routed output.", default=0, ge=0)
    shared_expert_ffn_size: Optional[int] = option(
        "Intermediate size of the combined shared experts; null means "
        "`expert_ffn_size * num_shared_experts`.", default=None, gt=0)
    shared_expert_gate: bool = option(
        "Scale the shared experts' output per token by sigmoid(x . w), w a learned [H] vector "
        "(Qwen2-MoE's `shared_expert_gate`); false adds it unscaled (DeepSeek).", default=False)
    hf_weight_names: HFWeightNames = option(
        "Hugging Face naming of the weights that `MoELayer.hf_state_dict` exports: deepseek "
        "(DeepSeek-V2/V3, GLM-4.5, Kimi K2: `experts.{i}.gate_proj` / `up_proj` / `down_proj`, "
        "`shared_experts.*`), qwen (Qwen2/3-MoE: the same expert names, `shared_expert.*`) or "
        "mixtral (`experts.{i}.w1` / `w3` / `w2`). `config_from_hf` sets it from the model's "
        "family; `load_hf_state_dict` reads all three namings whatever it says.",
        default="deepseek")

    @property
    def shared_ffn_size(self) -> int:
        """Effective intermediate size of the combined shared experts (0 if there are none)."""
        if self.shared_expert_ffn_size is not None:
            return self.shared_expert_ffn_size
        return self.expert_ffn_size * self.num_shared_experts

    def _check_consistency(self) -> None:
        _require(self.shared_expert_ffn_size is None or self.num_shared_experts > 0,
                 f"model.shared_expert_ffn_size = {self.shared_expert_ffn_size} is set but "
                 f"model.num_shared_experts = 0; set model.num_shared_experts or remove "
                 f"model.shared_expert_ffn_size")
        _require(not self.shared_expert_gate or self.num_shared_experts > 0,
                 "model.shared_expert_gate = true needs a shared expert, but "
                 "model.num_shared_experts = 0; set model.num_shared_experts or remove "
                 "model.shared_expert_gate")


@dataclass(frozen=True)
class RouterConfig(_Section):
    """How each token chooses its experts, and the load-balancing losses."""

    SECTION: ClassVar[str] = "router"

    top_k: int = option("Number of experts each token is sent to.", ge=1)
    score_func: ScoreFunc = option(
        "How gate logits become expert scores: a softmax over the experts, or an independent "
        "sigmoid per expert (DeepSeek-V3).", default="softmax")
    num_groups: int = option(
        "Number of equal expert groups for group-limited routing (DeepSeek); 1 = no group limit.",
        default=1, ge=1)
    topk_groups: Optional[int] = option(
        "Number of groups a token may pick its experts from; null means all `num_groups`.",
        default=None, ge=1)
    group_score: GroupScore = option(
        "How a group is scored for group-limited routing: top2_sum (the sum of its two best "
        "expert scores, DeepSeek-V3 `noaux_tc`) or max (its best score, DeepSeek-V2 "
        "`group_limited_greedy`).", default="top2_sum")
    norm_topk_prob: bool = option(
        "Renormalise each token's top-k scores to sum to 1 (before `routed_scaling_factor`).",
        default=True)
    routed_scaling_factor: float = option(
        "Multiplier applied to the routing weights of the routed experts.", default=1.0, gt=0)
    expert_bias: bool = option(
        "Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores "
        "for choosing experts only; the routing weights use the unbiased scores.", default=False)
    bias_update_rate: float = option(
        "Step by which the expert bias moves towards balance after each training step "
        "(used only when `expert_bias` is true).", default=0.001, ge=0)
    aux_loss_type: AuxLossType = option(
        "Load-balancing auxiliary loss: none, switch (over the batch, Switch Transformer) or seq "
        "(per sequence, DeepSeek).", default="none")
    aux_loss_coeff: float = option(
        "Weight of the auxiliary loss; must be > 0 exactly when `aux_loss_type` is not none.",
        default=0.0, ge=0)
    z_loss_coeff: float = option(
        "Weight of the router z-loss (mean squared log-sum-exp of the gate logits); 0 = off.",
        default=0.0, ge=0)
    capacity_factor: Optional[float] = option(
        "Expert capacity = ceil(capacity_factor * tokens * top_k / num_experts) rows; rows beyond "
        "it are dropped. null = dropless.", default=None, gt=0)

    @property
    def effective_topk_groups(self) -> int:
        """Number of groups a token may pick from, with null resolved to ``num_groups``."""
        return self.num_groups if self.topk_groups is None else self.topk_groups

    @property
    def dropless(self) -> bool:
        """Whether every routed (token, expert) pair is kept (no capacity limit)."""
        return self.capacity_factor is None

    def _check_consistency(self) -> None:
        _require(self.effective_topk_groups <= self.num_groups,
                 f"router.topk_groups = {self.topk_groups} exceeds router.num_groups = "
                 f"{self.num_groups}")
        _require(self.aux_loss_type == "none" or self.aux_loss_coeff > 0,
                 f"router.aux_loss_type = {self.aux_loss_type!r} needs router.aux_loss_coeff > 0 "
                 f"(got {self.aux_loss_coeff}); set the coefficient or use aux_loss_type 'none'")
        _require(self.aux_loss_type != "none" or self.aux_loss_coeff == 0,
                 f"router.aux_loss_coeff = {self.aux_loss_coeff} has no effect while "
                 f"router.aux_loss_type = 'none'; set router.aux_loss_type to 'switch' or 'seq'")


@dataclass(frozen=True)
class ParallelConfig(_Section):
    """How the experts and the data are spread over the ranks."""

    SECTION: ClassVar[str] = "parallel"

    expert_parallel: int = option(
        "Number of ranks the experts are spread over; each holds num_experts / expert_parallel.",
        default=1, ge=1)
    data_parallel: Optional[int] = option(
        "Number of expert-parallel groups; null means world_size / expert_parallel, decided at "
        "run time.", default=None, ge=1)
    load_window_steps: int = option(
        "Forward steps each MoE layer keeps in its expert-load window: a ring buffer of the "
        "tokens per expert of the last load_window_steps forwards, updated in the step without "
        "communication and summed over all ranks only by layer.load_stats() (a collective; "
        "docs/load_balancing.md).", default=100, ge=1)
    redundant_experts: int = option(
        "Extra physical expert slots in each expert-parallel group, spread evenly over its ranks "
        "(a multiple of expert_parallel): each rank holds (num_experts + redundant_experts) / "
        "expert_parallel slots, and the extra ones hold replicas of hot experts (placed by "
        "layer.rebalance() from the load statistics; at start the lowest expert ids). A token "
        "routed to a replicated expert goes to one of its replicas; in training the gradient "
        "reducer sums each expert's replicas so they take one update. Dropless only "
        "(docs/load_balancing.md).", default=0, ge=0)
    rebalance_interval: int = option(
        "The model scripts (scripts/train.py, scripts/generate.py) call rebalance() on every MoE "
        "layer after every rebalance_interval steps, placing the experts (and replicas) by the "
        "load of the window since the last rebalance; 0 = never.", default=0, ge=0)

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size for ``world_size`` ranks, checking that the sizes fit."""
        _require(world_size % self.expert_parallel == 0,
                 f"world size {world_size} (msrun --worker_num) is not divisible by "
                 f"parallel.expert_parallel = {self.expert_parallel}")
        data_parallel = world_size // self.expert_parallel
        _require(self.data_parallel in (None, data_parallel),
                 f"parallel.data_parallel = {self.data_parallel} * parallel.expert_parallel = "
                 f"{self.expert_parallel} does not match the world size {world_size}")
        return data_parallel


@dataclass(frozen=True)
class DispatchConfig(_Section):
    """Static buffer sizes, path selection and token exchange between ranks."""

    SECTION: ClassVar[str] = "dispatch"

    max_tokens_per_rank: int = option(
        "Most tokens one rank may route in one step; sizes the static dispatch buffers "
        "(like CANN's globalBs / ep).", default=4096, gt=0)
    decode_token_threshold: int = option(
        "Steps with at most this many tokens per rank take the decode path (the fused decode "
        "operators, see decode_layout; a layer without them, i.e. EP = 1, a capacity factor, "
        "no shared-memory window, or outside CANN's limits on Ascend, runs the prefill path "
        "anyway); larger steps take the prefill path (all-to-all-v).", default=64, ge=0)
    decode_layout: DecodeLayout = option(
        "Decode over shared memory (CPU kernels): rowwise delivers each token row once per rank "
        "that holds one of its experts and runs the experts row by row (FusedDeliver -> "
        "ExpertsWeightedSum -> FusedReturn: fewer bytes moved); grouped hands the experts one "
        "row per (token, expert) pair grouped by expert (FusedDispatch -> grouped experts -> "
        "FusedCombine: the contract of CANN's operators, which Ascend always uses).",
        default="rowwise")
    transport: Transport = option(
        "How ranks exchange tokens: shm (shared-memory buffers between processes on one host), "
        "two_level (a group spanning hosts with several of its ranks on each: shared memory "
        "between the ranks of a host, MindSpore's AllGather for the rows that cross hosts), "
        "allgather (collective communication only), or auto (shm if every group is on one "
        "host, else two_level if it fits, else allgather; chosen at run time).",
        default="auto")
    timeout_s: float = option(
        "Seconds a rank waits for its peers in one exchange before failing.", default=60.0, gt=0)
    attach_timeout_s: float = option(
        "Seconds a rank waits at start-up for its peers' communication buffers to appear.",
        default=300.0, gt=0)
    window_slot_bytes: Optional[int] = option(
        "Bytes of shared memory per ordered pair of ranks (the pre-allocated communication "
        "window); null sizes it for a whole step (max_tokens_per_rank rows) up to 1 MiB, or, "
        "for a dropless layer, up to 4 MiB so that the partial sums the fused decode Return (or "
        "Combine) sends back in a whole step fit and are summed in place. Larger payloads "
        "travel by single copy (process_vm_readv) or, where that is not allowed, in slot-sized "
        "chunks. At least 64 (one cache line).",
        default=None, ge=64)
    combine_round_tokens: int = option(
        "Prefill inference over shared memory: received rows per source rank in one round of "
        "the fused experts + combine kernel, which runs the experts and returns their partial "
        "sums round by round instead of all at once. Its buffers (two rounds of "
        "expert_parallel x this rows, and the output) replace the unfused path's partial sums "
        "(expert_parallel x max_tokens_per_rank rows), so the layer uses it only where they are "
        "smaller. Smaller rounds hold less memory; larger ones give the experts' GEMMs more "
        "rows (about expert_parallel x this x top_k / num_experts per expert and round).",
        default=512, gt=0)
    quant: DispatchQuant = option(
        "How token rows travel to the experts: none (in runtime.dtype) or int8 (per token: "
        "symmetric int8 with one float32 scale max|x| / 127 per row, quantized once at the "
        "source and dequantized into the experts' input; CANN's quant mode 2). Every dispatch "
        "path, both phases; the return trip (combine) stays in runtime.dtype. Training gets a "
        "straight-through gradient (the backward exchange is not quantized). A row holding NaN "
        "or infinity is refused. Error and speed: docs/quantization.md.", default="none")


@dataclass(frozen=True)
class RuntimeConfig(_Section):
    """MindSpore execution settings."""

    SECTION: ClassVar[str] = "runtime"

    mode: ExecutionMode = option(
        "MindSpore execution mode: graph (compiled GRAPH_MODE) or pynative (eager).",
        default="graph")
    dtype: DType = option("Data type of the layer's parameters and activations.",
                          default="float32")
    seed: int = option("Seed for weight initialisation and synthetic inputs.", default=0, ge=0)
    host_blocking_run: bool = option(
        "CPU: run MindSpore's host tasks on the calling thread (sets MS_DEV_HOST_BLOCKING_RUN=1) "
        "instead of a worker thread that the caller busy-waits for. With several ranks per "
        "host the busy wait takes the cores of the ranks that compute (figures: "
        "docs/performance.md). Already set when the package is imported "
        "(host_defaults.py; MOE_EP_HOST_DEFAULTS=0 turns that off); false makes setup_runtime "
        "undo the import's setting (effective before MindSpore first queues work). An "
        "MS_DEV_HOST_BLOCKING_RUN already in the environment wins.", default=True)
    recompute_experts: bool = option(
        "Training: run the routed experts in one kernel without buffers of one row per (token, "
        "expert) pair, as inference always does, and recompute them in the backward pass. The "
        "forward pass then keeps only the delivered token rows for backward, instead of four "
        "per-pair buffers sized for the worst case (R * max_tokens_per_rank * top_k rows); the "
        "experts' forward runs twice (its cost: docs/performance.md). Needs a dropless layer "
        "(router.capacity_factor null) and the CPU kernels.", default=False)


@dataclass(frozen=True)
class WorkloadConfig(_Section):
    """The synthetic work a run performs: prefill, decode and training steps."""

    SECTION: ClassVar[str] = "workload"

    batch_size: int = option("Sequences per rank in each prefill and training step.",
                             default=2, gt=0)
    prefill_seq_len: int = option("Tokens per sequence in prefill and training steps.",
                                  default=128, gt=0)
    decode_steps: int = option("Number of decode steps after the prefill.", default=4, ge=0)
    decode_batch_size: int = option("Tokens per rank in each decode step.", default=8, gt=0)
    train_steps: int = option("Number of training steps (forward, backward, optimiser update).",
                              default=1, ge=0)
    learning_rate: float = option("Optimiser learning rate for the training steps.",
                                  default=1e-3, gt=0)


@dataclass(frozen=True)
class LanguageModelConfig(_Section):
    """The decoder-only language model built around MoE layers (`mindspore_moe_ep.models`)."""

    SECTION: ClassVar[str] = "lm"

    vocab_size: int = option(
        "Tokens in the vocabulary; 256 for the byte-level corpus (token = byte; byte 0 ends a "
        "document and is the end-of-sequence token).", default=256, gt=0)
    num_layers: int = option("Decoder layers (attention + FFN each).", default=2, gt=0)
    dense_layers: int = option(
        "The first `dense_layers` layers use a dense SwiGLU FFN, the others (at least one) "
        "MoELayer (DeepSeek-V3: 3 of 61).", default=1, ge=0)
    dense_ffn_size: Optional[int] = option(
        "Intermediate size of the dense SwiGLU FFN; null means `model.expert_ffn_size * "
        "(router.top_k + model.num_shared_experts)`, the MoE layer's active width "
        "(DeepSeek-V3: 18432 = 2048 * 9).", default=None, gt=0)
    num_heads: int = option("Attention (query) heads.", default=4, gt=0)
    num_kv_heads: Optional[int] = option(
        "Key/value heads (grouped-query attention: each serves num_heads / num_kv_heads query "
        "heads); null means num_heads.", default=None, gt=0)
    head_dim: int = option(
        "Width of one attention head (even: rotary embedding rotates pairs); independent of "
        "model.hidden_size, as in Qwen3 and DeepSeek-V3.", default=16, gt=0)
    max_seq_len: int = option(
        "Longest sequence, prompt plus generated tokens: the length of the static KV cache and "
        "of the rotary tables.", default=128, gt=0)
    max_batch_size: int = option(
        "Sequences per rank in one generation batch: the rows of the static KV cache.",
        default=4, gt=0)
    rope_theta: float = option("Base of the rotary position embedding's frequencies.",
                               default=10000.0, gt=0)
    norm_eps: float = option("Epsilon of the RMSNorm layers.", default=1e-6, gt=0)

    @property
    def kv_heads(self) -> int:
        """Key/value heads, with null resolved to ``num_heads``."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def _check_consistency(self) -> None:
        _require(self.dense_layers < self.num_layers,
                 f"lm.dense_layers = {self.dense_layers} leaves no MoE layer in lm.num_layers = "
                 f"{self.num_layers}; use fewer dense layers")
        _require(self.kv_heads <= self.num_heads and self.num_heads % self.kv_heads == 0,
                 f"lm.num_heads = {self.num_heads} is not a multiple of lm.num_kv_heads = "
                 f"{self.kv_heads}; each key/value head serves the same number of query heads")
        _require(self.head_dim % 2 == 0,
                 f"lm.head_dim = {self.head_dim} is odd; rotary embedding needs an even width")


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Language-model training (`scripts/train.py`): batch, AdamW, schedule, checkpoints."""

    SECTION: ClassVar[str] = "train"

    steps: int = option("Optimiser steps.", default=100, ge=0)
    global_batch_size: int = option(
        "Sequences per step over all ranks, split evenly between them (a multiple of the world "
        "size).", default=16, gt=0)
    seq_len: int = option("Tokens per training sequence (at most lm.max_seq_len).",
                          default=128, gt=0)
    max_learning_rate: float = option("Learning rate after warm-up.", default=3.0e-3, gt=0)
    min_learning_rate: float = option("Learning rate at the end of the cosine decay.",
                                      default=3.0e-4, ge=0)
    warmup_steps: int = option("Steps of linear warm-up from 0 to max_learning_rate.",
                               default=10, ge=0)
    weight_decay: float = option("AdamW's decoupled weight decay (not on norms and biases).",
                                 default=0.1, ge=0)
    grad_clip_norm: Optional[float] = option(
        "Clip the global gradient norm (over every rank's experts) to this; null = no clipping.",
        default=1.0, gt=0)
    log_every: int = option("Steps between progress lines (and metrics.jsonl records).",
                            default=10, gt=0)
    eval_every: int = option("Steps between validation losses (and at the last step).",
                             default=50, gt=0)
    eval_sequences: int = option(
        "Held-out sequences in one validation loss, over all ranks (a multiple of the world "
        "size).", default=16, gt=0)
    checkpoint_every: Optional[int] = option(
        "Steps between checkpoints (one is always saved at the end); null = only at the end.",
        default=None, gt=0)

    def _check_consistency(self) -> None:
        _require(self.min_learning_rate <= self.max_learning_rate,
                 f"train.min_learning_rate = {self.min_learning_rate} exceeds "
                 f"train.max_learning_rate = {self.max_learning_rate}")


# ----------------------------------------------------------------------------------------------
# The whole configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MoEConfig:
    """The complete, validated configuration: one frozen section per YAML section."""

    model: ModelConfig
    router: RouterConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    lm: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for spec in fields(self):
            section = getattr(self, spec.name)
            if not isinstance(section, spec.type):
                raise ConfigError(f"MoEConfig.{spec.name} must be a {spec.type.__name__}, "
                                  f"got {type(section).__name__}", key=spec.name)
        self._check_consistency()

    def _check_consistency(self) -> None:
        """The rules that span sections; divisibility first, as the later rules rely on it."""
        model, router = self.model, self.router
        experts, groups = model.num_experts, router.num_groups
        _require(experts % groups == 0,
                 f"model.num_experts = {experts} is not divisible by router.num_groups = {groups}; "
                 f"expert groups must be equal in size")
        _require(router.top_k <= experts,
                 f"router.top_k = {router.top_k} exceeds model.num_experts = {experts}")
        selectable = router.effective_topk_groups * (experts // groups)
        _require(router.top_k <= selectable,
                 f"router.top_k = {router.top_k} exceeds the {selectable} experts in the "
                 f"router.topk_groups = {router.effective_topk_groups} groups a token may use "
                 f"({experts // groups} experts per group: model.num_experts = {experts} / "
                 f"router.num_groups = {groups})")
        _require(not (self.runtime.recompute_experts and router.capacity_factor is not None),
                 f"runtime.recompute_experts = true needs a dropless layer, but "
                 f"router.capacity_factor = {router.capacity_factor}; set one of them to "
                 f"false / null")
        _require(self.train.seq_len <= self.lm.max_seq_len,
                 f"train.seq_len = {self.train.seq_len} exceeds lm.max_seq_len = "
                 f"{self.lm.max_seq_len}")
        ranks = self.parallel.expert_parallel
        _require(experts % ranks == 0,
                 f"model.num_experts = {experts} is not divisible by parallel.expert_parallel = "
                 f"{ranks}; every rank must hold the same number of experts")
        redundant = self.parallel.redundant_experts
        _require(redundant % ranks == 0,
                 f"parallel.redundant_experts = {redundant} is not divisible by "
                 f"parallel.expert_parallel = {ranks}; the extra slots are spread evenly over "
                 f"the ranks")
        _require((experts + redundant) // ranks <= experts,
                 f"parallel.redundant_experts = {redundant} gives "
                 f"{(experts + redundant) // ranks} expert slots per rank, more than the "
                 f"{experts} experts (a rank holds at most one replica of each expert): at "
                 f"most {experts * ranks - experts} with expert_parallel = {ranks}")
        _require(redundant == 0 or router.capacity_factor is None,
                 f"parallel.redundant_experts = {redundant} needs a dropless layer, but "
                 f"router.capacity_factor = {router.capacity_factor}; set one of them to 0 / "
                 f"null")

    @property
    def num_local_experts(self) -> int:
        """Number of routed expert slots each rank holds (its experts and replicas)."""
        return ((self.model.num_experts + self.parallel.redundant_experts)
                // self.parallel.expert_parallel)

    @property
    def num_expert_slots(self) -> int:
        """Physical expert slots over an expert-parallel group: experts + redundant replicas."""
        return self.model.num_experts + self.parallel.redundant_experts

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "MoEConfig":
        """Validate a nested ``{section: {field: value}}`` mapping; errors name ``source``."""
        with located_in(source):
            check_keys(data)
            return cls(**{name: _build_section(section, data.get(name))
                          for name, section in SECTIONS.items()})

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        """The nested ``{section: {field: value}}`` form; ``from_dict`` inverts it."""
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "MoEConfig":
        """A re-validated copy with fields replaced; keys are ``top_k`` or ``"router.top_k"``."""
        with located_in("replace()"):
            tree = apply_overrides(self.to_dict(), overrides)
        return MoEConfig.from_dict(tree, source="replace()")


SECTIONS: Dict[str, Type[_Section]] = {spec.name: spec.type for spec in fields(MoEConfig)}
"""The YAML sections, in order, and the dataclass of each."""


def _index_field_paths() -> Dict[str, str]:
    """Map each bare field name to its ``section.field`` path; bare names must be unique."""
    paths: Dict[str, str] = {}
    for section_name, section in SECTIONS.items():
        for spec in fields(section):
            if spec.name in paths:
                raise TypeError(f"field name {spec.name!r} is used by two sections "
                                f"({paths[spec.name]} and {section_name}.{spec.name})")
            paths[spec.name] = f"{section_name}.{spec.name}"
    return paths


FIELD_PATHS: Dict[str, str] = _index_field_paths()
"""Bare field name -> ``section.field`` path, e.g. ``top_k`` -> ``router.top_k``."""


# ----------------------------------------------------------------------------------------------
# Checking and editing nested mappings
# ----------------------------------------------------------------------------------------------

def _type_name(value: Any) -> str:
    """How a YAML value reads in prose: 'a list', 'a string', ..."""
    names = {list: "a list", str: "a string", int: "a number", float: "a number",
             bool: "a boolean"}
    return names.get(type(value), f"a {type(value).__name__}")


def check_keys(tree: Any, *, allow_base: bool = False) -> None:
    """Reject anything but a mapping of known sections, each a mapping of its known keys.

    A section may be null (an empty section). ``allow_base`` admits the ``base`` key of a file.
    Values and required keys are not checked here (see :meth:`MoEConfig.from_dict`).
    """
    if not isinstance(tree, Mapping):
        raise ConfigError(f"the top level must be a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {_type_name(tree)}")
    top_level_keys = [*SECTIONS, "base"] if allow_base else list(SECTIONS)
    for name, body in tree.items():
        if name not in top_level_keys:
            raise ConfigError(f"unknown section '{name}'{suggestion(name, top_level_keys)}",
                              key=str(name))
        if name == "base" or body is None:
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(f"section '{name}' must be a mapping of keys to values, got "
                              f"{_type_name(body)}", key=name)
        known = [spec.name for spec in fields(SECTIONS[name])]
        for key in body:
            if key not in known:
                raise ConfigError(f"unknown key '{name}.{key}'{_suggest_key(name, key, known)}",
                                  key=f"{name}.{key}")


def _suggest_key(section: str, key: Any, known: Sequence[str]) -> str:
    """Suggest the same key of another section, else a close key of this or another section."""
    if key in FIELD_PATHS:
        return f" (did you mean '{FIELD_PATHS[key]}'?)"
    nearest = difflib.get_close_matches(str(key), known, n=1)
    if nearest:
        return f" (did you mean '{section}.{nearest[0]}'?)"
    nearest = difflib.get_close_matches(str(key), list(FIELD_PATHS), n=1)
    return f" (did you mean '{FIELD_PATHS[nearest[0]]}'?)" if nearest else ""


def _build_section(section: Type[_Section], body: Optional[Mapping[str, Any]]) -> _Section:
    """Construct one section from its (key-checked) mapping, naming a missing required key."""
    body = body or {}
    for spec in fields(section):
        if spec.default is MISSING and spec.name not in body:
            path = f"{section.SECTION}.{spec.name}"
            raise ConfigError(f"missing required key '{path}' ({allowed_values(spec)})", key=path)
    return section(**body)


def resolve_field_name(name: str) -> str:
    """The ``section.field`` path of a field named bare (``top_k``) or dotted (``router.top_k``)."""
    if name in FIELD_PATHS:
        return FIELD_PATHS[name]
    if name in FIELD_PATHS.values():
        return name
    candidates = list(FIELD_PATHS.values()) if "." in name else list(FIELD_PATHS)
    raise ConfigError(f"unknown override '{name}'{suggestion(name, candidates)}")


def apply_overrides(tree: Mapping[str, Any],
                    overrides: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """A copy of the nested ``tree`` with each override set (values are checked later)."""
    result = {section: dict(body or {}) for section, body in tree.items()}
    given_as: Dict[str, str] = {}
    for name, value in overrides.items():
        path = resolve_field_name(name)
        if path in given_as:
            raise ConfigError(f"override '{path}' is given twice (as '{given_as[path]}' and "
                              f"'{name}')", key=path)
        given_as[path] = name
        section, key = path.split(".")
        result.setdefault(section, {})[key] = value
    return result


# ----------------------------------------------------------------------------------------------
# Reference documentation
# ----------------------------------------------------------------------------------------------

def _yaml_text(value: Any) -> str:
    """A default value as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def reference_markdown() -> str:
    """The key tables of ``docs/config_reference.md``, generated from the field declarations."""
    lines = []
    for name, section in SECTIONS.items():
        lines += [f"### `{name}`", "", section.__doc__, "",
                  "| key | allowed values | default | meaning |", "| --- | --- | --- | --- |"]
        for spec in fields(section):
            default = ("**required**" if spec.default is MISSING
                       else f"`{_yaml_text(spec.default)}`")
            lines.append(f"| `{name}.{spec.name}` | {allowed_values(spec)} | {default} | "
                         f"{spec.metadata['doc']} |")
        lines.append("")
    return "\n".join(lines)
