"""MoELayer routing (expert ids, routing weights) and aux / z losses against the NumPy reference.

Selection must be identical (exact ids, in descending-score order); routing weights must agree
within 1e-6 of the largest weight (float32). Inputs are chosen by seed so that the reference's
top-k (and kept-group) boundary has a margin >= 1e-4, far above float32 error. Loss values
(from ``layer.stats()`` after a forward) must agree with the reference to rel 1e-5.
"""
import dataclasses
import os

import mindspore as ms
import numpy as np
import pytest

import mindspore_moe_ep as mee
from reference import numpy_moe as ref
from reference.numpy_moe import RefConfig

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "yaml_configs", "tiny.yaml")
H, F = 16, 12
MIN_MARGIN = 1e-4


@pytest.fixture(autouse=True, scope="module")
def pynative_mode():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield


def build_layer(ref_cfg, params):
    """A routed-only MoELayer with ``ref_cfg``'s routing settings, loaded with ``params``."""
    overrides = {k: v for k, v in dataclasses.asdict(ref_cfg).items() if v is not None}
    overrides.update(hidden_size=H, expert_ffn_size=F, num_shared_experts=0, dtype="float32",
                     mode="pynative")
    layer = mee.MoELayer(mee.load_config(TINY, **overrides))
    layer.load_hf_state_dict(params)
    return layer


def make_case(ref_cfg, shape, seed, gate_scale=2.0, bias=None):
    """(params, x) float32; each token redrawn (from ``seed``) until its routing margin is safe."""
    rng = np.random.default_rng(seed)
    params = ref.make_params(rng, H, F, ref_cfg.num_experts, gate_scale=gate_scale,
                             with_bias=ref_cfg.expert_bias)
    if bias is not None:
        params["gate.e_score_correction_bias"] = np.asarray(bias, np.float32)
    tokens = []                                                    # [T] of [1, H]
    while len(tokens) < int(np.prod(shape[:-1])):
        token = rng.standard_normal((1, H)).astype(np.float32)
        if ref.routing_margin(token, params, ref_cfg) >= MIN_MARGIN:
            tokens.append(token)
    return params, np.concatenate(tokens).reshape(shape)


def check_route(layer, ref_cfg, params, x):
    """layer.route(x) == reference: exact ids, weights to 1e-6 of their scale. Returns ref dict."""
    ids, weights = layer.route(ms.Tensor(x))
    assert ids.dtype == ms.int32 and weights.dtype == ms.float32
    r = ref.route(x, params, ref_cfg)
    np.testing.assert_array_equal(ids.asnumpy(), r["expert_ids"])
    w = weights.asnumpy().astype(np.float64)
    assert w.shape == r["weights"].shape
    np.testing.assert_allclose(w, r["weights"], rtol=0, atol=1e-6 * np.abs(r["weights"]).max())
    return r


# ----------------------------------------------------------------------------------------------
# Router variants
# ----------------------------------------------------------------------------------------------

ROUTER_CASES = {
    "softmax_norm": dict(top_k=2),
    "softmax_no_norm_scaled": dict(top_k=2, norm_topk_prob=False, routed_scaling_factor=2.5),
    "softmax_top3_norm_scaled": dict(top_k=3, routed_scaling_factor=0.5),
    "sigmoid_norm_scaled": dict(top_k=2, score_func="sigmoid", routed_scaling_factor=2.5),
    "sigmoid_no_norm": dict(top_k=2, score_func="sigmoid", norm_topk_prob=False),
    "top1_softmax": dict(top_k=1),
    "top1_sigmoid_norm_ignored": dict(top_k=1, score_func="sigmoid", norm_topk_prob=True),
    "topE_softmax_norm": dict(top_k=8),
    "topE_sigmoid_no_norm": dict(top_k=8, score_func="sigmoid", norm_topk_prob=False),
    "groups_softmax_16e": dict(num_experts=16, top_k=2, num_groups=4, topk_groups=2),
    "groups_max_score_16e": dict(num_experts=16, top_k=3, num_groups=4, topk_groups=2,
                                 group_score="max"),
    "groups_sigmoid_bias_16e": dict(num_experts=16, top_k=4, score_func="sigmoid",
                                    num_groups=4, topk_groups=2, expert_bias=True,
                                    routed_scaling_factor=2.5),
}


@pytest.mark.parametrize("name", sorted(ROUTER_CASES))
def test_route_matches_reference(name):
    cfg = RefConfig(**{"num_experts": 8, **ROUTER_CASES[name]})
    params, x = make_case(cfg, (24, H), seed=10)
    r = check_route(build_layer(cfg, params), cfg, params, x)
    if cfg.num_groups > 1:
        # group limiting must matter for this input, or the case would not test it
        flat = ref.route(x, params, dataclasses.replace(cfg, num_groups=1, topk_groups=1))
        assert (flat["expert_ids"] != r["expert_ids"]).any()
        # ... and so must the group score rule
        other = "top2_sum" if cfg.group_score == "max" else "max"
        swapped = ref.route(x, params, dataclasses.replace(cfg, group_score=other))
        assert (swapped["expert_ids"] != r["expert_ids"]).any()


def test_expert_bias_affects_selection_not_weights():
    # a strong bias on experts 5 and 6 drags them into most tokens' top-2
    bias = np.zeros(8, np.float32)
    bias[[5, 6]] = 0.6
    cfg = RefConfig(num_experts=8, top_k=2, score_func="sigmoid", norm_topk_prob=False,
                    expert_bias=True)
    params, x = make_case(cfg, (24, H), seed=20, bias=bias)
    r = check_route(build_layer(cfg, params), cfg, params, x)
    unbiased = ref.route(x, params, dataclasses.replace(cfg, expert_bias=False))
    assert (r["expert_ids"] != unbiased["expert_ids"]).any()   # the bias changes selection
    # ... and the weights are the unbiased sigmoid scores of the chosen experts
    np.testing.assert_allclose(r["weights"],
                               np.take_along_axis(r["scores"], r["expert_ids"], axis=-1))


# ----------------------------------------------------------------------------------------------
# Aux and z losses (via layer.stats())
# ----------------------------------------------------------------------------------------------

LOSS_CASES = {
    "switch_2d": (dict(aux_loss_type="switch", aux_loss_coeff=0.01), (24, H)),
    "switch_3d_sigmoid": (dict(score_func="sigmoid", aux_loss_type="switch",
                               aux_loss_coeff=0.01), (3, 8, H)),
    "seq_3d": (dict(aux_loss_type="seq", aux_loss_coeff=0.01), (3, 8, H)),
    "seq_3d_sigmoid_groups_z": (dict(num_experts=16, top_k=4, score_func="sigmoid",
                                     num_groups=4, topk_groups=2, expert_bias=True,
                                     routed_scaling_factor=2.5, aux_loss_type="seq",
                                     aux_loss_coeff=1e-3, z_loss_coeff=1e-3), (2, 12, H)),
    "seq_2d_is_one_sequence": (dict(aux_loss_type="seq", aux_loss_coeff=0.01), (24, H)),
    "z_only": (dict(z_loss_coeff=1e-3), (24, H)),
    "switch_capacity_counts_before_drops": (dict(aux_loss_type="switch", aux_loss_coeff=0.01,
                                                 capacity_factor=0.5), (24, H)),
}


@pytest.mark.parametrize("name", sorted(LOSS_CASES))
def test_aux_and_z_losses_match_reference(name):
    opts, shape = LOSS_CASES[name]
    cfg = RefConfig(**{"num_experts": 8, "top_k": 2, **opts})
    params, x = make_case(cfg, shape, seed=30, gate_scale=3.0)
    layer = build_layer(cfg, params)
    layer(ms.Tensor(x))
    st = layer.stats()
    _, st_ref = ref.moe_forward(params, x, cfg)
    assert float(st["aux_loss"]) == pytest.approx(st_ref["aux_loss"], rel=1e-5, abs=1e-12)
    assert float(st["z_loss"]) == pytest.approx(st_ref["z_loss"], rel=1e-5, abs=1e-12)
    np.testing.assert_array_equal(np.asarray(st["tokens_per_expert"]).astype(np.int64),
                                  st_ref["tokens_per_expert"])
    assert int(st["num_dropped"]) == st_ref["num_dropped"]
    if cfg.aux_loss_type != "none":
        assert st_ref["aux_loss"] > 0
    if cfg.z_loss_coeff:
        assert st_ref["z_loss"] > 0
    if cfg.aux_loss_type == "seq" and len(shape) == 3:
        # per-sequence counts differ from pooled ones here, so a switch loss would not pass
        other = ref.aux_loss(ref.route(x.reshape(-1, H), params, cfg)["scores"],
                             st_ref["expert_ids"], 1, cfg)
        assert abs(other - st_ref["aux_loss"]) > 1e-4 * st_ref["aux_loss"]
    if cfg.capacity_factor is not None:
        assert st_ref["num_dropped"] > 0
        # counting only the kept pairs would give a visibly different loss
        probs = ref.route(x, params, cfg)["scores"].mean(axis=0)               # [E]
        kept_f = st_ref["tokens_per_expert"] / (x.shape[0] * cfg.top_k)        # [E]
        kept_aux = cfg.aux_loss_coeff * cfg.num_experts * float(kept_f @ probs)
        assert abs(kept_aux - st_ref["aux_loss"]) > 1e-3 * st_ref["aux_loss"]
