"""Gradient synchronisation for expert-parallel training.

With the global loss ``L = sum over ranks of L_rank``:

- replicated parameters (router gate, shared expert) got only this rank's share of dL/dp, so
  their gradients are summed over the whole world;
- expert parameters already hold every token of the expert-parallel group that reached them (the
  exchange's backward brings the gradients home), so they are summed only over the
  data-parallel replicas that own the same experts (ranks with the same group rank);
- with redundant experts (``parallel.redundant_experts``), a slot's gradient covers only the
  tokens its replica served, so each slot gets the sum over every slot of the world that holds
  the same logical expert (its replicas in the group, and theirs in the data-parallel replicas):
  every replica then takes the same update and they stay equal.

``average=True`` divides everything by the world size, for ``L = mean over ranks of L_rank``.
MindSpore's CPU backend reduces only over the world group, so the data-parallel sum of expert
gradients is an AllGather followed by a local sum of the matching replicas.
"""
import mindspore as ms
from mindspore import nn, ops


class ExpertParallelGradReducer(nn.Cell):
    """``reducer(grads)`` -> grads synchronised as above; ``grads`` follow
    ``network.trainable_params()`` order. ``network`` is an MoELayer or any Cell holding
    MoELayers (a whole model: every layer's experts are expert parameters, the rest replicated).
    """

    def __init__(self, network, average=False):
        super().__init__()
        from .layer import MoELayer
        moe_layers = [cell for _, cell in network.cells_and_names() if isinstance(cell, MoELayer)]
        if not moe_layers:
            raise ValueError(f"ExpertParallelGradReducer: {type(network).__name__} holds no "
                             f"MoELayer")
        group = moe_layers[0].group
        self.world_size = group.world_size
        self.ep_size = group.size
        self.replicas = group.world_size // group.size
        self.group_rank = group.group_rank
        self.scale = 1.0 / group.world_size if average else 1.0
        # By identity, not by name: wrapping the layer in another Cell renames its parameters
        # ("experts.x" becomes "layer.experts.x"), and a reducer built afterwards must still
        # tell expert parameters apart.
        expert_params = {id(param) for layer in moe_layers
                         for param in layer.experts.trainable_params()}
        self.is_expert = tuple(id(param) in expert_params for param in network.trainable_params())
        # With redundant experts: each expert parameter's layer's sum matrix [S, W * S] (a
        # Parameter the layer rewrites when it rebalances), in trainable_params order.
        self.redundant = group.redundant_experts > 0
        sum_of = {id(param): layer.replica_grad_sum for layer in moe_layers
                  for param in layer.experts.trainable_params()} if self.redundant else {}
        self.replica_sums = tuple(sum_of.get(id(param)) for param in network.trainable_params())
        self.all_reduce = ops.AllReduce() if group.world_size > 1 else None
        self.all_gather = (ops.AllGather() if self.replicas > 1 or self.redundant else None)

    def construct(self, grads):
        synced = ()
        for grad, is_expert, replica_sum in zip(grads, self.is_expert, self.replica_sums):
            if is_expert and replica_sum is not None:
                grad = self._sum_over_expert_copies(grad, replica_sum)
            elif is_expert:
                grad = self._sum_over_replicas(grad)
            elif self.all_reduce is not None:
                grad = self.all_reduce(grad)
            synced = synced + (grad * self.scale,)
        return synced

    def _sum_over_expert_copies(self, grad, replica_sum):
        """Each slot's gradient summed over every slot of the world holding its expert:
        replica_sum [S, W * S] (0 / 1) @ every rank's slot gradients [W * S, ...]."""
        gathered = self.all_gather(grad.astype(ms.float32))        # [W * S, ...]
        flat = gathered.reshape(gathered.shape[0], -1)               # [W * S, n]
        return ops.matmul(replica_sum, flat).reshape(grad.shape).astype(grad.dtype)

    def _sum_over_replicas(self, grad):
        """Sum of this expert gradient over the ranks holding the same experts."""
        if self.all_gather is None:
            return grad
        gathered = self.all_gather(grad.astype(ms.float32))        # [W * E_local, ...]
        per_rank = gathered.reshape((self.world_size,) + grad.shape)  # [W, E_local, ...]
        same_experts = per_rank[self.group_rank::self.ep_size]        # [replicas, E_local, ...]
        return same_experts.sum(axis=0).astype(grad.dtype)
