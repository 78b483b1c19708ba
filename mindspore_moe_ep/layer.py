"""MoELayer: router -> dispatcher -> experts -> combine (+ shared expert), as one Cell."""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from .config import MoEConfig
from .experts import GroupedSwiGLUExperts, SharedExpert
from .router import TopKRouter
from .runtime import ascend_backend_active, mindspore_dtype
from .state_dict import export_hf_moe_state_dict, load_hf_moe_state_dict
from .parallel_state import check_same_config_on_all_ranks, expert_parallel_group
from .token_dispatcher import LocalTokenDispatcher, check_tokens_fit


def _window_slot_bytes(config):
    """Shared memory per ordered rank pair: by default one full step of the largest message.

    Without fused decode operators the slot holds at most DEFAULT_SLOT_BYTES: large payloads
    travel by single copy (or, where the kernel forbids it, in slot-sized chunks), so a larger
    slot would only cost /dev/shm. With them (a dropless layer), the slot holds a whole step of
    the partial sums that the fused Return (or Combine, with ``decode_layout: grouped``) sends
    back, up to SHARED_ROWS_MAX_SLOT_BYTES: the source then sums its peers' rows where they lie
    in the window instead of copying them (ShareRows).
    """
    if config.dispatch.window_slot_bytes is not None:
        return config.dispatch.window_slot_bytes
    from .comm.window import DEFAULT_SLOT_BYTES, SHARED_ROWS_MAX_SLOT_BYTES
    element_bytes = 4 if config.runtime.dtype == "float32" else 2
    top_k, capacity = config.router.top_k, config.dispatch.max_tokens_per_rank
    # token row + top_k local ids (int32) + top_k routing weights (float32): the fused decode
    # operators' packed message (where they pull, only the ids and weights travel as notes)
    largest_row = config.model.hidden_size * element_bytes + 2 * top_k * 4
    whole_step = capacity * largest_row
    return_step = capacity * config.model.hidden_size * element_bytes  # one partial sum per row
    if config.router.capacity_factor is None and return_step <= SHARED_ROWS_MAX_SLOT_BYTES:
        return max(return_step, min(whole_step, DEFAULT_SLOT_BYTES))
    return min(whole_step, DEFAULT_SLOT_BYTES)


def _combine_round_rows(config, world_size):
    """Rows per source in one round of the fused experts + combine, or None where the unfused
    path holds less: the fused kernel's buffers (a round's partial sums to send and returned
    rows, R x B rows each, and the output, C rows) against the unfused partial sums (R x C)."""
    capacity = config.dispatch.max_tokens_per_rank
    round_rows = min(config.dispatch.combine_round_tokens, capacity)
    if 2 * world_size * round_rows + capacity >= world_size * capacity:
        return None
    return round_rows


def _build_dispatchers(config, group):
    """(prefill dispatcher, decode dispatcher or None, shared-memory window or None) for this
    rank's expert-parallel group.

    EP = 1: the local dispatcher serves both phases. EP > 1: the sparse all-to-all-v for
    prefill/training; the fused decode operators when the group shares a host (shared-memory
    window) and the layer is dropless (the fused operators, like CANN's, never drop).
    On Ascend the dispatchers come from :mod:`mindspore_moe_ep.ascend` (HCCL and CANN).
    """
    if ascend_backend_active():
        from .ascend import build_ascend_dispatchers
        return (*build_ascend_dispatchers(config, group), None)
    router = config.router
    if group.size == 1:
        return LocalTokenDispatcher(config.model.num_experts, router.top_k,
                                    router.capacity_factor), None, None
    from .comm.exchange import make_exchange
    from .ep_dispatcher import FusedDecodeDispatcher, SparseAllToAllDispatcher
    dispatch = config.dispatch
    exchange = make_exchange(dispatch.max_tokens_per_rank, transport=dispatch.transport,
                             group_ranks=list(group.group_ranks), rank=group.rank,
                             slot_bytes=_window_slot_bytes(config), timeout_s=dispatch.timeout_s,
                             attach_timeout_s=dispatch.attach_timeout_s)
    prefill = SparseAllToAllDispatcher(group, router.top_k, router.capacity_factor,
                                       dispatch.max_tokens_per_rank, exchange,
                                       _combine_round_rows(config, group.size))
    window = getattr(exchange, "window", None)
    decode = None
    if window is not None and router.capacity_factor is None:
        decode = FusedDecodeDispatcher(group, router.top_k, dispatch.max_tokens_per_rank, window)
    return prefill, decode, window


class AuxLossScaler(nn.Cell):
    """Identity on the activation that gives ``aux_loss`` a gradient of 1 in backward.

    This is how the router's auxiliary losses join training without changing what the layer
    returns (Megatron-Core's MoEAuxLossAutoScaler): the caller's loss only needs the output.
    """

    def construct(self, activation, aux_loss):
        return activation

    def bprop(self, activation, aux_loss, out, dout):
        return dout, ops.ones_like(aux_loss)


class MoELayer(nn.Cell):
    """A Mixture-of-Experts FFN layer configured by a :class:`MoEConfig`.

    ``layer(x)`` takes [batch, seq, hidden] or [tokens, hidden] and returns the same shape.
    Statistics of the last forward (expert load, dropped rows, losses) are kept in non-trainable
    Parameters so they survive GRAPH_MODE; read them with :meth:`stats`.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MoELayer(config): expected a MoEConfig (see load_config / "
                            f"config_from_hf), got {type(config).__name__}")
        self.config = config
        model, router = config.model, config.router
        dtype = mindspore_dtype(config.runtime.dtype)
        self.hidden_size = model.hidden_size
        self.compute_dtype = dtype
        self.group = expert_parallel_group(config)
        check_same_config_on_all_ranks(config, self.group)
        self.local_expert_indices = self.group.local_expert_indices
        self.prefill_dispatcher, self.decode_dispatcher, self._window = _build_dispatchers(
            config, self.group)
        self.decode_token_threshold = config.dispatch.decode_token_threshold
        self.router = TopKRouter(config, param_dtype=dtype)
        self.experts = GroupedSwiGLUExperts(self.local_expert_indices, model.hidden_size,
                                            model.expert_ffn_size, dtype,
                                            seed=config.runtime.seed)
        self.shared_expert = (SharedExpert(model.hidden_size, model.shared_ffn_size, dtype,
                                           seed=config.runtime.seed,
                                           gated=model.shared_expert_gate)
                              if model.num_shared_experts > 0 else None)
        self.aux_loss_scaler = AuxLossScaler()
        # Row-wise steps, without per-pair buffers: the dispatcher (any with ``deliver``: the
        # local one at EP = 1, the sparse all-to-all-v, the fused decode pair) delivers rows and
        # one kernel runs the experts and sums. In prefill: always in inference, in training with
        # runtime.recompute_experts; dropless only (capacity drops belong to the grouping step).
        self.rowwise_supported = (router.capacity_factor is None
                                  and self.experts.weighted_sum_kernel is not None
                                  and hasattr(self.prefill_dispatcher, "deliver"))
        # Inference over the shared-memory window: experts, return and sum in one kernel.
        self.experts_combine_supported = self.rowwise_supported and getattr(
            self.prefill_dispatcher, "experts_combine_kernel", None) is not None
        # Decode with the fused row-wise pair (FusedDeliver / FusedReturn) around the row-wise
        # experts, unless the config asks for the grouped pair.
        self.decode_rowwise = (self.rowwise_supported
                               and config.dispatch.decode_layout == "rowwise"
                               and hasattr(self.decode_dispatcher, "deliver"))
        self.recompute_experts = config.runtime.recompute_experts
        if self.recompute_experts and not self.rowwise_supported:
            raise ValueError("runtime.recompute_experts = true needs the CPU kernels' fused "
                             "experts (ExpertsWeightedSum); this device has none: set it to false")

        def statistic(name, value):
            return Parameter(Tensor(value), name=name, requires_grad=False)
        self.last_tokens_per_expert = statistic("last_tokens_per_expert",
                                                np.zeros(len(self.local_expert_indices), np.int32))
        self.last_routed_per_expert = statistic("last_routed_per_expert",
                                                np.zeros(model.num_experts, np.float32))
        self.last_num_dropped = statistic("last_num_dropped", np.zeros(1, np.int32))
        self.last_aux_loss = statistic("last_aux_loss", np.zeros((), np.float32))
        self.last_z_loss = statistic("last_z_loss", np.zeros((), np.float32))

    def __call__(self, x, *args, **kwargs):
        """Checks ``x`` and ``phase`` before any work (see :meth:`check_input`); under expert
        parallelism a refused input also fails the window's next step, so that the peers waiting
        in it raise at once with this rank's reason instead of after ``dispatch.timeout_s``."""
        try:
            num_tokens = self.check_input(x.shape, x.dtype)
            self._dispatcher_for(num_tokens, args[0] if args else kwargs.get("phase"))
        except (TypeError, ValueError) as error:
            if self._window is not None:
                self._window.abandon(f"{type(error).__name__}: {error}")
            raise
        return super().__call__(x, *args, **kwargs)

    def check_input(self, shape, dtype):
        """Raises if ``layer(x)`` cannot take an ``x`` of this shape and dtype: [tokens, H] or
        [batch, seq, H] with H = model.hidden_size, a float dtype, and at most
        ``dispatch.max_tokens_per_rank`` tokens (the pre-allocated buffers' rows). Returns the
        number of tokens."""
        if len(shape) not in (2, 3) or shape[-1] != self.hidden_size:
            raise ValueError(f"MoELayer: x has shape {tuple(shape)}; expected [tokens, "
                             f"{self.hidden_size}] or [batch, seq, {self.hidden_size}] "
                             f"(model.hidden_size = {self.hidden_size})")
        if dtype not in (ms.float32, ms.float16, ms.bfloat16):
            raise TypeError(f"MoELayer: x has dtype {dtype}; expected float32, float16 or "
                            f"bfloat16")
        num_tokens = 1
        for size in shape[:-1]:
            num_tokens *= size
        check_tokens_fit(num_tokens, self.config.dispatch.max_tokens_per_rank)
        return num_tokens

    def construct(self, x, phase=None):
        """x: [B, S, H] or [T, H] -> same shape.

        ``phase``: "prefill" (sparse all-to-all-v, differentiable; the experts run on rows
        grouped by expert when training, and row by row without per-pair buffers in inference
        or with ``runtime.recompute_experts``; in inference over the shared-memory window, where
        it holds less memory, the experts, the return and the sum run as one kernel, see
        ``_dispatcher_for``), "decode" (inference only: the fused decode operators, FusedDeliver
        / FusedReturn around the row-wise experts, or FusedDispatch / FusedCombine with
        ``dispatch.decode_layout: grouped``; the prefill path where the layer has none) or None:
        decode when the Cell is not training and this rank has at most
        ``dispatch.decode_token_threshold`` tokens. Under expert parallelism all ranks of a group
        must take the same path in a step: with uneven token counts around the threshold, pass
        ``phase`` explicitly (ranks that take different paths fail at once on every rank, with
        an error naming both operators: the exchange's messages carry the operator's name).
        """
        input_shape = x.shape
        self.check_input(input_shape, x.dtype)  # again here: a model compiled around the layer
        num_sequences = input_shape[0] if len(input_shape) == 3 else 1
        # Shape and elementwise work in float32: MindSpore CPU has no bf16 Reshape / Add.
        tokens = x.astype(ms.float32).reshape(-1, self.hidden_size)               # [T, H]

        expert_ids, routing_weights, aux_loss, z_loss, routed_per_expert = self.router(
            tokens, num_sequences)                                                 # [T, K]
        dispatcher, path = self._dispatcher_for(tokens.shape[0], phase)
        if path == "grouped":
            rows, tokens_per_expert, num_dropped, handle = dispatcher.dispatch(
                tokens.astype(self.compute_dtype), expert_ids, routing_weights)   # [N, H]
            expert_out = self.experts(rows, tokens_per_expert)                     # [N, H]
            output = dispatcher.combine(expert_out, handle)                        # [T, H]
        else:
            rows, local_ids, weights, row_counts, route = dispatcher.deliver(
                tokens.astype(self.compute_dtype), expert_ids, routing_weights)   # [N, H]
            if path == "experts_combine":
                output, tokens_per_expert = dispatcher.experts_combine(
                    rows, local_ids, weights, row_counts, route, self.experts.gate_up_weight,
                    self.experts.down_weight)                                      # [T, H]
            else:
                partial, tokens_per_expert = self.experts.weighted_sum(
                    rows, local_ids, weights, row_counts)                          # [N, H]
                output = dispatcher.return_rows(partial, row_counts, route)        # [T, H]
            num_dropped = ops.zeros((1,), ms.int32)
        output = output.astype(ms.float32)
        if self.shared_expert is not None:
            output = output + self.shared_expert(tokens)
        output = self.aux_loss_scaler(output, aux_loss + z_loss)

        ops.assign(self.last_tokens_per_expert, tokens_per_expert)
        ops.assign(self.last_routed_per_expert, routed_per_expert)
        ops.assign(self.last_num_dropped, num_dropped)
        ops.assign(self.last_aux_loss, aux_loss)
        ops.assign(self.last_z_loss, z_loss)
        return output.reshape(input_shape).astype(x.dtype)

    def _dispatcher_for(self, num_tokens, phase):
        """(dispatcher, experts path) of this step (decided at compile time: shapes are static).

        Paths: "grouped" (dispatch -> grouped experts -> combine: training, capacity factors,
        devices without the row-wise experts kernel (Ascend), the decode operators with
        ``dispatch.decode_layout: grouped``), "rowwise" (the dispatcher's deliver / return_rows
        around ``experts.weighted_sum``: decode through the fused row-wise operators, training
        with ``runtime.recompute_experts``, and prefill inference at EP = 1, without a
        shared-memory window or where the fused kernel would hold more) and "experts_combine"
        (prefill inference over the window: deliver, then the experts, return and sum in one
        kernel, in rounds). "decode" goes through the prefill dispatcher where the layer has no
        decode dispatcher (EP = 1, a capacity factor, no shared-memory window, or outside CANN's
        limits on Ascend)."""
        if phase is None:
            phase = ("decode" if not self.training and num_tokens <= self.decode_token_threshold
                     else "prefill")
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase must be 'prefill', 'decode' or None, got {phase!r}")
        if phase == "decode" and self.training:
            raise ValueError("phase='decode' is inference only (the fused decode operators have "
                             "no gradient): call layer.set_train(False), or use phase='prefill' "
                             "or None in training")
        if phase == "decode" and self.decode_dispatcher is not None:
            if self.decode_rowwise:
                return self.decode_dispatcher, "rowwise"
            return self.decode_dispatcher, "grouped"
        if not self.rowwise_supported or (self.training and not self.recompute_experts):
            return self.prefill_dispatcher, "grouped"
        if not self.training and self.experts_combine_supported:
            return self.prefill_dispatcher, "experts_combine"
        return self.prefill_dispatcher, "rowwise"

    def dispatcher_for(self, num_tokens, phase=None):
        """The dispatcher a step of ``num_tokens`` tokens per rank in ``phase`` goes through (in
        the Cell's current training mode): ``prefill_dispatcher`` or ``decode_dispatcher``."""
        return self._dispatcher_for(num_tokens, phase)[0]

    def experts_path(self, num_tokens, phase=None):
        """How a step of ``num_tokens`` tokens per rank in ``phase`` runs the routed experts
        (in the Cell's current training mode): "grouped", "rowwise" or "experts_combine" (see
        ``_dispatcher_for``)."""
        return self._dispatcher_for(num_tokens, phase)[1]

    def close(self):
        """Releases this rank's shared-memory window now (idempotent; it is also released when
        the layer is garbage-collected). The layer cannot run afterwards. After a failed step,
        close the layer and build a new one on every rank of the group."""
        if self._window is not None:
            self._window.close()

    def route(self, x):
        """Routing decision only: (expert_ids [T, K] int32, routing_weights [T, K] float32)."""
        expert_ids, routing_weights, _, _, _ = self.router(x.reshape(-1, self.hidden_size))
        return expert_ids, routing_weights

    def stats(self):
        """Statistics of the last forward, as plain Python / NumPy values.

        - ``tokens_per_expert`` [local experts]: rows each of this rank's experts computed
          (after capacity drops; all experts when expert_parallel is 1);
        - ``routed_per_expert`` [num_experts]: this rank's tokens' choices, before drops (the
          load the aux loss and the expert-bias update see);
        - ``num_dropped``: (token, expert) pairs dropped by capacity on this rank's experts;
        - ``aux_loss``, ``z_loss``: the router's losses, with their coefficients.
        """
        return {
            "tokens_per_expert": self.last_tokens_per_expert.asnumpy().astype(np.int64),
            "routed_per_expert": self.last_routed_per_expert.asnumpy().astype(np.int64),
            "num_dropped": int(self.last_num_dropped.asnumpy().sum()),
            "aux_loss": float(self.last_aux_loss.asnumpy()),
            "z_loss": float(self.last_z_loss.asnumpy()),
        }

    def update_expert_bias(self, tokens_per_expert=None):
        """One aux-loss-free balancing step from observed load.

        Default load: the last forward's ``routed_per_expert`` summed over all ranks (a
        collective: every rank must call this together), so every rank applies the same step.
        """
        if not self.config.router.expert_bias:
            raise ValueError("update_expert_bias needs router.expert_bias: true in the config")
        if tokens_per_expert is None:
            tokens_per_expert = self.stats()["routed_per_expert"]
            if self.group.world_size > 1:
                from .comm.window import world_all_gather
                tokens_per_expert = world_all_gather(tokens_per_expert).sum(axis=0)
        return self.router.update_expert_bias(tokens_per_expert,
                                              self.config.router.bias_update_rate)

    def load_hf_state_dict(self, state_dict, prefix=""):
        """Load Hugging Face-named NumPy weights (DeepSeek, Qwen-MoE or Mixtral naming; only this
        rank's experts); see state_dict.py."""
        load_hf_moe_state_dict(self, state_dict, prefix)

    def hf_state_dict(self, prefix=""):
        """The whole layer's weights in Hugging Face naming: {prefix + name: NumPy array}.

        Every expert of the layer, gathered from every rank of the expert-parallel group: under
        expert parallelism a collective (every rank of the world calls it; each rank of a group
        gets the same dict). Names follow
        ``model.hf_weight_names`` (the family ``config_from_hf`` imported, DeepSeek-V3 naming by
        default; table in state_dict.py), so ``numpy.savez(path, **layer.hf_state_dict(p))`` is
        read back by ``load_hf_state_dict(numpy.load(path), p)`` and by tools that read that
        family's checkpoints. Each array has its Parameter's dtype: ``runtime.dtype`` for the
        gate, experts and shared expert, except that bfloat16 (which NumPy lacks) comes as
        float32 holding exactly the bfloat16 values; the expert bias
        (``gate.e_score_correction_bias``) and Qwen's ``shared_expert_gate.weight`` are float32,
        as the layer keeps them. Replicated weights come from the group's first rank (a warning
        is logged if another rank's differ).
        """
        return export_hf_moe_state_dict(self, prefix)
