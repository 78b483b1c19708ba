"""The planner's cost model: hand-derived counts, published measurements, the CLI and its errors.

Published figures (docs/scaling.md names each table):

- DeepEP (deepseek-ai/DeepEP, docs/legacy.md, "Performance", V1 tables): H800, NVLink ~160 GB/s,
  CX7 InfiniBand 400 Gb/s (~50 GB/s); normal kernels at 4096 tokens, hidden 7168, top-8 of 256,
  FP8 dispatch / BF16 combine; low-latency kernels at 128 tokens per rank.
- DeepEP-Ascend (sgl-project/sgl-kernel-npu README, "DeepEP-Ascend Performance"): A3 SuperPoD,
  pure HCCS, INT8 dispatch / BF16 combine, the same shapes.

A prediction must be within 30% of the published figure, or be one of the misses that
docs/scaling.md explains (asserted here to go the way the explanation says).
"""
import json
import math
import os
import subprocess
import sys

import pytest

from mindspore_moe_ep.config import ConfigError
from mindspore_moe_ep.planning import (LayerShape, PlanOptions, Routing, destinations, estimate,
                                       imbalance_from_loads, load_cluster, make_plan,
                                       miss_probability, row_bytes, traffic_per_token)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTERS = os.path.join(ROOT, "yaml_configs", "clusters")
PLAN = os.path.join(ROOT, "scripts", "plan.py")
V3_LAYER = LayerShape(hidden=7168, num_experts=256, expert_ffn=2048, top_k=8)
TOLERANCE = 0.30

# DeepEP V1, normal kernels (EP: dispatch GB/s, combine GB/s; NVLink at EP 8, RDMA above).
DEEPEP_NORMAL = {8: (153, 158), 16: (43, 43), 32: (58, 57), 64: (51, 50)}
# DeepEP V1, low-latency kernels at 128 tokens (EP: dispatch us, combine us).
DEEPEP_LOW_LATENCY = {8: (77, 114), 16: (118, 195), 32: (155, 273), 64: (173, 314),
                      128: (192, 369), 256: (194, 360)}
# DeepEP-Ascend on A3 (EP: dispatch GB/s, combine GB/s), normal kernels.
ASCEND_NORMAL = {8: (146, 125), 16: (107, 103), 32: (102, 95), 64: (81, 91), 128: (57, 81)}
# DeepEP-Ascend on A3, low-latency kernels at 128 tokens (EP: dispatch us, combine us).
ASCEND_LOW_LATENCY = {8: (132, 126), 16: (139, 135), 32: (153, 151)}


def within(predicted, published, tolerance=TOLERANCE):
    return abs(predicted - published) <= tolerance * published


# ---- hand-derived counts ---------------------------------------------------------------------

def test_a_rank_is_missed_with_the_hypergeometric_probability():
    # 8 experts, top-2, a rank of 2 experts: C(6,2)/C(8,2) = 15/28.
    assert miss_probability(Routing(8, 2), 2) == pytest.approx(15 / 28)
    where = destinations(Routing(8, 2), ep=4, cards_per_node=2)
    assert where.ranks == pytest.approx(4 * 13 / 28)
    assert where.remote_ranks == pytest.approx(2 * 13 / 28)
    # a node of 4 experts: C(4,2)/C(8,2) = 6/28 missed; one remote node
    assert where.remote_nodes == pytest.approx(22 / 28)


def test_group_limited_routing_counts_only_the_picked_groups():
    # 8 experts in 4 groups of 2, a token picks 1 group then top-2 in it: a rank of 2 experts
    # (one group) is hit iff its group is picked: probability 1/4.
    assert miss_probability(Routing(8, 2, num_groups=4, topk_groups=1), 2) == pytest.approx(3 / 4)
    # a node of two groups: hit iff one of them is picked: 2/4.
    assert miss_probability(Routing(8, 2, num_groups=4, topk_groups=1), 4) == pytest.approx(1 / 2)


def test_send_units_count_rows_per_rank_node_or_expert():
    shape = LayerShape(hidden=16, num_experts=8, expert_ffn=8, top_k=2)
    per_rank = traffic_per_token(shape, 4, 2, "rank")
    per_expert = traffic_per_token(shape, 4, 2, "expert")
    per_node = traffic_per_token(shape, 4, 2, "node")
    assert per_rank.total == pytest.approx(4 * 13 / 28)
    assert per_expert.total == pytest.approx(2)                  # top-k rows
    assert per_node.inter_node == pytest.approx(22 / 28)         # one row per remote node
    assert row_bytes(7168, "fp8") == 7168 + 4 * 56                # DeepEP's per-128 scales
    assert row_bytes(7168, "int8") == 7168 + 4
    assert row_bytes(7168, "bf16") == 2 * 7168


def test_time_is_latency_plus_bytes_over_bandwidth(tmp_path):
    cluster = load_cluster(os.path.join(CLUSTERS, "h800_infiniband.yaml"))
    shape = LayerShape(hidden=1024, num_experts=8, expert_ffn=64, top_k=8)  # every rank, always
    row = estimate(shape, cluster, 8, "prefill", 1000,
                   PlanOptions(dispatch_dtype="bf16", combine_dtype="bf16", imbalance=1.0))
    peer_bytes = 7 * 1000 * 2048                                   # 7 peers, 1000 rows each
    expected = 10.0 + 1.0 + peer_bytes / 160e9 * 1e6               # overhead + latency + bytes/bw
    assert row.dispatch_us == pytest.approx(expected)
    assert row.dispatch_bytes == pytest.approx(8 * 1000 * 2048)


def test_redundant_experts_spread_a_hot_expert():
    loads = [100, 10, 10, 10, 10, 10, 10, 10]                      # expert 0 is hot
    assert imbalance_from_loads(loads, 4) == pytest.approx(110 / 42.5)
    assert imbalance_from_loads(loads, 4, redundant_per_rank=1) < imbalance_from_loads(loads, 4)


# ---- published measurements ------------------------------------------------------------------

def deepep_normal(ep, cluster):
    nodes = max(ep // 8, 1)
    shape = (V3_LAYER if nodes == 1 else
             LayerShape(7168, 256, 2048, 8, num_groups=nodes, topk_groups=min(nodes, 4)))
    options = PlanOptions(dispatch_dtype="fp8", combine_dtype="bf16", imbalance=1.0,
                          send_unit="rank" if nodes == 1 else "node")
    return estimate(shape, cluster, ep, "prefill", 4096, options)


@pytest.mark.parametrize("ep", sorted(DEEPEP_NORMAL))
def test_deepep_normal_kernels_bandwidth(ep):
    row = deepep_normal(ep, load_cluster(os.path.join(CLUSTERS, "h800_infiniband.yaml")))
    dispatch, combine = DEEPEP_NORMAL[ep]
    if ep == 8:   # NVLink is the bottleneck link
        predicted = (row.dispatch_bottleneck_gbps, row.combine_bottleneck_gbps)
    else:         # DeepEP's table gives the RDMA bandwidth
        predicted = (row.dispatch_inter_node_gbps, row.combine_inter_node_gbps)
    assert within(predicted[0], dispatch), (ep, predicted, DEEPEP_NORMAL[ep])
    assert within(predicted[1], combine), (ep, predicted, DEEPEP_NORMAL[ep])


def low_latency(ep, cluster, dispatch_dtype):
    options = PlanOptions(dispatch_dtype=dispatch_dtype, combine_dtype="bf16", imbalance=1.0,
                          send_unit="expert")
    return estimate(V3_LAYER, cluster, ep, "decode", 128, options)


@pytest.mark.parametrize("ep", sorted(DEEPEP_LOW_LATENCY))
def test_deepep_low_latency_kernels_latency(ep):
    row = low_latency(ep, load_cluster(os.path.join(CLUSTERS, "h800_infiniband.yaml")), "fp8")
    dispatch, combine = DEEPEP_LOW_LATENCY[ep]
    assert within(row.combine_us, combine), (ep, row.combine_us, combine)
    if ep == 8:
        # Explained miss (docs/scaling.md): 32% under; the model has no term for the sender's
        # FP8 cast and per-expert packing, largest in share where the bytes are fewest.
        assert row.dispatch_us < dispatch and within(row.dispatch_us, dispatch, 0.35)
    else:
        assert within(row.dispatch_us, dispatch), (ep, row.dispatch_us, dispatch)


@pytest.mark.parametrize("ep", sorted(ASCEND_NORMAL))
def test_deepep_ascend_normal_kernels_bandwidth(ep):
    cluster = load_cluster(os.path.join(CLUSTERS, "atlas_a3_superpod.yaml"))
    options = PlanOptions(dispatch_dtype="int8", combine_dtype="bf16", imbalance=1.0)
    row = estimate(V3_LAYER, cluster, ep, "prefill", 4096, options)
    dispatch, combine = ASCEND_NORMAL[ep]
    predicted = (row.dispatch_bottleneck_gbps, row.combine_bottleneck_gbps)
    if ep <= 8:
        assert within(predicted[0], dispatch) and within(predicted[1], combine), predicted
    else:
        # Explained miss (docs/scaling.md): the published bandwidth falls with EP in one flat
        # HCCS domain; a link model predicts it flat, so it over-predicts, more as EP grows.
        assert predicted[0] > dispatch and predicted[1] > 0.9 * combine, (ep, predicted)


@pytest.mark.parametrize("ep", sorted(ASCEND_LOW_LATENCY))
def test_deepep_ascend_low_latency_combine(ep):
    cluster = load_cluster(os.path.join(CLUSTERS, "atlas_a3_superpod.yaml"))
    row = low_latency(ep, cluster, "int8")
    dispatch, combine = ASCEND_LOW_LATENCY[ep]
    assert within(row.combine_us, combine), (ep, row.combine_us, combine)
    # Explained miss: the published dispatch takes as long as the combine that moves twice the
    # bytes (quantisation on the vector cores, not modelled), so the model predicts it short.
    assert row.dispatch_us < dispatch


# ---- the planner and its command -------------------------------------------------------------

def run_plan(*args):
    return subprocess.run([sys.executable, PLAN, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_plan_json_has_one_row_per_ep_phase_and_batch():
    done = run_plan("yaml_configs/deepseek_v3_256npu.yaml", "--cluster",
                    os.path.join(CLUSTERS, "h800_infiniband.yaml"), "--ep", "16,32",
                    "--decode-tokens", "8,128", "--prefill-tokens", "4096",
                    "--dispatch-dtype", "fp8", "--combine-dtype", "bf16", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    keys = {(row["ep"], row["phase"], row["tokens_per_rank"]) for row in plan["rows"]}
    assert keys == {(ep, phase, tokens) for ep in (16, 32)
                    for phase, tokens in (("prefill", 4096), ("decode", 8), ("decode", 128))}
    for row in plan["rows"]:
        for key in ("dispatch_us", "combine_us", "dispatch_gbps", "combine_gbps", "memory_bytes"):
            assert row[key] > 0, (key, row)
    # fp8 dispatch moves about half the bytes of the bf16 combine (scales aside)
    row = plan["rows"][0]
    assert row["dispatch_bytes"] / row["combine_bytes"] == pytest.approx(
        (7168 + 224) / (2 * 7168))
    recommendation = plan["recommendation"]
    assert recommendation["ep"] in (16, 32) and recommendation["reasons"]
    # the config value of the redundant slots: per rank x ranks (parallel.redundant_experts)
    assert recommendation["redundant_experts"] == (recommendation["redundant_experts_per_rank"]
                                                   * recommendation["ep"])


@pytest.mark.parametrize("args, message", [
    (["--ep", "12"], "--ep value 12 is not allowed: it must divide model.num_experts = 256"),
    (["--decode-tokens", "0"], "expected integers >= 1"),
    (["--dispatch-dtype", "fp4"], "invalid choice: 'fp4'"),
])
def test_plan_refuses_bad_arguments_naming_them(args, message):
    done = run_plan("yaml_configs/deepseek_v3_256npu.yaml", "--cluster",
                    os.path.join(CLUSTERS, "h800_infiniband.yaml"), *args)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_cluster_files_refuse_bad_fields(tmp_path):
    path = tmp_path / "bad.yaml"
    with open(os.path.join(CLUSTERS, "h800_infiniband.yaml"), encoding="utf-8") as good:
        path.write_text(good.read().replace("cards_per_node: 8", "cards_per_node: 0"))
    with pytest.raises(ConfigError, match=r"cluster.cards_per_node = 0 is not allowed; "
                                          r"expected an integer > 0"):
        load_cluster(path)
    path.write_text("cluster:\n  name: x\n  cards_per_nod: 8\n")
    with pytest.raises(ConfigError, match="cluster.cards_per_nod is not a cluster field "
                                          r"\(did you mean 'cards_per_node'\?\)"):
        load_cluster(path)


def test_every_shipped_cluster_file_loads():
    names = sorted(os.listdir(CLUSTERS))
    assert {"h800_infiniband.yaml", "atlas_a3_superpod.yaml", "atlas_800t_a2.yaml",
            "cpu_host.yaml"} <= set(names)
    for name in names:
        assert load_cluster(os.path.join(CLUSTERS, name)).cards_per_node >= 1


# ---- a CPU host: cores shared by the ranks (issue 21, section 2, own runs) ------------------
# The arithmetic of the model for a given calibration, checked by hand; the measured comparison
# itself (timings) is in docs/scaling.md and scripts/plan_validation.py --layer-times.

def cpu_host(**changes):
    """A calibration with round numbers: 2 cores, 4 ranks per node."""
    fields = dict(name="test host", cards_per_node=4, num_nodes=1, cores_per_node=2,
                  intra_node_gbps=10.0, intra_node_latency_us=0.0, inter_node_gbps=1.0,
                  inter_node_latency_us=0.0, device_memory_gib=4.0, memory_gbps=20.0,
                  weight_pack_gbps=5.0, operator_overhead_us=50.0, step_overhead_us=1000.0,
                  oversubscribed_step_overhead_us=3000.0, oversubscribed_compute_efficiency=0.8,
                  tflops_float32=0.2, compute_sharing="per_node", shared_memory_window=True)
    fields.update(changes)
    from mindspore_moe_ep.planning import ClusterSpec
    return ClusterSpec(**fields)


def test_blom_expected_maximum_of_normals():
    from mindspore_moe_ep.planning.routing import expected_max_z
    assert expected_max_z(1) == 0.0
    # exact: 1/sqrt(pi) for 2, 1.0294 for 4, 1.4236 for 8
    assert expected_max_z(2) == pytest.approx(1 / math.sqrt(math.pi), abs=0.03)
    assert expected_max_z(4) == pytest.approx(1.0294, abs=0.03)
    assert expected_max_z(8) == pytest.approx(1.4236, abs=0.03)


def test_cpu_host_shares_cores_and_bandwidth_among_its_ranks():
    cluster = cpu_host()
    assert [cluster.sharers(ep) for ep in (1, 2, 4, 8)] == [1, 2, 4, 4]
    assert [cluster.oversubscription(ep) for ep in (1, 2, 3, 4)] == [1.0, 1.0, 1.5, 2.0]
    assert [cluster.step_overhead(ep) for ep in (1, 2, 3, 4)] == [1000.0, 1000.0, 2000.0,
                                                                  3000.0]
    assert [cluster.compute_efficiency(ep) for ep in (2, 3, 4)] == pytest.approx([1.0, 0.9, 0.8])
    # A device cluster is unaffected by the CPU fields' defaults.
    h800 = load_cluster(os.path.join(CLUSTERS, "h800_infiniband.yaml"))
    assert (h800.sharers(8), h800.oversubscription(8), h800.step_overhead(8)) == (1, 1.0, 0.0)


def test_cpu_host_prefill_is_compute_bound_on_shared_cores():
    # 4 experts at EP 2 and 4, top-1, 4096 tokens per rank: every local expert gets thousands
    # of rows (its weights packed, then its FLOPs), the busiest rank is given (imbalance 1).
    shape = LayerShape(hidden=1024, num_experts=4, expert_ffn=512, top_k=1,
                       weight_dtype="float32")
    options = PlanOptions(dispatch_dtype="float32", combine_dtype="float32",
                          compute_dtype="float32", imbalance=1.0)
    for ep, rate_per_rank in ((2, 0.2e12 / 2), (4, 0.2e12 * 0.8 / 4)):
        row = estimate(shape, cpu_host(), ep, "prefill", 4096, options, capacity=4096)
        pairs = 4096                                        # T * top_k * imbalance
        compute_us = 6 * 1024 * 512 * pairs / rate_per_rank * 1e6
        # Each expert's 4096 * ep / 4 rows run in GEMM calls of at most 512 rows (the CPU
        # kernel's chunks), each call packing the expert's weights again.
        calls = (4 // ep) * (4096 * ep // 4) // 512
        weights_us = calls * 3 * 1024 * 512 * 4 / (5e9 / ep) * 1e6
        assert row.experts_us == pytest.approx(compute_us + weights_us, rel=1e-9)
        # Each token goes to its one expert's rank: 1/ep of rows stay, the rest to peers;
        # the receiver copies both out of the window, at the node's copy rate shared by ep.
        copied = 4096 * 4096                                 # rows x float32 row bytes
        exchange_us = 50.0 * max(1, ep / 2) + copied / (10e9 / ep) * 1e6
        assert row.dispatch_us == pytest.approx(exchange_us, rel=1e-9)
        assert row.combine_us == pytest.approx(exchange_us, rel=1e-9)
        assert row.step_us == {2: 1000.0, 4: 3000.0}[ep]
        assert row.layer_us == pytest.approx(row.step_us + 2 * exchange_us + compute_us
                                             + weights_us)


def test_cpu_host_decode_reads_weights_once_per_touched_expert():
    # EP 2, 8 experts (4 per rank), top-1, 1 token per rank: the group's 2 pairs fall on 2 of
    # 8 experts; an expert gets one row with probability q1 = 2 (1/8) (7/8), two with
    # q2 = (1/8)^2. One-row calls read the weights at memory_gbps, two-row calls pack them,
    # and each call's FLOPs come on top (weights first, then arithmetic, on the same core).
    from mindspore_moe_ep.planning.routing import expected_max_z
    shape = LayerShape(hidden=256, num_experts=8, expert_ffn=128, top_k=1,
                       weight_dtype="float32")
    options = PlanOptions(dispatch_dtype="float32", combine_dtype="float32",
                          compute_dtype="float32", imbalance=1.0)
    row = estimate(shape, cpu_host(), 2, "decode", 1, options, capacity=128)
    expert_bytes = 3 * 256 * 128 * 4
    q1, q2 = 2 * (1 / 8) * (7 / 8), (1 / 8) ** 2
    z = expected_max_z(2)
    single = 4 * q1 + math.sqrt(4 * q1 * (1 - q1)) * z       # busiest of the 2 ranks
    several = 4 * q2 + math.sqrt(4 * q2 * (1 - q2)) * z
    flops = 6 * 256 * 128
    rate = 0.2e12 / 2
    expected = (single * expert_bytes / (20e9 / 2) + several * expert_bytes / (5e9 / 2)
                + max(1, single) * flops / rate)                    # 1 pair: T * top_k
    assert row.experts_us == pytest.approx(expected * 1e6, rel=1e-9)


def test_own_runs_comparison_puts_the_estimate_next_to_the_measured_time(tmp_path, capsys):
    # scripts/plan_validation.py --layer-times on a made-up measurement: the predicted column
    # is the planner's estimate of that layer, the ratio predicted / measured.
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    sys.path.insert(0, os.path.join(ROOT, "scripts", "benchmarks"))
    import layer_times
    import plan_validation
    measured = {"machine": {"date_utc": "2026-12-03T00:00:00+00:00", "cpu_model": "test"},
                "loads": {"2": {"started_utc": "x", "load_1m_before": 0.1,
                                "load_1m_after": 0.2, "other_cores": 0.0}},
                "rows": [{"workload": "end_to_end", "phase": "prefill", "tokens": 512, "ep": 2,
                          "min_s": 0.040}]}
    path = tmp_path / "layer_times.json"
    path.write_text(json.dumps(measured))
    cluster_path = tmp_path / "host.yaml"
    from mindspore_moe_ep.planning import save_cluster
    save_cluster(cpu_host(), cluster_path)
    rows = plan_validation.own_runs(str(path), str(cluster_path))
    config = layer_times.config_of("end_to_end", 2)
    expected = estimate(LayerShape.from_config(config), cpu_host(), 2, "prefill", 512,
                        PlanOptions(dispatch_dtype="float32", combine_dtype="float32",
                                    compute_dtype="float32"),
                        config.dispatch.max_tokens_per_rank)
    assert rows[0]["predicted_ms"] == pytest.approx(expected.layer_us / 1e3)
    assert rows[0]["ratio"] == pytest.approx(expected.layer_us / 40e3)
    assert rows[0]["within"] == (abs(expected.layer_us / 40e3 - 1) <= 0.25)
    assert "| end_to_end | prefill | 512 | 2 | layer_times.py | 40.0 |" in capsys.readouterr().out


def test_shipped_cpu_host_file_is_a_calibration_of_shared_cores():
    cluster = load_cluster(os.path.join(CLUSTERS, "cpu_host.yaml"))
    assert cluster.compute_sharing == "per_node" and cluster.cores_per_node >= 1
    assert cluster.weight_pack_gbps and cluster.step_overhead_us > 0
    assert "scripts/calibrate_host.py" in cluster.source
