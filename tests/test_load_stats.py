"""The expert-load window: ``layer.load_stats()`` / ``reset_load_stats()`` (issue 19, item 1).

Expected counts are NumPy bincounts of the router's choices (``layer.route``), never the
layer's own statistics. The EP 2 and DP 2 group sums run under msrun:
tests/distributed/load_stats_worker.py.
"""
import json
import os

import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor, nn

import mindspore_moe_ep as mee
from mindspore_moe_ep.config import ConfigError
from mindspore_moe_ep.load_balancing import chronological_window, max_over_mean, rank_loads

from distributed import launch
from lm_scripts import generate, train

TINY = os.path.join(launch.REPOSITORY_ROOT, "yaml_configs", "tiny.yaml")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed",
                      "load_stats_worker.py")
WINDOW, STEPS, TOKENS = 4, 6, 12


def batches(num_steps, hidden=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((TOKENS, hidden)).astype(np.float32) for _ in range(num_steps)]


def routed_counts(layer, x):
    """[E] NumPy count of the router's choices for x."""
    expert_ids, _ = layer.route(Tensor(x))
    return np.bincount(expert_ids.asnumpy().reshape(-1), minlength=layer.config.model.num_experts)


def test_window_holds_the_last_steps_counts(mode):
    layer = mee.MoELayer(mee.load_config(TINY, load_window_steps=WINDOW))
    expected = []
    for x in batches(STEPS):
        layer(Tensor(x))
        expected.append(routed_counts(layer, x))
    stats = layer.load_stats()
    window = np.array(expected[-WINDOW:])                                       # [W, E]
    np.testing.assert_array_equal(stats["tokens_per_expert_per_step"], window)
    np.testing.assert_array_equal(stats["tokens_per_expert"], window.sum(axis=0))
    np.testing.assert_array_equal(stats["local_tokens_per_expert"], window.sum(axis=0))
    assert (stats["window_steps"], stats["window_capacity"], stats["total_steps"]) == \
        (WINDOW, WINDOW, STEPS)
    assert stats["tokens_per_expert"].sum() == WINDOW * TOKENS * 2               # top_k 2
    assert stats["rank_loads"].tolist() == [WINDOW * TOKENS * 2]                 # EP 1
    sums = window.sum(axis=0)
    assert stats["expert_load_max_over_mean"] == pytest.approx(sums.max() / sums.mean())
    assert stats["rank_load_max_over_mean"] == 1.0


def test_fewer_steps_than_the_window(mode):
    layer = mee.MoELayer(mee.load_config(TINY, load_window_steps=10))
    expected = []
    for x in batches(3):
        layer(Tensor(x))
        expected.append(routed_counts(layer, x))
    stats = layer.load_stats()
    np.testing.assert_array_equal(stats["tokens_per_expert_per_step"], np.array(expected))
    assert (stats["window_steps"], stats["total_steps"]) == (3, 3)


def test_reset_empties_the_window(mode):
    layer = mee.MoELayer(mee.load_config(TINY, load_window_steps=WINDOW))
    first, second = batches(2, seed=1)
    layer(Tensor(first))
    layer.reset_load_stats()
    empty = layer.load_stats()
    assert empty["window_steps"] == 0 and empty["tokens_per_expert"].sum() == 0
    assert empty["tokens_per_expert_per_step"].shape == (0, 8)
    layer(Tensor(second))
    stats = layer.load_stats()
    np.testing.assert_array_equal(stats["tokens_per_expert"], routed_counts(layer, second))
    assert stats["total_steps"] == 1


class _ForwardBackward(nn.Cell):
    """value_and_grad of the layer's output sum, as a training step runs it."""

    def __init__(self, layer):
        super().__init__()
        self.grad = ms.value_and_grad(layer, None, ms.ParameterTuple(layer.trainable_params()))

    def construct(self, x):
        return self.grad(x)


def test_a_training_step_counts_once(mode):
    layer = mee.MoELayer(mee.load_config(TINY, load_window_steps=WINDOW))
    layer.set_train(True)
    step = _ForwardBackward(layer)
    expected = []
    for x in batches(2, seed=2):
        step(Tensor(x))
        expected.append(routed_counts(layer, x))
    stats = layer.load_stats()
    assert stats["total_steps"] == 2
    np.testing.assert_array_equal(stats["tokens_per_expert_per_step"], np.array(expected))


def test_window_length_is_validated():
    with pytest.raises(ConfigError, match=r"parallel.load_window_steps = 0 is not allowed"):
        mee.load_config(TINY, load_window_steps=0)


def test_summary_functions_on_hand_derived_values():
    ring = np.array([[4, 0], [1, 1], [2, 2]])       # forwards 3, 1, 2 (5 forwards, W = 3)
    np.testing.assert_array_equal(chronological_window(ring, 5), [[2, 2], [4, 0], [1, 1]])
    np.testing.assert_array_equal(chronological_window(ring, 2), [[4, 0], [1, 1]])
    np.testing.assert_array_equal(rank_loads([1, 2, 3, 4, 5, 6], 3), [3, 7, 11])
    assert max_over_mean([3, 7, 11]) == pytest.approx(11 / 7)
    assert max_over_mean([0, 0]) == 1.0
    with pytest.raises(ValueError, match="num_ranks = 4 does not divide the 6 experts"):
        rank_loads([1] * 6, 4)


# ---- EP 2 and DP 2 under msrun ----------------------------------------------------------------

@pytest.fixture(scope="module")
def two_ranks():
    with launch.msrun_reports(WORKER, 2, timeout_s=240) as result:
        yield result.results


@pytest.mark.parametrize("layout", ["ep2", "dp2"])
def test_group_sum_over_ranks(two_ranks, layout):
    """Each rank's window total is the sum of both ranks' NumPy counts; its local part its own."""
    counts = {rank: np.array(report[layout]["counts"]) for rank, report in two_ranks.items()}
    total = counts[0].sum(axis=0) + counts[1].sum(axis=0)                       # [E]
    for rank, report in two_ranks.items():
        stats = report[layout]["stats"]
        assert stats["tokens_per_expert"] == total.tolist()
        assert stats["local_tokens_per_expert"] == counts[rank].sum(axis=0).tolist()
        np.testing.assert_array_equal(stats["tokens_per_expert_per_step"],
                                      counts[0] + counts[1])
        expected_ranks = ([total[:4].sum(), total[4:].sum()] if layout == "ep2"
                          else [total.sum()])                       # expert e on rank e // 4
        assert stats["rank_loads"] == [int(load) for load in expected_ranks]
        assert stats["window_steps"] == 3
        assert (stats["expert_parallel"], stats["data_parallel"]) == \
            ((2, 1) if layout == "ep2" else (1, 2))


# ---- the scripts save it ------------------------------------------------------------------------

def test_train_and_generate_save_the_load(tmp_path):
    out = tmp_path / "run"
    train("--out", str(out), "--set", "train.steps=3", "--set", "train.log_every=2",
          "--set", "train.eval_every=100", "--set", "train.eval_sequences=8")
    records = [json.loads(line) for line in (out / "expert_load.jsonl").read_text().splitlines()]
    # Logged steps 1 (the first), 2 and 3 (the last); each window covers the steps since the last.
    assert [record["step"] for record in records] == [1, 2, 3]
    tokens_per_step = 8 * 32 * 2                        # global batch 8 x seq 32, top-2
    for record in records:
        assert len(record["layers"]) == 2               # lm_tiny: 3 layers, the first dense
        for stats in record["layers"]:
            assert stats["window_steps"] == 1
            assert sum(stats["tokens_per_expert"]) == tokens_per_step
    stats_file = tmp_path / "generate_load.json"
    generate("--checkpoint", str(out), "--prompt", "def f(", "--max-new-tokens", "4",
             "--load-stats", str(stats_file))
    layers = json.loads(stats_file.read_text())["layers"]
    # The timed generation only: one prefill of 6 positions and 3 decode steps of 1, over the
    # static batch of lm.max_batch_size = 4 rows (the unused rows are routed too), top-2.
    assert [stats["window_steps"] for stats in layers] == [4, 4]
    assert [sum(stats["tokens_per_expert"]) for stats in layers] == [4 * (6 + 3) * 2] * 2
