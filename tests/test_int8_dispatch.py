"""Per-token int8 dispatch (``dispatch.quant: int8``, CANN's quant mode 2).

- The kernels' quantizer and dequantizer against the NumPy statement of the rule
  (tests/reference/numpy_quant.py): int8 values and scales equal, ties to even, rows of zeros and
  rows whose scale underflows, every dtype, under every instruction set the CPU runs.
- The layer at EP 1 against the NumPy float64 reference evaluated on the dequantized rows
  (prefill and decode, PyNative and GRAPH_MODE, its gradients straight-through), and its error
  against the unquantized layer below a stated bound.
- Under msrun (4 ranks): EP 4 and EP 2, every path that moves token rows, equal to EP 1
  (tests/distributed/int8_dispatch_worker.py), and a NaN refused on every rank at once.
- Config validation and the CANN arguments (quant mode 2, dequantized dynamic scales).
"""
import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

import mindspore_moe_ep as mee
from mindspore_moe_ep.config import ConfigError
from mindspore_moe_ep.ops import CPU_ISAS, KernelError, detected_cpu_isa, set_cpu_isa
from mindspore_moe_ep.ops.quantized_rows import (DequantizeRows, QuantizeRoundTrip, QuantizeRows,
                                                 int8_row_words)
from distributed import launch
from reference import numpy_moe as ref
from reference.numpy_quant import dequantize_int8, int8_round_trip, quantize_int8_per_token
from reference.numpy_moe import RefConfig
from test_layer_vs_reference import (EXPERT_PATHS, H, TINY, assert_scaled_close, build_layer,
                                     layer_grads, make_case, to_numpy)

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
# A hidden size with 32-value blocks (quantize), 16-value blocks (dequantize) and a scalar tail.
WIDE = 2 * 32 + 16 + 5
MSRUN = os.path.join(os.path.dirname(sys.executable), "msrun")
BAD_TIMEOUT_S = 3.0
SLACK_S = 5.0
# The layer with int8 rows against the unquantized layer, max |difference| / max |output| on the
# random inputs below: each value moves by at most scale / 2 = max|x| / 254 (0.4% of its row's
# largest), and the experts' output moves by about as much relative to its size.
INT8_VS_NONE_REL_BOUND = 1e-2


@pytest.fixture(autouse=True, scope="module")
def pynative_mode():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield


def runnable_isas():
    return CPU_ISAS[:CPU_ISAS.index(detected_cpu_isa()) + 1]


def rows_to_test(seed=0):
    """Float32 rows with the rule's edge cases: random magnitudes, exact ties, zeros, a row whose
    scale underflows, negative maxima, and a row with a single non-zero value."""
    rng = np.random.default_rng(seed)
    rows = (rng.standard_normal((9, WIDE)) * 10.0 ** rng.integers(-3, 4, (9, 1))).astype(
        np.float32)
    ties = (np.arange(WIDE) - WIDE // 2 + 0.5).astype(np.float32)  # x / scale = k + 0.5
    ties[0] = -127.0                                               # max |x| = 127: scale = 1
    rows[1] = ties
    rows[2] = 0.0
    rows[3] = np.float32(1e-44) * np.sign(rng.standard_normal(WIDE))   # amax / 127 underflows
    rows[4] = -np.abs(rows[4])
    rows[5] = 0.0
    rows[5, 17] = 3.0
    return rows


def unpack(quantized, hidden):
    """int32 words [T, W] -> (q [T, H] int8, scale [T] float32)."""
    words = quantized.asnumpy()
    q = words.view(np.int8).reshape(words.shape[0], -1)[:, :hidden]
    return q, words[:, -1].view(np.float32)


# ---- the rule -------------------------------------------------------------------------------------

def test_numpy_rule_on_hand_derived_values():
    """The reference itself, on values worked out by hand: ties go to the even integer."""
    x = np.array([[127.0, 2.5, -2.5, 3.5, 0.5, -0.49, 0.0],
                  [0.0] * 7], np.float32)
    q, scale = quantize_int8_per_token(x)
    np.testing.assert_array_equal(q[0], [127, 2, -2, 4, 0, 0, 0])
    np.testing.assert_array_equal(q[1], 0)
    np.testing.assert_array_equal(scale, [1.0, 0.0])
    np.testing.assert_array_equal(dequantize_int8(q, scale)[0], [127, 2, -2, 4, 0, 0, 0])


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_quantize_rows_match_numpy_under_every_isa(dtype):
    x = ref.round_to_dtype(rows_to_test(), dtype)       # values of the dtype, as float32
    expected_q, expected_scale = quantize_int8_per_token(x)
    slots = np.array([[4], [-1], [0], [2], [1], [3], [5], [6], [7], [8], [0]], np.int32)
    try:
        for isa in runnable_isas():
            set_cpu_isa(isa)
            q, scale = unpack(QuantizeRows()(Tensor(x).astype(DTYPES[dtype]), Tensor(slots)),
                              WIDE)
            used = slots[:, 0] >= 0
            np.testing.assert_array_equal(q[used], expected_q[slots[used, 0]], err_msg=isa)
            np.testing.assert_array_equal(scale[used], expected_scale[slots[used, 0]],
                                          err_msg=isa)
    finally:
        set_cpu_isa("avx512")


def test_quantize_matches_numpy_on_many_rows_near_the_rounding_boundaries():
    """The vector path multiplies by 1 / scale and divides only near a half-integer: thousands
    of rows of every magnitude, and rows whose quotients sit within a few ulp of k + 0.5, give
    exactly the division's values."""
    rng = np.random.default_rng(7)
    magnitudes = 10.0 ** rng.uniform(-35, 35, (3000, 1))
    random_rows = rng.standard_normal((3000, WIDE)) * magnitudes
    # x / scale = k + 0.5 + a few ulp, with power-of-two scales (exact quotients) and with
    # arbitrary ones (scale = fl(max / 127), x = fl((k + 0.5) * scale): quotients off by an ulp)
    halves = rng.integers(-126, 126, (2000, WIDE)) + 0.5
    jitter = rng.integers(-4, 5, (2000, WIDE)) * 2.0 ** -22 * np.abs(halves)
    powers = 2.0 ** rng.integers(-20, 20, (1000, 1))
    exact = np.concatenate([127 * powers, ((halves + jitter)[:1000, 1:]) * powers], axis=1)
    maxima = (rng.uniform(0.5, 2.0, (1000, 1)) * 10.0 ** rng.uniform(-5, 5, (1000, 1))).astype(
        np.float32)
    scales = maxima / np.float32(127)
    inexact = np.concatenate([maxima, (halves[1000:, 1:] * scales).astype(np.float32)], axis=1)
    near_ties = np.concatenate([exact, inexact])
    x = np.concatenate([random_rows, near_ties]).astype(np.float32)
    expected_q, expected_scale = quantize_int8_per_token(x)
    slots = Tensor(np.arange(len(x), dtype=np.int32).reshape(-1, 1))
    try:
        for isa in runnable_isas():
            set_cpu_isa(isa)
            q, scale = unpack(QuantizeRows()(Tensor(x), slots), WIDE)
            np.testing.assert_array_equal(q, expected_q, err_msg=isa)
            np.testing.assert_array_equal(scale, expected_scale, err_msg=isa)
    finally:
        set_cpu_isa("avx512")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_dequantize_and_round_trip_match_numpy_under_every_isa(dtype):
    x = ref.round_to_dtype(rows_to_test(1), dtype)
    q, scale = quantize_int8_per_token(x)
    words = np.zeros((len(x) + 3, int8_row_words(WIDE)), np.int32)
    packed = words.view(np.int8).reshape(len(words), -1)
    packed[:len(x), :WIDE] = q
    words[:len(x), -1] = scale.view(np.int32)
    expected = dequantize_int8(q, scale, dtype)
    counts = Tensor(np.array([len(x)], np.int32))    # one block; the last 3 rows unused
    try:
        for isa in runnable_isas():
            set_cpu_isa(isa)
            rows = to_numpy(DequantizeRows(WIDE, DTYPES[dtype])(Tensor(words), counts))
            np.testing.assert_array_equal(rows[:len(x)], expected, err_msg=isa)
            round_trip = to_numpy(QuantizeRoundTrip()(Tensor(x).astype(DTYPES[dtype])))
            np.testing.assert_array_equal(round_trip, expected, err_msg=isa)
    finally:
        set_cpu_isa("avx512")
    # the error of the round trip: at most half a step (scale / 2) per value, before rounding
    # (rows whose scale underflows to 0 lose their values, below 127 * 2^-149 each)
    if dtype == "float32":
        scaled = scale > 0
        assert (np.abs(expected - x)[scaled] <= scale[scaled, None] / 2 * (1 + 1e-6)).all()
        assert (np.abs(x[~scaled]) < 127 * 2.0 ** -149).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_row_that_int8_cannot_carry_is_refused_naming_the_token(bad):
    x = np.ones((5, WIDE), np.float32)
    x[3, 40] = bad
    with pytest.raises(KernelError, match=r"x\[3, 40\] = (nan|inf|-inf) \(token 3 of this rank\)"):
        QuantizeRoundTrip()(Tensor(x))
    with pytest.raises(KernelError, match=r"x\[3, 40\]"):
        QuantizeRows()(Tensor(x), Tensor(np.array([[3]], np.int32)))


def test_dequantize_refuses_counts_outside_the_blocks():
    words = Tensor(np.zeros((8, int8_row_words(16)), np.int32))
    with pytest.raises(KernelError, match=r"row_counts\[1\] = 5 is outside \[0, 4\]"):
        DequantizeRows(16, ms.float32)(words, Tensor(np.array([2, 5], np.int32)))


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_row_wise_experts_read_quantized_rows_as_their_dequantized_form(dtype):
    """Rows that stay int8 where they land (inference under EP) give the row-wise experts the
    same numbers, bit for bit, as the same rows dequantized first; their gradient is refused
    with a clear error (training delivers rows dequantized)."""
    from mindspore_moe_ep.ops import ExpertsWeightedSum
    from test_experts_weighted_sum import make_inputs, tensors
    inputs, used = make_inputs(np.random.default_rng(3), [40, 17, 0], 40, dtype)
    inputs["rows"][~used] = 0.0                       # quantized tails: any bytes, never read
    rows, ids, weights, counts, gate_up, down = tensors(inputs, dtype)
    block_slots = Tensor(np.arange(len(inputs["rows"]), dtype=np.int32).reshape(-1, 1))
    quantized = QuantizeRows()(rows, block_slots)                                  # [N, W]
    dequantized = DequantizeRows(rows.shape[1], DTYPES[dtype])(quantized, counts)  # [N, H]
    expected, expected_counts = ExpertsWeightedSum()(dequantized, ids, weights, counts, gate_up,
                                                     down)
    out, tokens_per_expert = ExpertsWeightedSum()(quantized, ids, weights, counts, gate_up, down)
    assert out.dtype == DTYPES[dtype]
    np.testing.assert_array_equal(to_numpy(out)[used], to_numpy(expected)[used])
    np.testing.assert_array_equal(tokens_per_expert.asnumpy(), expected_counts.asnumpy())
    from mindspore_moe_ep.ops import explain_kernel_errors
    from mindspore_moe_ep.ops.local_kernels import experts_weighted_sum_grad_op
    with pytest.raises(KernelError, match="rows are quantized"), explain_kernel_errors():
        experts_weighted_sum_grad_op()(out, quantized, ids, weights, counts, gate_up,
                                       down)[0].asnumpy()


# ---- the layer at EP 1 -----------------------------------------------------------------------------

def int8_case(seed, shape=(24, H), shared=True):
    cfg = RefConfig(num_experts=8, top_k=2)
    params, x = make_case(cfg, shape, seed=seed, shared=shared)
    return cfg, params, x


@pytest.mark.parametrize("experts_path", EXPERT_PATHS)
def test_layer_equals_the_reference_on_dequantized_rows(experts_path):
    """Routing and the shared expert read x; the routed experts read x's int8 round trip."""
    cfg, params, x = int8_case(seed=300)
    layer = build_layer(cfg, params, shared=True, experts_path=experts_path, quant="int8")
    assert layer.plan(24, "prefill").quantized
    y = to_numpy(layer(Tensor(x)))
    expected, _ = ref.moe_forward(params, x, cfg, expert_input=int8_round_trip(x))
    assert_scaled_close(y, expected, 1e-5, "int8 layer vs reference on dequantized rows")
    unquantized, _ = ref.moe_forward(params, x, cfg)
    difference = np.abs(expected - unquantized).max() / np.abs(unquantized).max()
    assert 1e-5 < difference < INT8_VS_NONE_REL_BOUND  # quantized, and not by much


def test_decode_and_graph_mode_take_the_same_round_trip():
    cfg, params, x = int8_case(seed=301, shape=(4, H))
    expected, _ = ref.moe_forward(params, x, cfg, expert_input=int8_round_trip(x))
    layer = build_layer(cfg, params, shared=True, quant="int8")
    assert_scaled_close(to_numpy(layer(Tensor(x), "decode")), expected, 1e-5, "decode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph_layer = build_layer(cfg, params, shared=True, quant="int8", mode="graph")
        assert_scaled_close(to_numpy(graph_layer(Tensor(x))), expected, 1e-5, "graph mode")
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.parametrize("experts_path", ["grouped", "recompute"])
def test_gradients_are_straight_through(experts_path):
    """The experts' gradient at the dequantized rows reaches x unchanged (d x' / d x = 1)."""
    cfg, params, x = int8_case(seed=302)
    grad_out = np.random.default_rng(303).standard_normal(x.shape)
    _, expected = ref.moe_loss_and_grads(params, x, grad_out, cfg,
                                         expert_input=int8_round_trip(x))
    layer = build_layer(cfg, params, shared=True, experts_path=experts_path, quant="int8")
    got = layer_grads(layer, x, grad_out)
    assert set(got) == set(expected)
    for key in sorted(expected):
        assert_scaled_close(got[key], expected[key], 5e-5, f"d {key}")


def test_error_against_the_unquantized_layer_on_random_data():
    """Same weights, random (not margin-filtered) tokens: the int8 layer's output stays within
    INT8_VS_NONE_REL_BOUND of the unquantized one (a token whose routing is near a tie picks
    the same experts: routing reads the unquantized x)."""
    config = mee.load_config(TINY, hidden_size=WIDE, max_tokens_per_rank=256)
    layers = {quant: mee.MoELayer(config.replace(quant=quant)) for quant in ("none", "int8")}
    for a, b in zip(*(layer.trainable_params() for layer in layers.values())):  # same seed
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    x = Tensor(np.random.default_rng(5).standard_normal((256, WIDE)).astype(np.float32))
    outputs = {quant: to_numpy(layer(x, "prefill")) for quant, layer in layers.items()}
    error = np.abs(outputs["int8"] - outputs["none"]).max() / np.abs(outputs["none"]).max()
    assert 0 < error < INT8_VS_NONE_REL_BOUND


def test_the_layer_refuses_a_nan_before_any_exchange():
    cfg, params, x = int8_case(seed=304, shape=(6, H))
    x = x.copy()
    x[2, 7] = np.nan
    layer = build_layer(cfg, params, shared=True, quant="int8")
    with pytest.raises(Exception, match=r"x\[2, 7\] = nan \(token 2 of this rank\)"):
        layer(Tensor(x)).asnumpy()


def test_the_main_job_says_that_rows_travel_as_int8(tmp_path):
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, "scripts/run_moe.py", TINY, "--expert-parallel", "1", "--quant", "int8",
         "--repeats", "1", "--json", str(summary_path)], cwd=launch.REPOSITORY_ROOT,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rows int8" in result.stdout
    phases = json.loads(summary_path.read_text())["phases"]
    assert phases["prefill"]["quantized"] and phases["decode0"]["quantized"]
    assert phases["train0"]["quantized"]  # training steps quantize too (straight-through)


# ---- config ------------------------------------------------------------------------------------------

def test_quant_is_validated_and_defaults_to_none():
    assert mee.load_config(TINY).dispatch.quant == "none"
    assert mee.load_config(TINY, quant="int8").dispatch.quant == "int8"
    with pytest.raises(ConfigError, match=r"dispatch\.quant.*'fp8'.*none.*int8"):
        mee.load_config(TINY, quant="fp8")


def test_cann_arguments_ask_for_quant_mode_2_and_the_dispatcher_dequantizes():
    from mindspore_moe_ep.ascend.cann_dispatcher import CannDecodeDispatcher
    from mindspore_moe_ep.ascend.cann_limits import cann_dispatch_arguments
    from test_cann_arguments import config as cann_config, group_of
    for quant, mode in (("none", 0), ("int8", 2)):
        cfg = cann_config(quant=quant)
        arguments = cann_dispatch_arguments(cfg, group_of(cfg), "A3")
        assert arguments.dispatch_kwargs()["quant_mode"] == mode
    dispatcher = CannDecodeDispatcher(arguments)
    assert dispatcher.quantized
    rows = np.array([[127, -64, 3, 0], [1, 2, -3, 4]], np.int8)
    scales = np.array([0.5, 2.0], np.float32)
    seen = {}

    def fake_dispatch(x, expert_ids, *positional, **kwargs):
        seen.update(kwargs)
        marker = Tensor(np.zeros(1, np.int32))
        counts = Tensor(np.ones(arguments.local_expert_num, np.int64))
        return (Tensor(rows), Tensor(scales), marker, counts, marker, marker, marker)

    dispatcher._dispatch_op = fake_dispatch
    x = Tensor(np.zeros((3, 4), np.float32))
    expand_x, *_ = dispatcher.dispatch(x, Tensor(np.zeros((3, 8), np.int32)),
                                       Tensor(np.ones((3, 8), np.float32)))
    assert seen["quant_mode"] == 2
    np.testing.assert_array_equal(expand_x.asnumpy(), rows.astype(np.float32) * scales[:, None])
    assert expand_x.dtype == x.dtype


# ---- expert parallelism under msrun -----------------------------------------------------------------

@pytest.fixture(scope="module")
def four_ranks():
    if not os.path.exists(MSRUN):
        pytest.skip("msrun is not installed")
    with launch.msrun_reports(os.path.join("tests", "distributed", "int8_dispatch_worker.py"), 4,
                              timeout_s=420) as result:
        yield result.results


@pytest.mark.parametrize("part", ["forward", "grad"])
def test_expert_parallel_equals_expert_parallelism_1(four_ranks, part):
    """EP 4 and EP 2, every row-moving path (window pull and pack, fused experts + combine,
    grouped and row-wise decode, AllGather), forward and straight-through gradients: the
    single-process int8 layer's numbers (worker's tolerances: 1e-5 forward, 5e-5 gradients)."""
    minimum = {"forward": 60, "grad": 20}[part]
    for rank, report in sorted(four_ranks.items()):
        found = [(name, ok, detail) for name, ok, detail in report["checks"]
                 if name.split("/", 1)[1].startswith(part + "/")]
        failed = [f"rank {rank}: {name}: {detail[-500:]}" for name, ok, detail in found if not ok]
        assert not failed, "\n".join(failed[:10])
        assert len(found) >= minimum, f"rank {rank}: only {len(found)} '{part}' checks"


def test_a_nan_fails_every_rank_at_once_naming_its_token(four_ranks):
    for rank, report in sorted(four_ranks.items()):
        for case, (message, seconds) in report["bad_messages"].items():
            assert message is not None, f"rank {rank}: {case} did not fail"
            assert seconds < BAD_TIMEOUT_S + SLACK_S, f"rank {rank}: {case} took {seconds} s"
            if case == "nan/allgather":
                assert "holds NaN or infinity" in message, message
            else:
                assert "x[3, 5] = nan (token 3 of this rank)" in message, message
                if rank != 1:
                    assert "rank 1 failed" in message, message
