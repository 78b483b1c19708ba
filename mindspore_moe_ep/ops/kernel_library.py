"""Locating the compiled AOT kernel library and explaining its errors.

The C++ kernels in ``custom_ops/cpu`` are compiled by ``setup.py`` into
``mindspore_moe_ep/kernels/libmoe_ep_cpu.so``. MindSpore loads that library itself when a Custom op
runs; this module only builds the ``"path.so:FunctionName"`` strings for ``ops.Custom``, points the
kernels at MindSpore's bundled oneDNN, and reads the library's last error message through ctypes.

A failing kernel makes MindSpore raise ``RuntimeError("Return value from CPU AOT kernel ... is N")``
without the reason. :func:`explain_kernel_errors` re-raises such errors as :class:`KernelError`
carrying the kernel's own message, e.g. ``expert_ids[3,1] = 9 is out of range [0, 8)``.
"""
import contextlib
import ctypes
import functools
import os

import mindspore
from mindspore import nn, ops

LIBRARY_FILE_NAME = "libmoe_ep_cpu.so"
# Environment variable through which the kernels find MindSpore's oneDNN (see gemm_backend.h).
ONEDNN_PATH_VARIABLE = "MOE_EP_DNNL_LIBRARY"
# The start of MindSpore's message for a non-zero kernel return value.
_AOT_FAILURE_MARKER = "Return value from CPU AOT kernel"


class KernelLibraryNotFoundError(ImportError):
    """The compiled kernel library is missing (the package was not installed with pip)."""


class KernelError(RuntimeError):
    """A kernel of this package rejected its inputs; the message says why."""


def _packaged_library_path() -> str:
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(package_dir, "kernels", LIBRARY_FILE_NAME)


def _point_kernels_at_onednn() -> None:
    """Tells the GEMM kernels where MindSpore's oneDNN is, unless the user already chose one."""
    bundled = os.path.join(os.path.dirname(mindspore.__file__), "lib", "libdnnl.so.3")
    if os.path.exists(bundled):
        os.environ.setdefault(ONEDNN_PATH_VARIABLE, bundled)


@functools.lru_cache(maxsize=None)
def library_path() -> str:
    """Absolute path of the compiled kernel library; raises KernelLibraryNotFoundError if absent."""
    path = _packaged_library_path()
    if not os.path.exists(path):
        raise KernelLibraryNotFoundError(
            f"The compiled kernels of mindspore-moe-ep were not found at {path}. They are built "
            f"when the package is installed: run 'pip install -e .' (development) or "
            f"'pip install .' from the repository root (g++ with C++17 is needed).")
    _check_kernel_environment()
    _point_kernels_at_onednn()
    _hand_over_host_defaults(path)
    return path


@functools.lru_cache(maxsize=None)
def _hand_over_host_defaults(path: str) -> None:
    """Gives the loaded kernel library this process's default thread count (host_defaults.py)
    before its first kernel runs (MindSpore's Custom ops load the same library instance), and
    MindSpore's CPU operators the same count."""
    from ..host_defaults import apply_operator_threads, default_kernel_threads
    apply_operator_threads()
    threads = default_kernel_threads()
    if threads > 0:
        library = ctypes.CDLL(path)
        library.MoeEpSetDefaultThreadCount.restype = ctypes.c_int
        library.MoeEpSetDefaultThreadCount.argtypes = [ctypes.c_int]
        library.MoeEpSetDefaultThreadCount(threads)


def kernel_func(name: str) -> str:
    """The ``func`` string of ``ops.Custom`` for the kernel ``name``.

    CPU: ``"/abs/lib.so:name"``. Ascend (MindSpore's device target when the Custom op is built):
    the bare operator name, which MindSpore resolves to the AscendC kernel of the same name and
    semantics in the installed custom operator package (custom_ops/ascendc, docs/ascend.md).
    """
    if mindspore.get_context("device_target") == "Ascend":
        from ..ascend.opp import ASCENDC_KERNELS, require_ascendc_kernels
        if name not in ASCENDC_KERNELS:
            raise KernelLibraryNotFoundError(
                f"kernel {name} has no Ascend implementation (CPU only); the Ascend backend "
                f"uses {', '.join(ASCENDC_KERNELS)} (see docs/ascend.md)")
        require_ascendc_kernels()
        return name
    return f"{library_path()}:{name}"


def custom_op(kernel_name: str, out_shape, out_dtype, *, bprop=None, shape_key=None,
              side_effect: bool = False):
    """The AOT ``ops.Custom`` primitive of one of this library's kernels.

    ``shape_key``: the static parameters, other than input shapes, that the output shapes depend
    on (e.g. the number of experts). PyNative caches shape inference per primitive and input
    shapes, so two instances with different parameters must differ in an attribute, or the
    second silently gets the first one's output shapes.
    ``side_effect``: for kernels that talk to other ranks: GRAPH_MODE then neither prunes them
    (even with unused outputs) nor reorders them, so every rank runs the same exchange sequence.
    """
    primitive = ops.Custom(kernel_func(kernel_name), out_shape=out_shape, out_dtype=out_dtype,
                           func_type="aot", bprop=bprop)
    if shape_key is not None:
        primitive.add_prim_attr("moe_ep_shape_key", repr(shape_key))
    if side_effect:
        primitive.add_prim_attr("side_effect_io", True)
    return primitive


# Environment switches the kernels read once, with their allowed values (checked before the
# kernels see them, so that a typo is an error rather than a silently ignored setting).
KERNEL_ENVIRONMENT = {
    "MOE_EP_CPU_ISA": ("scalar", "avx2", "avx512"),
    "MOE_EP_BF16_GEMM": ("auto", "direct", "converted"),
}


def _check_kernel_environment() -> None:
    for variable, allowed in KERNEL_ENVIRONMENT.items():
        value = os.environ.get(variable)
        if value and value not in allowed:
            raise ValueError(f"{variable}={value!r} is not one of {', '.join(allowed)}")


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    library = ctypes.CDLL(library_path())
    library.MoeEpFirstError.restype = ctypes.c_char_p
    library.MoeEpFirstError.argtypes = []
    library.MoeEpClearLastError.restype = None
    library.MoeEpClearLastError.argtypes = []
    library.MoeEpGemmBackend.restype = ctypes.c_char_p
    library.MoeEpGemmBackend.argtypes = []
    library.MoeEpSetGemmBackend.restype = ctypes.c_int
    library.MoeEpSetGemmBackend.argtypes = [ctypes.c_char_p]
    library.MoeEpSetDefaultThreadCount.restype = ctypes.c_int
    library.MoeEpSetDefaultThreadCount.argtypes = [ctypes.c_int]
    for getter in ("MoeEpCpuIsa", "MoeEpDetectedCpuIsa", "MoeEpBFloat16Gemm"):
        getattr(library, getter).restype = ctypes.c_char_p
        getattr(library, getter).argtypes = []
    for setter in ("MoeEpSetCpuIsa", "MoeEpSetBFloat16Gemm"):
        getattr(library, setter).restype = ctypes.c_int
        getattr(library, setter).argtypes = [ctypes.c_char_p]
    return library


def take_kernel_errors() -> str:
    """The first kernel failure since the last call ("" if none), plus a count of the failures
    after it (in PyNative, kernels queued behind a failed one still run and may fail too, so the
    first is the cause); clears them."""
    library = _library()
    message = library.MoeEpFirstError().decode("utf-8", errors="replace")
    library.MoeEpClearLastError()
    return message


def is_kernel_failure(error: BaseException) -> bool:
    """Whether ``error`` is MindSpore's report of a failed (non-zero) kernel of this library."""
    text = str(error)
    return (isinstance(error, RuntimeError) and _AOT_FAILURE_MARKER in text
            and LIBRARY_FILE_NAME in text)


@contextlib.contextmanager
def explain_kernel_errors():
    """Re-raises kernel failures inside the block as KernelError with the kernel's message.

    Use around the code that runs a graph or reads results (``asnumpy``), since in PyNative mode
    errors surface when results are synchronised::

        with explain_kernel_errors():
            out = net(x).asnumpy()
    """
    try:
        yield
    except RuntimeError as error:
        if isinstance(error, KernelError) or not is_kernel_failure(error):
            raise
        message = take_kernel_errors() or "the kernel gave no message"
        first_line = str(error).strip().splitlines()[0]
        raise KernelError(f"{message}\n(MindSpore: {first_line})") from error


class KernelCell(nn.Cell):
    """A Cell whose direct calls turn kernel failures into KernelError with the kernel's message.

    The base of every Cell around the library's kernels."""

    def __call__(self, *args, **kwargs):
        with explain_kernel_errors():
            return super().__call__(*args, **kwargs)


def gemm_backend() -> str:
    """The GEMM implementation the grouped-matmul kernels use: "onednn" or "reference"."""
    return _library().MoeEpGemmBackend().decode()


def set_gemm_backend(name: str) -> None:
    """Selects the GEMM implementation: "onednn" (default when found) or "reference" (C++ loop)."""
    if _library().MoeEpSetGemmBackend(name.encode()) != 0:
        raise ValueError(f"GEMM backend {name!r} is unknown or unavailable; "
                         f"use 'onednn' or 'reference'")


CPU_ISAS = KERNEL_ENVIRONMENT["MOE_EP_CPU_ISA"]
"""The instruction sets the CPU kernels choose between at run time, in increasing order."""


def detected_cpu_isa() -> str:
    """The best instruction set of this CPU that the kernels have paths for (see CPU_ISAS)."""
    return _library().MoeEpDetectedCpuIsa().decode()


def cpu_isa() -> str:
    """The instruction set the kernels use now: detected_cpu_isa(), capped by the environment
    variable MOE_EP_CPU_ISA (read when the library is first used) or by set_cpu_isa()."""
    return _library().MoeEpCpuIsa().decode()


def set_cpu_isa(name: str) -> None:
    """Caps the kernels' instruction set for this process ("scalar", "avx2" or "avx512"; a cap
    above what the CPU runs leaves what it runs), e.g. to run every path's tests on one CPU."""
    if _library().MoeEpSetCpuIsa(str(name).encode()) != 0:
        raise ValueError(f"CPU instruction set {name!r} is unknown; use one of {CPU_ISAS}")


def bfloat16_gemm() -> str:
    """How bfloat16 grouped matmuls multiply now: "direct" (oneDNN's bfloat16 GEMM) or
    "converted" (widened to float32 panel by panel). Unless MOE_EP_BF16_GEMM or
    set_bfloat16_gemm() says: direct exactly where oneDNN multiplies with AMX (its effective
    instruction set), the faster path there; a rule, not a timing, so that every process on a
    machine takes the same path (the two round differently)."""
    return _library().MoeEpBFloat16Gemm().decode()


def set_bfloat16_gemm(name: str) -> None:
    """Sets how bfloat16 grouped matmuls multiply: "auto" (default), "direct" or "converted"."""
    if _library().MoeEpSetBFloat16Gemm(str(name).encode()) != 0:
        raise ValueError(f"bfloat16 GEMM {name!r} is unknown; use 'auto', 'direct' or "
                         f"'converted'")


def kernel_threads() -> int:
    """Threads the CPU kernels split their loops over in this process: MOE_EP_NUM_THREADS, else
    the usable cores shared by the msrun workers on this host (host_defaults.py)."""
    return int(_library().MoeEpSetDefaultThreadCount(0))
