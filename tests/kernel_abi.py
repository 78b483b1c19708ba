"""Calling a kernel's AOT entry point directly with NumPy arrays, as MindSpore calls it:
``int f(nparam, params, ndims, shapes, dtypes, stream, extra)`` with the inputs, then the outputs.

For tests that must not depend on MindSpore's runtime: a forked child (which must not touch the
parent's MindSpore threads), or a sequence of failing kernels that MindSpore would stop at the
first failure in some execution modes. No MindSpore import here.
"""
import ctypes

import numpy as np

NUMPY_DTYPE_NAMES = {np.dtype(np.float32): b"float32", np.dtype(np.int32): b"int32"}


def call_kernel(library: ctypes.CDLL, name: str, *arrays: np.ndarray) -> int:
    """Runs kernel ``name`` on ``arrays`` (inputs then outputs, float32 / int32); returns its
    status (0 = success)."""
    count = len(arrays)
    params = (ctypes.c_void_p * count)(*[a.ctypes.data for a in arrays])
    ndims = (ctypes.c_int * count)(*[a.ndim for a in arrays])
    shapes_kept = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
    shapes = (ctypes.POINTER(ctypes.c_int64) * count)(
        *[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in shapes_kept])
    dtypes = (ctypes.c_char_p * count)(*[NUMPY_DTYPE_NAMES[a.dtype] for a in arrays])
    function = getattr(library, name)
    function.restype = ctypes.c_int
    return function(count, params, ndims, shapes, dtypes, None, None)
