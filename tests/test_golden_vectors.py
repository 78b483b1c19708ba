"""The CPU kernels and a whole layer reproduce the golden vectors of tests/golden/.

The vectors come from the independent NumPy references (scripts/make_golden_vectors.py); the
Ascend kernels are held to the same files in tests/test_ascend.py.
"""
import importlib.util
import os

import mindspore as ms
import pytest

from reference import golden

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ["float32", "float16", "bfloat16"]


@pytest.fixture(autouse=True, scope="module")
def pynative_cpu():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_golden_vectors", os.path.join(REPO, "scripts", "make_golden_vectors.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_golden_files_are_what_the_generator_writes():
    generator = _generator()
    assert generator.differences() == [], "run: python scripts/make_golden_vectors.py"


@pytest.mark.parametrize("key, change", [
    ("y", lambda y: y * (1 + 1e-10)),                 # a float beyond FLOAT_REL_TOL
    ("expert_ids", lambda ids: ids[:, ::-1].copy()),   # an integer array: exact
], ids=["float", "int"])
def test_stale_golden_file_is_detected(tmp_path, key, change):
    """The CPU-independent comparison still catches a changed case (and only that case)."""
    generator = _generator()
    for name in generator.golden_cases():
        case = golden.load(name)
        if name == "layer_dropless":
            case[key] = change(case[key])
        generator.np.savez(str(tmp_path / f"{name}.npz"), **case)
    assert generator.differences(str(tmp_path)) == ["layer_dropless"]


def test_golden_files_are_small():
    total = sum(os.path.getsize(os.path.join(golden.GOLDEN_DIR, name))
                for name in os.listdir(golden.GOLDEN_DIR))
    assert total < 1_000_000, f"tests/golden holds {total} bytes; keep it under 1 MB"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["dispatch_dropless", "dispatch_capacity"])
def test_dispatch(name, dtype):
    """Rows past sum(tokens_per_expert) are unspecified, so check_dispatch compares the used
    rows; the capacity case has such a tail."""
    golden.check_dispatch(name, dtype)
    case = golden.load(name)
    if name == "dispatch_capacity":
        assert case["tokens_per_expert"].sum() < case["grouped_x"].shape[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [True, False], ids=["combine", "gather_sum"])
def test_combine_and_gather_sum(weighted, dtype):
    golden.check_combine(dtype, weighted)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows(dtype):
    golden.check_gather_rows(dtype)


def test_expert_parallel_layout():
    golden.check_layout()


@pytest.mark.parametrize("name", ["layer_dropless", "layer_capacity"])
def test_layer(name):
    golden.check_layer(name)
