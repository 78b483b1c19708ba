"""NumPy reference of the per-token int8 rule of ``dispatch.quant: int8`` (CANN's quant mode 2),
written from the rule's statement, sharing no code with the kernels:

    scale = max|x| / 127 (float32), q = round half to even (x / scale) clipped to [-127, 127],
    q = 0 where scale = 0; dequantized: float32(q) * scale, then rounded to the row's dtype.
"""
import numpy as np

from .numpy_moe import round_to_dtype


def quantize_int8_per_token(x):
    """x [T, H] (values of float32) -> (q [T, H] int8, scale [T] float32)."""
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32)            # [T]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = x / scale[:, None]                                                    # float32
    q = np.clip(np.rint(ratio), -127, 127)
    q = np.where(scale[:, None] == 0, 0, q)
    return q.astype(np.int8), scale


def dequantize_int8(q, scale, dtype="float32"):
    """(q [T, H] int8, scale [T]) -> rows [T, H] as float32 values of ``dtype``."""
    rows = q.astype(np.float32) * np.asarray(scale, np.float32)[:, None]
    return round_to_dtype(rows, dtype)


def int8_round_trip(x, dtype="float32"):
    """What a row holds after travelling as int8: dequantize(quantize(x))."""
    return dequantize_int8(*quantize_int8_per_token(x), dtype)
