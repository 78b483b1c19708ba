"""Checks of the kernels and the layer against the golden vectors of tests/golden/.

Shared by tests/test_golden_vectors.py (CPU kernels, run here) and tests/test_ascend.py (the
AscendC kernels, on an NPU): the kernel Cells of mindspore_moe_ep.ops are the same classes on
both devices; the device target decides which kernel they run. Each ``check_*`` runs one case
and asserts; ``dtype`` is the float dtype the float inputs are cast to.
"""
import json
import os

import numpy as np

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
TINY_YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "yaml_configs", "tiny.yaml")

# Relative tolerance of float results (max abs error / max |expected|) by dtype: float32 adds in
# float32 (a few ulp); float16 / bfloat16 also round inputs and output (~1 ulp each).
REL_TOL = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}


def load(name):
    """The arrays of tests/golden/<name>.npz as a dict."""
    with np.load(os.path.join(GOLDEN_DIR, name + ".npz")) as stored:
        return {key: stored[key] for key in stored.files}


def _ms():
    import mindspore as ms
    return ms


def _tensor(array, dtype):
    ms = _ms()
    return ms.Tensor(np.asarray(array, np.float32)).astype(getattr(ms, dtype))


def _float64(tensor):
    return tensor.astype(_ms().float32).asnumpy().astype(np.float64)


def _round(array, dtype):
    """``array`` rounded to ``dtype`` (what the kernel sees), as float64."""
    return _float64(_tensor(array, dtype))


def assert_close(actual, expected, dtype, what):
    """max|actual - expected| <= REL_TOL[dtype] * max|expected| (shapes equal)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.abs(expected).max()), 1e-12)
    error = float(np.abs(actual - expected).max())
    assert error <= REL_TOL[dtype] * scale, (
        f"{what} ({dtype}): max error {error:.3g} > {REL_TOL[dtype]:g} * {scale:.3g}")


def check_dispatch(name, dtype):
    """DispatchKernel: positions, counts and drops exact; the used rows are x's rows, moved
    exactly (rows past sum(tokens_per_expert) are unspecified)."""
    from mindspore_moe_ep.ops import DispatchKernel
    ms = _ms()
    case = load(name)
    kernel = DispatchKernel(int(case["num_experts"]), int(case["capacity"][0]))
    grouped_x, positions, tokens_per_expert, num_dropped = kernel(
        _tensor(case["x"], dtype), ms.Tensor(case["expert_ids"]))
    np.testing.assert_array_equal(positions.asnumpy(), case["positions"])
    np.testing.assert_array_equal(tokens_per_expert.asnumpy(), case["tokens_per_expert"])
    np.testing.assert_array_equal(num_dropped.asnumpy(), case["num_dropped"])
    used = int(np.sum(case["tokens_per_expert"]))
    np.testing.assert_array_equal(_float64(grouped_x)[:used],
                                  _round(case["grouped_x"], dtype)[:used])


def check_combine(dtype, weighted):
    """CombineKernel (weighted) or the unweighted gather-sum, against the float64 sums."""
    from mindspore_moe_ep.ops import CombineKernel
    from mindspore_moe_ep.ops.local_kernels import gather_sum_op
    ms = _ms()
    case = load("combine")
    rows, positions = _tensor(case["expert_out"], dtype), ms.Tensor(case["positions"])
    if weighted:
        y = CombineKernel()(rows, positions, ms.Tensor(case["weights"]))
        expected = case["y"]
    else:
        y = gather_sum_op()(rows, positions)
        expected = case["y_unweighted"]
    # The reference sums the float32 inputs; the kernel sees them rounded to dtype first.
    rounded = {"expert_out": _round(case["expert_out"], dtype)}
    expected_from_rounded = _weighted_sum(rounded["expert_out"], case["positions"],
                                          case["weights"] if weighted else None)
    assert_close(_float64(y), expected_from_rounded, dtype, "combine" if weighted else "gather_sum")
    if dtype == "float32":
        assert_close(_float64(y), expected, dtype, "combine vs golden")


def _weighted_sum(rows, positions, weights):
    y = np.zeros((positions.shape[0], rows.shape[1]))
    for t, k in zip(*np.nonzero(positions >= 0)):
        y[t] += (1.0 if weights is None else float(weights[t, k])) * rows[positions[t, k]]
    return y


def check_gather_rows(dtype):
    """GatherRows (the pack / unpack of the prefill exchange): the unweighted gather-sum."""
    from mindspore_moe_ep.ops.ep_kernels import GatherRows
    ms = _ms()
    case = load("combine")
    positions = case["positions"]
    inverse = np.full((case["expert_out"].shape[0], 1), -1, np.int32)   # not read by the kernel
    out = GatherRows()(_tensor(case["expert_out"], dtype), ms.Tensor(positions), ms.Tensor(inverse))
    expected = _weighted_sum(_round(case["expert_out"], dtype), positions, None)
    assert_close(_float64(out), expected, dtype, "gather_rows")


def check_layout():
    """ExpertParallelLayout: every output exact."""
    from mindspore_moe_ep.ops.ep_kernels import ExpertParallelLayout
    ms = _ms()
    case = load("expert_parallel_layout")
    layout = ExpertParallelLayout(int(case["world_size"]), int(case["capacity_per_rank"]),
                                  int(case["experts_per_rank"][0]))
    outputs = layout(ms.Tensor(case["expert_ids"]))
    for name, output in zip(("send_token_index", "send_counts", "token_slot", "send_local_ids"),
                            outputs):
        np.testing.assert_array_equal(output.asnumpy(), case[name], err_msg=name)


def check_layer(name, rel_tol=1e-5):
    """A tiny.yaml MoELayer loaded with the case's weights reproduces its output and routing."""
    import mindspore_moe_ep as mee
    ms = _ms()
    case = load(name)
    overrides = json.loads(str(case["overrides"]))
    config = mee.load_config(TINY_YAML, mode="pynative", dtype="float32", **overrides)
    layer = mee.MoELayer(config)
    layer.load_hf_state_dict({key[len("param:"):]: value for key, value in case.items()
                              if key.startswith("param:")})
    y = _float64(layer(ms.Tensor(case["x"].astype(np.float32))))
    scale = float(np.abs(case["y"]).max())
    error = float(np.abs(y - case["y"]).max())
    assert error <= rel_tol * scale, f"{name}: max error {error:.3g} > {rel_tol:g} * {scale:.3g}"
    expert_ids, weights = layer.route(ms.Tensor(case["x"].astype(np.float32)))
    np.testing.assert_array_equal(expert_ids.asnumpy(), case["expert_ids"])
    np.testing.assert_allclose(weights.asnumpy(), case["weights"], rtol=1e-5, atol=1e-6)
    stats = layer.stats()
    np.testing.assert_array_equal(stats["tokens_per_expert"], case["tokens_per_expert"])
    assert stats["num_dropped"] == int(case["num_dropped"])
