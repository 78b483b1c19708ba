"""MoELayer forward, statistics and gradients against the independent NumPy float64 reference.

Tolerances (max abs error divided by the largest magnitude of the reference tensor):
  float32 forward 1e-5, float32 gradients 5e-5, graph vs pynative 1e-6;
  float16 1e-2 and bfloat16 4e-2 (inputs and weights are first rounded to that dtype and the
  reference is computed in float64 from the rounded values; the remaining error comes from the
  layer's low-precision activations, ~0.5 ulp per rounding: 4.9e-4 in float16, 3.9e-3 in bfloat16).
Routing selection must match exactly: inputs are chosen (by seed) with a routing margin far above
the numerical error, so that a correct layer cannot pick different experts than the reference.
"""
import dataclasses
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

import mindspore_moe_ep as mee
from mindspore_moe_ep.state_dict import StateDictError
from reference import numpy_moe as ref
from reference.numpy_moe import RefConfig

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "yaml_configs", "tiny.yaml")
H, F, E, FS = 16, 12, 8, 10     # hidden, expert FFN, experts, shared-expert FFN
MS_DTYPE = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
REL_TOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 4e-2}
MIN_MARGIN = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}


@pytest.fixture(autouse=True, scope="module")
def pynative_mode():
    """Every test here runs in PYNATIVE_MODE unless it switches to graph mode itself."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield


# ----------------------------------------------------------------------------------------------
# Harness
# ----------------------------------------------------------------------------------------------

# How the layer runs its routed experts (dropless layers; with a capacity every path groups):
# "rowwise": inference (the Cell's default, not training): ExpertsWeightedSum, no per-pair
# buffers, gradients by recomputation; "grouped": training, grouped GEMMs; "recompute":
# training with runtime.recompute_experts, the row-wise kernel again.
EXPERT_PATHS = ["rowwise", "grouped", "recompute"]


def build_layer(ref_cfg, params, *, shared=False, dtype="float32", mode="pynative", prefix="",
                experts_path="rowwise", **config_overrides):
    """An MoELayer with the same routing settings as ``ref_cfg``, loaded with ``params``.

    ``shared``: False, True (DeepSeek: added as is) or "gated" (Qwen2-MoE: scaled by a sigmoid
    gate; its weights are then loaded under Qwen's ``shared_expert.`` names).
    ``experts_path``: one of EXPERT_PATHS; the layer is checked to take it.
    ``config_overrides``: further config fields (e.g. ``quant="int8"``)."""
    overrides = {k: v for k, v in dataclasses.asdict(ref_cfg).items() if v is not None}
    overrides.update(hidden_size=H, expert_ffn_size=F, num_shared_experts=1 if shared else 0,
                     dtype=dtype, mode=mode, recompute_experts=experts_path == "recompute")
    overrides.update(config_overrides)
    if shared:
        overrides["shared_expert_ffn_size"] = FS
    if shared == "gated":
        overrides["shared_expert_gate"] = True
        params = {k.replace("shared_experts.", "shared_expert."): v for k, v in params.items()}
    layer = mee.MoELayer(mee.load_config(TINY, **overrides))
    layer.load_hf_state_dict({prefix + k: v for k, v in params.items()}, prefix=prefix)
    layer.set_train(experts_path != "rowwise")
    grouped = ref_cfg.capacity_factor is not None or experts_path == "grouped"
    assert layer.plan(16, "prefill").experts_path == ("grouped" if grouped else "rowwise")
    return layer


def make_case(ref_cfg, shape, seed, *, shared=False, dtype="float32", gate_scale=2.0,
              params=None):
    """Weights and an input of ``shape`` (both rounded to ``dtype``) with a safe routing margin.

    Each token is redrawn (deterministically from ``seed``) until the reference's top-k
    selection for it has a margin of at least MIN_MARGIN[dtype]. Returns (params, x) float32.
    """
    rng = np.random.default_rng(seed)
    if params is None:
        params = ref.make_params(rng, H, F, ref_cfg.num_experts,
                                 shared_ffn=FS if shared else None, gate_scale=gate_scale,
                                 with_bias=ref_cfg.expert_bias, shared_gate=shared == "gated")
    params = {k: ref.round_to_dtype(v, dtype) for k, v in params.items()}
    tokens = []                                                    # [T] of [H]
    while len(tokens) < int(np.prod(shape[:-1])):
        for _ in range(1000):
            token = ref.round_to_dtype(rng.standard_normal((1, H)), dtype)
            if ref.routing_margin(token, params, ref_cfg) >= MIN_MARGIN[dtype]:
                break
        else:
            raise AssertionError("could not draw a token with a safe routing margin")
        tokens.append(token[0])
    return params, np.stack(tokens).reshape(shape)


def to_numpy(t):
    return t.astype(ms.float32).asnumpy().astype(np.float64)


def assert_scaled_close(actual, expected, rel, what):
    """max|actual - expected| <= rel * max|expected| (and shapes equal)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(np.abs(expected).max(), 1e-12)
    err = np.abs(actual - expected).max()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} * scale {scale:.3g}"


def check_forward(layer, ref_cfg, params, x, dtype="float32"):
    """Run the layer on x and compare output and stats with the reference. Returns stats."""
    y = to_numpy(layer(ms.Tensor(x, MS_DTYPE[dtype])))
    y_ref, st_ref = ref.moe_forward(params, x, ref_cfg)
    assert_scaled_close(y, y_ref, REL_TOL[dtype], f"output ({dtype})")
    st = layer.stats()
    np.testing.assert_array_equal(np.asarray(st["tokens_per_expert"]).astype(np.int64),
                                  st_ref["tokens_per_expert"])
    assert int(st["num_dropped"]) == st_ref["num_dropped"]
    return st, st_ref


class LossCell(nn.Cell):
    """sum(layer(x) * G) -- the layer injects the aux / z-loss gradients itself."""

    def __init__(self, layer, grad_out):
        super().__init__()
        self.layer = layer
        self.grad_out = ms.Tensor(grad_out, ms.float32)

    def construct(self, x):
        return (self.layer(x) * self.grad_out).sum()


class GradCell(nn.Cell):
    """Gradients of LossCell w.r.t. its input and every trainable parameter."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.weights = ms.ParameterTuple(net.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True)

    def construct(self, x):
        return self.grad(self.net, self.weights)(x)


def layer_grads(layer, x, grad_out):
    """{'x': dx, HF name: d weight} from MindSpore, mapped to the HF layouts of the reference."""
    net = LossCell(layer, grad_out)
    (dx,), dws = GradCell(net)(ms.Tensor(x, ms.float32))
    grads = {"x": to_numpy(dx)}
    for param, g in zip(net.trainable_params(), dws):
        g = to_numpy(g)
        name = param.name
        if name.endswith("shared_expert.gate_up_weight"):           # [H, 2Fs] (or [1, H, 2Fs])
            g = g.reshape(g.shape[-2:])
            fs = g.shape[1] // 2
            grads["shared_experts.gate_proj.weight"] = g[:, :fs].T
            grads["shared_experts.up_proj.weight"] = g[:, fs:].T
        elif name.endswith("shared_expert.down_weight"):            # [Fs, H] (or [1, Fs, H])
            grads["shared_experts.down_proj.weight"] = g.reshape(g.shape[-2:]).T
        elif name.endswith("shared_expert.gate_weight"):            # [H, 1]
            grads["shared_expert_gate.weight"] = g.T
        elif name.endswith("router.gate_weight"):                   # [E, H]
            grads["gate.weight"] = g
        elif name.endswith("experts.gate_up_weight"):               # [E, H, 2F]
            f = g.shape[2] // 2
            for e in range(g.shape[0]):
                grads[f"experts.{e}.gate_proj.weight"] = g[e, :, :f].T
                grads[f"experts.{e}.up_proj.weight"] = g[e, :, f:].T
        elif name.endswith("experts.down_weight"):                  # [E, F, H]
            for e in range(g.shape[0]):
                grads[f"experts.{e}.down_proj.weight"] = g[e].T
        else:
            raise AssertionError(f"unexpected trainable parameter {name!r}")
    return grads


# ----------------------------------------------------------------------------------------------
# Forward, float32
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("experts_path", EXPERT_PATHS)
@pytest.mark.parametrize("shared", [False, True, "gated"], ids=["routed", "shared", "gated"])
@pytest.mark.parametrize("shape", [(24, H), (2, 8, H)], ids=["2d", "3d"])
def test_forward_float32(shape, shared, experts_path):
    cfg = RefConfig(num_experts=E, top_k=2)
    params, x = make_case(cfg, shape, seed=100, shared=shared)
    layer = build_layer(cfg, params, shared=shared, experts_path=experts_path)
    check_forward(layer, cfg, params, x)


def test_forward_float32_deepseek_routing():
    """Sigmoid scores, group-limited top-4 with expert bias, scaling 2.5, on 16 experts."""
    cfg = RefConfig(num_experts=16, top_k=4, score_func="sigmoid", num_groups=4, topk_groups=2,
                    expert_bias=True, routed_scaling_factor=2.5)
    params, x = make_case(cfg, (2, 8, H), seed=200, shared=True)
    layer = build_layer(cfg, params, shared=True)
    check_forward(layer, cfg, params, x)


# ----------------------------------------------------------------------------------------------
# Forward, low precision
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("experts_path", EXPERT_PATHS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_forward_low_precision(dtype, experts_path):
    cfg = RefConfig(num_experts=E, top_k=2)
    params, x = make_case(cfg, (2, 8, H), seed=300, shared=True, dtype=dtype)
    layer = build_layer(cfg, params, shared=True, dtype=dtype, experts_path=experts_path)
    check_forward(layer, cfg, params, x, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Capacity and edge cases
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("capacity_factor,shape", [(1.0, (24, H)), (0.5, (2, 8, H))])
def test_capacity_drops_match_reference(capacity_factor, shape):
    cfg = RefConfig(num_experts=E, top_k=2, capacity_factor=capacity_factor)
    params, x = make_case(cfg, shape, seed=400, gate_scale=3.0)
    _, st_ref = ref.moe_forward(params, x, cfg)
    assert st_ref["num_dropped"] > 0                       # the case really drops pairs
    layer = build_layer(cfg, params)
    check_forward(layer, cfg, params, x)


def _one_expert_params(cfg, hot=3):
    """Weights whose gate sends every token (x[:, 0] ~ 5) to expert ``hot`` first."""
    params = ref.make_params(np.random.default_rng(500), H, F, cfg.num_experts)
    params["gate.weight"][hot, 0] = 8.0
    return params


@pytest.mark.parametrize("capacity_factor, experts_path",
                         [(None, path) for path in EXPERT_PATHS] + [(1.0, "grouped")])
def test_all_tokens_to_one_expert(capacity_factor, experts_path):
    # sigmoid keeps the other experts' scores O(1), so the second choice has a clear margin
    cfg = RefConfig(num_experts=E, top_k=2, score_func="sigmoid", capacity_factor=capacity_factor)
    rng = np.random.default_rng(501)
    x = rng.standard_normal((16, H)).astype(np.float32)
    x[:, 0] = 5.0
    params = _one_expert_params(cfg)
    _, st_ref = ref.moe_forward(params, x, cfg)
    assert (st_ref["expert_ids"][:, 0] == 3).all()
    assert ref.routing_margin(x, params, cfg) > MIN_MARGIN["float32"]
    layer = build_layer(cfg, params, experts_path=experts_path)
    st, _ = check_forward(layer, cfg, params, x)
    if capacity_factor is None:
        assert int(np.asarray(st["tokens_per_expert"])[3]) == 16
    else:   # C = ceil(16 * 2 / 8) = 4 -> expert 3 drops 12 of its 16 rows
        assert int(np.asarray(st["tokens_per_expert"])[3]) == 4
        assert int(st["num_dropped"]) >= 12


@pytest.mark.parametrize("shape", [(1, H), (1, 1, H)], ids=["2d", "3d"])
def test_single_token(shape):
    cfg = RefConfig(num_experts=E, top_k=2, aux_loss_type="seq", aux_loss_coeff=0.01)
    params, x = make_case(cfg, shape, seed=600, shared=True)
    layer = build_layer(cfg, params, shared=True)
    st, st_ref = check_forward(layer, cfg, params, x)
    assert float(st["aux_loss"]) == pytest.approx(st_ref["aux_loss"], rel=1e-5)


def test_phase_is_checked_and_decode_refused_in_training():
    layer = mee.MoELayer(mee.load_config(TINY))
    x = ms.Tensor(np.ones((4, layer.hidden_size), np.float32))
    with pytest.raises(ValueError, match="phase must be 'prefill', 'decode' or None, got 'train'"):
        layer(x, "train")
    layer.set_train(True)
    # The fused decode operators have no gradient: refused before any kernel runs, even at
    # EP = 1 (where decode would take the prefill path), so a script fails alike at any EP size.
    with pytest.raises(ValueError, match=r"phase='decode' is inference only .*set_train\(False\)"):
        layer(x, "decode")
    assert layer.experts_path(4) == "grouped"  # phase None in training: prefill
    layer.set_train(False)
    assert layer(x, "decode").shape == x.shape


@pytest.mark.parametrize("norm", [True, False])
def test_top_k_equals_num_experts(norm):
    cfg = RefConfig(num_experts=E, top_k=E, norm_topk_prob=norm)
    params, x = make_case(cfg, (12, H), seed=700, shared=False)
    layer = build_layer(cfg, params)
    st, _ = check_forward(layer, cfg, params, x)
    np.testing.assert_array_equal(np.asarray(st["tokens_per_expert"]), np.full(E, 12))


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------

GRAD_CASES = {
    "softmax_switch_z_shared_2d": (dict(top_k=2, aux_loss_type="switch", aux_loss_coeff=0.1,
                                        z_loss_coeff=0.01), (16, H), True),
    "sigmoid_groups_bias_seq_z_3d": (dict(num_experts=16, top_k=4, score_func="sigmoid",
                                          num_groups=4, topk_groups=2, expert_bias=True,
                                          routed_scaling_factor=2.5, aux_loss_type="seq",
                                          aux_loss_coeff=0.1, z_loss_coeff=0.01),
                                     (2, 8, H), True),
    "softmax_capacity_switch_2d": (dict(top_k=2, capacity_factor=0.75, aux_loss_type="switch",
                                        aux_loss_coeff=0.1, z_loss_coeff=0.01), (16, H), False),
    "softmax_gated_shared_qwen_2d": (dict(top_k=2, z_loss_coeff=0.01), (16, H), "gated"),
}


def _grad_case(name, seed):
    opts, shape, shared = GRAD_CASES[name]
    cfg = RefConfig(**{"num_experts": E, **opts})
    params, x = make_case(cfg, shape, seed=seed, shared=shared)
    grad_out = np.random.default_rng(seed + 1).standard_normal(shape).astype(np.float32)
    return cfg, params, x, grad_out, shared


@pytest.mark.parametrize("name, experts_path",
                         [(name, path) for name in sorted(GRAD_CASES) for path in EXPERT_PATHS
                          if "capacity" not in name or path == "grouped"])
def test_gradients_vs_reference(name, experts_path):
    cfg, params, x, grad_out, shared = _grad_case(name, seed=800)
    _, expected = ref.moe_loss_and_grads(params, x, grad_out, cfg)
    # the aux + z losses visibly change the gate / input gradients, so their omission would fail
    _, no_aux = ref.moe_loss_and_grads(
        params, x, grad_out, dataclasses.replace(cfg, aux_loss_type="none", aux_loss_coeff=0.0,
                                                 z_loss_coeff=0.0))
    for key in ("gate.weight", "x"):
        diff = np.abs(expected[key] - no_aux[key]).max()
        assert diff > 20 * 5e-5 * np.abs(expected[key]).max(), key
    if cfg.capacity_factor is not None:
        assert ref.moe_forward(params, x, cfg)[1]["num_dropped"] > 0

    got = layer_grads(build_layer(cfg, params, shared=shared, experts_path=experts_path), x,
                      grad_out)
    assert set(got) == set(expected)
    for key in sorted(expected):
        assert_scaled_close(got[key], expected[key], 5e-5, f"d {key}")


# ----------------------------------------------------------------------------------------------
# Graph mode
# ----------------------------------------------------------------------------------------------

class ForwardCell(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x):
        return self.layer(x)


def test_graph_mode_matches_pynative():
    """Forward, stats and gradients in GRAPH_MODE equal PYNATIVE (and the reference)."""
    name = "sigmoid_groups_bias_seq_z_3d"
    cfg, params, x, grad_out, shared = _grad_case(name, seed=900)
    xt = ms.Tensor(x, ms.float32)

    pyn_layer = build_layer(cfg, params, shared=shared)
    y_pyn = to_numpy(ForwardCell(pyn_layer)(xt))
    st_pyn = pyn_layer.stats()
    g_pyn = layer_grads(pyn_layer, x, grad_out)

    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph_layer = build_layer(cfg, params, shared=shared, mode="graph")
        y_graph = to_numpy(ForwardCell(graph_layer)(xt))
        st_graph = graph_layer.stats()
        g_graph = layer_grads(graph_layer, x, grad_out)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)

    assert_scaled_close(y_graph, y_pyn, 1e-6, "graph vs pynative output")
    assert_scaled_close(y_graph, ref.moe_forward(params, x, cfg)[0], 1e-5, "graph vs reference")
    np.testing.assert_array_equal(np.asarray(st_graph["tokens_per_expert"]),
                                  np.asarray(st_pyn["tokens_per_expert"]))
    assert float(st_graph["aux_loss"]) == pytest.approx(float(st_pyn["aux_loss"]), rel=1e-6)
    assert float(st_graph["z_loss"]) == pytest.approx(float(st_pyn["z_loss"]), rel=1e-6)
    assert set(g_graph) == set(g_pyn)
    for key in sorted(g_pyn):
        assert_scaled_close(g_graph[key], g_pyn[key], 1e-6, f"graph vs pynative d {key}")


# ----------------------------------------------------------------------------------------------
# load_hf_state_dict
# ----------------------------------------------------------------------------------------------

def _fresh(shared=True):
    cfg = RefConfig(num_experts=E, top_k=2)
    params = ref.make_params(np.random.default_rng(1000), H, F, E, shared_ffn=FS if shared else None)
    return cfg, params


def test_load_with_prefix_roundtrip():
    cfg, params = _fresh()
    prefix = "model.layers.3.mlp."
    layer = build_layer(cfg, params, shared=True, prefix=prefix)
    x = make_case(cfg, (8, H), seed=1001, params=params)[1]
    check_forward(layer, cfg, params, x)


@pytest.mark.parametrize("problem", ["missing", "unexpected", "wrong_shape"])
def test_load_errors_name_the_key(problem):
    cfg, params = _fresh()
    if problem == "missing":
        key = "experts.5.up_proj.weight"
        del params[key]
    elif problem == "unexpected":
        key = "experts.8.gate_proj.weight"           # only experts 0..7 exist
        params[key] = params["experts.0.gate_proj.weight"].copy()
    else:
        key = "experts.2.down_proj.weight"           # [H, F] given as [F, H]
        params[key] = params[key].T.copy()
    with pytest.raises(Exception) as info:
        build_layer(cfg, params, shared=True)
    assert key in str(info.value), f"error does not name {key!r}: {info.value}"


def test_load_wrong_shared_shape_names_the_key():
    cfg, params = _fresh()
    key = "shared_experts.gate_proj.weight"
    params[key] = np.zeros((FS + 1, H), np.float32)
    with pytest.raises(Exception) as info:
        build_layer(cfg, params, shared=True)
    assert key in str(info.value), f"error does not name {key!r}: {info.value}"


def test_load_qwen_names_refuses_both_spellings_and_requires_the_gate():
    """Qwen's ``shared_expert.*`` and DeepSeek's ``shared_experts.*`` name the same weights."""
    cfg, params = _fresh()
    layer = mee.MoELayer(mee.load_config(TINY, hidden_size=H, expert_ffn_size=F, num_experts=E,
                                         top_k=2, num_shared_experts=1,
                                         shared_expert_ffn_size=FS, shared_expert_gate=True))
    gate = {"shared_expert_gate.weight": np.ones((1, H), np.float32)}
    both = {**params, **gate,
            "shared_expert.up_proj.weight": params["shared_experts.up_proj.weight"]}
    with pytest.raises(StateDictError, match=r"'shared_expert\.up_proj\.weight' is given "
                                                 r"twice"):
        layer.load_hf_state_dict(both)
    with pytest.raises(StateDictError, match=r"missing key 'shared_expert_gate\.weight'"):
        layer.load_hf_state_dict(params)
