"""MoELayer: router -> dispatcher -> experts -> combine (+ shared expert), as one Cell.

Each step follows a :class:`StepPlan` (``layer.plan(num_tokens, phase)``): which dispatcher and
which experts path; ``construct`` runs the plan's path through one short method per path.
"""
from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from .config import MoEConfig
from .experts import GroupedSwiGLUExperts, SharedExpert
from .router import TopKRouter
from .runtime import ascend_backend_active, mindspore_dtype
from .state_dict import export_hf_moe_state_dict, load_hf_moe_state_dict
from .ops.kernel_library import explain_kernel_errors
from .load_balancing.replica_selection import (ReplicaSelector, initial_placement,
                                               replica_gradient_sum)
from .comm.window import host_labels, world_all_gather
from .parallel_state import check_same_config_on_all_ranks, expert_parallel_group
from .dispatcher import check_tokens_fit
from .token_dispatcher import LocalTokenDispatcher

# Experts paths (StepPlan.experts_path):
GROUPED = "grouped"                  # dispatch -> grouped GEMMs -> combine
ROWWISE = "rowwise"                  # deliver -> experts.weighted_sum -> return_rows
EXPERTS_COMBINE = "experts_combine"  # deliver -> experts + return in one kernel


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
    router, quant = config.router, config.dispatch.quant
    if group.size == 1:
        return LocalTokenDispatcher(config.model.num_experts, router.top_k,
                                    router.capacity_factor, quant), None, None
    from .comm.exchange import make_exchange
    from .comm.window_sizing import combine_round_rows, window_slot_bytes
    from .ep_dispatcher import FusedDecodeDispatcher, SparseAllToAllDispatcher
    dispatch = config.dispatch
    exchange = make_exchange(dispatch.max_tokens_per_rank, transport=dispatch.transport,
                             group_ranks=list(group.group_ranks), rank=group.rank,
                             slot_bytes=window_slot_bytes(config), timeout_s=dispatch.timeout_s,
                             attach_timeout_s=dispatch.attach_timeout_s)
    prefill = SparseAllToAllDispatcher(group, router.top_k, router.capacity_factor,
                                       dispatch.max_tokens_per_rank, exchange,
                                       combine_round_rows(config, group.size), quant=quant,
                                       hidden_size=config.model.hidden_size,
                                       row_dtype=mindspore_dtype(config.runtime.dtype))
    window = getattr(exchange, "window", None)
    decode = None
    if window is not None and router.capacity_factor is None:
        decode = FusedDecodeDispatcher(group, router.top_k, dispatch.max_tokens_per_rank, window,
                                       quant)
    return prefill, decode, window


def _ranks_per_host(host_of_rank):
    """Ranks per host for plan_placement: None for one host (or unknown hosts), else the size of
    the equal, consecutive host blocks (None if the hosts are not laid out that way)."""
    if host_of_rank is None or len(set(host_of_rank)) == 1:
        return None
    per_host = host_of_rank.count(host_of_rank[0])
    blocks = [host_of_rank[i:i + per_host] for i in range(0, len(host_of_rank), per_host)]
    return per_host if all(len(set(block)) == 1 and len(block) == per_host
                           for block in blocks) else None


@dataclass(frozen=True)
class StepPlan:
    """How one step runs (decided at compile time: shapes are static).

    - ``phase``: "prefill" or "decode" (after resolving None);
    - ``dispatcher``: "prefill" (``layer.prefill_dispatcher``: the sparse all-to-all-v, or the
      local dispatcher at EP = 1) or "decode" (``layer.decode_dispatcher``: the fused decode
      operators);
    - ``experts_path``: "grouped", "rowwise" or "experts_combine" (module constants);
    - ``quantized``: whether token rows travel to the experts as per-token int8
      (``dispatch.quant: int8``; every path, both phases).
    """

    phase: str
    dispatcher: str
    experts_path: str
    quantized: bool = False


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
        self.prefill_dispatcher, self.decode_dispatcher, self._window = _build_dispatchers(
            config, self.group)
        # Where the experts live (load_balancing): the placement of logical experts in this
        # group's physical slots, and, under expert parallelism, the Cell that sends each
        # (token, expert) pair to one of the expert's replicas (slot ids are what dispatchers see).
        self.placement = initial_placement(model.num_experts, self.group.size,
                                           self.group.experts_per_rank)
        self.host_of_rank = (None if self.group.size == 1 or self._window is not None
                             else host_labels(self.group.group_ranks))
        self.replica_selector = (ReplicaSelector(self.placement, self.group.group_rank,
                                                 self.host_of_rank)
                                 if self.group.size > 1 else None)
        # Training with replicas: which slots of the world hold each local slot's expert (the
        # gradient reducer sums them, grad_sync.py).
        self.replica_grad_sum = (
            Parameter(Tensor(replica_gradient_sum(self.placement, self.group.group_rank,
                                                  self.group.world_size)),
                      name="replica_grad_sum", requires_grad=False)
            if self.group.redundant_experts else None)
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
        # What the step plans can choose from (asked of the dispatchers' capabilities once).
        # Row-wise steps, without per-pair buffers, need the row-wise experts kernel (CPU) and a
        # dropless layer (capacity drops belong to the grouping step).
        rowwise_experts = (router.capacity_factor is None
                           and self.experts.weighted_sum_kernel is not None)
        prefill_can = self.prefill_dispatcher.capabilities
        self.prefill_rowwise = rowwise_experts and prefill_can.rowwise
        self.prefill_experts_combine = self.prefill_rowwise and prefill_can.experts_combine
        self.decode_rowwise = (rowwise_experts and self.decode_dispatcher is not None
                               and self.decode_dispatcher.capabilities.rowwise
                               and config.dispatch.decode_layout == "rowwise")
        self.recompute_experts = config.runtime.recompute_experts
        if self.recompute_experts and not self.prefill_rowwise:
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
        # The expert-load window (load_stats): row s % W holds forward s's routed_per_expert.
        self.load_window = config.parallel.load_window_steps
        self.load_history = statistic("load_history", np.zeros(
            (self.load_window, model.num_experts), np.float32))                       # [W, E]
        self.load_steps = statistic("load_steps", np.zeros(1, np.int32))   # forwards since reset
        self.slot_load_history = statistic("slot_load_history", np.zeros(
            (self.load_window, len(self.local_expert_indices)), np.float32))          # [W, S]

    @property
    def local_expert_indices(self):
        """The logical expert of each of this rank's slots (its part of ``placement``)."""
        return list(self.placement.rank_experts(self.group.group_rank))

    def __call__(self, x, *args, **kwargs):
        """Checks ``x`` and ``phase`` before any work (see :meth:`check_input`); under expert
        parallelism a refused input also fails the window's next step, so that the peers waiting
        in it raise at once with this rank's reason instead of after ``dispatch.timeout_s``."""
        try:
            num_tokens = self.check_input(x.shape, x.dtype)
            self._plan_fields(num_tokens, args[0] if args else kwargs.get("phase"))
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
        :meth:`plan`), "decode" (inference only: the fused decode operators, FusedDeliver
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
        _, dispatcher_name, path, _ = self._plan_fields(tokens.shape[0], phase)
        dispatcher = self._dispatcher_named(dispatcher_name)
        routed_input = tokens.astype(self.compute_dtype)                           # [T, H]
        slot_ids = (expert_ids if self.replica_selector is None
                    else self.replica_selector(expert_ids))                        # [T, K]
        if path == GROUPED:
            output, tokens_per_expert, num_dropped = self._grouped_step(
                dispatcher, routed_input, slot_ids, routing_weights)
        elif path == EXPERTS_COMBINE:
            output, tokens_per_expert, num_dropped = self._experts_combine_step(
                dispatcher, routed_input, slot_ids, routing_weights)
        else:
            output, tokens_per_expert, num_dropped = self._rowwise_step(
                dispatcher, routed_input, slot_ids, routing_weights)
        output = output.astype(ms.float32)
        if self.shared_expert is not None:
            output = output + self.shared_expert(tokens)
        output = self.aux_loss_scaler(output, aux_loss + z_loss)

        ops.assign(self.last_tokens_per_expert, tokens_per_expert)
        ops.assign(self.last_routed_per_expert, routed_per_expert)
        ops.assign(self.last_num_dropped, num_dropped)
        ops.assign(self.last_aux_loss, aux_loss)
        ops.assign(self.last_z_loss, z_loss)
        self._record_load(routed_per_expert, tokens_per_expert)
        return output.reshape(input_shape).astype(x.dtype)

    def _record_load(self, routed_per_expert, tokens_per_expert):
        """Writes this forward's routed_per_expert [E] and the rows this rank's slots received
        [S] into the load window's next row (no communication: the ranks are summed by
        :meth:`load_stats`)."""
        row = self.load_steps % self.load_window                                  # [1]
        ops.scatter_update(self.load_history, row, routed_per_expert.reshape(1, -1))
        ops.scatter_update(self.slot_load_history, row,
                           tokens_per_expert.astype(ms.float32).reshape(1, -1))
        ops.assign_add(self.load_steps, ops.ones((1,), ms.int32))

    def _grouped_step(self, dispatcher, x, expert_ids, routing_weights):
        """dispatch -> grouped experts -> combine: (y [T, H], tokens_per_expert, num_dropped)."""
        rows, tokens_per_expert, num_dropped, handle = dispatcher.dispatch(
            x, expert_ids, routing_weights)                                        # [N, H]
        expert_out = self.experts(rows, tokens_per_expert)                         # [N, H]
        return dispatcher.combine(expert_out, handle), tokens_per_expert, num_dropped

    def _rowwise_step(self, dispatcher, x, expert_ids, routing_weights):
        """deliver -> experts.weighted_sum -> return_rows (dropless). In inference, int8 rows
        stay quantized until the experts read them."""
        rows, local_ids, weights, row_counts, route = dispatcher.deliver(
            x, expert_ids, routing_weights, not self.training)                     # [N, H]
        partial, tokens_per_expert = self.experts.weighted_sum(
            rows, local_ids, weights, row_counts)                                  # [N, H]
        output = dispatcher.return_rows(partial, row_counts, route)                # [T, H]
        return output, tokens_per_expert, ops.zeros((1,), ms.int32)

    def _experts_combine_step(self, dispatcher, x, expert_ids, routing_weights):
        """deliver -> the experts and the return in one kernel (inference, dropless; int8 rows
        stay quantized until the experts read them)."""
        rows, local_ids, weights, row_counts, route = dispatcher.deliver(
            x, expert_ids, routing_weights, not self.training)                     # [N, H]
        output, tokens_per_expert = dispatcher.experts_combine(
            rows, local_ids, weights, row_counts, route, self.experts.gate_up_weight,
            self.experts.down_weight)                                              # [T, H]
        return output, tokens_per_expert, ops.zeros((1,), ms.int32)

    def plan(self, num_tokens, phase=None) -> StepPlan:
        """How a step of ``num_tokens`` tokens per rank in ``phase`` runs, in the Cell's current
        training mode: the dispatcher and experts path of every step, from one rule.

        - "grouped": training (unless ``runtime.recompute_experts``), capacity factors, devices
          without the row-wise experts kernel (Ascend), and the decode operators with
          ``dispatch.decode_layout: grouped``;
        - "rowwise": decode through the fused row-wise operators, training with
          ``runtime.recompute_experts``, and prefill inference at EP = 1, without a
          shared-memory window, or where the fused kernel would hold more memory;
        - "experts_combine": prefill inference over the shared-memory window.

        "decode" goes through the prefill dispatcher where the layer has none for decode (EP = 1,
        a capacity factor, no shared-memory window, or outside CANN's limits on Ascend).
        Raises ValueError for a phase that is not "prefill", "decode" or None, and for "decode"
        in training."""
        return StepPlan(*self._plan_fields(num_tokens, phase))

    def _plan_fields(self, num_tokens, phase):
        """(phase, dispatcher, experts path, quantized) as plain values, for ``construct``
        (GRAPH_MODE cannot build dataclasses) and :meth:`plan`."""
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
            return (phase, "decode", ROWWISE if self.decode_rowwise else GROUPED,
                    self.decode_dispatcher.quantized)
        quantized = self.prefill_dispatcher.quantized
        if not self.prefill_rowwise or (self.training and not self.recompute_experts):
            return phase, "prefill", GROUPED, quantized
        if not self.training and self.prefill_experts_combine:
            return phase, "prefill", EXPERTS_COMBINE, quantized
        return phase, "prefill", ROWWISE, quantized

    def dispatcher_for(self, num_tokens, phase=None):
        """The dispatcher Cell of :meth:`plan`: ``prefill_dispatcher`` or ``decode_dispatcher``."""
        return self._dispatcher_named(self.plan(num_tokens, phase).dispatcher)

    def _dispatcher_named(self, name):
        """StepPlan.dispatcher ("prefill" or "decode") -> the dispatcher Cell."""
        return self.decode_dispatcher if name == "decode" else self.prefill_dispatcher

    def experts_path(self, num_tokens, phase=None):
        """The experts path of :meth:`plan`: "grouped", "rowwise" or "experts_combine"."""
        return self.plan(num_tokens, phase).experts_path

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

        - ``tokens_per_expert`` [local slots]: rows each of this rank's expert slots computed
          (after capacity drops; all experts when expert_parallel is 1; the logical expert of
          each slot is ``local_expert_indices``);
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

    def load_stats(self):
        """Expert load over the last ``parallel.load_window_steps`` forwards, summed over every
        rank of the world (the expert-parallel group and its data-parallel replicas).

        Under msrun a collective: every rank must call it together (same as
        :meth:`update_expert_bias`); the step itself records without communication. Returns
        the dict of :func:`mindspore_moe_ep.load_balancing.load_stats_from_window`:
        ``tokens_per_expert`` [E], ``tokens_per_expert_per_step`` [S, E] (oldest first),
        ``rank_loads`` [R] (the rows each rank's slots received), their max/mean
        (``rank_load_max_over_mean``, ``expert_load_max_over_mean``), ``window_steps``,
        ``window_capacity``, ``total_steps``, this rank's ``local_tokens_per_expert`` [E],
        ``expert_parallel``, ``data_parallel`` and ``slot_experts`` (the placement: the logical
        expert of each of the group's R x S slots). Forwards in eval mode count too.
        """
        from .load_balancing import load_stats_from_window
        local = np.rint(self.load_history.asnumpy()).astype(np.int64)               # [W, E]
        local_slots = np.rint(self.slot_load_history.asnumpy()).astype(np.int64)    # [W, S]
        steps = int(self.load_steps.asnumpy()[0])
        total, slot_history = local, local_slots[None]                               # [1, W, S]
        if self.group.world_size > 1:
            gathered = world_all_gather(np.concatenate(
                [[steps], local.reshape(-1), local_slots.reshape(-1)]))
            if (gathered[:, 0] != steps).any():  # the same on every rank: all raise together
                raise RuntimeError(f"load_stats: the ranks recorded different numbers of "
                                   f"forwards {gathered[:, 0].tolist()} since the last reset; "
                                   f"call the layer and reset_load_stats on every rank")
            total = gathered[:, 1:1 + local.size].sum(axis=0).reshape(local.shape)
            slot_history = gathered[:, 1 + local.size:].reshape(
                -1, self.group.size, *local_slots.shape).sum(axis=0)                 # [R, W, S]
        stats = load_stats_from_window(total, local, steps, self.group.size,
                                       self.group.world_size // self.group.size, slot_history)
        stats["slot_experts"] = list(self.placement.slot_experts)
        return stats

    def reset_load_stats(self):
        """Empties the load window (this rank only; call it on every rank, e.g. after each
        :meth:`load_stats`, for windows that do not overlap)."""
        for history in (self.load_history, self.slot_load_history):
            history.set_data(Tensor(np.zeros(history.shape, np.float32)))
        self.load_steps.set_data(Tensor(np.zeros(1, np.int32)))

    def rebalance(self, placement=None, optimizer=None):
        """Moves the experts (and replicas) to a new placement; a collective over the world.

        ``placement``: a :class:`~mindspore_moe_ep.load_balancing.Placement` of this layer's
        ``model.num_experts`` experts over the group's R ranks x S slots, or None to plan one
        with :func:`~mindspore_moe_ep.load_balancing.plan_placement` from :meth:`load_stats`
        (so every rank plans the same). Expert weights travel through the layer's row exchange
        (load_balancing/relocation.py), with ``optimizer``'s per-weight states when given
        (Parameters cloned from the weights with a prefix, as AdamW's moments), then the replica
        tables are swapped in place: static shapes, nothing recompiles, and the layer computes
        the same function. Starts a new load window. Returns the placement in force.

        Every rank must pass the same placement; if any rank's is refused or differs, every rank
        raises naming the ranks, and a failed move (a dead peer: the exchange's timeout) raises
        too. Either way the old placement stays in force.
        """
        from .load_balancing import (Placement, agree_on_placement, move_slot_arrays,
                                     optimizer_states, plan_placement, relocation_sources)
        if self.group.size == 1:
            raise ValueError("rebalance() needs parallel.expert_parallel > 1: with one rank "
                             "every expert is local and there is nothing to move")
        try:
            if placement is None:
                placement = plan_placement(self.load_stats()["tokens_per_expert"],
                                           self.group.size, self.group.experts_per_rank,
                                           _ranks_per_host(self.host_of_rank))
            if not isinstance(placement, Placement):
                raise TypeError(f"rebalance(placement): expected a load_balancing.Placement "
                                f"(e.g. from plan_placement) or None, got "
                                f"{type(placement).__name__}")
            placement.check()
            sources, refusal = relocation_sources(self.placement, placement), None
        except (TypeError, ValueError) as error:
            refusal = f"{type(error).__name__}: {error}"
        agree_on_placement(None if refusal else placement, refusal, self.group.num_slots,
                           world_all_gather)
        weights = [self.experts.gate_up_weight, self.experts.down_weight]
        states = optimizer_states(optimizer, weights)
        arrays = [param.asnumpy().astype(np.float32) for param in weights + states]  # exact
        exchange = self.prefill_dispatcher.exchange

        def exchange_rows(rows, counts):
            received, received_counts = exchange(Tensor(rows), Tensor(counts))
            return received.asnumpy(), received_counts.asnumpy()
        try:
            with explain_kernel_errors():
                moved = move_slot_arrays(arrays, sources, self.group.group_rank, exchange_rows,
                                         self.config.dispatch.max_tokens_per_rank,
                                         self.hidden_size)
        except RuntimeError as error:
            raise RuntimeError(f"rebalance: moving the expert weights failed, the old placement "
                               f"stays in force (the exchange cannot be used again: close the "
                               f"layer and build a new one on every rank): {error}") from error
        for param, array in zip(weights + states, moved):
            param.set_data(Tensor(array).astype(param.dtype))
        self.replica_selector.set_placement(placement)
        if self.replica_grad_sum is not None:
            self.replica_grad_sum.set_data(Tensor(replica_gradient_sum(
                placement, self.group.group_rank, self.group.world_size)))
        self.placement = placement
        self.reset_load_stats()
        return placement

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
