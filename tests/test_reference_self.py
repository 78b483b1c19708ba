"""Self-checks of the NumPy float64 reference (no library code involved).

Hand-computed router cases, group-limited selection, capacity dropping, aux/z losses with known
values, and the analytic gradients against central finite differences.
"""
import math
from dataclasses import replace

import numpy as np
import pytest

from reference import numpy_moe as ref
from reference.numpy_moe import RefConfig


def _gate_params(logits_row, hidden=1):
    """Weights so that x = [[1, 0, ...]] yields exactly ``logits_row`` as router logits."""
    gate = np.zeros((len(logits_row), hidden))
    gate[:, 0] = logits_row
    return {"gate.weight": gate}


# ----------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------

def test_softmax_top2_hand_computed():
    params = _gate_params([1.0, 2.0, 0.0, 3.0])
    x = np.array([[1.0]])
    # softmax([1, 2, 0, 3]) = [0.0871443..., 0.2368828..., 0.0320586..., 0.6439142...]
    r = ref.route(x, params, RefConfig(num_experts=4, top_k=2, norm_topk_prob=False))
    np.testing.assert_array_equal(r["expert_ids"], [[3, 1]])
    np.testing.assert_allclose(r["weights"], [[0.6439142598879724, 0.23688281808991016]],
                               rtol=1e-14)
    # normalised: e^3 / (e^3 + e^2) = sigmoid(1) = 0.7310585786...
    r = ref.route(x, params, RefConfig(num_experts=4, top_k=2, norm_topk_prob=True,
                                       routed_scaling_factor=2.5))
    np.testing.assert_allclose(r["weights"], [[2.5 * 0.7310585786300048,
                                               2.5 * 0.2689414213699951]], rtol=1e-14)


def test_ties_pick_lower_index_and_top1_is_not_normalised():
    params = _gate_params([0.5, 2.0, 2.0, 2.0])
    cfg = RefConfig(num_experts=4, top_k=2, score_func="sigmoid")
    r = ref.route(np.array([[1.0]]), params, cfg)
    np.testing.assert_array_equal(r["expert_ids"], [[1, 2]])
    np.testing.assert_allclose(r["weights"], [[0.5, 0.5]], rtol=1e-14)
    # top_k = 1: norm_topk_prob is ignored, the weight is the raw sigmoid score
    r = ref.route(np.array([[1.0]]), params,
                  replace(cfg, top_k=1, norm_topk_prob=True))
    np.testing.assert_array_equal(r["expert_ids"], [[1]])
    np.testing.assert_allclose(r["weights"], [[1.0 / (1.0 + math.exp(-2.0))]], rtol=1e-14)


def test_group_limited_selection_hand_built():
    # groups of 2: g0 = [5, -5], g1 = [2, 2], g2 = [1.5, 1.5], g3 = [5, -5] (sigmoid scores)
    # group scores (sum of top-2): g0 = g3 = 1.0, g1 = 2 sig(2) = 1.76, g2 = 2 sig(1.5) = 1.64
    params = _gate_params([5.0, -5.0, 2.0, 2.0, 1.5, 1.5, 5.0, -5.0])
    x = np.array([[1.0]])
    base = RefConfig(num_experts=8, top_k=2, score_func="sigmoid", num_groups=4, topk_groups=2)
    r = ref.route(x, params, base)
    # expert 0 has the best score but its group is dropped
    np.testing.assert_array_equal(r["expert_ids"], [[2, 3]])
    assert np.isneginf(r["choice"][0, [0, 1, 6, 7]]).all()
    # without groups expert 0 and 6 win
    r = ref.route(x, params, replace(base, num_groups=1, topk_groups=1))
    np.testing.assert_array_equal(r["expert_ids"], [[0, 6]])
    # topk_groups = 3: tie between g0 and g3 keeps the lower group index (g0)
    r = ref.route(x, params, replace(base, topk_groups=3, top_k=4))
    np.testing.assert_array_equal(r["expert_ids"], [[0, 2, 3, 4]])


def test_group_score_uses_single_expert_when_groups_have_one_expert():
    params = _gate_params([1.0, 3.0, 2.0, 0.0])
    cfg = RefConfig(num_experts=4, top_k=2, score_func="sigmoid", num_groups=4, topk_groups=2)
    r = ref.route(np.array([[1.0]]), params, cfg)
    np.testing.assert_array_equal(r["expert_ids"], [[1, 2]])


def test_expert_bias_changes_selection_not_weights():
    params = _gate_params([1.0, 0.0, 2.0, -1.0])
    params["gate.e_score_correction_bias"] = np.array([0.0, 0.0, 0.0, 0.9])
    x = np.array([[1.0]])
    cfg = RefConfig(num_experts=4, top_k=2, score_func="sigmoid", norm_topk_prob=False,
                    expert_bias=True)
    r = ref.route(x, params, cfg)
    sig = lambda a: 1.0 / (1.0 + math.exp(-a))
    # choice = [sig(1), sig(0), sig(2), sig(-1) + 0.9 = 1.169] -> experts 3, 2
    np.testing.assert_array_equal(r["expert_ids"], [[3, 2]])
    np.testing.assert_allclose(r["weights"], [[sig(-1.0), sig(2.0)]], rtol=1e-14)
    r = ref.route(x, params, replace(cfg, expert_bias=False))
    np.testing.assert_array_equal(r["expert_ids"], [[2, 0]])


# ----------------------------------------------------------------------------------------------
# Capacity
# ----------------------------------------------------------------------------------------------

def test_capacity_drops_hand_built():
    ids = np.array([[0, 1], [0, 2], [0, 1], [1, 0]])
    # C = ceil(1.0 * 4 * 2 / 4) = 2 -> expert 0 keeps (0,0),(1,0); drops (2,0),(3,1);
    # expert 1 keeps (0,1),(2,1); drops (3,0); expert 2 keeps (1,1)
    keep, tpe, dropped = ref.apply_capacity(ids, 4, 1.0)
    np.testing.assert_array_equal(keep, [[True, True], [True, True], [False, True],
                                         [False, False]])
    np.testing.assert_array_equal(tpe, [2, 2, 1, 0])
    assert dropped == 3
    assert ref.expert_capacity(0.6, 4, 2, 4) == 2          # ceil(1.2)
    keep, tpe, dropped = ref.apply_capacity(ids, 4, 0.5)   # C = 1
    np.testing.assert_array_equal(tpe, [1, 1, 1, 0])
    assert dropped == 5
    keep, tpe, dropped = ref.apply_capacity(ids, 4, None)  # dropless
    assert keep.all() and dropped == 0
    np.testing.assert_array_equal(tpe, [4, 3, 1, 0])


def test_dropped_pairs_contribute_nothing():
    rng = np.random.default_rng(0)
    params = ref.make_params(rng, 6, 5, 4, gate_scale=3.0)
    x = rng.standard_normal((8, 6))
    cfg = RefConfig(num_experts=4, top_k=2, capacity_factor=0.5)
    y, st = ref.moe_forward(params, x, cfg)
    assert st["num_dropped"] > 0
    expect = np.zeros_like(x)
    for t in range(8):
        for k in range(2):
            if st["keep"][t, k]:
                e = st["expert_ids"][t, k]
                p = {n: params[f"experts.{e}.{n}.weight"].astype(np.float64)
                     for n in ("gate_proj", "up_proj", "down_proj")}
                a, b = p["gate_proj"] @ x[t], p["up_proj"] @ x[t]
                expect[t] += st["weights"][t, k] * (p["down_proj"] @ (a / (1 + np.exp(-a)) * b))
    np.testing.assert_allclose(y, expect, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

def test_top_k_equal_num_experts_is_dense_mixture_plus_shared():
    rng = np.random.default_rng(1)
    params = ref.make_params(rng, 6, 5, 4, shared_ffn=7)
    x = rng.standard_normal((5, 6))
    cfg = RefConfig(num_experts=4, top_k=4, norm_topk_prob=False)
    y, st = ref.moe_forward(params, x, cfg)
    probs = ref.softmax(x @ params["gate.weight"].astype(np.float64).T)
    dense = sum(probs[:, e:e + 1] * ref.swiglu(
        x, *(params[f"experts.{e}.{n}.weight"].astype(np.float64)
             for n in ("gate_proj", "up_proj", "down_proj"))) for e in range(4))
    shared = ref.swiglu(x, *(params[f"shared_experts.{n}.weight"].astype(np.float64)
                             for n in ("gate_proj", "up_proj", "down_proj")))
    np.testing.assert_allclose(y, dense + shared, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(st["tokens_per_expert"], [5, 5, 5, 5])


def test_3d_input_matches_flattened_forward():
    rng = np.random.default_rng(2)
    params = ref.make_params(rng, 6, 5, 4)
    x = rng.standard_normal((2, 3, 6))
    cfg = RefConfig(num_experts=4, top_k=2)
    y3, _ = ref.moe_forward(params, x, cfg)
    y2, _ = ref.moe_forward(params, x.reshape(6, 6), cfg)
    assert y3.shape == (2, 3, 6)
    np.testing.assert_allclose(y3.reshape(6, 6), y2, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Aux / z losses
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_switch_aux_equals_seq_aux_for_one_sequence(score_func):
    rng = np.random.default_rng(3)
    params = ref.make_params(rng, 6, 5, 8, gate_scale=2.0)
    x = rng.standard_normal((10, 6))
    common = dict(num_experts=8, top_k=2, score_func=score_func, aux_loss_coeff=0.01)
    _, sw = ref.moe_forward(params, x, RefConfig(aux_loss_type="switch", **common))
    _, sq = ref.moe_forward(params, x, RefConfig(aux_loss_type="seq", **common))
    assert sw["aux_loss"] > 0
    assert sw["aux_loss"] == pytest.approx(sq["aux_loss"], rel=1e-12)


def test_seq_aux_is_mean_over_sequences():
    rng = np.random.default_rng(4)
    params = ref.make_params(rng, 6, 5, 8, gate_scale=2.0)
    x = rng.standard_normal((3, 5, 6))
    cfg = RefConfig(num_experts=8, top_k=2, aux_loss_type="seq", aux_loss_coeff=0.02)
    _, st = ref.moe_forward(params, x, cfg)
    per_seq = [ref.moe_forward(params, x[b], cfg)[1]["aux_loss"] for b in range(3)]
    assert st["aux_loss"] == pytest.approx(np.mean(per_seq), rel=1e-12)
    # and it differs from the switch loss over all 15 tokens (the pooled counts differ)
    _, sw = ref.moe_forward(params, x, replace(cfg, aux_loss_type="switch"))
    assert abs(sw["aux_loss"] - st["aux_loss"]) > 1e-6


def test_aux_loss_with_uniform_probs_equals_coeff_and_z_loss_known():
    # zero gate -> uniform probs P_e = 1/E, so coeff * E * sum_e f_e / E = coeff for any counts
    params = ref.make_params(np.random.default_rng(5), 3, 2, 4)
    params["gate.weight"] = np.zeros((4, 3))
    x = np.random.default_rng(5).standard_normal((6, 3))
    cfg = RefConfig(num_experts=4, top_k=2, aux_loss_type="switch", aux_loss_coeff=0.3,
                    z_loss_coeff=0.1)
    _, st = ref.moe_forward(params, x, cfg)
    assert st["aux_loss"] == pytest.approx(0.3, rel=1e-12)
    # all logits zero -> logsumexp = log 4
    assert st["z_loss"] == pytest.approx(0.1 * math.log(4.0) ** 2, rel=1e-12)
    # uniform ties -> every token picks experts 0 and 1
    np.testing.assert_array_equal(st["tokens_per_expert"], [6, 6, 0, 0])


# ----------------------------------------------------------------------------------------------
# Gradients: analytic vs finite differences
# ----------------------------------------------------------------------------------------------

GRAD_CASES = {
    "softmax_norm_switch_z_shared": dict(top_k=2, aux_loss_type="switch", aux_loss_coeff=0.05,
                                         z_loss_coeff=0.01, shared=True),
    "softmax_gated_shared_qwen": dict(top_k=2, z_loss_coeff=0.01, shared="gated"),
    "sigmoid_groups_bias_scale_seq": dict(top_k=2, score_func="sigmoid", num_groups=2,
                                          topk_groups=1, expert_bias=True,
                                          routed_scaling_factor=2.5, aux_loss_type="seq",
                                          aux_loss_coeff=0.1, z_loss_coeff=0.02, batch=2),
    "softmax_no_norm_top1_capacity": dict(top_k=1, norm_topk_prob=False, capacity_factor=0.75,
                                          aux_loss_type="switch", aux_loss_coeff=0.1),
    "sigmoid_norm_top_all": dict(top_k=4, score_func="sigmoid", aux_loss_type="switch",
                                 aux_loss_coeff=0.1, z_loss_coeff=0.01),
}


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_analytic_grads_match_finite_differences(case):
    opts = dict(GRAD_CASES[case])
    shared = opts.pop("shared", False)
    batch = opts.pop("batch", 1)
    rng = np.random.default_rng(sorted(GRAD_CASES).index(case) + 11)
    h, f, e, t = 5, 3, 4, 6
    cfg = RefConfig(num_experts=e, **opts)
    params = {k: v.astype(np.float64) for k, v in
              ref.make_params(rng, h, f, e, shared_ffn=4 if shared else None, gate_scale=2.0,
                              with_bias=cfg.expert_bias,
                              shared_gate=shared == "gated").items()}
    x = rng.standard_normal((batch, t // batch, h) if batch > 1 else (t, h))
    g = rng.standard_normal(x.shape)
    assert ref.routing_margin(x, params, cfg) > 1e-4   # eps cannot flip the selection
    loss, grads = ref.moe_loss_and_grads(params, x, g, cfg)
    assert loss == pytest.approx(ref.moe_loss(params, x, g, cfg), rel=1e-12)
    fd = ref.finite_difference_grads(params, x, g, cfg, eps=1e-6)
    assert set(fd) == set(grads)
    if cfg.capacity_factor is not None:
        assert ref.moe_forward(params, x, cfg)[1]["num_dropped"] > 0
    for name in fd:
        scale = max(np.abs(fd[name]).max(), 1e-3)
        np.testing.assert_allclose(grads[name], fd[name], rtol=0, atol=1e-7 * scale + 1e-9,
                                   err_msg=name)
    # the router gradient is non-trivial (aux, z and routing weights all reach it)
    assert np.abs(grads["gate.weight"]).max() > 1e-3


def test_aux_and_z_gradients_reach_the_gate():
    """With G = 0 the only gradient of the gate comes from aux + z; it must match FD too."""
    rng = np.random.default_rng(12)
    params = {k: v.astype(np.float64) for k, v in ref.make_params(rng, 4, 3, 4).items()}
    x = rng.standard_normal((6, 4))
    g = np.zeros_like(x)
    cfg = RefConfig(num_experts=4, top_k=2, aux_loss_type="switch", aux_loss_coeff=0.5,
                    z_loss_coeff=0.3)
    _, grads = ref.moe_loss_and_grads(params, x, g, cfg)
    fd = ref.finite_difference_grads(params, x, g, cfg, names=["gate.weight"])
    assert np.abs(grads["gate.weight"]).max() > 1e-3
    np.testing.assert_allclose(grads["gate.weight"], fd["gate.weight"], atol=1e-8)
    np.testing.assert_allclose(grads["x"], fd["x"], atol=1e-8)
    assert np.abs(grads["experts.0.up_proj.weight"]).max() == 0.0


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def test_round_to_dtype():
    a = np.array([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -7, 3.14159], np.float32)
    # bfloat16 keeps 7 mantissa bits: ties round to even
    np.testing.assert_array_equal(ref.round_to_dtype(a, "bfloat16"),
                                  np.array([1.0, 1.0 + 2.0 ** -6, 1.0 + 2.0 ** -7, 3.140625],
                                           np.float32))
    np.testing.assert_array_equal(ref.round_to_dtype(a, "float16"),
                                  a.astype(np.float16).astype(np.float32))
