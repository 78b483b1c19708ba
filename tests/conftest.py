"""Fixtures shared by the kernel tests."""
import mindspore as ms
import pytest

MODES = {"pynative": ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE}


@pytest.fixture(params=sorted(MODES))
def mode(request):
    """Runs the test once in PYNATIVE_MODE and once in GRAPH_MODE."""
    ms.set_context(mode=MODES[request.param])
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="session")
def lm_tiny_ep1_run(tmp_path_factory):
    """scripts/train.py on yaml_configs/lm_tiny.yaml in this process (EP 1): 40 steps, every
    step logged. (run directory, what main returned, the metrics.jsonl records)."""
    import json
    from lm_scripts import train
    out = tmp_path_factory.mktemp("lm_tiny_ep1")
    result = train("--out", str(out), "--set", "train.log_every=1")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, result, records
