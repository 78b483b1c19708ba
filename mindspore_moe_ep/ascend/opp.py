"""Finding the installed AscendC kernels (the custom operator package built from custom_ops/ascendc).

On Ascend, the kernel Cells of ``mindspore_moe_ep.ops`` name their operator ("MoeEpDispatch",
...) instead of a CPU library path, and MindSpore looks the operator up in the installed custom
operator packages: the directories in ``ASCEND_CUSTOM_OPP_PATH``, then
``$ASCEND_OPP_PATH/vendors/*``. :func:`require_ascendc_kernels` checks that ours is there first, so
a missing build fails with instructions instead of MindSpore's "Cannot find operator".

Pure Python; tested on any machine with fake package trees.
"""
import glob
import os
from typing import List, Mapping, Optional

# The operators of custom_ops/ascendc, with the semantics of the CPU kernels of the same names.
ASCENDC_KERNELS = ("MoeEpDispatch", "MoeEpCombine", "MoeEpGatherSum", "MoeEpCombineGrad",
                   "MoeEpGatherRows", "MoeEpExpertParallelLayout")
VENDOR_NAME = "moe_ep"


class AscendKernelsNotInstalledError(RuntimeError):
    """The custom operator package of custom_ops/ascendc is not installed or not visible."""


def _package_roots(environ: Mapping[str, str]) -> List[str]:
    """Custom operator package directories, in MindSpore's search order."""
    roots = [path for path in environ.get("ASCEND_CUSTOM_OPP_PATH", "").split(":") if path]
    opp_path = environ.get("ASCEND_OPP_PATH")
    if opp_path:
        roots += sorted(glob.glob(os.path.join(opp_path, "vendors", "*")))
    return roots


def find_ascendc_kernels(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The installed package that declares every operator of ASCENDC_KERNELS, or None."""
    for root in _package_roots(environ):
        pattern = os.path.join(root, "op_impl", "ai_core", "tbe", "config", "*",
                               "aic-*-ops-info.json")
        for info_file in glob.glob(pattern):
            try:
                with open(info_file, encoding="utf-8") as stream:
                    text = stream.read()
            except OSError:
                continue
            if all(f'"{name}"' in text for name in ASCENDC_KERNELS):
                return root
    return None


def require_ascendc_kernels(environ: Mapping[str, str] = os.environ) -> str:
    """The package root; raises AscendKernelsNotInstalledError with build instructions if absent."""
    root = find_ascendc_kernels(environ)
    if root is None:
        searched = _package_roots(environ) or ["(ASCEND_CUSTOM_OPP_PATH and ASCEND_OPP_PATH unset)"]
        raise AscendKernelsNotInstalledError(
            "the AscendC kernels of mindspore-moe-ep (operators "
            f"{', '.join(ASCENDC_KERNELS)}) are not installed; searched: {', '.join(searched)}. "
            "Build and install them on the Ascend host with 'bash custom_ops/ascendc/build.sh "
            "--install' (see docs/ascend.md), or point ASCEND_CUSTOM_OPP_PATH at "
            f"<install path>/vendors/{VENDOR_NAME}.")
    return root
