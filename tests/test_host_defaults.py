"""The CPU host settings that `import mindspore_moe_ep` applies (host_defaults.py): set where
the environment is silent, never over an explicit value, not on Ascend hosts, not when opted
out; kernel threads are the usable cores shared by the msrun workers of the host, handed to the
kernel library (not to the environment, which child processes would inherit), and MindSpore's
CPU operator threads follow them unless the script set those first."""
import json
import os
import subprocess
import sys

import pytest

from distributed import launch

from mindspore_moe_ep.host_defaults import usable_cores

PROBE = """
import json, os
import mindspore
import mindspore_moe_ep as mee
if os.environ.get("PROBE_OPERATOR_THREADS"):  # the script chooses MindSpore's threads itself
    mindspore.device_context.cpu.op_tuning.threads_num(int(os.environ["PROBE_OPERATOR_THREADS"]))
from mindspore_moe_ep.ops.kernel_library import kernel_threads
threads = kernel_threads()  # first: the library decides the count when it loads
report = {"applied": mee.applied_host_defaults(),
          "blocking": os.environ.get("MS_DEV_HOST_BLOCKING_RUN"),
          "threads_variable": os.environ.get("MOE_EP_NUM_THREADS"),
          "kernel_threads": threads}
if os.environ.get("MS_ROLE") == "MS_WORKER":  # msrun also runs the script as its scheduler
    import launch
    launch.write_result(report)
else:
    print(json.dumps(report))
"""
CLEARED = ("MS_DEV_HOST_BLOCKING_RUN", "MOE_EP_NUM_THREADS", "MOE_EP_HOST_DEFAULTS",
           "PROBE_OPERATOR_THREADS",
           "ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_OPP_PATH", "MS_WORKER_NUM",
           "MS_ROLE")


def probe(**environment):
    env = {key: value for key, value in os.environ.items() if key not in CLEARED}
    env.update(environment, GLOG_v="3")
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_defaults_applied_on_a_plain_cpu_host():
    seen = probe()
    assert seen["blocking"] == "1"
    assert seen["kernel_threads"] == usable_cores()  # one process: every usable core
    assert seen["applied"] == {"MS_DEV_HOST_BLOCKING_RUN": "1",
                               "kernel_threads": str(usable_cores()),  # decided by then
                               "operator_threads": str(usable_cores())}
    assert seen["threads_variable"] is None  # children choose their own share


@pytest.mark.parametrize("environment, expected", [
    ({"MOE_EP_NUM_THREADS": "3"}, {"blocking": "1", "kernel_threads": 3,
                                   "applied": {"MS_DEV_HOST_BLOCKING_RUN": "1",
                                               "operator_threads": "3"}}),
    ({"PROBE_OPERATOR_THREADS": "3"}, {"applied": {"MS_DEV_HOST_BLOCKING_RUN": "1",
                                                   "kernel_threads": str(usable_cores())}}),
    ({"MS_DEV_HOST_BLOCKING_RUN": "0"}, {"blocking": "0"}),
    ({"MOE_EP_HOST_DEFAULTS": "0"}, {"blocking": None, "applied": {}}),
    ({"ASCEND_HOME_PATH": "/usr/local/Ascend/ascend-toolkit/latest"},
     {"blocking": None, "applied": {}}),
], ids=["explicit_threads_win", "script_operator_threads_win", "explicit_blocking_wins",
        "opted_out", "ascend_host"])
def test_explicit_settings_opt_out_and_ascend_hosts(environment, expected):
    seen = probe(**environment)
    for key, value in expected.items():
        assert seen[key] == value, seen
    assert "kernel_threads" not in seen["applied"] or "MOE_EP_NUM_THREADS" not in environment


def test_threads_are_shared_by_the_workers_of_the_host(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {"PYTHONPATH": os.path.join(launch.REPOSITORY_ROOT, "tests", "distributed")}
    with launch.msrun_reports(str(script), 2, timeout_s=120, env=env) as result:
        for report in result.results.values():
            assert report["kernel_threads"] == max(1, usable_cores() // 2), report
            assert report["applied"]["operator_threads"] == str(report["kernel_threads"])
