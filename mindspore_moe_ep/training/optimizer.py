"""AdamW (Loshchilov & Hutter, 2019) as a Cell, with bias correction and decoupled weight decay.

MindSpore's ``nn.AdamWeightDecay`` omits Adam's bias correction and ``mint.optim.AdamW`` has no
CPU kernel, so the update is written out here (it is short):

    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2;   t = t + 1
    p = p - lr * ( (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * p )

Weight decay applies to matrices only (``ndim >= 2``: not to norm scales). The moments are
Parameters named ``adam_m.<param>`` / ``adam_v.<param>`` and the step count ``adam_step``, so a
checkpoint of the optimizer is ``optimizer.parameters_and_names()``.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops


class AdamW(nn.Cell):
    """``optimizer(grads, learning_rate)`` updates ``params`` in place; grads in params order."""

    def __init__(self, params, weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8):
        super().__init__()
        self.params = ParameterTuple(params)
        self.exp_avg = self.params.clone(prefix="adam_m", init="zeros")
        self.exp_avg_sq = self.params.clone(prefix="adam_v", init="zeros")
        self.weight_decay = tuple(weight_decay if param.ndim >= 2 else 0.0 for param in params)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.step = Parameter(Tensor(np.zeros((), np.float32)), name="adam_step",
                              requires_grad=False)

    def construct(self, grads, learning_rate):
        step = self.step + 1.0
        ops.assign(self.step, step)
        correction1 = 1.0 - ops.pow(Tensor(self.beta1, ms.float32), step)
        correction2 = 1.0 - ops.pow(Tensor(self.beta2, ms.float32), step)
        for param, exp_avg, exp_avg_sq, grad, decay in zip(
                self.params, self.exp_avg, self.exp_avg_sq, grads, self.weight_decay):
            new_avg = self.beta1 * exp_avg + (1.0 - self.beta1) * grad
            new_avg_sq = self.beta2 * exp_avg_sq + (1.0 - self.beta2) * ops.square(grad)
            update = (new_avg / correction1) / (ops.sqrt(new_avg_sq / correction2) + self.eps)
            if decay:
                update = update + decay * param
            ops.assign(exp_avg, new_avg)
            ops.assign(exp_avg_sq, new_avg_sq)
            ops.assign(param, param - learning_rate * update)
        return step
