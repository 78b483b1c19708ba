"""The grouped SwiGLU kernel (MoeEpSwiGLU / MoeEpSwiGLUGrad) against float64 NumPy."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindspore_moe_ep.ops import GroupedSwiGLU, KernelError, explain_kernel_errors

DTYPES = {"float32": (ms.float32, 2e-6), "float16": (ms.float16, 2e-3),
          "bfloat16": (ms.bfloat16, 1.6e-2)}


def reference(gate_up, d_hidden):
    """float64 SwiGLU and its gradient (independent of the kernel)."""
    ffn = gate_up.shape[1] // 2
    gate, up = gate_up[:, :ffn], gate_up[:, ffn:]
    sigmoid = 1.0 / (1.0 + np.exp(-gate))
    silu = gate * sigmoid
    d_gate = d_hidden * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
    return silu * up, np.concatenate([d_gate, d_hidden * silu], axis=1)


def as_numpy(tensor):
    with np.errstate(invalid="ignore"):  # the inputs hold NaN and inf on purpose
        return tensor.astype(ms.float32).asnumpy().astype(np.float64)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("ffn", [1, 13, 64])
def test_used_rows_match_float64_reference_and_tail_is_never_read(dtype, ffn):
    ms_dtype, tolerance = DTYPES[dtype]
    rng = np.random.default_rng(ffn)
    counts = np.array([3, 0, 5], np.int32)
    used, rows = int(counts.sum()), 12
    gate_up = rng.standard_normal((rows, 2 * ffn)) * 4                       # [N, 2F]
    gate_up[:, 0] = [-100, 100, -20, 20, 0, -1e-3, 1e-3, 88, np.nan, np.inf, -np.inf, 1][:rows]
    gate_up[used:] = np.nan      # the unused tail: any value, never read
    d_hidden = rng.standard_normal((rows, ffn))
    x = Tensor(gate_up.astype(np.float32)).astype(ms_dtype)
    dy = Tensor(d_hidden.astype(np.float32)).astype(ms_dtype)
    cell = GroupedSwiGLU()
    hidden = cell(x, Tensor(counts))
    _, pullback = ms.vjp(lambda a: cell(a, Tensor(counts)), x)
    (d_gate_up,) = pullback(dy)
    expect_hidden, expect_grad = reference(as_numpy(x)[:used], as_numpy(dy)[:used])
    assert hidden.dtype == ms_dtype and hidden.shape == (rows, ffn)
    np.testing.assert_allclose(as_numpy(hidden)[:used], expect_hidden, rtol=tolerance,
                               atol=tolerance)
    np.testing.assert_allclose(as_numpy(d_gate_up)[:used], expect_grad, rtol=tolerance,
                               atol=tolerance)


def test_counts_beyond_the_rows_are_refused():
    cell = GroupedSwiGLU()
    with pytest.raises(KernelError, match="tokens_per_expert sums to 9, more than the 8 rows"), \
            explain_kernel_errors():
        cell(Tensor(np.zeros((8, 4), np.float32)), Tensor(np.array([4, 5], np.int32))).asnumpy()


def test_odd_width_is_refused():
    cell = GroupedSwiGLU()
    with pytest.raises(KernelError, match="2 \\* expert_ffn_size"), explain_kernel_errors():
        cell(Tensor(np.zeros((8, 5), np.float32)), Tensor(np.array([4], np.int32))).asnumpy()
