"""Batched generation with a static KV cache: one prefill, then one decode step per token.

    generator = Generator(model)                # model built with cache_batch_size = B
    result = generator.generate(prompts, max_new_tokens=32, sampling=Sampling())

``prompts`` are this rank's (at most B lists of token ids); shorter prompts are padded on the
right to the longest prompt of the whole batch (``prompt_length``, the same on every rank, so
that every rank runs the same prefill shape). The prefill runs the MoE layers with
``phase="prefill"`` (the sparse all-to-all-v) and fills the cache; each decode step feeds every
sequence's newest token at its own position with ``phase="decode"`` (the fused Dispatch/Combine).
A sequence stops at the end-of-sequence token or after ``max_new_tokens``; under expert
parallelism every rank keeps stepping until every rank's sequences stopped (the layers are
collectives), which the ranks agree on after each step.
"""
import time
from dataclasses import dataclass, field
from typing import List

import numpy as np
from mindspore import Tensor

from ..comm.window import distributed_initialized, world_all_gather

END_OF_SEQUENCE = 0


@dataclass(frozen=True)
class Sampling:
    """Greedy (temperature 0) or sampled with a temperature and nucleus (top-p) cut."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature = {self.temperature} is not allowed; expected >= 0 "
                             f"(0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p} is not allowed; expected 0 < top_p <= 1")


def choose_token(logits, sampling, generator):
    """The next token from logits [V]: argmax, or a sample from the top-p nucleus."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[:int(np.searchsorted(cumulative, sampling.top_p)) + 1]
    return int(generator.choice(keep, p=probs[keep] / probs[keep].sum()))


@dataclass
class Generation:
    """What :meth:`Generator.generate` returns for this rank's prompts."""

    tokens: List[List[int]]            # generated tokens per prompt (EOS included if reached)
    finish_reasons: List[str]          # "eos" or "length"
    first_logits: np.ndarray           # [prompts, V] float32: the prefill's last-position logits
    prefill_s: float = 0.0             # prefill + choosing the first token
    decode_s: float = 0.0              # every decode step
    decode_steps: int = 0
    step_times: List[float] = field(default_factory=list)       # each decode step, wall
    forward_times: List[float] = field(default_factory=list)    # its model call (to host logits)
    rebalances: int = 0                # rebalance() rounds over the MoE layers (not in decode_s)
    rebalance_s: float = 0.0


class Generator:
    """Runs prefill and decode steps of a model with a KV cache of ``cache_batch_size`` rows."""

    def __init__(self, model, end_of_sequence=END_OF_SEQUENCE, rebalance_interval=None):
        """``end_of_sequence``: the token that ends a sequence (None: only max_new_tokens does,
        e.g. for benchmarks). It also pads prompts and unused rows (0 if None).
        ``rebalance_interval``: rebalance every MoE layer (``layer.rebalance()``, planned from
        its load window) after every that many decode steps; None takes
        ``parallel.rebalance_interval``, 0 never (nor at EP 1)."""
        if not model.cache_batch_size:
            raise ValueError("Generator needs a model built with cache_batch_size > 0 (the KV "
                             "cache's rows)")
        self.model = model
        self.batch = model.cache_batch_size
        self.max_seq_len = model.config.lm.max_seq_len
        self.end_of_sequence = end_of_sequence
        self.padding = END_OF_SEQUENCE if end_of_sequence is None else end_of_sequence
        if rebalance_interval is None:
            rebalance_interval = model.config.parallel.rebalance_interval
        self.rebalance_interval = (rebalance_interval
                                   if model.config.parallel.expert_parallel > 1 else 0)
        model.set_train(False)

    def rebalance(self):
        """Every MoE layer's ``rebalance()`` (a collective), planned from its load window."""
        for layer in self.model.moe_layers():
            layer.rebalance()

    def generate(self, prompts, max_new_tokens, sampling=Sampling(), prompt_length=None,
                 prompt_ids=None):
        """Generate for ``prompts`` (this rank's, at most ``cache_batch_size``; may be empty).

        ``prompt_length``: the padded prefill length (default: the longest prompt here); it must
        be the same on every rank. ``prompt_ids``: a global index per prompt, which keys its
        sampler (so sampled text does not depend on which rank a prompt ran on).
        """
        lengths = [len(prompt) for prompt in prompts]
        prompt_length = prompt_length or max(lengths, default=1)
        self._check(prompts, lengths, prompt_length, max_new_tokens)
        prompt_ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
        samplers = [np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [sampling.seed, index]))) for index in prompt_ids]
        # [B, P]: prompts padded with EOS on the right; unused rows hold a 1-token dummy.
        tokens = np.full((self.batch, prompt_length), self.padding, np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = prompt
        positions = np.array(lengths + [1] * (self.batch - len(prompts)), np.int32)  # [B]

        started = time.perf_counter()
        logits = self.model(Tensor(tokens), "prefill").asnumpy()                  # [B, P, V]
        first_logits = logits[np.arange(len(prompts)), np.array(lengths, int) - 1]   # [n, V]
        result = Generation([[] for _ in prompts], ["length"] * len(prompts), first_logits)
        next_tokens = np.full((self.batch,), self.padding, np.int32)
        for row in range(len(prompts)):
            next_tokens[row] = choose_token(first_logits[row], sampling, samplers[row])
        active = self._append(result, next_tokens, max_new_tokens)
        result.prefill_s = time.perf_counter() - started

        keep_going = self._any_rank_active(active)
        while keep_going:
            step_started = time.perf_counter()
            logits = self.model(Tensor(next_tokens.reshape(-1, 1)), "decode",
                                Tensor(positions)).asnumpy()[:, 0]                 # [B, V]
            result.forward_times.append(time.perf_counter() - step_started)
            positions += 1
            for row in np.flatnonzero(active):
                next_tokens[row] = choose_token(logits[row], sampling, samplers[row])
            active = self._append(result, next_tokens, max_new_tokens)
            keep_going = self._any_rank_active(active)
            result.step_times.append(time.perf_counter() - step_started)
            if (keep_going and self.rebalance_interval
                    and len(result.step_times) % self.rebalance_interval == 0):
                rebalance_started = time.perf_counter()
                self.rebalance()
                result.rebalances += 1
                result.rebalance_s += time.perf_counter() - rebalance_started
        result.decode_steps = len(result.step_times)
        result.decode_s = float(sum(result.step_times))
        return result

    def _check(self, prompts, lengths, prompt_length, max_new_tokens):
        if len(prompts) > self.batch:
            raise ValueError(f"{len(prompts)} prompts on this rank exceed lm.max_batch_size = "
                             f"{self.batch} (the KV cache's rows)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {max_new_tokens} is not allowed; expected >= 1")
        for index, length in enumerate(lengths):
            if length == 0:
                raise ValueError(f"prompt {index} is empty; a prompt needs at least one token")
        if prompt_length < max(lengths, default=0):
            raise ValueError(f"prompt_length = {prompt_length} is shorter than the longest "
                             f"prompt ({max(lengths)} tokens)")
        if prompt_length + max_new_tokens - 1 > self.max_seq_len:
            raise ValueError(f"a prompt of {prompt_length} tokens and max_new_tokens = "
                             f"{max_new_tokens} need {prompt_length + max_new_tokens - 1} cache "
                             f"positions; lm.max_seq_len = {self.max_seq_len}")

    def _append(self, result, next_tokens, max_new_tokens):
        """Record each unfinished sequence's new token; returns [B] bool: still generating."""
        active = np.zeros(self.batch, bool)
        for row, generated in enumerate(result.tokens):
            if generated and (generated[-1] == self.end_of_sequence
                              or len(generated) >= max_new_tokens):
                continue
            generated.append(int(next_tokens[row]))
            if generated[-1] == self.end_of_sequence:
                result.finish_reasons[row] = "eos"
            elif len(generated) < max_new_tokens:
                active[row] = True
        return active

    @staticmethod
    def _any_rank_active(active):
        """Whether any sequence of any rank still generates (a collective under msrun)."""
        count = int(active.sum())
        if distributed_initialized():
            count = int(world_all_gather(np.array([count], np.int32)).sum())
        return count > 0
