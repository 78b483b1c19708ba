"""One training step of an expert-parallel model, as one Cell (one graph in GRAPH_MODE):

    loss, grads = value_and_grad(next-token loss)     # the router's aux losses join here
    grads = ExpertParallelGradReducer(model)(grads)   # mean over ranks (experts: over replicas)
    grads *= min(1, clip / global_norm(grads))        # the norm counts every rank's experts once
    AdamW(grads, learning_rate)

The expert-bias update (DeepSeek-V3's aux-loss-free balancing) runs after the step, eagerly:
:func:`update_expert_biases`.
"""
import mindspore as ms
from mindspore import ParameterTuple, nn, ops

from ..grad_sync import ExpertParallelGradReducer
from ..models import NextTokenLoss
from .optimizer import AdamW


class TrainStep(nn.Cell):
    """``step(tokens [B, S] int32, targets [B, S] int32, learning_rate [] float32)`` ->
    (this rank's loss, the loss averaged over all ranks, the global gradient norm before
    clipping)."""

    def __init__(self, model, train_config):
        super().__init__()
        self.loss_net = NextTokenLoss(model)
        self.weights = ParameterTuple(model.trainable_params())
        self.value_and_grad = ms.value_and_grad(self.loss_net, None, self.weights)
        self.reducer = ExpertParallelGradReducer(model, average=True)
        self.is_expert = self.reducer.is_expert
        self.world_size = self.reducer.world_size
        self.replicas = self.reducer.replicas
        self.all_reduce = ops.AllReduce() if self.world_size > 1 else None
        self.clip_norm = train_config.grad_clip_norm
        self.optimizer = AdamW(model.trainable_params(), weight_decay=train_config.weight_decay)

    def construct(self, tokens, targets, learning_rate):
        loss, grads = self.value_and_grad(tokens, targets)
        grads = self.reducer(grads)
        norm = self.global_norm(grads)
        if self.clip_norm is not None:
            scale = ops.minimum(self.clip_norm / (norm + 1e-6), 1.0)
            grads = tuple(grad * scale for grad in grads)
        self.optimizer(grads, learning_rate)
        return loss, self.mean_over_ranks(loss), norm

    def global_norm(self, grads):
        """sqrt of the sum of squares of the whole model's gradient: replicated parameters once,
        each expert once (every group holds all experts; data-parallel replicas repeat them)."""
        replicated = ops.zeros((1,), ms.float32)
        experts = ops.zeros((1,), ms.float32)
        for grad, is_expert in zip(grads, self.is_expert):
            squares = ops.square(grad).sum().reshape(1)
            if is_expert:
                experts = experts + squares
            else:
                replicated = replicated + squares
        if self.all_reduce is not None:
            experts = self.all_reduce(experts) / self.replicas
        return ops.sqrt(replicated + experts).reshape(())

    def mean_over_ranks(self, value):
        """The mean of a scalar over all ranks (every rank must call it)."""
        if self.all_reduce is None:
            return value
        return (self.all_reduce(value.reshape(1)) / self.world_size).reshape(())


def update_expert_biases(model):
    """Every MoE layer's expert-bias step from the last forward's load (a collective)."""
    for layer in model.moe_layers():
        if layer.config.router.expert_bias:
            layer.update_expert_bias()
