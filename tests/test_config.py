"""Tests of mindspore_moe_ep.config: schema, YAML loading, overrides and the Hugging Face importer.

Pure Python: neither these tests nor the config package need mindspore.
"""
import dataclasses
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG_PACKAGE_DIR = REPO / "mindspore_moe_ep" / "config"
SHIPPED_DIR = REPO / "yaml_configs"
MALFORMED_DIR = Path(__file__).resolve().parent / "malformed_yaml"


def import_config_package_alone() -> None:
    """Import ``mindspore_moe_ep.config`` without running the top-level package's ``__init__``.

    The top-level package imports mindspore (layers, kernels). The config package is pure
    Python; testing it alone keeps this file fast and independent of mindspore and of the
    kernel build.
    """
    name = "mindspore_moe_ep.config"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, CONFIG_PACKAGE_DIR / "__init__.py",
            submodule_search_locations=[str(CONFIG_PACKAGE_DIR)])
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])


import_config_package_alone()

from mindspore_moe_ep.config import (ConfigError, MoEConfig, RouterConfig,  # noqa: E402
                                     config_from_hf, load_config)
from mindspore_moe_ep.config.schema import (FIELD_PATHS, SECTIONS,  # noqa: E402
                                            reference_markdown)

TINY_TREE = {
    "model": {"hidden_size": 16, "num_experts": 8, "expert_ffn_size": 12},
    "router": {"top_k": 2},
}


def write(path: Path, text: str) -> Path:
    """Write dedented ``text`` to ``path`` (creating folders) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def tiny(**overrides) -> MoEConfig:
    return MoEConfig.from_dict(TINY_TREE).replace(**overrides)


# ----------------------------------------------------------------------------------------------
# Shipped YAMLs
# ----------------------------------------------------------------------------------------------

SHIPPED_VALUES = {
    "tiny.yaml": {
        "hidden_size": 16, "num_experts": 8, "expert_ffn_size": 12, "num_shared_experts": 1,
        "top_k": 2, "score_func": "softmax", "num_groups": 1, "expert_bias": False,
        "expert_parallel": 1, "mode": "graph", "dtype": "float32",
        "batch_size": 2, "prefill_seq_len": 8, "decode_batch_size": 4, "train_steps": 1,
    },
    "deepseek_v3_small_4cpu.yaml": {
        "hidden_size": 1024, "num_experts": 64, "expert_ffn_size": 256, "num_shared_experts": 1,
        "top_k": 8, "score_func": "sigmoid", "num_groups": 8, "topk_groups": 4,
        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "expert_bias": True,
        "expert_parallel": 4, "max_tokens_per_rank": 512, "mode": "graph", "dtype": "float32",
        "batch_size": 2, "prefill_seq_len": 128, "decode_batch_size": 8, "decode_steps": 4,
        "train_steps": 1,
    },
    "deepseek_v3_64npu.yaml": {
        "hidden_size": 7168, "num_experts": 256, "expert_ffn_size": 2048, "num_shared_experts": 1,
        "top_k": 8, "score_func": "sigmoid", "num_groups": 8, "topk_groups": 4,
        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "expert_bias": True,
        "expert_parallel": 64, "max_tokens_per_rank": 256, "mode": "graph", "dtype": "bfloat16",
    },
    "deepseek_v3_256npu.yaml": {
        "hidden_size": 7168, "num_experts": 256, "expert_ffn_size": 2048, "num_shared_experts": 1,
        "top_k": 8, "score_func": "sigmoid", "num_groups": 8, "topk_groups": 4,
        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "expert_bias": True,
        "expert_parallel": 256, "max_tokens_per_rank": 256, "mode": "graph", "dtype": "bfloat16",
    },
    "lm_tiny.yaml": {
        "hidden_size": 32, "num_experts": 8, "expert_ffn_size": 32, "top_k": 2,
        "score_func": "sigmoid", "expert_bias": True, "aux_loss_type": "seq",
        "num_layers": 3, "dense_layers": 1, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8,
        "max_seq_len": 64, "max_batch_size": 4, "steps": 40, "global_batch_size": 8,
        "seq_len": 32, "mode": "pynative",
    },
    "lm_deepseek_v3_mini_4cpu.yaml": {
        "hidden_size": 256, "num_experts": 64, "expert_ffn_size": 128, "num_shared_experts": 1,
        "top_k": 8, "score_func": "sigmoid", "num_groups": 8, "topk_groups": 4,
        "routed_scaling_factor": 2.5, "expert_bias": True, "expert_parallel": 4,
        "num_layers": 6, "dense_layers": 1, "num_heads": 8, "num_kv_heads": 4, "head_dim": 32,
        "max_seq_len": 256, "steps": 100, "global_batch_size": 16, "seq_len": 128,
        "mode": "graph",
    },
    "lm_deepseek_v3_mini_4cpu_balanced.yaml": {
        "hidden_size": 256, "num_experts": 64, "expert_parallel": 4, "num_layers": 6,
        "steps": 100, "mode": "graph", "redundant_experts": 4, "rebalance_interval": 25,
        "load_window_steps": 100,
    },
}


def field_value(config: MoEConfig, name: str):
    section, key = FIELD_PATHS[name].split(".")
    return getattr(getattr(config, section), key)


def test_every_shipped_yaml_is_checked():
    assert sorted(path.name for path in SHIPPED_DIR.glob("*.yaml")) == sorted(SHIPPED_VALUES)


@pytest.mark.parametrize("name", sorted(SHIPPED_VALUES))
def test_shipped_yaml_loads_with_documented_values(name):
    path = SHIPPED_DIR / name
    assert path.read_text().startswith("# "), "each shipped YAML starts with a comment header"
    config = load_config(path)
    for field_name, expected in SHIPPED_VALUES[name].items():
        assert field_value(config, field_name) == expected, field_name


def test_deepseek_yamls_keep_tokens_within_the_static_buffers():
    for name in ("deepseek_v3_small_4cpu.yaml", "deepseek_v3_64npu.yaml",
                 "deepseek_v3_256npu.yaml"):
        config = load_config(SHIPPED_DIR / name)
        prefill_tokens = config.workload.batch_size * config.workload.prefill_seq_len
        assert prefill_tokens <= config.dispatch.max_tokens_per_rank
        assert config.workload.decode_batch_size <= config.dispatch.decode_token_threshold


def test_deepseek_64npu_matches_the_hugging_face_import():
    shipped = load_config(SHIPPED_DIR / "deepseek_v3_64npu.yaml")
    imported = config_from_hf(DEEPSEEK_V3, expert_parallel=64)
    assert shipped.model == imported.model
    routing = ("top_k", "score_func", "num_groups", "topk_groups", "norm_topk_prob",
               "routed_scaling_factor", "expert_bias", "aux_loss_type")
    for name in routing:
        assert getattr(shipped.router, name) == getattr(imported.router, name), name


def test_base_yaml_is_not_loadable_alone():
    with pytest.raises(ConfigError, match=r"missing required key 'model\.hidden_size'"):
        load_config(SHIPPED_DIR / "base" / "deepseek_v3_base.yaml")


# ----------------------------------------------------------------------------------------------
# Inheritance
# ----------------------------------------------------------------------------------------------

def test_child_merges_over_base_key_by_key(tmp_path):
    write(tmp_path / "base.yaml", """\
        model: {hidden_size: 16, num_experts: 8, expert_ffn_size: 12}
        router: {top_k: 2, score_func: sigmoid}
        workload: {batch_size: 3}
    """)
    child = write(tmp_path / "child.yaml", """\
        base: base.yaml
        router: {top_k: 4}
        runtime: {seed: 7}
        workload:
    """)
    config = load_config(child)
    assert config.router.top_k == 4                  # overridden by the child
    assert config.router.score_func == "sigmoid"     # kept from the base, same section
    assert config.workload.batch_size == 3           # kept: an empty section changes nothing
    assert config.runtime.seed == 7                  # added by the child


def test_base_path_is_relative_to_the_including_file(tmp_path, monkeypatch):
    write(tmp_path / "common" / "root.yaml", "model: {hidden_size: 16, num_experts: 8, "
                                             "expert_ffn_size: 12}\n")
    write(tmp_path / "common" / "routing.yaml", "base: root.yaml\nrouter: {top_k: 2}\n")
    write(tmp_path / "runs" / "run.yaml", "base: ../common/routing.yaml\nparallel: "
                                          "{expert_parallel: 2}\n")
    monkeypatch.chdir(tmp_path / "common")         # resolution must not depend on the cwd
    config = load_config(Path("..") / "runs" / "run.yaml")
    assert (config.model.hidden_size, config.router.top_k, config.num_local_experts) == (16, 2, 4)


def test_base_cycle_through_three_files(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: c.yaml\n")
    write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "a.yaml")
    names = [Path(part).name for part in str(caught.value).split(": ", 2)[-1].split(" -> ")]
    assert names == ["a.yaml", "b.yaml", "c.yaml", "a.yaml"]


def test_missing_config_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: '{missing}'"):
        load_config(missing)


# ----------------------------------------------------------------------------------------------
# Malformed YAMLs: each file states the expected message in '# expect:' lines and, if the error
# belongs to another file, that file in an '# error-in:' line.
# ----------------------------------------------------------------------------------------------

MALFORMED = sorted(MALFORMED_DIR.glob("*.yaml"))


def header_values(path: Path, tag: str):
    prefix = f"# {tag}: "
    return [line[len(prefix):] for line in path.read_text().splitlines()
            if line.startswith(prefix)]


def test_there_are_enough_malformed_cases():
    assert len(MALFORMED) >= 22
    assert all(header_values(path, "expect") for path in MALFORMED)


@pytest.mark.parametrize("path", MALFORMED, ids=[path.stem for path in MALFORMED])
def test_malformed_yaml_is_rejected_with_a_precise_message(path):
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    for expected in header_values(path, "expect"):
        assert expected in message
    (error_file,) = header_values(path, "error-in") or [path.name]
    assert caught.value.source == str(MALFORMED_DIR / error_file)
    assert message.startswith(f"{MALFORMED_DIR / error_file}: ")


# ----------------------------------------------------------------------------------------------
# Schema, replace() and overrides
# ----------------------------------------------------------------------------------------------

def test_field_names_are_unique_across_sections_and_documented():
    all_fields = [spec for section in SECTIONS.values() for spec in dataclasses.fields(section)]
    assert len(FIELD_PATHS) == len(all_fields)
    assert all(spec.metadata["doc"].strip() for spec in all_fields)


def test_defaults_and_derived_values():
    config = tiny()
    assert config.router.score_func == "softmax" and config.router.norm_topk_prob is True
    assert config.router.dropless and not tiny(capacity_factor=1.25).router.dropless
    assert config.router.effective_topk_groups == 1
    assert config.model.shared_ffn_size == 0
    assert config.dispatch.transport == "auto" and config.dispatch.max_tokens_per_rank == 4096
    assert tiny(num_shared_experts=2).model.shared_ffn_size == 24
    assert tiny(num_shared_experts=2, shared_expert_ffn_size=40).model.shared_ffn_size == 40
    assert tiny(num_groups=4).router.effective_topk_groups == 4


def test_float_fields_accept_ints_and_store_floats():
    factor = tiny(routed_scaling_factor=2).router.routed_scaling_factor
    assert factor == 2.0 and type(factor) is float


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny().router.top_k = 3


def test_replace_accepts_bare_and_dotted_names_and_keeps_the_original():
    original = tiny()
    changed = original.replace(expert_parallel=4, **{"router.top_k": 3})
    assert (changed.parallel.expert_parallel, changed.router.top_k) == (4, 3)
    assert changed.num_local_experts == 2
    assert (original.parallel.expert_parallel, original.router.top_k) == (1, 2)


@pytest.mark.parametrize("overrides, expected", [
    ({"expert_paralel": 2}, "replace(): unknown override 'expert_paralel' "
                            "(did you mean 'expert_parallel'?)"),
    ({"router.topk": 2}, "unknown override 'router.topk' (did you mean 'router.top_k'?)"),
    ({"top_k": 2, "router.top_k": 3}, "override 'router.top_k' is given twice "
                                      "(as 'top_k' and 'router.top_k')"),
    ({"expert_parallel": 3}, "replace(): model.num_experts = 8 is not divisible by "
                             "parallel.expert_parallel = 3"),
    ({"top_k": 2.5}, "replace(): router.top_k = 2.5 is not allowed; expected an integer >= 1"),
])
def test_replace_rejects_bad_overrides(overrides, expected):
    with pytest.raises(ConfigError) as caught:
        tiny().replace(**overrides)
    assert expected in str(caught.value)


def test_load_config_applies_overrides_after_merging():
    config = load_config(SHIPPED_DIR / "tiny.yaml", expert_parallel=2,
                         **{"runtime.dtype": "float16"})
    assert (config.num_local_experts, config.runtime.dtype) == (4, "float16")
    with pytest.raises(ConfigError, match=r"^overrides: router\.top_k = 0 is not allowed"):
        load_config(SHIPPED_DIR / "tiny.yaml", top_k=0)


def test_to_dict_and_from_dict_round_trip():
    config = load_config(SHIPPED_DIR / "deepseek_v3_small_4cpu.yaml")
    assert MoEConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["router"]["num_groups"] == 8


@pytest.mark.parametrize("data, expected", [
    ([1, 2], "<dict>: the top level must be a mapping of sections"),
    ({**TINY_TREE, "parallel": [1]}, "<dict>: section 'parallel' must be a mapping"),
    ({"model": TINY_TREE["model"]}, "<dict>: missing required key 'router.top_k'"),
])
def test_from_dict_errors_name_the_source(data, expected):
    with pytest.raises(ConfigError) as caught:
        MoEConfig.from_dict(data)
    assert str(caught.value).startswith(expected)


def test_sections_validate_on_direct_construction():
    with pytest.raises(ConfigError, match=r"^router\.score_func = 'relu' is not allowed"):
        RouterConfig(top_k=2, score_func="relu")
    with pytest.raises(ConfigError, match="MoEConfig.router must be a RouterConfig, got dict"):
        MoEConfig(model=tiny().model, router={"top_k": 2})


def test_data_parallel_size_is_resolved_from_the_world_size():
    assert tiny(expert_parallel=4).parallel.data_parallel_size(8) == 2
    with pytest.raises(ConfigError, match=r"world size 6 \(msrun --worker_num\) is not divisible"):
        tiny(expert_parallel=4).parallel.data_parallel_size(6)
    with pytest.raises(ConfigError, match="does not match the world size 8"):
        tiny(expert_parallel=4, data_parallel=3).parallel.data_parallel_size(8)


def test_config_package_does_not_import_mindspore():
    check = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
             f"import test_config; assert 'mindspore' not in sys.modules, 'mindspore imported'")
    subprocess.run([sys.executable, "-c", check], check=True)


def test_reference_doc_is_in_sync_with_the_schema():
    doc = (REPO / "docs" / "config_reference.md").read_text()
    assert reference_markdown() in doc, (
        "docs/config_reference.md is out of date: paste the output of "
        "mindspore_moe_ep.config.schema.reference_markdown() between its GENERATED markers")


# ----------------------------------------------------------------------------------------------
# Hugging Face import (values from the published config.json files)
# ----------------------------------------------------------------------------------------------

DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "norm_topk_prob": True, "routed_scaling_factor": 2.5, "aux_loss_alpha": 0.001,
    "seq_aux": True, "first_k_dense_replace": 3, "num_hidden_layers": 61, "vocab_size": 129280,
}
DEEPSEEK_V2_LITE = {
    "model_type": "deepseek_v2", "hidden_size": 2048, "moe_intermediate_size": 1408,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1,
    "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
    "routed_scaling_factor": 1.0, "aux_loss_alpha": 0.001, "seq_aux": True,
}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.02, "output_router_logits": False, "num_hidden_layers": 32,
    "rope_theta": 1000000.0,
}
QWEN2_MOE_A2_7B = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
    "intermediate_size": 5632, "moe_intermediate_size": 1408, "num_experts": 60,
    "num_experts_per_tok": 4, "shared_expert_intermediate_size": 5632, "norm_topk_prob": False,
    "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1,
}
QWEN3_MOE_30B_A3B = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "moe_intermediate_size": 768,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "router_aux_loss_coef": 0.001,
}


def test_deepseek_v3_import():
    config = config_from_hf(DEEPSEEK_V3)
    model, router = config.model, config.router
    assert (model.hidden_size, model.num_experts, model.expert_ffn_size) == (7168, 256, 2048)
    assert (model.num_shared_experts, model.shared_ffn_size) == (1, 2048)
    assert (router.top_k, router.num_groups, router.topk_groups) == (8, 8, 4)
    assert router.score_func == "sigmoid" and router.norm_topk_prob is True
    assert router.routed_scaling_factor == 2.5 and router.expert_bias is True
    assert (router.aux_loss_type, router.aux_loss_coeff) == ("seq", 0.001)


def test_deepseek_group_limited_greedy_and_greedy():
    limited = config_from_hf({**DEEPSEEK_V3, "topk_method": "group_limited_greedy"}).router
    assert (limited.num_groups, limited.topk_groups, limited.expert_bias) == (8, 4, False)
    assert limited.group_score == "max"  # DeepSeek-V2 scores a group by its best expert
    assert config_from_hf(DEEPSEEK_V3).router.group_score == "top2_sum"
    lite = config_from_hf(DEEPSEEK_V2_LITE)
    assert (lite.router.num_groups, lite.router.topk_groups, lite.router.top_k) == (1, None, 6)
    assert (lite.model.num_shared_experts, lite.model.shared_ffn_size) == (2, 2816)
    assert lite.router.score_func == "softmax" and lite.router.norm_topk_prob is False


def test_mixtral_import():
    config = config_from_hf(MIXTRAL_8X7B)
    assert (config.model.hidden_size, config.model.num_experts) == (4096, 8)
    assert (config.model.expert_ffn_size, config.model.num_shared_experts) == (14336, 0)
    assert (config.router.top_k, config.router.score_func, config.router.norm_topk_prob) == (
        2, "softmax", True)
    assert (config.router.aux_loss_type, config.router.aux_loss_coeff) == ("switch", 0.02)


def test_qwen2_moe_import_gates_the_shared_expert():
    config = config_from_hf(QWEN2_MOE_A2_7B)
    assert (config.model.num_experts, config.model.expert_ffn_size) == (60, 1408)
    assert (config.model.num_shared_experts, config.model.shared_ffn_size) == (1, 5632)
    assert config.model.shared_expert_gate is True
    assert (config.router.top_k, config.router.norm_topk_prob) == (4, False)
    assert (config.router.aux_loss_type, config.router.aux_loss_coeff) == ("switch", 0.001)


def test_qwen3_moe_import_and_family_detection_by_keys():
    config = config_from_hf(QWEN3_MOE_30B_A3B)
    assert (config.model.num_experts, config.router.top_k, config.model.num_shared_experts) == (
        128, 8, 0)
    assert config.model.shared_expert_gate is False
    untyped = {key: value for key, value in DEEPSEEK_V3.items() if key != "model_type"}
    assert config_from_hf({**untyped, "model_type": "kimi_k2"}).model.num_experts == 256
    assert config_from_hf({**MIXTRAL_8X7B, "model_type": None}).model.num_experts == 8


def test_hf_import_applies_overrides():
    config = config_from_hf(DEEPSEEK_V3, expert_parallel=4, **{"runtime.dtype": "bfloat16"})
    assert (config.num_local_experts, config.runtime.dtype) == (64, "bfloat16")
    assert config_from_hf(DEEPSEEK_V3, num_experts=64).num_local_experts == 64


@pytest.mark.parametrize("hf, overrides, expected", [
    ({**DEEPSEEK_V3, "scoring_func": "relu"}, {},
     "scoring_func = 'relu' is not supported; expected one of 'softmax', 'sigmoid'"),
    ({**DEEPSEEK_V3, "topk_method": "xyz"}, {},
     "topk_method = 'xyz' is not supported; expected one of 'greedy', 'group_limited_greedy', "
     "'noaux_tc'"),
    ({k: v for k, v in DEEPSEEK_V3.items() if k != "n_group"}, {},
     "missing key 'n_group', which DeepSeek configs need"),
    ({k: v for k, v in QWEN3_MOE_30B_A3B.items() if k != "norm_topk_prob"}, {},
     "missing key 'norm_topk_prob', which Qwen-MoE configs need"),
    ({**MIXTRAL_8X7B, "num_local_experts": 0}, {},
     "model.num_experts = 0 is not allowed; expected an integer > 0 "
     "(from Hugging Face key 'num_local_experts')"),
    ({**DEEPSEEK_V3, "seq_aux": "yes"}, {},
     "seq_aux = 'yes' is not supported; expected one of True, False"),
    ({"model_type": "llama", "hidden_size": 4096}, {},
     "cannot tell the MoE family of model_type = 'llama'"),
    ([("hidden_size", 1)], {}, "expected a dict (the parsed config.json), got list"),
    (DEEPSEEK_V3, {"expert_parallel": 3},
     "model.num_experts = 256 is not divisible by parallel.expert_parallel = 3"),
    (DEEPSEEK_V3, {"top_k": 0}, "router.top_k = 0 is not allowed; expected an integer >= 1 "
                                "(from override)"),
    (DEEPSEEK_V3, {"expert_paralel": 4}, "unknown override 'expert_paralel' "
                                         "(did you mean 'expert_parallel'?)"),
])
def test_hf_import_errors(hf, overrides, expected):
    with pytest.raises(ConfigError) as caught:
        config_from_hf(hf, **overrides)
    assert str(caught.value).startswith("<Hugging Face config>: ")
    assert expected in str(caught.value)
