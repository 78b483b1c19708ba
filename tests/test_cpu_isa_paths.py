"""Every SIMD path of the CPU kernels, run and compared on whatever CPU runs the suite.

The kernels pick their loops at run time (scalar, AVX2 + F16C; AVX-512 decides whether bfloat16
GEMMs may go to oneDNN's bfloat16 kernels), capped by MOE_EP_CPU_ISA or ``set_cpu_isa``. Here
each kernel with a vector path runs under every cap the CPU allows, and:

- where the paths add in the same order (the weighted sums of the combine and of the row-wise
  experts, SwiGLU and its gradient, the rows' gradient of the combine, every conversion), the
  results must be bit-identical to the scalar path's;
- where they do not, the bound is stated next to the comparison: the combine's weight gradient
  is a dot product over H that AVX2 sums in 16 partial sums (float32: |error| <= H * 2^-24 *
  sum|terms| for either order, so the two differ by at most twice that), and oneDNN's bfloat16
  GEMM against the float32 GEMM of the widened inputs (both sum exact products in float32, in
  different orders: k * 2^-24 * sum|terms| each, then one rounding to bfloat16, 2^-8 relative).

Caps above the CPU's instruction set cannot run here and are skipped with the reason; the last
test also runs the kernel test files under the scalar cap (and AVX2 on AVX-512 CPUs) in a fresh
process, the way MOE_EP_CPU_ISA is meant to be used.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from mindspore_moe_ep.ops import (CPU_ISAS, CombineKernel, ExpertsWeightedSum, GroupedMatmul,
                                  GroupedSwiGLU, bfloat16_gemm, cpu_isa, detected_cpu_isa,
                                  set_bfloat16_gemm, set_cpu_isa)
from mindspore_moe_ep.ops.kernel_library import library_path
from test_experts_weighted_sum import make_inputs, tensors

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Sizes with a 64-element block, a 16-element block and a scalar tail on every vector path.
HIDDEN = 64 + 16 + 5
FFN = 2 * 16 + 7


def runnable_isas():
    """The caps this CPU can run, scalar first."""
    return CPU_ISAS[:CPU_ISAS.index(detected_cpu_isa()) + 1]


def under_each_isa(compute):
    """{isa: compute()} for every runnable cap, with bfloat16 GEMMs pinned to the converted
    path (the direct one is compared on its own below); restores the defaults."""
    results = {}
    set_bfloat16_gemm("converted")
    try:
        for isa in runnable_isas():
            set_cpu_isa(isa)
            assert cpu_isa() == isa
            results[isa] = compute()
    finally:
        set_cpu_isa("avx512")
        set_bfloat16_gemm("auto")
    return results


def as_bits(tensor):
    """The raw bits of a float tensor of any dtype, as an integer array (NaN-safe equality)."""
    array = tensor.astype(ms.float32).asnumpy() if tensor.dtype == ms.bfloat16 else tensor.asnumpy()
    return array.view(np.uint32 if array.dtype == np.float32 else np.uint16)


def assert_bit_identical(results, what):
    scalar = results["scalar"]
    for isa, outputs in results.items():
        for index, (expected, actual) in enumerate(zip(scalar, outputs)):
            np.testing.assert_array_equal(actual, expected,
                                          err_msg=f"{what}, output {index}: {isa} != scalar")


@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_every_cap_up_to_the_cpus_is_selectable():
    assert detected_cpu_isa() in CPU_ISAS
    for isa in runnable_isas():
        set_cpu_isa(isa)
        assert cpu_isa() == isa
    set_cpu_isa("avx512")            # a cap above the CPU leaves what it runs
    assert cpu_isa() == detected_cpu_isa()
    with pytest.raises(ValueError, match=r"'avx1024' is unknown; use one of \('scalar'"):
        set_cpu_isa("avx1024")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_combine_and_its_gradient(dtype):
    """Weighted sum over K rows per token and its backward, under every cap."""
    rng = np.random.default_rng(11)
    tokens, top_k, rows = 9, 3, 30
    expert_out = Tensor(rng.standard_normal((rows, HIDDEN)).astype(np.float32)).astype(DTYPES[dtype])
    positions = rng.permutation(rows)[:tokens * top_k].reshape(tokens, top_k).astype(np.int32)
    positions[2, 1] = -1
    weights = Tensor(rng.uniform(0.1, 1.0, (tokens, top_k)).astype(np.float32))
    d_y = Tensor(rng.standard_normal((tokens, HIDDEN)).astype(np.float32))
    combine = CombineKernel()

    def loss(out, w):
        return (combine(out, Tensor(positions), w).astype(ms.float32) * d_y).sum()

    def compute():
        y = combine(expert_out, Tensor(positions), weights)
        d_rows, d_weights = ms.grad(loss, grad_position=(0, 1))(expert_out, weights)
        return as_bits(y), as_bits(d_rows), d_weights.asnumpy().astype(np.float64)

    results = under_each_isa(compute)
    # y and the rows' gradient: the same additions in the same order on every path.
    assert_bit_identical({isa: out[:2] for isa, out in results.items()}, f"combine {dtype}")
    # The weights' gradient: dot(d_y[t], rows[p]) over H, summed in another order by AVX2.
    rows64 = expert_out.astype(ms.float32).asnumpy().astype(np.float64)
    dy64 = d_y.asnumpy().astype(np.float64)
    for isa, (_, _, d_weights) in results.items():
        for t, k in zip(*np.nonzero(positions >= 0)):
            terms = np.abs(dy64[t] * rows64[positions[t, k]]).sum()
            bound = 2 * HIDDEN * 2.0 ** -24 * terms
            assert abs(d_weights[t, k] - results["scalar"][2][t, k]) <= bound, (isa, t, k)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_swiglu_and_its_gradient(dtype):
    rng = np.random.default_rng(12)
    counts = np.array([5, 0, 6], np.int32)
    gate_up = Tensor((3 * rng.standard_normal((12, 2 * FFN))).astype(np.float32)).astype(
        DTYPES[dtype])
    d_hidden = Tensor(rng.standard_normal((12, FFN)).astype(np.float32))
    swiglu = GroupedSwiGLU()
    used = int(counts.sum())

    def loss(values):
        return (swiglu(values, Tensor(counts)).astype(ms.float32) * d_hidden).sum()

    def compute():
        hidden = swiglu(gate_up, Tensor(counts))
        d_gate_up = ms.grad(loss)(gate_up)
        return as_bits(hidden)[:used], as_bits(d_gate_up)[:used]

    assert_bit_identical(under_each_isa(compute), f"swiglu {dtype}")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_rowwise_experts_weighted_sum(dtype):
    """The row-wise experts kernel: GEMMs (oneDNN, the same on every cap), SwiGLU and the
    weighted row sums (row_sums.h) on the vector paths."""
    inputs, used = make_inputs(np.random.default_rng(13), [20, 7], 20, dtype)
    kernel = ExpertsWeightedSum()

    def compute():
        out, tokens_per_expert = kernel(*tensors(inputs, dtype))
        return as_bits(out)[used], tokens_per_expert.asnumpy()

    assert_bit_identical(under_each_isa(compute), f"experts weighted sum {dtype}")


@pytest.mark.skipif(detected_cpu_isa() != "avx512",
                    reason="oneDNN's bfloat16 GEMM is only a candidate on CPUs with AVX-512; "
                           "this CPU has " + detected_cpu_isa())
def test_direct_bfloat16_gemm_against_the_converted_one():
    """Both multiply the same bfloat16 values with float32 sums in different orders, then round
    once to bfloat16: |direct - converted| <= 2 * k * 2^-24 * sum|terms| + 2^-8 * |value|."""
    rng = np.random.default_rng(14)
    k_in, n_out, counts = 96, 40, np.array([7, 0, 9], np.int32)
    rows = Tensor(rng.standard_normal((20, k_in)).astype(np.float32)).astype(ms.bfloat16)
    weights = Tensor(rng.standard_normal((3, k_in, n_out)).astype(np.float32)).astype(ms.bfloat16)
    matmul = GroupedMatmul()
    outputs = {}
    try:
        for path in ("direct", "converted"):
            set_bfloat16_gemm(path)
            assert bfloat16_gemm() == path
            outputs[path] = matmul(rows, weights, Tensor(counts)).astype(ms.float32).asnumpy()
    finally:
        set_bfloat16_gemm("auto")
    rows64 = rows.astype(ms.float32).asnumpy().astype(np.float64)
    weights64 = weights.astype(ms.float32).asnumpy().astype(np.float64)
    expert_of_row = np.repeat(np.arange(3), counts)
    for row, expert in enumerate(expert_of_row):
        terms = np.abs(rows64[row])[:, None] * np.abs(weights64[expert])       # [k, n]
        exact = rows64[row] @ weights64[expert]
        bound = 2 * k_in * 2.0 ** -24 * terms.sum(axis=0) + 2.0 ** -8 * np.abs(exact)
        difference = np.abs(outputs["direct"][row] - outputs["converted"][row])
        assert (difference <= bound).all(), row


# A stand-in for oneDNN: the GEMMs take as long as SHIM_SGEMM_MS / SHIM_BF16_MS say (and compute
# nothing), and dnnl_get_effective_cpu_isa returns SHIM_ISA (left out with -DNO_EFFECTIVE_ISA).
ONEDNN_SHIM = textwrap.dedent("""
    #include <stdint.h>
    #include <stdlib.h>
    #include <time.h>
    static int pause_ms(const char *variable) {
      const char *value = getenv(variable);
      struct timespec wait = {0, (value ? atol(value) : 0) * 1000000L};
      nanosleep(&wait, 0);
      return 0;
    }
    int dnnl_sgemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                   int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
      return pause_ms("SHIM_SGEMM_MS");
    }
    int dnnl_gemm_bf16bf16f32(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha,
                              const uint16_t *a, int64_t lda, const uint16_t *b, int64_t ldb,
                              float beta, float *c, int64_t ldc) {
      return pause_ms("SHIM_BF16_MS");
    }
    #ifndef NO_EFFECTIVE_ISA
    int dnnl_get_effective_cpu_isa(void) { return (int)strtol(getenv("SHIM_ISA"), 0, 0); }
    #endif
""")


@pytest.mark.skipif(detected_cpu_isa() != "avx512",
                    reason="oneDNN's bfloat16 GEMM is only a candidate on CPUs with AVX-512; "
                           "this CPU has " + detected_cpu_isa())
def test_bfloat16_gemm_choice_follows_the_instruction_set_not_a_timing(tmp_path):
    """The automatic choice is a rule of oneDNN's effective instruction set: direct exactly when
    it includes AMX. It used to be timed once per process, so that under load the ranks of one
    launch took either path and a bfloat16 model's outputs changed from launch to launch (the
    two paths round differently). Against a stand-in oneDNN whose GEMMs take as long as it is
    told: a slow direct GEMM with AMX is still direct, a fast one without AMX still converted."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) to build the stand-in oneDNN")
    source = tmp_path / "onednn_shim.c"
    source.write_text(ONEDNN_SHIM)
    shims = {}
    for name, flags in (("shim", []), ("shim_without_isa", ["-DNO_EFFECTIVE_ISA"])):
        shims[name] = str(tmp_path / f"lib{name}.so")
        subprocess.run([compiler, "-x", "c", "-O1", "-shared", "-fPIC", *flags, str(source),
                        "-o", shims[name]], check=True, capture_output=True)
    # A fresh process that loads only the kernel library (not MindSpore, whose oneDNN would be
    # found first), pointed at the stand-in, and asks for the choice.
    script = ("import ctypes, sys; library = ctypes.CDLL(sys.argv[1]); "
              "library.MoeEpBFloat16Gemm.restype = ctypes.c_char_p; "
              "print(library.MoeEpBFloat16Gemm().decode())")

    def choice(shim, isa, sgemm_ms, bf16_ms):
        environment = {key: value for key, value in os.environ.items()
                       if key not in ("MOE_EP_BF16_GEMM", "MOE_EP_CPU_ISA")}
        environment.update(MOE_EP_DNNL_LIBRARY=shims[shim], SHIM_ISA=hex(isa),
                           SHIM_SGEMM_MS=str(sgemm_ms), SHIM_BF16_MS=str(bf16_ms))
        return subprocess.run([sys.executable, "-c", script, library_path()], env=environment,
                              capture_output=True, text=True, check=True).stdout.split()[-1]

    # dnnl_cpu_isa_t: avx512_core_amx 0xfef (0x1fef with AMX-FP16; 0x3e7 in older oneDNN)
    for isa in (0xfef, 0x1fef, 0x3e7):
        assert choice("shim", isa, sgemm_ms=0, bf16_ms=5) == "direct", hex(isa)
    # avx2, avx512_core, avx512_core_bf16, avx512_core_fp16: no AMX
    for isa in (0x7, 0x27, 0xe7, 0x1ef):
        assert choice("shim", isa, sgemm_ms=5, bf16_ms=0) == "converted", hex(isa)
    # a oneDNN that cannot tell its instruction set: converted (the path that works everywhere)
    assert choice("shim_without_isa", 0, sgemm_ms=5, bf16_ms=0) == "converted"


def test_bad_environment_values_are_refused():
    """MOE_EP_CPU_ISA / MOE_EP_BF16_GEMM with an unknown value: a clear error at first use."""
    for variable, value, allowed in (("MOE_EP_CPU_ISA", "avx9", "scalar, avx2, avx512"),
                                     ("MOE_EP_BF16_GEMM", "fast", "auto, direct, converted")):
        result = subprocess.run(
            [sys.executable, "-c", "from mindspore_moe_ep.ops import cpu_isa; cpu_isa()"],
            capture_output=True, text=True, env=dict(os.environ, **{variable: value}))
        assert result.returncode != 0
        assert f"{variable}={value!r} is not one of {allowed}" in result.stderr, result.stderr


KERNEL_TEST_FILES = ["tests/test_local_kernels.py", "tests/test_swiglu_kernel.py",
                     "tests/test_experts_weighted_sum.py", "tests/test_experts_combine.py",
                     "tests/test_golden_vectors.py"]


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_kernel_tests_pass_under_the_cap(isa):
    """The kernel test files, in a fresh process with MOE_EP_CPU_ISA set (below the CPU's own
    instruction set, so that the capped path is the one that runs)."""
    if CPU_ISAS.index(isa) >= CPU_ISAS.index(detected_cpu_isa()):
        pytest.skip(f"the {isa} cap is this CPU's own instruction set ({detected_cpu_isa()}): "
                    f"the rest of the suite already runs it")
    environment = dict(os.environ, MOE_EP_CPU_ISA=isa, GLOG_v="3")
    active = subprocess.run(
        [sys.executable, "-c", "from mindspore_moe_ep.ops import cpu_isa; print(cpu_isa())"],
        capture_output=True, text=True, env=environment, check=True).stdout.split()[-1]
    assert active == isa
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TEST_FILES],
        cwd=REPO, capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]
