"""The Ascend backend.

Runs everywhere: the launcher's dry run, the AscendC build script's refusal without CANN, the
lookup of the installed kernels, the index arithmetic of the HCCL all-to-all-v (with AlltoAllV
simulated in NumPy) and the wiring of the Ascend branch.

Needs an NPU (skipped here, marked ``needs_npu``): the AscendC kernels against the golden
vectors, a whole layer, CANN's grouped matmul, the HCCL exchange under msrun, and the fused
decode operators against a single-process layer.
"""
import json
import os
import subprocess
import sys
import textwrap

import mindspore as ms
import numpy as np
import pytest

from mindspore_moe_ep.runtime import device_target
from reference import golden

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSRUN_ASCEND = os.path.join(REPO, "scripts", "msrun_ascend.sh")
BUILD_SH = os.path.join(REPO, "custom_ops", "ascendc", "build.sh")

needs_npu = pytest.mark.skipif(device_target() != "Ascend",
                               reason="needs an Ascend NPU (device_target != 'Ascend')")


def run(command, env=None, timeout_s=120):
    environment = dict(os.environ, **(env or {}))
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=timeout_s)


# ----------------------------------------------------------------------------------------------
# Launcher and build script
# ----------------------------------------------------------------------------------------------

def test_msrun_dry_run_prints_the_exact_multi_node_command():
    result = run(["bash", MSRUN_ASCEND, "--nodes", "8", "--node-rank", "3",
                  "--workers-per-node", "8", "--master-addr", "10.1.2.3", "--master-port", "9000",
                  "--dry-run", "--", "--repeats", "1"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"msrun --worker_num=64 --local_worker_num=8 --master_addr=10.1.2.3 --master_port=9000 "
        f"--node_rank=3 --log_dir=msrun_logs_ascend --join=True --cluster_time_out=600 "
        f"{REPO}/scripts/run_moe.py {REPO}/yaml_configs/deepseek_v3_64npu.yaml --repeats 1")


def test_msrun_dry_run_sets_the_hccl_window_for_the_soc():
    env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "PYTHON": sys.executable}
    env_without_window = {key: value for key, value in os.environ.items()
                          if key != "HCCL_BUFFSIZE"}
    env_without_window.update(env)
    config = os.path.join(REPO, "yaml_configs", "deepseek_v3_256npu.yaml")
    result = subprocess.run(["bash", MSRUN_ASCEND, "--nodes", "32", "--node-rank", "0",
                             "--workers-per-node", "8", "--master-addr", "10.1.2.3",
                             "--config", config, "--soc", "A3", "--dry-run"],
                            cwd=REPO, env=env_without_window, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HCCL_BUFFSIZE=1891 msrun --worker_num=256 ")
    # Already large enough: left alone.
    env_without_window["HCCL_BUFFSIZE"] = "4096"
    result = subprocess.run(["bash", MSRUN_ASCEND, "--nodes", "32", "--node-rank", "0",
                             "--workers-per-node", "8", "--master-addr", "10.1.2.3",
                             "--config", config, "--soc", "A3", "--dry-run"],
                            cwd=REPO, env=env_without_window, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.startswith("msrun --worker_num=256 ")


@pytest.mark.parametrize("arguments,message", [
    (["--nodes", "2", "--node-rank", "2", "--workers-per-node", "8", "--master-addr", "h"],
     "--node-rank must be an integer in [0, 2)"),
    (["--nodes", "2", "--node-rank", "0", "--workers-per-node", "8"],
     "--master-addr (the IP address of node 0) is required"),
    (["--nodes", "1", "--node-rank", "0", "--workers-per-node", "0"],
     "--workers-per-node must be an integer >= 1"),
    (["--nodes", "1", "--node-rank", "0", "--workers-per-node", "8", "--soc", "A9"],
     "--soc must be A2 or A3"),
    (["--nodes", "1", "--node-rank", "0", "--workers-per-node", "8", "--config", "missing.yaml"],
     "config file 'missing.yaml' not found"),
])
def test_msrun_launcher_rejects_bad_arguments(arguments, message):
    result = run(["bash", MSRUN_ASCEND, *arguments, "--dry-run"])
    assert result.returncode == 2
    assert message in result.stderr


def test_build_script_fails_clearly_without_cann():
    env = {key: value for key, value in os.environ.items()
           if key not in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")}
    result = subprocess.run(["bash", BUILD_SH], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "CANN was not found: ASCEND_HOME_PATH" in result.stderr
    assert "set_env.sh" in result.stderr


def test_build_script_names_a_wrong_cann_path(tmp_path):
    result = run(["bash", BUILD_SH], env={"ASCEND_HOME_PATH": str(tmp_path / "missing")})
    assert result.returncode == 2
    assert f"ASCEND_HOME_PATH={tmp_path / 'missing'} is not a directory" in result.stderr
    result = run(["bash", BUILD_SH], env={"ASCEND_HOME_PATH": str(tmp_path)})
    assert result.returncode == 2
    assert "no AscendC operator project template" in result.stderr


def test_every_ascendc_operator_has_a_kernel_and_a_definition():
    """Each operator of the package: a kernel source named after it and an OpDef in op_host."""
    from mindspore_moe_ep.ascend.opp import ASCENDC_KERNELS
    host = open(os.path.join(REPO, "custom_ops", "ascendc", "op_host", "moe_ep_ops.cpp")).read()
    for name in ASCENDC_KERNELS:
        snake = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
        source = os.path.join(REPO, "custom_ops", "ascendc", "op_kernel", snake + ".cpp")
        assert os.path.exists(source), source
        assert f"__aicore__ void {snake}(" in open(source).read()
        assert f"OP_ADD({name});" in host and f"REGISTER_TILING_DATA_CLASS({name}," in open(
            os.path.join(REPO, "custom_ops", "ascendc", "op_host", "moe_ep_tiling.h")).read()


# ----------------------------------------------------------------------------------------------
# Finding the installed kernels
# ----------------------------------------------------------------------------------------------

def _fake_package(root, names):
    config_dir = root / "op_impl" / "ai_core" / "tbe" / "config" / "ascend910b"
    config_dir.mkdir(parents=True)
    (config_dir / "aic-ascend910b-ops-info.json").write_text(
        json.dumps({name: {"opFile": {"value": name}} for name in names}))
    return root


def test_installed_kernels_are_found_on_either_search_path(tmp_path):
    from mindspore_moe_ep.ascend.opp import ASCENDC_KERNELS, find_ascendc_kernels
    custom = _fake_package(tmp_path / "custom" / "vendors" / "moe_ep", ASCENDC_KERNELS)
    assert find_ascendc_kernels({"ASCEND_CUSTOM_OPP_PATH": f"/nowhere:{custom}"}) == str(custom)
    vendor = _fake_package(tmp_path / "opp" / "vendors" / "moe_ep", ASCENDC_KERNELS)
    assert find_ascendc_kernels({"ASCEND_OPP_PATH": str(tmp_path / "opp")}) == str(vendor)


def test_missing_kernels_raise_with_build_instructions(tmp_path):
    from mindspore_moe_ep.ascend.opp import (ASCENDC_KERNELS, AscendKernelsNotInstalledError,
                                             require_ascendc_kernels)
    partial = _fake_package(tmp_path / "partial", ASCENDC_KERNELS[:-1])
    with pytest.raises(AscendKernelsNotInstalledError) as error:
        require_ascendc_kernels({"ASCEND_CUSTOM_OPP_PATH": str(partial)})
    assert "custom_ops/ascendc/build.sh" in str(error.value)
    assert str(partial) in str(error.value)
    with pytest.raises(AscendKernelsNotInstalledError, match="unset"):
        require_ascendc_kernels({})


# ----------------------------------------------------------------------------------------------
# HCCL all-to-all-v: the packing around AlltoAllV, with AlltoAllV simulated
# ----------------------------------------------------------------------------------------------

def _simulated_exchange(send_rows, send_counts, capacity):
    """What HcclExchangeRows computes, with the AlltoAllV done in NumPy. Lists indexed by rank."""
    from mindspore_moe_ep.ascend.hccl_exchange import AlltoAllVPacking
    world = len(send_rows)
    packing = AlltoAllVPacking(world, capacity)
    compact = [packing.pack(ms.Tensor(rows), ms.Tensor(counts)).asnumpy()
               for rows, counts in zip(send_rows, send_counts)]
    outputs = []
    for target in range(world):
        segments = []
        for source in range(world):
            lengths = send_counts[source] + 1                       # rows + the padding row
            start = int(lengths[:target].sum())
            segments.append(compact[source][start:start + lengths[target]])
        recv_counts = np.array([send_counts[source][target] for source in range(world)], np.int32)
        received = np.concatenate(segments)
        outputs.append((packing.unpack(ms.Tensor(received), ms.Tensor(recv_counts)).asnumpy(),
                        recv_counts))
    return outputs


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_alltoallv_packing_delivers_the_exchange_contract(dtype):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    world, capacity, width = 4, 5, 3
    rng = np.random.default_rng(0)
    send_rows = [rng.integers(-9, 9, (world * capacity, width)).astype(dtype) for _ in range(world)]
    send_counts = [rng.integers(0, capacity + 1, world).astype(np.int32) for _ in range(world)]
    send_counts[1][:] = 0                                  # a rank that sends nothing
    send_counts[2][:] = capacity                           # a rank that fills every slot
    for target, (recv_rows, recv_counts) in enumerate(_simulated_exchange(send_rows, send_counts,
                                                                          capacity)):
        expected = np.zeros_like(recv_rows)
        for source in range(world):
            count = send_counts[source][target]
            expected[source * capacity:source * capacity + count] = \
                send_rows[source][target * capacity:target * capacity + count]
        np.testing.assert_array_equal(recv_rows, expected, err_msg=f"rank {target}")
        assert recv_counts.tolist() == [send_counts[s][target] for s in range(world)]


def test_reverse_exchange_is_the_adjoint():
    """<exchange(x), y> == <x, reverse_exchange(y)>: the gradient HcclExchangeRows uses."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    world, capacity, width = 3, 4, 2
    rng = np.random.default_rng(1)
    x = [rng.standard_normal((world * capacity, width)).astype(np.float32) for _ in range(world)]
    counts = [rng.integers(0, capacity + 1, world).astype(np.int32) for _ in range(world)]
    forward = _simulated_exchange(x, counts, capacity)
    y = [rng.standard_normal((world * capacity, width)).astype(np.float32) for _ in range(world)]
    backward = _simulated_exchange(y, [recv_counts for _, recv_counts in forward], capacity)
    left = sum(float((out * y_r).sum()) for (out, _), y_r in zip(forward, y))
    right = sum(float((x_r * d_x).sum()) for x_r, (d_x, _) in zip(x, backward))
    assert abs(left - right) < 1e-4 * max(1.0, abs(left))


# ----------------------------------------------------------------------------------------------
# Wiring: the Ascend branch of the layer and the experts' grouped matmul
# ----------------------------------------------------------------------------------------------

def test_layer_takes_the_ascend_branch_only_on_ascend(monkeypatch):
    import mindspore_moe_ep as mee
    from mindspore_moe_ep import ascend, layer
    from mindspore_moe_ep.token_dispatcher import LocalTokenDispatcher
    config = mee.load_config(golden.TINY_YAML)
    group = layer.expert_parallel_group(config)
    prefill, decode, window = layer._build_dispatchers(config, group)
    assert isinstance(prefill, LocalTokenDispatcher) and decode is None and window is None
    calls = []
    monkeypatch.setattr(layer, "ascend_backend_active", lambda: True)
    monkeypatch.setattr(ascend, "build_ascend_dispatchers",
                        lambda cfg, grp: calls.append((cfg, grp)) or ("prefill", "decode"))
    assert layer._build_dispatchers(config, group) == ("prefill", "decode", None)
    assert calls == [(config, group)]


def test_cpu_keeps_the_cpu_kernels():
    from mindspore_moe_ep.experts import grouped_matmul_for_device
    from mindspore_moe_ep.ops import GroupedMatmul
    from mindspore_moe_ep.ops.kernel_library import kernel_func
    from mindspore_moe_ep.runtime import ascend_backend_active
    assert not ascend_backend_active()
    assert isinstance(grouped_matmul_for_device(), GroupedMatmul)
    assert kernel_func("MoeEpDispatch").endswith("libmoe_ep_cpu.so:MoeEpDispatch")


# ----------------------------------------------------------------------------------------------
# On an NPU
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def on_ascend():
    """PyNative on the NPU, with the AscendC kernels installed."""
    from mindspore_moe_ep.ascend.opp import require_ascendc_kernels
    ms.set_device("Ascend")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    require_ascendc_kernels()
    yield


@needs_npu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", ["dispatch_dropless", "dispatch_capacity"])
def test_ascendc_dispatch_matches_golden(on_ascend, name, dtype):
    golden.check_dispatch(name, dtype)


@needs_npu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("weighted", [True, False], ids=["combine", "gather_sum"])
def test_ascendc_combine_matches_golden(on_ascend, weighted, dtype):
    golden.check_combine(dtype, weighted)


@needs_npu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ascendc_gather_rows_matches_golden(on_ascend, dtype):
    golden.check_gather_rows(dtype)


@needs_npu
def test_ascendc_layout_matches_golden(on_ascend):
    golden.check_layout()


@needs_npu
@pytest.mark.parametrize("name", ["layer_dropless", "layer_capacity"])
def test_layer_on_ascend_matches_golden(on_ascend, name):
    golden.check_layer(name, rel_tol=1e-3)   # CANN's matmuls may use reduced-precision paths


@needs_npu
def test_ascend_grouped_matmul(on_ascend):
    from mindspore_moe_ep.ascend.grouped_matmul import AscendGroupedMatmul
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((10, 8)).astype(np.float32)
    weights = rng.standard_normal((3, 8, 4)).astype(np.float32)
    counts = np.array([3, 0, 5], np.int32)
    out = AscendGroupedMatmul()(ms.Tensor(rows).astype(ms.bfloat16),
                                ms.Tensor(weights).astype(ms.bfloat16), ms.Tensor(counts))
    expected = np.zeros((10, 4))
    starts = np.concatenate([[0], np.cumsum(counts)])
    for expert in range(3):
        span = slice(starts[expert], starts[expert + 1])
        expected[span] = rows[span] @ weights[expert]
    golden.assert_close(out.astype(ms.float32).asnumpy().astype(np.float64), expected,
                        "bfloat16", "grouped matmul")


HCCL_WORKER = textwrap.dedent("""
    import numpy as np, mindspore as ms
    from mindspore.communication import init, get_rank, get_group_size
    ms.set_device("Ascend"); ms.set_context(mode=ms.GRAPH_MODE, jit_config={"jit_level": "O0"})
    init()
    from mindspore_moe_ep.ascend.hccl_exchange import HcclExchangeRows
    rank, world, capacity = get_rank(), get_group_size(), 4
    def data(r):
        rng = np.random.default_rng(r)
        return (rng.standard_normal((world * capacity, 3)).astype(np.float32),
                rng.integers(0, capacity + 1, world).astype(np.int32))
    rows, counts = data(rank)
    exchange = HcclExchangeRows(list(range(world)), capacity)
    recv, recv_counts = exchange(ms.Tensor(rows), ms.Tensor(counts))
    expected = np.zeros_like(rows)
    for source in range(world):
        source_rows, source_counts = data(source)
        c = source_counts[rank]
        expected[source * capacity:source * capacity + c] = source_rows[rank * capacity:rank * capacity + c]
    assert np.array_equal(recv.asnumpy(), expected), rank
    def loss(x):
        return (exchange(x, ms.Tensor(counts))[0] * 2).sum()
    grad = ms.grad(loss)(ms.Tensor(rows))
    mask = np.arange(world * capacity) % capacity < np.repeat(counts, capacity)
    assert np.array_equal(grad.asnumpy(), 2.0 * mask[:, None] * np.ones_like(rows)), rank
    print("HCCL exchange OK", rank)
""")


@needs_npu
def test_hccl_exchange_under_msrun(tmp_path):
    if ms.hal.device_count("Ascend") < 2:
        pytest.skip("needs 2 NPUs")
    worker = tmp_path / "hccl_worker.py"
    worker.write_text(HCCL_WORKER)
    result = run([os.path.join(os.path.dirname(sys.executable), "msrun"), "--worker_num=2",
                  "--local_worker_num=2", "--master_port=8129", f"--log_dir={tmp_path / 'logs'}",
                  "--join=True", str(worker)], env={"PYTHONPATH": REPO}, timeout_s=600)
    logs = "".join(path.read_text() for path in (tmp_path / "logs").glob("worker_*.log"))
    assert result.returncode == 0, logs[-3000:]
    assert logs.count("HCCL exchange OK") == 2


@needs_npu
def test_fused_decode_matches_single_process(tmp_path):
    """The main job on 16 NPUs (A2's smallest CANN EP size): decode through CANN's operators."""
    from mindspore_moe_ep.ascend import detect_soc
    soc = detect_soc()
    if soc is None or ms.hal.device_count("Ascend") < 16:
        pytest.skip("needs 16 NPUs of an Atlas A2 / A3 node pair")
    config = tmp_path / "cann_16.yaml"
    config.write_text(textwrap.dedent(f"""
        # 16-rank layer inside CANN's limits for {soc}.
        model: {{hidden_size: 7168, num_experts: 32, expert_ffn_size: 256}}
        router: {{top_k: 8, score_func: sigmoid}}
        parallel: {{expert_parallel: 16}}
        dispatch: {{max_tokens_per_rank: 16, decode_token_threshold: 8}}
        runtime: {{mode: graph, dtype: bfloat16}}
        workload: {{batch_size: 1, prefill_seq_len: 16, decode_steps: 2, decode_batch_size: 8,
                   train_steps: 0}}
    """))
    summary = tmp_path / "summary.json"
    result = run(["bash", MSRUN_ASCEND, "--nodes", "1", "--node-rank", "0",
                  "--workers-per-node", "16", "--config", str(config), "--soc", soc,
                  "--log-dir", str(tmp_path / "logs"), "--", "--repeats", "1",
                  "--json", str(summary)], env={"PYTHON": sys.executable}, timeout_s=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    phases = json.loads(summary.read_text())["phases"]
    assert max(phase["max_abs_diff_vs_single_process"] for name, phase in phases.items()
               if name.startswith(("prefill", "decode"))) < 0.05   # bfloat16
