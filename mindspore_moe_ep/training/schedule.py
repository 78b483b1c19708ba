"""Learning rate: linear warm-up, then cosine decay to a floor (the schedule of most LLM runs)."""
import math


def learning_rate(step, train):
    """The learning rate of optimiser step ``step`` (0-based) under the ``train`` config.

    Steps 0 .. warmup-1 rise linearly to ``max_learning_rate`` (step 0 gets max / warmup, not 0);
    after that a half cosine falls to ``min_learning_rate`` at the last step.
    """
    peak, floor = train.max_learning_rate, train.min_learning_rate
    if step < train.warmup_steps:
        return peak * (step + 1) / train.warmup_steps
    decay_steps = max(train.steps - train.warmup_steps - 1, 1)
    progress = min((step - train.warmup_steps) / decay_steps, 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
