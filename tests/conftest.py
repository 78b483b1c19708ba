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
