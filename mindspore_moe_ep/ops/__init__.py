"""Kernels behind small Python interfaces: the local dispatch, combine, grouped matmul and
SwiGLU Cells, and the row-wise experts-and-weighted-sum Cell."""
from .kernel_library import (KernelError, KernelLibraryNotFoundError, explain_kernel_errors,
                             gemm_backend, kernel_func, set_gemm_backend)
from .activations import GroupedSwiGLU
from .local_kernels import CombineKernel, DispatchKernel, ExpertsWeightedSum, GroupedMatmul

__all__ = [
    "CombineKernel",
    "DispatchKernel",
    "ExpertsWeightedSum",
    "GroupedMatmul",
    "GroupedSwiGLU",
    "KernelError",
    "KernelLibraryNotFoundError",
    "explain_kernel_errors",
    "gemm_backend",
    "kernel_func",
    "set_gemm_backend",
]
