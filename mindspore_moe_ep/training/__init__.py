"""Training an MoE language model: data (``corpus``), learning-rate ``schedule``, ``optimizer``
(AdamW) and the expert-parallel training ``step``. ``scripts/train.py`` puts them together."""
from .corpus import load_corpus, training_batch, validation_batch
from .optimizer import AdamW
from .schedule import learning_rate
from .step import TrainStep, update_expert_biases

__all__ = ["AdamW", "TrainStep", "learning_rate", "load_corpus", "training_batch",
           "update_expert_biases", "validation_batch"]
