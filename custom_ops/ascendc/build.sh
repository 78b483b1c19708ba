#!/usr/bin/env bash
# Build the AscendC kernels of mindspore-moe-ep into a CANN custom operator package.
#
#   custom_ops/ascendc/build.sh [--soc "ascend910b;ascend910_93"] [--install-path DIR] [--clean]
#
# Needs, on the Ascend host: the CANN toolkit (ASCEND_HOME_PATH, set by
# 'source /usr/local/Ascend/ascend-toolkit/set_env.sh'), cmake >= 3.16, and the python where
# MindSpore 2.10 is installed (PYTHON, default: python3). Uses MindSpore's custom operator
# compiler (mindspore/lib/plugin/ascend/custom_compiler) on op_host/ and op_kernel/. The package
# lands in custom_ops/ascendc/build/; with --install-path it is installed there, and the script
# prints the ASCEND_CUSTOM_OPP_PATH to export. See docs/ascend.md.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
fail() { echo "build.sh: error: $*" >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
soc="ascend910b;ascend910_93"
install_path=""
clean=0
while [ $# -gt 0 ]; do
  case "$1" in
    --soc) [ $# -ge 2 ] || fail "--soc needs a value"; soc=$2; shift 2 ;;
    --install-path) [ $# -ge 2 ] || fail "--install-path needs a directory"; install_path=$2; shift 2 ;;
    --clean) clean=1; shift ;;
    -h|--help) usage 0 ;;
    *) fail "unknown option '$1' (see --help)" ;;
  esac
done

build_dir="$here/build"
if [ "$clean" -eq 1 ]; then
  rm -rf "$build_dir"
  echo "build.sh: removed $build_dir"
  exit 0
fi

# 1. The CANN toolkit.
cann=${ASCEND_HOME_PATH:-${ASCEND_TOOLKIT_HOME:-}}
if [ -z "$cann" ]; then
  fail "CANN was not found: ASCEND_HOME_PATH (and ASCEND_TOOLKIT_HOME) are unset. On the Ascend" \
       "host, run 'source /usr/local/Ascend/ascend-toolkit/set_env.sh' (or your CANN install's" \
       "set_env.sh) and try again. The AscendC kernels cannot be built without CANN."
fi
[ -d "$cann" ] || fail "ASCEND_HOME_PATH=$cann is not a directory; point it at the CANN toolkit" \
                       "(e.g. /usr/local/Ascend/ascend-toolkit/latest)"
if [ ! -d "$cann/tools/op_project_templates/ascendc" ] && \
   [ ! -d "$cann/tools/msopgen/template/operator_demo_projects/ascendc_operator_sample" ]; then
  fail "$cann has no AscendC operator project template (tools/op_project_templates/ascendc or" \
       "tools/msopgen): install the CANN toolkit (not only the runtime)"
fi

# 2. cmake and MindSpore's custom operator compiler.
command -v cmake >/dev/null || fail "cmake (>= 3.16) is not on PATH"
python=${PYTHON:-python3}
command -v "$python" >/dev/null || fail "'$python' is not on PATH (set PYTHON to the python with MindSpore)"
compiler=$("$python" -c 'import os, mindspore; print(os.path.join(os.path.dirname(mindspore.__file__), "lib", "plugin", "ascend", "custom_compiler"))' 2>/dev/null) \
  || fail "'$python' cannot import mindspore: set PYTHON to the python where MindSpore 2.10 is installed"
[ -f "$compiler/setup.py" ] || fail "MindSpore's custom operator compiler is missing ($compiler/setup.py);" \
                                   "install the MindSpore 2.10 wheel with its Ascend plugin"

# MindSpore's compiler accepts only paths made of [A-Za-z0-9_./-].
case "$here" in
  *[!A-Za-z0-9_./-]*) fail "the path $here contains characters MindSpore's compiler rejects;" \
                           "move the repository to a path of letters, digits, '_', '.', '-' and '/'" ;;
esac

# 3. Build (the compiler writes next to itself, so it runs from a copy in build/).
mkdir -p "$build_dir"
rm -rf "$build_dir/custom_compiler"
cp -r "$compiler" "$build_dir/custom_compiler"
args=(setup.py --op_host_path "$here/op_host" --op_kernel_path "$here/op_kernel"
      --soc_version "$soc" --vendor_name moe_ep --ascend_cann_package_path "$cann")
if [ -n "$install_path" ]; then
  mkdir -p "$install_path"
  args+=(--install_path "$(cd "$install_path" && pwd)")
fi
echo "build.sh: building the AscendC kernels for $soc with CANN at $cann"
(cd "$build_dir/custom_compiler" && "$python" "${args[@]}") || {
  echo "build.sh: the build failed; its log: $build_dir/custom_compiler/build.log" >&2
  exit 1
}
package=$(ls "$build_dir"/custom_compiler/CustomProject/build_out/*.run 2>/dev/null | head -n 1 || true)
echo "build.sh: package: ${package:-(see $build_dir/custom_compiler/CustomProject/build_out)}"
if [ -n "$install_path" ]; then
  echo "build.sh: installed; before running, export"
  echo "  export ASCEND_CUSTOM_OPP_PATH=$(cd "$install_path" && pwd)/vendors/moe_ep:\${ASCEND_CUSTOM_OPP_PATH:-}"
else
  echo "build.sh: install it with 'bash $package --install-path=<dir>' (or rerun with --install-path)"
fi
