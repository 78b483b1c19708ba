"""Arguments of CANN's fused MoE Dispatch / Combine, their limits and the HCCL_BUFFSIZE check.

Each documented limit is checked with a configuration that passes and one that fails, and the
failure must name the limit. Pure Python except the last tests (the decode dispatcher's calls).
"""
import math
import os
from types import SimpleNamespace

import pytest

from mindspore_moe_ep.ascend.cann_limits import (CannDispatchArguments, CannDoesNotFit,
                                                 HcclBufferTooSmallError, cann_dispatch_arguments,
                                                 cann_group_name, check_hccl_buffsize,
                                                 configured_hccl_buffsize_mb, hccl_buffsize_mb,
                                                 limit_violations, soc_family)
from mindspore_moe_ep.config import MoEConfig, load_config
from mindspore_moe_ep.parallel_state import ExpertParallelGroup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024 * 1024


def config(**changes) -> MoEConfig:
    """DeepSeek-V3-shaped config that fits both SoCs (ep 64, BS 256), with ``changes``."""
    tree = {
        "model": {"hidden_size": 7168, "num_experts": 256, "expert_ffn_size": 2048},
        "router": {"top_k": 8},
        "parallel": {"expert_parallel": 64},
        "dispatch": {"max_tokens_per_rank": 256},
        "runtime": {"dtype": "bfloat16"},
    }
    return MoEConfig.from_dict(tree).replace(**changes)


def group_of(cfg, rank=0, first=0) -> ExpertParallelGroup:
    ep = cfg.parallel.expert_parallel
    return ExpertParallelGroup(world_size=first + ep, rank=first + rank,
                               group_ranks=tuple(range(first, first + ep)),
                               num_experts=cfg.model.num_experts,
                               redundant_experts=cfg.parallel.redundant_experts)


def reasons(soc, **changes):
    return limit_violations(config(**changes), soc)


# ----------------------------------------------------------------------------------------------
# Each limit: a passing and a failing value, and the failure names the limit
# ----------------------------------------------------------------------------------------------

LIMIT_CASES = [
    # soc, passing changes, failing changes, the name the message must contain
    ("A2", {"hidden_size": 4096}, {"hidden_size": 4080}, "model.hidden_size"),     # multiple of 32
    ("A2", {"hidden_size": 7168}, {"hidden_size": 7200}, "model.hidden_size"),     # <= 7168
    ("A3", {"hidden_size": 7168}, {"hidden_size": 4096}, "model.hidden_size"),     # exactly 7168
    ("A2", {"max_tokens_per_rank": 256}, {"max_tokens_per_rank": 257},
     "dispatch.max_tokens_per_rank"),
    ("A3", {"max_tokens_per_rank": 512}, {"max_tokens_per_rank": 513},
     "dispatch.max_tokens_per_rank"),
    ("A2", {"top_k": 16, "num_groups": 1, "topk_groups": None},
     {"top_k": 17, "num_groups": 1, "topk_groups": None}, "router.top_k"),
    ("A3", {"top_k": 8}, {"top_k": 9}, "router.top_k"),
    ("A2", {"expert_parallel": 16}, {"expert_parallel": 8}, "parallel.expert_parallel"),
    ("A2", {"expert_parallel": 32}, {"expert_parallel": 128}, "parallel.expert_parallel"),
    ("A3", {"expert_parallel": 8}, {"expert_parallel": 4}, "parallel.expert_parallel"),
    ("A3", {"expert_parallel": 256}, {"expert_parallel": 128, "num_experts": 384},
     "model.num_experts"),                                                           # <= 256
    ("A3", {"expert_parallel": 144, "num_experts": 144},
     {"expert_parallel": 12, "num_experts": 144}, "parallel.expert_parallel"),
    ("A2", {"expert_parallel": 16, "num_experts": 256},
     {"expert_parallel": 16, "num_experts": 512}, "expert slots per rank"),          # <= 24 (A2)
    ("A2", {"dtype": "float16"}, {"dtype": "float32"}, "runtime.dtype"),
    ("A3", {"dtype": "bfloat16"}, {"dtype": "float32"}, "runtime.dtype"),
    ("A2", {"capacity_factor": None}, {"capacity_factor": 1.25}, "router.capacity_factor"),
]


@pytest.mark.parametrize("soc,passing,failing,name", LIMIT_CASES,
                         ids=[f"{case[0]}-{case[3]}-{i}" for i, case in enumerate(LIMIT_CASES)])
def test_each_limit_passes_and_fails_with_a_message_naming_it(soc, passing, failing, name):
    assert reasons(soc, **passing) == ()
    failures = reasons(soc, **failing)
    assert any(name in message for message in failures), failures
    result = cann_dispatch_arguments(config(**failing), group_of(config(**failing)), soc)
    assert isinstance(result, CannDoesNotFit)
    assert name in str(result) and soc in str(result)


def test_experts_must_divide_the_ranks():
    """MoEConfig already refuses this; the CANN check does not rely on it."""
    stub = SimpleNamespace(
        model=SimpleNamespace(hidden_size=7168, num_experts=250),
        router=SimpleNamespace(top_k=8, capacity_factor=None),
        parallel=SimpleNamespace(expert_parallel=64, redundant_experts=0),
        dispatch=SimpleNamespace(max_tokens_per_rank=256),
        runtime=SimpleNamespace(dtype="bfloat16"))
    failures = limit_violations(stub, "A2")
    assert any("divisible by parallel.expert_parallel" in message for message in failures)


def test_every_broken_limit_is_reported_at_once():
    failures = reasons("A3", hidden_size=4096, top_k=9, dtype="float32")
    assert len(failures) == 3


def test_top_k_between_the_two_socs():
    """K = 12 fits A2 (K <= 16) but not A3 (K <= 8)."""
    changes = {"top_k": 12, "num_groups": 1, "topk_groups": None}
    assert reasons("A2", **changes) == ()
    assert any("router.top_k" in message for message in reasons("A3", **changes))


def test_unknown_soc_is_refused():
    with pytest.raises(ValueError, match="soc must be one of"):
        limit_violations(config(), "A1")


# ----------------------------------------------------------------------------------------------
# The arguments
# ----------------------------------------------------------------------------------------------

def test_arguments_of_deepseek_v3_on_64_a2_cards():
    cfg = load_config(os.path.join(REPO, "yaml_configs", "deepseek_v3_64npu.yaml"))
    arguments = cann_dispatch_arguments(cfg, group_of(cfg, rank=5), "A2")
    assert isinstance(arguments, CannDispatchArguments)
    assert (arguments.ep_world_size, arguments.ep_rank_id, arguments.moe_expert_num) == (64, 5, 256)
    assert (arguments.local_expert_num, arguments.top_k, arguments.max_bs) == (4, 8, 256)
    assert arguments.global_bs == 256 * 64
    assert arguments.expand_rows == 256 * 64 * 4          # A = globalBs * min(L, K)
    assert arguments.shared_expert_num == 0 and arguments.expert_scales_in_dispatch
    assert arguments.group_ep == "moe_ep_cann_0_64"
    # 2 * (BS * ep * min(L, K) * H * 2 bytes + 2 MB) = 2 * (896 MB + 2 MB)
    assert arguments.hccl_buffsize_mb == 1796


def test_arguments_of_deepseek_v3_on_256_a3_ranks():
    cfg = load_config(os.path.join(REPO, "yaml_configs", "deepseek_v3_256npu.yaml"))
    arguments = cann_dispatch_arguments(cfg, group_of(cfg, rank=255), "A3")
    assert isinstance(arguments, CannDispatchArguments)
    assert (arguments.ep_world_size, arguments.ep_rank_id, arguments.local_expert_num) == (256, 255, 1)
    assert arguments.expand_rows == 256 * 256 * 1
    assert arguments.shared_expert_num == 1 and not arguments.expert_scales_in_dispatch
    documented = 2 + math.ceil(256 * 2 * (7168 + 128) * (256 * 1 + 8 + 1) * 2 / MIB)
    tiling_check = math.ceil(256 * 256 * 7168 * 2 * 2 * 1 / MIB)
    assert arguments.hccl_buffsize_mb == max(documented, tiling_check) == 1891


def test_redundant_experts_become_slots_of_the_fused_operators():
    """CANN's operators see physical slot ids: moe_expert_num = experts + redundant slots and
    local_expert_num = slots per rank (128 experts on 64 A2 cards, one redundant slot per card:
    128 + 64 = 192 slots, 3 per card), and the buffers are sized for them. DeepSeek-V3's 256
    experts with any redundant slot exceed the 256 moe_expert_num of MindSpore 2.10's docstring:
    refused (decode then takes the HCCL all-to-all-v), naming both fields."""
    cfg = load_config(os.path.join(REPO, "yaml_configs", "deepseek_v3_64npu.yaml"),
                      num_experts=128, redundant_experts=64)
    arguments = cann_dispatch_arguments(cfg, group_of(cfg, rank=5), "A2")
    assert isinstance(arguments, CannDispatchArguments)
    assert (arguments.moe_expert_num, arguments.local_expert_num) == (192, 3)
    assert arguments.expand_rows == 256 * 64 * 3          # A = globalBs * min(L, K)
    full = cfg.replace(num_experts=256)
    refused = cann_dispatch_arguments(full, group_of(full, rank=5), "A2")
    assert isinstance(refused, CannDoesNotFit)
    assert "model.num_experts + parallel.redundant_experts = 320" in str(refused)


def test_the_256_rank_config_does_not_fit_a2():
    cfg = load_config(os.path.join(REPO, "yaml_configs", "deepseek_v3_256npu.yaml"))
    result = cann_dispatch_arguments(cfg, group_of(cfg), "A2")
    assert isinstance(result, CannDoesNotFit)
    assert "parallel.expert_parallel = 256" in str(result)


def test_second_data_parallel_replica_gets_its_own_communicator():
    cfg = config()
    arguments = cann_dispatch_arguments(cfg, group_of(cfg, rank=3, first=64), "A2")
    assert arguments.group_ep == cann_group_name(tuple(range(64, 128))) == "moe_ep_cann_64_64"
    assert arguments.ep_rank_id == 3


def test_group_must_match_the_config():
    cfg = config()
    small = ExpertParallelGroup(16, 0, tuple(range(16)), 256)
    with pytest.raises(ValueError, match="parallel.expert_parallel = 64"):
        cann_dispatch_arguments(cfg, small, "A2")


def test_keyword_arguments_follow_mindspore_2_10_names():
    arguments = cann_dispatch_arguments(config(), group_of(config()), "A3")
    dispatch = arguments.dispatch_kwargs()
    assert dispatch["expert_token_nums_type"] == 1 and dispatch["quant_mode"] == 0
    assert dispatch["shared_expert_rank_num"] == 0 and dispatch["global_bs"] == 256 * 64
    combine = arguments.combine_kwargs()
    assert "shared_export_rank_num" in combine and "quant_mode" not in combine


# ----------------------------------------------------------------------------------------------
# HCCL_BUFFSIZE
# ----------------------------------------------------------------------------------------------

def test_hccl_buffsize_formulas():
    # A2: 2 * (BS * ep * min(L, K) * H * 2 + 2 MiB), in MiB, rounded up.
    assert hccl_buffsize_mb("A2", 8, 16, 2, 8, 4096) == math.ceil(
        2 * (8 * 16 * 2 * 4096 * 2 + 2 * MIB) / MIB)
    # A3: max(2 + 2 * BS * 2 * (H + 128) * (ep * L + K + 1), ep * BS * H * 4 * L), in MiB.
    assert hccl_buffsize_mb("A3", 512, 8, 32, 8, 7168) == max(
        2 + math.ceil(2 * 512 * 2 * 7296 * (8 * 32 + 9) / MIB),
        math.ceil(8 * 512 * 7168 * 4 * 32 / MIB))
    with pytest.raises(ValueError, match="soc must be one of"):
        hccl_buffsize_mb("A5", 1, 16, 1, 1, 32)


def test_hccl_buffsize_unset_is_the_cann_default_and_too_small():
    arguments = cann_dispatch_arguments(config(), group_of(config()), "A2")
    assert configured_hccl_buffsize_mb({}) == 200
    with pytest.raises(HcclBufferTooSmallError) as error:
        check_hccl_buffsize(arguments, {})
    message = str(error.value)
    assert "HCCL_BUFFSIZE = 200 MB (unset" in message
    assert "export HCCL_BUFFSIZE=1796" in message


def test_hccl_buffsize_set_too_small_states_the_value_to_set():
    arguments = cann_dispatch_arguments(config(), group_of(config()), "A2")
    with pytest.raises(HcclBufferTooSmallError, match="HCCL_BUFFSIZE=1796"):
        check_hccl_buffsize(arguments, {"HCCL_BUFFSIZE": "1795"})


def test_hccl_buffsize_large_enough_passes():
    arguments = cann_dispatch_arguments(config(), group_of(config()), "A2")
    check_hccl_buffsize(arguments, {"HCCL_BUFFSIZE": "1796"})
    check_hccl_buffsize(arguments, {"HCCL_BUFFSIZE": " 4096 "})


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5"])
def test_hccl_buffsize_bad_values_are_named(value):
    with pytest.raises(HcclBufferTooSmallError, match=f"HCCL_BUFFSIZE = '{value}' is not allowed"):
        configured_hccl_buffsize_mb({"HCCL_BUFFSIZE": value})


# ----------------------------------------------------------------------------------------------
# SoC names, and the dispatcher's calls
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,family", [
    ("Ascend910B1", "A2"), ("Ascend910B4", "A2"), ("ascend910b", "A2"),
    ("Ascend910_9391", "A3"), ("Ascend910_9362", "A3"), ("ascend910_93", "A3"),
    ("Ascend910A", None), ("Ascend310P3", None), ("", None)])
def test_soc_family(name, family):
    assert soc_family(name) == family


@pytest.mark.parametrize("soc", ["A2", "A3"])
def test_decode_dispatcher_passes_exactly_the_built_arguments(soc):
    """CannDecodeDispatcher spells out dispatch_kwargs() / combine_kwargs(): they must agree."""
    import mindspore as ms
    import numpy as np
    from mindspore_moe_ep.ascend.cann_dispatcher import CannDecodeDispatcher
    arguments = cann_dispatch_arguments(config(), group_of(config(), rank=7), soc)
    dispatcher = CannDecodeDispatcher(arguments)
    calls = {}

    def fake_dispatch(x, expert_ids, ep_world_size, ep_rank_id, moe_expert_num, **kwargs):
        calls["dispatch"] = ((ep_world_size, ep_rank_id, moe_expert_num), kwargs)
        rows = ms.Tensor(np.zeros((arguments.expand_rows, 4), np.float32))
        counts = ms.Tensor(np.ones(arguments.local_expert_num, np.int64))
        marker = ms.Tensor(np.zeros(1, np.int32))
        return rows, marker, marker, counts, marker, marker, marker

    def fake_combine(expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales,
                     ep_world_size, ep_rank_id, moe_expert_num, **kwargs):
        calls["combine"] = ((ep_world_size, ep_rank_id, moe_expert_num), kwargs)
        return expand_x

    dispatcher._dispatch_op, dispatcher._combine_op = fake_dispatch, fake_combine
    x = ms.Tensor(np.zeros((3, 4), np.float32))
    ids = ms.Tensor(np.zeros((3, 8), np.int32))
    weights = ms.Tensor(np.ones((3, 8), np.float32))
    rows, tokens_per_expert, _, handle = dispatcher.dispatch(x, ids, weights)
    dispatcher.combine(rows, handle)
    positional = (arguments.ep_world_size, 7, arguments.moe_expert_num)
    dispatch_kwargs = dict(arguments.dispatch_kwargs(),
                           expert_scales=weights if soc == "A2" else None)
    assert calls["dispatch"][0] == positional
    assert calls["dispatch"][1].keys() == dispatch_kwargs.keys()
    assert all(calls["dispatch"][1][key] is value or calls["dispatch"][1][key] == value
               for key, value in dispatch_kwargs.items())
    combine_kwargs = calls["combine"][1]
    assert calls["combine"][0] == positional
    assert (combine_kwargs["expand_scales"] is None) == (soc == "A3")
    combine_kwargs.pop("expand_scales")
    assert combine_kwargs == arguments.combine_kwargs()
    assert tokens_per_expert.dtype == ms.int32


def test_decode_dispatcher_refuses_more_tokens_than_the_buffers():
    import mindspore as ms
    import numpy as np
    from mindspore_moe_ep.ascend.cann_dispatcher import CannDecodeDispatcher
    cfg = config(max_tokens_per_rank=4)
    dispatcher = CannDecodeDispatcher(cann_dispatch_arguments(cfg, group_of(cfg), "A2"))
    x = ms.Tensor(np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match="dispatch.max_tokens_per_rank = 4"):
        dispatcher.dispatch(x, ms.Tensor(np.zeros((5, 8), np.int32)),
                            ms.Tensor(np.ones((5, 8), np.float32)))
