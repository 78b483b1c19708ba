"""Deterministic parameter initialisation.

Every rank of an expert-parallel job must build the same weights for the experts it owns as a
single-process run would, without materialising the experts it does not own. So each tensor (and
each expert) draws from its own NumPy generator keyed by ``(seed, tensor_id, expert_index)``.
"""
import numpy as np


def normal_array(shape, std, seed):
    """float32 array of N(0, std^2) samples from the generator keyed by ``seed`` (an int tuple)."""
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(seed))))
    return (generator.standard_normal(shape, dtype=np.float32) * np.float32(std))


def stacked_expert_normal(expert_indices, shape, std, seed):
    """[len(expert_indices), *shape]: one independent draw per global expert index."""
    return np.stack([normal_array(shape, std, (*seed, index)) for index in expert_indices])
