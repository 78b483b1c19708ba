"""Bad input to MoELayer is refused before any work, naming the argument, the value and what is
allowed: at EP 1 in this process, and under expert parallelism (EP 2 and 4, msrun workers:
tests/distributed/bad_input_worker.py) on the offending rank and, at once, on its peers.
"""
import os

import mindspore as ms
import numpy as np
import pytest

import mindspore_moe_ep as mee
from distributed import launch

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "yaml_configs",
                    "tiny.yaml")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed",
                      "bad_input_worker.py")
SHAPE_RULE = "expected [tokens, 16] or [batch, seq, 16] (model.hidden_size = 16)"
EXPECTED = {
    "hidden_divides": "MoELayer: x has shape (4, 32); " + SHAPE_RULE,
    "three_d_wrong_hidden": "MoELayer: x has shape (2, 4, 8); " + SHAPE_RULE,
    "int32": "MoELayer: x has dtype Int32; expected float32, float16 or bfloat16",
    "one_d": "MoELayer: x has shape (16,); " + SHAPE_RULE,
    "four_d": "MoELayer: x has shape (1, 2, 4, 16); " + SHAPE_RULE,
    "too_many_tokens": "33 tokens on this rank exceed dispatch.max_tokens_per_rank = 32",
}
PEER_BOUND_S = 5.0  # far below the workers' dispatch.timeout_s (20 s)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("case, shape, dtype", [
    ("hidden_divides", (4, 32), np.float32),
    ("three_d_wrong_hidden", (2, 4, 8), np.float32),
    ("int32", (8, 16), np.int32),
    ("one_d", (16,), np.float32),
    ("four_d", (1, 2, 4, 16), np.float32),
    ("too_many_tokens", (33, 16), np.float32),
])
def test_bad_input_is_refused_at_ep1(mode, case, shape, dtype):
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    layer = mee.MoELayer(mee.load_config(TINY, mode=mode, max_tokens_per_rank=32))
    with pytest.raises((ValueError, TypeError)) as raised:
        layer(ms.Tensor(np.ones(shape, dtype)))
    assert EXPECTED[case] in str(raised.value), str(raised.value)


def test_bad_input_inside_a_compiled_model_is_refused_at_compile_time():
    """A model compiled around the layer (GRAPH_MODE) never runs the layer's own __call__:
    construct checks the static shape as it compiles."""
    ms.set_context(mode=ms.GRAPH_MODE)

    class Model(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.moe = mee.MoELayer(mee.load_config(TINY, mode="graph"))

        def construct(self, x):
            return self.moe(x) * 2

    with pytest.raises(ValueError) as raised:
        Model()(ms.Tensor(np.ones((4, 32), np.float32)))
    assert EXPECTED["hidden_divides"] in str(raised.value), str(raised.value)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda world: f"world{world}")
def bad_run(request):
    with launch.msrun_reports(WORKER, request.param, timeout_s=400) as result:
        yield result


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_input_under_ep_fails_every_rank_at_once(bad_run, case):
    world = len(bad_run.results)
    for rank, report in bad_run.results.items():
        everyone = report["cases"][f"{case}/all"]
        assert EXPECTED[case] in (everyone["error"] or ""), everyone
        assert everyone["seconds"] < PEER_BOUND_S, everyone
        one = report["cases"][f"{case}/one"]
        if rank == world - 1:
            assert EXPECTED[case] in (one["error"] or ""), one
        else:  # a peer learns the offending rank's own reason from the window, at once
            assert f"rank {world - 1} failed in exchange step" in (one["error"] or ""), one
            assert EXPECTED[case] in one["error"], one
        assert one["seconds"] < PEER_BOUND_S, (rank, one)


def test_rebuilt_layers_release_their_windows(bad_run):
    for report in bad_run.results.values():
        assert report["windows_after_rebuilds"] == report["windows_before_rebuilds"], report
