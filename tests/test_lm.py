"""The MoE language model (mindspore_moe_ep.models) and its scripts, in one process (EP 1).

- the lm / train config sections reject bad values with the key, the value and what is allowed;
- the model's logits equal an independent NumPy float64 reference (tests/reference/numpy_lm.py);
- a decode step with the KV cache gives the logits of a full forward over the extended sequence;
- scripts/train.py learns (the loss falls by a stated margin), resumes bit-exactly, and
  scripts/generate.py gives the same tokens in GRAPH_MODE and PyNative;
- checkpoints of another model and bad generation inputs are refused with clear errors.

Expert parallelism (EP 2 and 4, resharding, errors on every rank) is in test_lm_distributed.py.
"""
import math
import os
import shutil

import numpy as np
import pytest
import mindspore as ms

import mindspore_moe_ep as mee
from mindspore_moe_ep.config import ConfigError
from lm_scripts import REPO, TINY_LM, generate, train
from reference import RefConfig
from reference.numpy_lm import LMRefConfig, lm_forward

MINI_LM = os.path.join(REPO, "yaml_configs", "lm_deepseek_v3_mini_4cpu.yaml")
# Float32 logits against float64 / against another float32 evaluation order: relative to the
# largest |logit| (measured: about 1e-6 for both).
REFERENCE_REL_TOL = 2e-5
DECODE_REL_TOL = 2e-5


def tiny_config(mode="pynative", **overrides):
    return mee.load_config(TINY_LM, **{"runtime.mode": mode, **overrides})


# ---- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"lm.num_kv_heads": 3}, "lm.num_heads = 4 is not a multiple of lm.num_kv_heads = 3"),
    ({"lm.head_dim": 7}, "lm.head_dim = 7 is odd; rotary embedding needs an even width"),
    ({"lm.dense_layers": 3}, "lm.dense_layers = 3 leaves no MoE layer in lm.num_layers = 3"),
    ({"lm.vocab_size": 0}, "lm.vocab_size = 0 is not allowed; expected an integer > 0"),
    ({"train.seq_len": 65}, "train.seq_len = 65 exceeds lm.max_seq_len = 64"),
    ({"train.min_learning_rate": 1.0}, "train.min_learning_rate = 1.0 exceeds "
                                       "train.max_learning_rate = 0.01"),
    ({"lm.num_heads": 2.0}, "lm.num_heads = 2.0 is not allowed; expected an integer > 0"),
])
def test_lm_config_rejects_bad_values(overrides, message):
    with pytest.raises(ConfigError) as caught:
        mee.load_config(TINY_LM, **overrides)
    assert message in str(caught.value)


def test_shipped_lm_configs_load():
    tiny = mee.load_config(TINY_LM)
    assert (tiny.lm.num_layers, tiny.lm.dense_layers, tiny.lm.kv_heads) == (3, 1, 2)
    mini = mee.load_config(MINI_LM)
    assert mini.num_local_experts == 16 and mini.router.top_k == 8
    assert (mini.lm.num_layers, mini.lm.dense_layers, mini.router.score_func) == (6, 1, "sigmoid")
    layer_config = mee.load_config(os.path.join(REPO, "yaml_configs", "tiny.yaml"))
    assert layer_config.lm.vocab_size == 256  # a layer-only config gets the section's defaults


def test_learning_rate_warms_up_then_decays_to_the_floor():
    from mindspore_moe_ep.training import learning_rate
    train_config = mee.load_config(TINY_LM).train      # 40 steps, warm-up 4, 1e-2 -> 1e-3
    rates = [learning_rate(step, train_config) for step in range(40)]
    assert rates[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert rates[4] == pytest.approx(1e-2) and rates[-1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))


def test_corpus_splits_documents_and_batches_are_reproducible():
    from mindspore_moe_ep.training import corpus
    train_data, validation = corpus.load_corpus()
    files = corpus.source_files()
    assert (train_data == 0).sum() + (validation == 0).sum() == len(files)
    assert (validation == 0).sum() == len(files) // corpus.VALIDATION_EVERY
    batch = corpus.training_batch(train_data, 0, 7, 8, 32)
    assert batch.shape == (8, 33) and batch.dtype == np.int32
    assert np.array_equal(batch, corpus.training_batch(train_data, 0, 7, 8, 32))
    assert not np.array_equal(batch, corpus.training_batch(train_data, 0, 8, 8, 32))


# ---- the model against references ------------------------------------------------------------

def reference_config(config):
    lm, router = config.lm, config.router
    moe = RefConfig(num_experts=config.model.num_experts, top_k=router.top_k,
                    score_func=router.score_func, norm_topk_prob=router.norm_topk_prob,
                    routed_scaling_factor=router.routed_scaling_factor,
                    num_groups=router.num_groups, topk_groups=router.effective_topk_groups,
                    group_score=router.group_score, expert_bias=router.expert_bias)
    return LMRefConfig(lm.num_layers, lm.dense_layers, lm.num_heads, lm.kv_heads, lm.head_dim,
                       lm.rope_theta, lm.norm_eps, moe)


def test_model_logits_match_the_numpy_reference():
    from mindspore_moe_ep.models import MoETransformerLM
    config = tiny_config()
    mee.setup_runtime(config)
    model = MoETransformerLM(config)
    model.set_train(False)
    rng = np.random.default_rng(3)
    for layer in model.moe_layers():  # a non-zero expert bias: it must steer selection only
        layer.router.expert_bias.set_data(ms.Tensor(rng.normal(0, 0.1, 8).astype(np.float32)))
    tokens = rng.integers(0, 256, (2, 12)).astype(np.int32)
    logits = model(ms.Tensor(tokens), "prefill").asnumpy()
    params = {name: param.asnumpy() for name, param in model.parameters_and_names()}
    expected = lm_forward(params, tokens, reference_config(config))
    error = np.abs(logits - expected).max() / np.abs(expected).max()
    assert error < REFERENCE_REL_TOL, error


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_decode_steps_give_the_logits_of_a_full_forward(mode):
    """Prompts of lengths 5, 9, 2, 7 (padded to 9), then 4 decode steps with the KV cache: each
    step's logits equal those of one full forward over the extended sequences at that position
    (causal: later positions do not change earlier ones)."""
    from mindspore_moe_ep.models import MoETransformerLM
    config = tiny_config(mode)
    mee.setup_runtime(config)
    cached = MoETransformerLM(config, cache_batch_size=4)   # the same weights: same seed
    full = MoETransformerLM(config)
    cached.set_train(False)
    full.set_train(False)
    rng = np.random.default_rng(5)
    lengths = np.array([5, 9, 2, 7])
    steps = 4
    sequences = rng.integers(1, 256, (4, 9 + steps)).astype(np.int32)
    logits = cached(ms.Tensor(sequences[:, :9]), "prefill").asnumpy()          # [4, 9, V]
    decoded = [logits[np.arange(4), lengths - 1]]
    for step in range(steps):
        positions = lengths + step
        sequences[np.arange(4), positions] = decoded[-1].argmax(axis=1)        # greedy
        decoded.append(cached(ms.Tensor(sequences[np.arange(4), positions].reshape(4, 1)),
                              "decode", ms.Tensor(positions.astype(np.int32))).asnumpy()[:, 0])
    reference = full(ms.Tensor(sequences), "prefill").asnumpy()               # [4, 13, V]
    for step in range(1, steps + 1):
        expected = reference[np.arange(4), lengths + step - 1]
        error = np.abs(decoded[step] - expected).max() / np.abs(expected).max()
        assert error < DECODE_REL_TOL, (step, error)


# ---- training, checkpoints and generation through the scripts --------------------------------

@pytest.fixture
def ep1_run(lm_tiny_ep1_run):
    """scripts/train.py on lm_tiny.yaml in this process: 40 steps, every step logged."""
    return lm_tiny_ep1_run


def test_training_loss_falls(ep1_run):
    """From ln 256 + 0.7 (random init) to a validation loss below 3.6 nats/byte in 40 steps of
    8 x 32 bytes (measured: 6.23 -> 3.20)."""
    _, result, records = ep1_run
    assert [record["step"] for record in records] == list(range(1, 41))
    assert records[0]["loss"] > math.log(256)
    final = records[-1]
    assert final["val_loss"] < 3.6
    assert records[0]["loss"] - final["val_loss"] > 2.0
    assert all(record["tokens_per_s"] > 0 for record in records)
    assert result["losses"][40] == pytest.approx(final["loss"])


def test_resume_continues_bit_exactly(ep1_run, tmp_path):
    out, _, records = ep1_run
    resumed = train("--out", str(tmp_path), "--resume", str(out / "step_000020"),
                    "--set", "train.log_every=1")["losses"]
    assert sorted(resumed) == list(range(21, 41))
    assert all(resumed[step] == records[step - 1]["loss"] for step in resumed)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generation_is_the_same_in_graph_and_pynative(ep1_run, temperature):
    out = str(ep1_run[0] / "step_000020")
    runs = [generate("--checkpoint", out, "--mode", mode, "--max-new-tokens", "12",
                     "--temperature", str(temperature), "--top-p", "0.95", "--json",
                     "--with-logits", "--no-warmup")
            for mode in ("pynative", "graph")]
    tokens = [[prompt["tokens"] for prompt in run["prompts"]] for run in runs]
    assert tokens[0] == tokens[1]
    assert all(len(t) == 12 for t in tokens[0])
    first = [np.array([p["first_logits"] for p in run["prompts"]]) for run in runs]
    assert np.abs(first[0] - first[1]).max() <= DECODE_REL_TOL * np.abs(first[0]).max()
    summary = runs[0]
    assert summary["paths"]["decode"]["dispatcher"] == "LocalTokenDispatcher"
    assert summary["timings"]["time_to_first_token_s"] > 0
    assert summary["timings"]["decode_tokens_per_s"] > 0


def copy_checkpoint(source, target):
    shutil.copytree(source, target)
    for name in os.listdir(target):
        os.chmod(os.path.join(target, name), 0o644)
    return str(target)


def test_a_checkpoint_of_another_config_is_refused(ep1_run):
    checkpoint = str(ep1_run[0] / "step_000040")
    with pytest.raises(SystemExit) as caught:
        generate("--checkpoint", checkpoint, "--set", "lm.num_layers=2")
    message = str(caught.value)
    assert os.path.join(checkpoint, "meta.json") in message
    assert "lm.num_layers = 3" in message and "lm.num_layers = 2" in message


def test_a_checkpoint_with_a_missing_or_foreign_key_is_refused(ep1_run, tmp_path):
    checkpoint = copy_checkpoint(ep1_run[0] / "step_000040", tmp_path / "ckpt")
    rank_file = os.path.join(checkpoint, "rank_0.ckpt")
    values = ms.load_checkpoint(rank_file)
    values["layers.9.attention.qkv_weight"] = values.pop("layers.0.attention.qkv_weight")
    ms.save_checkpoint([{"name": name, "data": value} for name, value in values.items()],
                       rank_file)
    with pytest.raises(SystemExit, match=rf"{rank_file}: key 'layers.0.attention.qkv_weight' "
                                         rf"is missing"):
        generate("--checkpoint", checkpoint)


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "abc", "--prompt", ""], "--prompt number 2 is empty"),
    (["--prompt", "x" * 60, "--max-new-tokens", "8"],
     "the longest prompt (60 bytes) and --max-new-tokens 8 need 67 positions of the KV cache; "
     "lm.max_seq_len = 64"),
    ([arg for index in range(5) for arg in ("--prompt", f"p{index}")],
     "5 prompts exceed the batch: world size 1 x lm.max_batch_size 4 = 4 sequences"),
    (["--max-new-tokens", "0"], "--max-new-tokens = 0 is not allowed; expected >= 1"),
    (["--temperature", "-1"], "temperature = -1.0 is not allowed; expected >= 0"),
])
def test_bad_generation_input_is_refused(ep1_run, argv, message):
    with pytest.raises(SystemExit) as caught:
        generate("--checkpoint", str(ep1_run[0]), *argv)
    assert message in str(caught.value)


def test_generate_report_says_when_experts_were_rebalanced():
    """scripts/generate.py's printed report names the rebalances of parallel.rebalance_interval
    (and prints nothing about them when there were none)."""
    from lm_scripts import load_script
    print_report = load_script("generate").print_report
    path = {"phase": "decode", "tokens_per_rank": 4, "dispatcher": "FusedDecodeDispatcher",
            "experts_path": "rowwise", "quantized": False}
    summary = {"checkpoint_step": 100, "checkpoint_expert_parallel": 4, "expert_parallel": 4,
               "world_size": 4, "mode": "graph", "prompts": [],
               "paths": {"prefill": path, "decode": path},
               "timings": {"time_to_first_token_s": 0.1, "time_per_output_token_s": 0.05,
                           "decode_tokens_per_s": 80.0, "decode_steps": 47, "rebalances": 2,
                           "rebalance_s": 1.25}}

    class Run:
        lines = []

        def log(self, message, prefix):
            self.lines.append(message)
    run = Run()
    print_report(summary, run)
    assert run.lines[-1] == ("experts rebalanced 2 times during decode "
                             "(parallel.rebalance_interval; 1.25 s, not in the decode time)")
    run.lines.clear()
    print_report(dict(summary, timings=dict(summary["timings"], rebalances=0)), run)
    assert not any("rebalanced" in line for line in run.lines)
