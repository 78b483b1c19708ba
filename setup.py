"""Install mindspore-moe-ep and compile its C++ AOT kernels.

The kernels in ``custom_ops/cpu`` are compiled into one shared library,
``mindspore_moe_ep/kernels/libmoe_ep_cpu.so``, with the flags MindSpore's AOT custom ops need:
``-O3 -std=c++17 -shared -fPIC -D_GLIBCXX_USE_CXX11_ABI=0`` (the wheel uses the old std::string
ABI) and ``-Wl,-z,nodelete`` (kernels that keep state must survive a dlclose after a failed run).
Works for ``pip install .`` and ``pip install -e .``.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_SOURCES = sorted(glob.glob(os.path.join("custom_ops", "cpu", "*.cc")))
KERNEL_HEADERS = sorted(glob.glob(os.path.join("custom_ops", "cpu", "*.h")))
COMPILE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-D_GLIBCXX_USE_CXX11_ABI=0",
 "-march=x86-64-v2"]
LINK_FLAGS = ["-Wl,-z,nodelete", "-ldl", "-lrt", "-lpthread"]


class KernelLibrary(Extension):
    """A plain C++ shared library (not a Python extension module)."""

    def __init__(self, name, sources):
        super().__init__(name, sources=sources, depends=KERNEL_HEADERS)


class BuildKernels(build_ext):
    """Compile each KernelLibrary with g++, stopping the install with a clear message on failure."""

    def get_ext_filename(self, ext_name):
        # "mindspore_moe_ep.kernels.libmoe_ep_cpu" -> "mindspore_moe_ep/kernels/libmoe_ep_cpu.so"
        return os.path.join(*ext_name.split(".")) + ".so"

    def build_extension(self, ext):
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            sys.exit(f"error: mindspore-moe-ep needs a C++17 compiler to build its kernels, and "
                     f"'{compiler}' was not found on PATH. Install g++ (e.g. 'apt-get install g++') "
                     f"or set CXX to your compiler, then install again.")
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        sources = [os.path.join(HERE, s) for s in ext.sources]
        command = [compiler, *COMPILE_FLAGS, f"-I{os.path.join(HERE, 'custom_ops', 'cpu')}",
                   *sources, "-o", target, *LINK_FLAGS]
        print("building kernels:", " ".join(command), flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"error: compiling the mindspore-moe-ep C++ kernels failed "
                     f"(exit {result.returncode}).\ncommand: {' '.join(command)}\n{result.stderr}")


setup(
    name="mindspore-moe-ep",
    version="0.1.0",
    description="Expert-parallel Mixture-of-Experts for MindSpore: sparse all-to-all-v for "
                "prefill/training and fused Dispatch/Combine for decode.",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["mindspore_moe_ep", "mindspore_moe_ep.*"]),
    ext_modules=[KernelLibrary("mindspore_moe_ep.kernels.libmoe_ep_cpu", KERNEL_SOURCES)],
    cmdclass={"build_ext": BuildKernels},
    install_requires=["mindspore==2.10.0", "numpy<2", "pyyaml>=5.1"],
    extras_require={"test": ["pytest>=7"]},
    zip_safe=False,
)
