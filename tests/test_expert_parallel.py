"""Expert parallelism under msrun (2 and 4 CPU workers) against single-process results.

One msrun launch per world size runs every case of distributed/ep_layer_worker.py (PYNATIVE_MODE,
plus a representative GRAPH_MODE subset), which runs the subject workers in sequence (routing,
forward, gradients, dp_ep, bad input: distributed/ep_layer_*_worker.py, each also runnable alone
under msrun); the tests below read the per-rank reports:

- both dispatchers, driven directly on payload rows encoding (source rank, token, column):
  grouped rows and counts bitwise, combine after a fake expert, over many seeded random
  configurations (uneven token counts, ranks without tokens, full ranks, top-1 .. top-8);
- MoELayer prefill and decode outputs and statistics vs an EP = 1 layer with the same weights
  on the concatenated batch (tiny.yaml, and the DeepSeek-V3 routing of
  deepseek_v3_small_4cpu.yaml shrunk to hidden 64: shared expert, sigmoid, group-limited top-8,
  expert bias); inference prefill in the unfused steps and in the fused experts + combine
  (in rounds);
- gradients after ExpertParallelGradReducer vs the single-process gradients of the same loss;
- capacity factor: drops and outputs as one process over the concatenated batch;
- determinism, bad inputs (a clear error on every rank, bounded by dispatch.timeout_s), and
  data parallel x expert parallel (world 4, expert_parallel 2).
"""
import os
import sys

import pytest

from distributed import launch

MSRUN = os.path.join(os.path.dirname(sys.executable), "msrun")
WORKER = os.path.join("tests", "distributed", "ep_layer_worker.py")
BAD_TIMEOUT_S = 3.0   # dispatch.timeout_s of the worker's failing layers
SLACK_S = 5.0         # scheduling slack on a loaded 2-core machine
MIN_CONFIGURATIONS = {2: 64, 4: 42}  # seeded routing configurations per world size
COMBINE_REL_TOL = 2e-6
LAYER_REL_TOL = 1e-5
BF16_LAYER_REL_TOL = 1.6e-2  # bfloat16 layers: ~2 bf16 ulps (distributed/ep_layer_common.py)
GRAD_REL_TOL = 5e-5

pytestmark = pytest.mark.skipif(not os.path.exists(MSRUN), reason="msrun is not installed")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda world: f"world{world}")
def ep_run(request):
    # At 4 ranks the kernels fill every unspecified buffer tail with NaN: the checks then also
    # show that no kernel of the expert-parallel path reads such a tail.
    poison = {"MOE_EP_POISON_UNUSED_ROWS": "1"} if request.param == 4 else None
    result = launch.run_msrun(WORKER, request.param, timeout_s=420, env=poison)
    assert result.returncode == 0 and len(result.results) == request.param, result.describe()
    yield result
    launch.remove_launch_files(result)


def checks(run, prefix):
    """(rank, name, ok, detail) of every check whose case starts with `prefix` (after the mode)."""
    return [(rank, name, ok, detail) for rank, report in sorted(run.results.items())
            for name, ok, detail in report["checks"] if name.split("/", 1)[1].startswith(prefix)]


def assert_all_pass(run, prefix, minimum):
    found = checks(run, prefix)
    failed = [f"rank {rank}: {name}: {detail}" for rank, name, ok, detail in found if not ok]
    assert not failed, "\n".join(failed[:20])
    per_rank = len(found) // len(run.results)
    assert per_rank >= minimum, f"only {per_rank} '{prefix}' checks per rank"
    return found


def modes_of(found):
    return {name.split("/", 1)[0] for _, name, _, _ in found}


def max_error(run, kind):
    return max(report.get(f"max_error/{kind}", 0.0) for report in run.results.values())


def world_of(run):
    return len(run.results)


# ---- dispatchers -----------------------------------------------------------------------------

def test_dispatchers_route_every_row_exactly(ep_run):
    found = assert_all_pass(ep_run, "routing/", minimum=400)
    assert modes_of(found) == {"pynative", "graph"}
    assert {name.rsplit("/", 1)[0].split("/")[-1] for _, name, _, _ in found} == \
        {"prefill", "prefill_rowwise", "decode", "decode_rowwise"}
    assert max_error(ep_run, "routing_combine") <= COMBINE_REL_TOL
    if world_of(ep_run) == 4:  # launched with MOE_EP_POISON_UNUSED_ROWS=1: every pair's
        # received rows past the counts are NaN (so the tail checks elsewhere mean something)
        poisoned = {name.split("/")[4] for _, name, _, _ in found if "/tail_poisoned" in name}
        assert poisoned == {"prefill", "prefill_rowwise", "decode", "decode_rowwise"}, poisoned


def test_fused_combine_sums_in_the_window_as_it_does_staged(ep_run):
    # The same routing cases through a layer whose slots hold a peer's partial rows (summed
    # where they lie in the window) and one whose slots do not (staged and exchanged), in
    # float32 and bfloat16, with narrow rows and with rows wide enough that a pulled Dispatch
    # lands them in several batches: bit-identical outputs that match the float64 expectation,
    # and each layer has the slots of its path.
    # The same for the row-wise pair (FusedDeliver / FusedReturn).
    # (cases at 4 ranks: 6 of e16_k8_h64, 2 of the wide spec; 2 checks per pair, plus the slots)
    found = assert_all_pass(ep_run, "combine_paths/", minimum=2 * (2 + 2 * 2 * (6 + 2)))
    for spec in ("e16_k8_h64", "e16_k8_h8192"):
        for dtype in ("float32", "bfloat16"):
            assert any(name.endswith(f"combine_paths/{spec}/{dtype}/slots")
                       for _, name, _, _ in found), (spec, dtype)
            assert any(f"combine_paths/{spec}/{dtype}/" in name
                       and name.endswith("/rowwise/in_window_equals_staged")
                       for _, name, _, _ in found), (spec, dtype)


def test_routing_configurations_cover_the_edge_cases(ep_run):
    world = world_of(ep_run)
    configurations = ep_run.results[0]["routing_configurations"]
    for report in ep_run.results.values():  # every rank ran the same sequence
        assert report["routing_configurations"] == configurations
    pynative = [entry for entry in configurations if entry[0] == "pynative"]
    assert len(pynative) >= MIN_CONFIGURATIONS[world]
    assert len([entry for entry in configurations if entry[0] == "graph"]) >= 2
    specs = {"e8_k2": 8, "e16_k1": 8, "e16_k8": 8, "e8_k6_c5": 5,  # max_tokens_per_rank
             "e16_k8_h64": 16}
    assert {entry[1] for entry in pynative} == set(specs)
    assert {entry[3] for entry in pynative} == {"random", "one_expert", "one_rank", "skewed"}
    tokens = [(entry[1], entry[4]) for entry in pynative]
    assert all(len(counts) == world for _, counts in tokens)
    assert any(0 in counts for _, counts in tokens)                          # a rank without tokens
    assert any(1 in counts for _, counts in tokens)                          # a rank with one token
    assert any(all(count == specs[name] for count in counts) for name, counts in tokens)  # T == C
    assert any(len(set(counts)) == world for _, counts in tokens)            # all different


# ---- the layer -------------------------------------------------------------------------------

def test_layer_prefill_and_decode_equal_single_process(ep_run):
    found = assert_all_pass(ep_run, "layer/", minimum=20)
    names = {name.split("/")[2] for _, name, _, _ in found}
    assert {"tiny", "deepseek", "tiny_rounds", "tiny_bf16", "hf_checkpoint"} <= names
    for model in ("tiny", "deepseek", "tiny_rounds", "tiny_bf16", "hf_checkpoint"):
        for phase in ("prefill", "decode"):
            assert any(name.endswith(f"layer/{model}/{phase}/output") for _, name, _, _ in found)
    # Inference prefill: the fused experts + combine in rounds (tiny_rounds), else unfused.
    # Decode: the fused row-wise operators (tiny_rounds: the grouped ones).
    for model in ("tiny", "deepseek", "tiny_rounds"):
        assert any(name.endswith(f"layer/{model}/prefill_path") for _, name, _, _ in found)
        assert any(name.endswith(f"layer/{model}/decode_path") for _, name, _, _ in found)
    assert any(name.endswith("layer/tiny_rounds/combine_round_rows") for _, name, _, _ in found)
    assert "graph" in modes_of(found)
    assert max_error(ep_run, "layer_output") <= LAYER_REL_TOL
    assert max_error(ep_run, "layer_output_bfloat16") <= BF16_LAYER_REL_TOL


def test_gradients_equal_single_process(ep_run):
    found = assert_all_pass(ep_run, "grad/", minimum=40)
    cases = {name.split("/")[2] for _, name, _, _ in found}
    # grouped experts (training), the fused experts + combine (not training; its gradient is
    # the unfused path's, recomputing the experts) and row-wise in training
    # (runtime.recompute_experts); each case checks its path first
    assert {"tiny_switch_aux_z", "tiny_switch_aux_z_recompute", "deepseek_seq_aux",
            "tiny_zero_tokens_no_aux", "tiny_capacity"} <= cases
    assert {name.split("/")[2] for _, name, _, _ in found if name.endswith("/path")} == cases
    # x, gate, routed experts (gate_up, down) and the shared expert
    for what in ("dx", "d_router.gate_weight", "d_experts.gate_up_weight",
                 "d_experts.down_weight", "d_shared_expert.gate_up_weight",
                 "d_shared_expert.down_weight"):
        assert any(name.endswith(f"grad/tiny_switch_aux_z/{what}") for _, name, _, _ in found)
    if world_of(ep_run) == 2:
        assert "graph" in modes_of(found)
    assert max_error(ep_run, "gradient") <= GRAD_REL_TOL


def test_layer_and_gradients_through_the_window_slots():
    # MOE_EP_WINDOW_TRANSPORT=slots: no rank reads its peers' memory, so the prefill delivery and
    # the decode Dispatch pack their rows and exchange them through the slots instead of pulling
    # them: the same outputs and gradients as a single process (the layer and grad parts).
    run = launch.run_msrun(WORKER, 2, ["--parts", "layer,grad"], timeout_s=420,
                           env={"MOE_EP_WINDOW_TRANSPORT": "slots"})
    try:
        assert run.returncode == 0 and len(run.results) == 2, run.describe()
        found = assert_all_pass(run, "layer/", minimum=20)
        assert {"tiny", "deepseek", "tiny_rounds"} <= {name.split("/")[2] for _, name, _, _ in found}
        assert_all_pass(run, "grad/", minimum=40)
        assert max_error(run, "layer_output") <= LAYER_REL_TOL
        assert all(report.get("window_transport") == "slots" for report in run.results.values())
    finally:
        launch.remove_launch_files(run)


def test_capacity_drops_equal_single_process_over_the_group_batch(ep_run):
    found = assert_all_pass(ep_run, "capacity/", minimum=20)
    names = {name.split("/", 2)[2].rsplit("/", 1)[0] for _, name, _, _ in found}
    assert any(name.startswith("1.0/4") for name in names)  # uneven tokens per rank
    for report in ep_run.results.values():  # the cases drop rows (factors <= 1 always do)
        dropped = {key.split("/", 1)[1].rsplit("/", 1)[0]: value for key, value in report.items()
                   if key.startswith("capacity/") and key.endswith("/ref_num_dropped")}
        assert len(dropped) == 4, dropped
        assert all(value > 0 for key, value in dropped.items() if float(key.split("/")[0]) <= 1)


def test_repeated_runs_are_bitwise_identical(ep_run):
    found = assert_all_pass(ep_run, "determinism/", minimum=40)
    assert {"layer", "grad", "capacity"} <= {name.split("/")[2] for _, name, _, _ in found}


def test_data_parallel_times_expert_parallel(ep_run):
    if world_of(ep_run) < 4:
        pytest.skip("needs 4 ranks (two replicas of a 2-way expert-parallel group)")
    found = assert_all_pass(ep_run, "dp_ep/", minimum=20)
    assert modes_of(found) == {"pynative", "graph"}
    assert any(name.endswith("dp_ep/grad/d_experts.down_weight") for _, name, _, _ in found)


# ---- bad input -------------------------------------------------------------------------------

def message(report, case):
    text, seconds = report["bad_messages"][case]
    return text or "", seconds


def test_config_differing_between_ranks_fails_on_every_rank(ep_run):
    for report in ep_run.results.values():
        text, seconds = message(report, "config_differs")
        assert "ValueError: the MoE config differs between ranks: ranks [1] disagree with " \
               "rank 0: router.top_k = 3 on rank 1 but 2 on rank 0" in text, text
        assert seconds < SLACK_S


def test_too_many_tokens_names_the_key_and_a_rebuilt_layer_works(ep_run):
    for report in ep_run.results.values():
        for phase in ("prefill", "decode"):
            text, _ = message(report, f"too_many_tokens_all/{phase}")
            assert text.startswith("ValueError: 9 tokens on this rank exceed "
                                   "dispatch.max_tokens_per_rank = 8"), text
        assert report["bad_messages"]["usable_after_rebuild"][0] is None


def test_too_many_tokens_on_one_rank_fails_its_peers_at_once_naming_it(ep_run):
    last = world_of(ep_run) - 1
    for rank, report in ep_run.results.items():
        text, seconds = message(report, "too_many_tokens_one_rank")
        assert "dispatch.max_tokens_per_rank = 8" in text, text
        if rank != last:
            assert f"rank {last} failed in exchange step 1: ValueError: 9 tokens" in text, text
        assert seconds < SLACK_S, seconds


def test_expert_id_out_of_range_fails_on_every_rank(ep_run):
    bad_value = "expert_ids[1,1] = 99 is out of range [0, 8)"
    for rank, report in ep_run.results.items():
        prefill, prefill_s = message(report, "bad_expert_id/prefill")
        decode, decode_s = message(report, "bad_expert_id/decode")
        rowwise, rowwise_s = message(report, "bad_expert_id/decode_rowwise")
        unsynced, unsynced_s = message(report, "bad_expert_id/decode_unsynced")
        if rank == 1:
            assert bad_value in prefill and bad_value in decode, (prefill, decode)
            assert bad_value in rowwise and rowwise_s < SLACK_S, rowwise
            # The failure explained is the first one, not a follow-on of the queued combine.
            assert bad_value in unsynced.splitlines()[0], unsynced
            assert max(prefill_s, decode_s) < SLACK_S
        else:
            # The layout kernel fails before the exchange; a failed kernel abandons the
            # process's windows, so the peers get the reason at once instead of a timeout.
            assert "rank 1 failed in exchange step 1: MoeEpExpertParallelLayout: " \
                   f"{bad_value}" in prefill, prefill
            assert prefill_s < BAD_TIMEOUT_S, prefill_s
            # The fused dispatch (and deliver) abandons its window itself, with the same effect.
            assert f"rank 1 failed in exchange step 1: {bad_value}" in decode, decode
            assert decode_s < BAD_TIMEOUT_S, decode_s
            assert f"rank 1 failed in exchange step 1: {bad_value}" in rowwise, rowwise
            assert rowwise_s < BAD_TIMEOUT_S, rowwise_s
        assert unsynced and unsynced_s < BAD_TIMEOUT_S + SLACK_S, (unsynced, unsynced_s)
