"""Top-k token router: which experts each token goes to, and with what weight.

The router follows DeepSeek-V3 where it generalises Switch/GShard/Mixtral:

1. ``logits = x @ gate_weight.T`` in float32 (the router is always float32: selection is
   sensitive to rounding).
2. ``scores = softmax(logits)`` or ``sigmoid(logits)``.
3. Selection uses ``scores + expert_bias`` (aux-loss-free balancing; the bias never enters the
   weights). With ``num_groups > 1`` only the ``topk_groups`` groups with the highest group score
   are eligible ("group-limited routing", which bounds the number of nodes a token is sent to):
   the sum of the group's two best scores (DeepSeek-V3) or its best score (DeepSeek-V2).
4. ``weights = scores[selected]``, optionally renormalised to sum to 1 (``norm_topk_prob``) and
   multiplied by ``routed_scaling_factor``.

Training signals: the Switch/GShard load-balancing loss (``aux_loss_type: switch``), the
DeepSeek-V3 sequence-wise loss (``seq``), and the ST-MoE router z-loss.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from .config import MoEConfig
from .initializers import TensorId, normal_array


def one_hot(indices, depth):
    """[..., depth] float32 indicator of ``indices`` (int32), built by comparison."""
    return (indices.expand_dims(-1) == ops.arange(depth, dtype=ms.int32)).astype(ms.float32)


class TopKRouter(nn.Cell):
    """Linear gate + scoring + (group-limited) top-k selection + auxiliary losses.

    Returns a plain tuple (GRAPH_MODE cannot build NamedTuples):

    - ``expert_ids``        [tokens, top_k] int32, in descending order of selection score
    - ``routing_weights``   [tokens, top_k] float32
    - ``aux_loss``          [] float32, already multiplied by its coefficient
    - ``z_loss``            [] float32, already multiplied by its coefficient
    - ``tokens_per_expert`` [num_experts] float32, selections before any capacity drop
    """

    def __init__(self, config: MoEConfig, param_dtype=ms.float32):
        super().__init__()
        model, router = config.model, config.router
        self.num_experts = model.num_experts
        self.top_k = router.top_k
        self.score_func = router.score_func
        self.num_groups = router.num_groups
        self.topk_groups = router.effective_topk_groups
        self.experts_per_group = model.num_experts // router.num_groups
        # Scores summed per group: the best two (DeepSeek-V3) or the best one (DeepSeek-V2).
        self.scores_per_group = min(1 if router.group_score == "max" else 2,
                                    self.experts_per_group)
        self.norm_topk_prob = router.norm_topk_prob
        self.routed_scaling_factor = router.routed_scaling_factor
        self.use_expert_bias = router.expert_bias
        self.aux_loss_type = router.aux_loss_type
        self.aux_loss_coeff = router.aux_loss_coeff
        self.z_loss_coeff = router.z_loss_coeff

        gate = normal_array((model.num_experts, model.hidden_size), std=model.hidden_size ** -0.5,
                            key=(config.runtime.seed, TensorId.GATE))
        self.gate_weight = Parameter(Tensor(gate).astype(param_dtype), name="gate_weight")  # [E, H]
        self.expert_bias = Parameter(Tensor(np.zeros(model.num_experts, np.float32)),
                                     name="expert_bias", requires_grad=False)  # [E]

    def construct(self, x, num_sequences=1):
        """x: [tokens, hidden]; num_sequences splits tokens into sequences for the seq aux loss."""
        logits = ops.matmul(x.astype(ms.float32), self.gate_weight.astype(ms.float32).T)  # [T, E]
        if self.score_func == "softmax":
            scores = ops.softmax(logits, axis=-1)
        else:
            scores = ops.sigmoid(logits)

        expert_ids = self._select(scores)                                     # [T, K]
        weights = ops.gather_elements(scores, 1, expert_ids)                  # [T, K]
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        weights = weights * self.routed_scaling_factor

        # [T, K, E] one-hot -> per-sequence selection counts; counts carry no gradient.
        selections = one_hot(expert_ids, self.num_experts)                  # [T, K, E]
        if x.shape[0] == 0:  # (static) MindSpore's CPU ReduceSum leaves an empty input's sum unset
            tokens_per_expert = ops.zeros((self.num_experts,), ms.float32)
        else:
            tokens_per_expert = selections.sum(axis=(0, 1))                   # [E]
        aux_loss = self._aux_loss(scores, selections, num_sequences)
        z_loss = self._z_loss(logits)
        return expert_ids, weights, aux_loss, z_loss, tokens_per_expert

    def _select(self, scores):
        """Top-k expert ids by (biased) score, restricted to the best groups if configured."""
        choice = scores + self.expert_bias if self.use_expert_bias else scores  # [T, E]
        if self.num_groups > 1:
            tokens = choice.shape[0]
            grouped = choice.reshape(tokens, self.num_groups, self.experts_per_group)  # [T, G, E/G]
            best_in_group, _ = ops.topk(grouped, self.scores_per_group)
            group_scores = best_in_group.sum(axis=-1)                          # [T, G]
            _, kept_groups = ops.topk(group_scores, self.topk_groups)          # [T, topk_groups]
            group_mask = one_hot(kept_groups, self.num_groups).sum(axis=1)      # [T, G]
            expert_mask = ops.broadcast_to(group_mask.reshape(tokens, self.num_groups, 1),
                                           grouped.shape).reshape(tokens, self.num_experts)
            choice = ops.where(expert_mask > 0.5, choice, ops.full_like(choice, -np.inf))
        _, expert_ids = ops.topk(choice, self.top_k)                           # [T, K]
        return expert_ids.astype(ms.int32)

    def _aux_loss(self, scores, selections, num_sequences):
        """Load-balancing loss: coeff * E * sum_e f_e * P_e, per sequence for "seq"."""
        if self.aux_loss_type == "none":
            return Tensor(0.0, ms.float32)
        tokens = scores.shape[0]
        # For "switch" the whole batch is one group; "seq" averages the same term over sequences.
        groups = num_sequences if self.aux_loss_type == "seq" else 1
        group_len = tokens // groups
        probs = scores / scores.sum(axis=-1, keepdims=True)                    # [T, E]
        mean_probs = probs.reshape(groups, group_len, self.num_experts).mean(axis=1)  # [G, E]
        counts = selections.reshape(groups, group_len * self.top_k, self.num_experts).sum(axis=1)
        load_fraction = ops.stop_gradient(counts) / (group_len * self.top_k)  # [G, E]
        per_group = (load_fraction * mean_probs).sum(axis=-1) * self.num_experts
        return per_group.mean() * self.aux_loss_coeff

    def _z_loss(self, logits):
        """ST-MoE router z-loss: coeff * mean_t logsumexp(logits_t)^2."""
        if self.z_loss_coeff == 0.0:
            return Tensor(0.0, ms.float32)
        return ops.square(ops.logsumexp(logits, -1)).mean() * self.z_loss_coeff

    def update_expert_bias(self, tokens_per_expert, update_rate):
        """Aux-loss-free balancing step (DeepSeek-V3): raise under-loaded experts, lower others.

        ``bias_e += update_rate * sign(mean_load - load_e)``, with ``tokens_per_expert`` the
        observed selections (summed over every rank of the world by the caller,
        :meth:`MoELayer.update_expert_bias`). Runs eagerly, between training steps, like the
        reference recipe.
        """
        load = np.asarray(tokens_per_expert, dtype=np.float64).reshape(-1)
        if load.shape != (self.num_experts,):
            raise ValueError(f"tokens_per_expert has shape {load.shape}; expected "
                             f"({self.num_experts},), one count per expert")
        step = update_rate * np.sign(load.mean() - load)
        new_bias = self.expert_bias.asnumpy().astype(np.float64) + step
        self.expert_bias.set_data(Tensor(new_bias.astype(np.float32)))
        return new_bias
