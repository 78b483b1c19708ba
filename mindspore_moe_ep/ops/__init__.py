"""Kernels behind small Python interfaces: the local dispatch, combine, grouped matmul and
SwiGLU Cells, and the row-wise experts-and-weighted-sum Cell."""
from .kernel_library import (CPU_ISAS, KernelError, KernelLibraryNotFoundError, bfloat16_gemm,
                             cpu_isa, detected_cpu_isa, explain_kernel_errors, gemm_backend,
                             kernel_func, set_bfloat16_gemm, set_cpu_isa, set_gemm_backend)
from .activations import GroupedSwiGLU
from .local_kernels import CombineKernel, DispatchKernel, ExpertsWeightedSum, GroupedMatmul

__all__ = [
    "CPU_ISAS",
    "CombineKernel",
    "DispatchKernel",
    "ExpertsWeightedSum",
    "GroupedMatmul",
    "GroupedSwiGLU",
    "KernelError",
    "KernelLibraryNotFoundError",
    "bfloat16_gemm",
    "cpu_isa",
    "detected_cpu_isa",
    "explain_kernel_errors",
    "gemm_backend",
    "kernel_func",
    "set_bfloat16_gemm",
    "set_cpu_isa",
    "set_gemm_backend",
]
