"""Ranks of one expert-parallel group that take different paths in a step fail at once, on every
rank, naming the paths and the fix; they never return a silently wrong output.

The case of the issue: EP 2 and 4, tiny.yaml with top_k 2, max_tokens_per_rank 32 and
decode_token_threshold 8; rank 0 holds 16 tokens (prefill path), the others 2 (decode path), all
calling ``layer(x)`` with the default ``phase=None`` in inference. Workers:
tests/distributed/phase_worker.py.
"""
import os

import pytest

from distributed import launch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed",
                      "phase_worker.py")
# Seconds within which a mismatch must be reported: far below the layer's dispatch.timeout_s
# (20 s in the worker), so a rank that waited for the timeout fails this bound. GRAPH_MODE
# includes the step's compilation (a few seconds with 4 ranks on 2 cores).
DETECTION_BOUND_S = {"pynative": 5.0, "graph": 12.0}
LAYER_REL_TOL = 1e-5  # EP vs EP = 1 forward: the same float32 arithmetic up to summation order


@pytest.fixture(scope="module", params=[2, 4], ids=lambda world: f"world{world}")
def phase_run(request):
    with launch.msrun_reports(WORKER, request.param, timeout_s=300) as result:
        yield result


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("routing", ["hot", "random"])
def test_straddling_ranks_fail_at_once_naming_both_paths(phase_run, mode, routing):
    for rank, report in phase_run.results.items():
        case = report["cases"][f"straddle/{mode}/{routing}"]
        expected_path = "SparseAllToAllDispatcher" if rank == 0 else "FusedDecodeDispatcher"
        assert case["path"] == expected_path
        text = case["error"]
        assert text is not None, f"rank {rank} returned an output ({mode}, {routing})"
        assert "ranks out of step in exchange step" in text, text
        # The rank's own operator and a peer's, whichever message it read first.
        own, other = (("DeliverRows (prefill)", "FusedDeliver (decode)") if rank == 0 else
                      ("FusedDeliver (decode)", "DeliverRows (prefill)"))
        assert own in text or "failed in exchange step" in text, text
        assert other in text, text
        assert "pass phase='prefill' or phase='decode' (the same on every rank)" in text, text
        assert case["seconds"] < DETECTION_BOUND_S[mode], (rank, case["seconds"])


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_explicit_phase_equals_the_single_process_result(phase_run, mode):
    for rank, report in phase_run.results.items():
        case = report["cases"][f"explicit_phase/{mode}"]
        assert case["error"] is None, case["error"]
        assert case["scaled_error"] <= LAYER_REL_TOL, (rank, case["scaled_error"])
