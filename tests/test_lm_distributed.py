"""The language-model scripts under expert parallelism: msrun workers (tests/distributed/
lm_worker.py) run scripts/train.py and scripts/generate.py as a user would under msrun.

- EP 2 training gives the EP 1 losses (the same global batch; float32 sums in another order);
- resuming at EP 2 from step 20 gives the uninterrupted run's losses bit for bit;
- a checkpoint saved at EP 4 loads at EP 2 and EP 1 (experts resharded): the same greedy and
  sampled tokens and first-token logits at EP 4 (PyNative and GRAPH_MODE), EP 2 and EP 1 (DP 4),
  and in one plain process (test_lm.py adds GRAPH_MODE there); a missing rank file is refused
  naming it;
- training rebalanced every 2 steps keeps the losses; generation with redundant experts,
  rebalanced during decode, keeps the tokens;
- bad input is refused on every rank (the launch ends instead of hanging);
- scripts/msrun_lm.sh (the main job's launcher) trains, checkpoints and generates.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from distributed.launch import remove_launch_files, run_msrun
from lm_scripts import REPO, generate

MSRUN = os.path.join(os.path.dirname(sys.executable), "msrun")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed", "lm_worker.py")
# EP 2 vs EP 1 training losses: the same math, gradients summed over ranks in another order
# (measured: at most 2.4e-7 over 40 steps).
LOSS_TOL = 1e-5
# First-token logits at different EP sizes / modes, relative to the largest |logit| (float32
# sums in another order; measured ~1e-6).
LOGITS_REL_TOL = 2e-5
# Training with replicas vs without: a replicated expert's weight gradient is the sum of its
# replicas' GEMMs over parts of its rows (equal to EP 1's within 1.3e-7 relative, in
# tests/distributed/rebalance_worker.py), and AdamW's first steps are nearly sign(g) * lr, so an
# element whose gradient is rounding-level near 0 can move by up to 2 lr either way (lm_tiny's
# learning rate rises to 1e-2).
# Measured: equal losses at steps 1-2, 1.5e-5 and 1.6e-4 apart at steps 3-4. The replicas' own
# agreement is checked bit for bit (test_replicas_stay_equal_through_training).
REPLICA_LOSS_TOL = 1e-3

pytestmark = pytest.mark.skipif(not os.path.exists(MSRUN), reason="msrun is not installed")


def launch(plan, workers, timeout_s):
    work = tempfile.mkdtemp(prefix=f"moe_ep_lm_{plan}_")
    result = run_msrun(WORKER, workers, [plan, work], timeout_s=timeout_s)
    assert result.returncode == 0 and sorted(result.results) == list(range(workers)), \
        result.describe()
    yield work, result.results
    remove_launch_files(result)
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def ep2():
    yield from launch("ep2", 2, timeout_s=300)


@pytest.fixture(scope="module")
def ep4():
    yield from launch("ep4", 4, timeout_s=400)


def close_logits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b).max() <= LOGITS_REL_TOL * np.abs(b).max()


def test_ep2_training_losses_equal_ep1(ep2, lm_tiny_ep1_run):
    _, reports = ep2
    ep1 = [record["loss"] for record in lm_tiny_ep1_run[2]]
    for report in reports.values():
        losses = [report["losses"][str(step)] for step in range(1, 41)]
        assert np.abs(np.array(losses) - np.array(ep1)).max() <= LOSS_TOL
    assert ep1[-1] < ep1[0] - 2.0  # and it learns (see test_lm.py for the stated margin)


def test_ep2_resume_is_bit_exact(ep2):
    _, reports = ep2
    for report in reports.values():
        assert sorted(map(int, report["resumed_losses"])) == list(range(21, 41))
        for step, loss in report["resumed_losses"].items():
            assert loss == report["losses"][step], step


def test_ep2_graph_mode_training_with_relocation_keeps_the_losses(ep2):
    """A compiled training step keeps running after rebalance() rewrote the expert weights, the
    AdamW moments and the replica tables in place: the same losses, and the placement moved."""
    _, reports = ep2
    for report in reports.values():
        graph = report["graph"]
        assert sorted(graph["0"]) == sorted(graph["2"]) == ["1", "2", "3", "4"]
        for step in graph["0"]:
            assert abs(graph["0"][step] - graph["2"][step]) <= LOSS_TOL, graph
        static = list(range(8))
        assert all(layer == static for record in graph["slots_0"] for layer in record)
        assert any(layer != static for layer in graph["slots_2"][-1]), graph["slots_2"]


def test_ep2_generation_equals_one_process_ep1_on_the_resharded_checkpoint(ep2):
    work, reports = ep2
    for name, extra in [("greedy", []), ("sampled", ["--temperature", "0.8", "--top-p", "0.95"])]:
        single = generate("--checkpoint", os.path.join(work, "run"), "--max-new-tokens", "8",
                          "--json", "--with-logits", "--no-warmup", *extra)
        for report in reports.values():
            assert report[name]["tokens"] == [p["tokens"] for p in single["prompts"]], name
            assert close_logits(report[name]["first_logits"],
                                [p["first_logits"] for p in single["prompts"]])
    paths = reports[0]["greedy"]["paths"]
    assert paths["prefill"]["dispatcher"] == "SparseAllToAllDispatcher"
    assert paths["decode"]["dispatcher"] == "FusedDecodeDispatcher"


def test_ep4_checkpoint_gives_the_same_tokens_at_ep4_ep2_ep1_in_both_modes(ep4):
    work, reports = ep4
    single = generate("--checkpoint", os.path.join(work, "run"), "--max-new-tokens", "8",
                      "--json", "--with-logits", "--no-warmup")
    expected_tokens = [p["tokens"] for p in single["prompts"]]
    expected_logits = [p["first_logits"] for p in single["prompts"]]
    assert len(set(map(tuple, expected_tokens))) > 1  # distinct outputs: a meaningful check
    for report in reports.values():
        for name in ("ep4_pynative", "ep4_graph", "ep2_pynative", "ep1_pynative"):
            assert report[name]["tokens"] == expected_tokens, name
            assert close_logits(report[name]["first_logits"], expected_logits), name
        assert report["sampled_ep4"]["tokens"] != expected_tokens
    paths = reports[0]["ep4_graph"]["paths"]
    assert (paths["prefill"]["dispatcher"], paths["decode"]["dispatcher"]) == (
        "SparseAllToAllDispatcher", "FusedDecodeDispatcher")
    assert reports[0]["ep1_pynative"]["paths"]["decode"]["dispatcher"] == "LocalTokenDispatcher"
    sampled = generate("--checkpoint", os.path.join(work, "run"), "--max-new-tokens", "8",
                       "--json", "--no-warmup", "--temperature", "0.8")
    assert reports[0]["sampled_ep4"]["tokens"] == [p["tokens"] for p in sampled["prompts"]]


def test_rebalanced_training_and_generation_keep_the_models_numbers(ep4):
    """parallel.rebalance_interval: training rebalanced every 2 steps (experts and AdamW moments
    relocated), without and with one redundant slot per rank (replicas' gradients summed),
    gives the losses of the run without it; generation with one redundant slot per
    rank, rebalanced every 3 decode steps, gives the same greedy tokens and first logits; the
    rebalanced run's checkpoint loads at EP 4 and in one process alike."""
    work, reports = ep4
    single = generate("--checkpoint", os.path.join(work, "run"), "--max-new-tokens", "8",
                      "--json", "--with-logits", "--no-warmup")
    for report in reports.values():
        losses = report["losses"]
        for name, tolerance in (("rebalanced_losses", LOSS_TOL),
                                ("replicas_losses", REPLICA_LOSS_TOL)):
            other = report[name]
            assert sorted(losses) == sorted(other) == ["1", "2", "3", "4"], name
            for step in losses:
                assert abs(losses[step] - other[step]) <= tolerance, (name, step, losses, other)
        replicas = report["ep4_replicas_rebalanced"]
        assert replicas["timings"]["rebalances"] == 2
        assert replicas["tokens"] == [p["tokens"] for p in single["prompts"]]
        assert close_logits(replicas["first_logits"],
                            [p["first_logits"] for p in single["prompts"]])
    # The rebalanced run's checkpoint (experts saved in their relocated slots, meta.json's
    # expert_slots) gives one process the tokens EP 4 got from it.
    relocated = generate("--checkpoint", os.path.join(work, "rebalanced"), "--max-new-tokens",
                         "8", "--json", "--with-logits", "--no-warmup")
    for report in reports.values():
        assert report["ep4_from_rebalanced"]["tokens"] == [p["tokens"]
                                                           for p in relocated["prompts"]]
        assert close_logits(report["ep4_from_rebalanced"]["first_logits"],
                            [p["first_logits"] for p in relocated["prompts"]])


def test_replicas_stay_equal_through_training(ep4):
    """Every replica of an expert takes the same update (the reducer sums their gradients and
    the moments moved with them): in the replicas run's final checkpoint all slots holding one
    expert hold the same weights and AdamW moments, bit for bit."""
    import json
    import mindspore as ms
    work, _ = ep4
    step_dir = os.path.join(work, "replicas", "step_000004")
    with open(os.path.join(step_dir, "meta.json"), encoding="utf-8") as meta_file:
        meta = json.load(meta_file)
    files = [{name: param.asnumpy() for name, param in
              ms.load_checkpoint(os.path.join(step_dir, name)).items()} for name in meta["files"]]
    compared = 0
    for name, slot_experts in meta["expert_slots"].items():
        per_file = len(slot_experts) // len(files)
        for key in (name, "adam_m." + name, "adam_v." + name):
            slots = np.concatenate([values[key] for values in files])         # [R * S, ...]
            for expert in set(slot_experts):
                holders = [p for p, held in enumerate(slot_experts) if held == expert]
                for other in holders[1:]:
                    np.testing.assert_array_equal(slots[other], slots[holders[0]],
                                                  err_msg=f"{key} expert {expert}")
                    compared += 1
        assert per_file == 3  # 8 experts + 4 redundant slots over 4 ranks
    assert compared >= 3 * 4  # every redundant slot, for the weights and both moments


def test_bad_input_is_refused_on_every_rank(ep4):
    work, reports = ep4
    for report in reports.values():
        assert "--prompt number 1 is empty" in report["empty_prompt"]
        assert ("lm.num_heads = 4" in report["other_config"]
                and "lm.num_heads = 8" in report["other_config"]
                and "meta.json" in report["other_config"])


def test_a_missing_rank_file_is_refused(ep4, tmp_path):
    work, _ = ep4
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(os.path.join(work, "run", "step_000004"), checkpoint)
    os.chmod(checkpoint / "rank_2.ckpt", 0o644)
    os.remove(checkpoint / "rank_2.ckpt")
    with pytest.raises(SystemExit) as caught:
        generate("--checkpoint", str(checkpoint))
    message = str(caught.value)
    assert f"{checkpoint / 'rank_2.ckpt'}: rank file missing" in message
    assert "expert_parallel = 4" in message


def test_main_job_launcher_trains_checkpoints_and_generates(tmp_path):
    """scripts/msrun_lm.sh (the README's command 1, on the tiny config): 2 workers, EP 2."""
    out = tmp_path / "run"
    environment = dict(os.environ, GLOG_v="3",
                       PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(
        ["bash", "scripts/msrun_lm.sh", "yaml_configs/lm_tiny.yaml", "--workers", "2",
         "--log-dir", str(tmp_path / "logs"), "--", "--out", str(out),
         "--set", "train.steps=4", "--set", "train.log_every=2", "--max-new-tokens", "4"],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[train] step     4/4" in result.stdout and "EP 2 x DP 1" in result.stdout
    assert "time to first token" in result.stdout and "FusedDecodeDispatcher" in result.stdout
    assert (out / "latest").read_text().strip() == "step_000004"
    assert sorted(os.listdir(out / "step_000004")) == ["meta.json", "rank_0.ckpt", "rank_1.ckpt"]
