"""setup_runtime: the host blocking-run policy reaches MindSpore's environment (issue: busy wait)."""
import os
import subprocess
import sys

import pytest

PROBE = """
import os, mindspore_moe_ep as mee
config = mee.MoEConfig.from_dict({{
    "model": {{"hidden_size": 8, "num_experts": 4, "expert_ffn_size": 8}},
    "router": {{"top_k": 2}}, "runtime": {{"host_blocking_run": {enabled}}}}})
mee.setup_runtime(config)
print("VALUE=" + str(os.environ.get("MS_DEV_HOST_BLOCKING_RUN")))
"""


def probe(enabled, preset=None):
    environment = {k: v for k, v in os.environ.items() if k != "MS_DEV_HOST_BLOCKING_RUN"}
    if preset is not None:
        environment["MS_DEV_HOST_BLOCKING_RUN"] = preset
    result = subprocess.run([sys.executable, "-c", PROBE.format(enabled=enabled)],
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("enabled, preset, expected", [
    (True, None, "VALUE=1"),      # the default turns the busy wait off on CPU
    (False, None, "VALUE=0"),     # opting out undoes what the package set at import
    (True, "0", "VALUE=0"),       # an explicit environment setting wins
])
def test_setup_runtime_applies_host_blocking_run(enabled, preset, expected):
    assert probe(enabled, preset) == expected
