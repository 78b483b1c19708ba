#!/usr/bin/env bash
# Launch the main job (scripts/run_moe.py) on Ascend NPUs over one or more nodes with msrun.
#
#   scripts/msrun_ascend.sh --nodes M --node-rank N --workers-per-node W --master-addr ADDR \
#       [--master-port PORT] [--config YAML] [--soc A2|A3] [--log-dir DIR] [--dry-run] [-- ARGS]
#
# Run the same command on every node, each with its own --node-rank (0 .. M-1); node 0 hosts the
# scheduler at ADDR:PORT (default port 8118). ARGS after "--" go to run_moe.py. --soc computes
# the HCCL_BUFFSIZE the fused MoE Dispatch/Combine need for the config (docs/ascend.md) and sets
# it unless the environment already has a large enough value. The exact command is printed
# first; --dry-run prints it and exits.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
fail() { echo "msrun_ascend.sh: error: $*" >&2; exit 2; }
is_int() { case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac; }

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
nodes=""; node_rank=""; workers=""; master_addr=""; master_port=8118
config="$repo/yaml_configs/deepseek_v3_64npu.yaml"; soc=""; log_dir=msrun_logs_ascend
dry_run=0; extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes|--node-rank|--workers-per-node|--master-addr|--master-port|--config|--soc|--log-dir)
      [ $# -ge 2 ] || fail "$1 needs a value"
      case "$1" in
        --nodes) nodes=$2 ;; --node-rank) node_rank=$2 ;; --workers-per-node) workers=$2 ;;
        --master-addr) master_addr=$2 ;; --master-port) master_port=$2 ;; --config) config=$2 ;;
        --soc) soc=$2 ;; --log-dir) log_dir=$2 ;;
      esac
      shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) fail "unknown option '$1' (see --help)" ;;
  esac
done

is_int "$nodes" && [ "$nodes" -ge 1 ] || fail "--nodes must be an integer >= 1, got '$nodes'"
is_int "$workers" && [ "$workers" -ge 1 ] || fail "--workers-per-node must be an integer >= 1 (NPUs per node), got '$workers'"
is_int "$node_rank" && [ "$node_rank" -lt "$nodes" ] || fail "--node-rank must be an integer in [0, $nodes), got '$node_rank'"
is_int "$master_port" && [ "$master_port" -ge 1024 ] && [ "$master_port" -le 65535 ] \
  || fail "--master-port must be an integer in [1024, 65535], got '$master_port'"
if [ -z "$master_addr" ]; then
  [ "$nodes" -eq 1 ] || fail "--master-addr (the IP address of node 0) is required with --nodes $nodes"
  master_addr=127.0.0.1
fi
[ -f "$config" ] || fail "config file '$config' not found"
case "$soc" in ""|A2|A3) ;; *) fail "--soc must be A2 or A3, got '$soc'" ;; esac

# The HCCL window of the fused decode operators (exported to every worker through msrun).
env_prefix=()
if [ -n "$soc" ]; then
  python=${PYTHON:-python3}
  required=$(cd "$repo" && "$python" - "$config" "$soc" <<'EOF'
import sys
from mindspore_moe_ep.config import load_config
from mindspore_moe_ep.ascend.cann_limits import hccl_buffsize_mb, limit_violations
config, soc = load_config(sys.argv[1]), sys.argv[2]
if limit_violations(config, soc):
    print(0)   # the fused operators do not fit: decode uses the HCCL all-to-all-v
else:
    ep = config.parallel.expert_parallel
    print(hccl_buffsize_mb(soc, config.dispatch.max_tokens_per_rank, ep,
                           config.model.num_experts // ep, config.router.top_k,
                           config.model.hidden_size))
EOF
  ) || fail "could not compute HCCL_BUFFSIZE for $config (is mindspore_moe_ep importable by '$python'?)"
  current=${HCCL_BUFFSIZE:-200}
  if [ "$required" -gt 0 ] && { ! is_int "$current" || [ "$current" -lt "$required" ]; }; then
    env_prefix=("HCCL_BUFFSIZE=$required")
  fi
fi

command=(msrun "--worker_num=$((nodes * workers))" "--local_worker_num=$workers"
         "--master_addr=$master_addr" "--master_port=$master_port" "--node_rank=$node_rank"
         "--log_dir=$log_dir" "--join=True" "--cluster_time_out=600"
         "$here/run_moe.py" "$config" "${extra[@]}")
printf '%s ' "${env_prefix[@]}" "${command[@]}" | sed 's/ $//'
echo
[ "$dry_run" -eq 1 ] && exit 0

command -v msrun >/dev/null || fail "msrun not on PATH: activate the environment where mindspore is installed"
# msrun starts workers with the `python` on PATH: make it the one msrun belongs to.
export PATH="$(dirname "$(command -v msrun)"):$PATH"
[ ${#env_prefix[@]} -eq 0 ] || export "${env_prefix[@]}"
exec "${command[@]}"
