#!/usr/bin/env bash
# Run a job script (default: the MoE layer job, scripts/run_moe.py) on N local CPU workers with
# msrun, one per rank.
#
#   scripts/msrun_moe.sh CONFIG.yaml [--workers N] [--script FILE] [--master-port PORT]
#                        [--log-dir DIR] [-- ARGS]
#
# --script: run_moe.py (default), run_lm.py, train.py or generate.py (of scripts/), or a path.
# ARGS after "--" go to the script (e.g. --mode pynative --json out.json). Rank 0's log is
# streamed while the job runs; every rank's log stays in the log directory.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

[ $# -ge 1 ] || usage 2
case "$1" in -h|--help) usage 0 ;; esac
config=$1; shift
workers=4
master_port=$(( 20000 + RANDOM % 20000 ))
log_dir=msrun_logs
script=run_moe.py
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers=$2; shift 2 ;;
    --master-port) master_port=$2; shift 2 ;;
    --log-dir) log_dir=$2; shift 2 ;;
    --script) script=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) echo "msrun_moe.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -f "$config" ] || { echo "msrun_moe.sh: config file '$config' not found" >&2; exit 2; }
command -v msrun >/dev/null || { echo "msrun_moe.sh: msrun not on PATH: activate the venv where mindspore is installed" >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
[ -f "$script" ] || script="$here/$script"
[ -f "$script" ] || { echo "msrun_moe.sh: script '$script' not found" >&2; exit 2; }
rm -rf "$log_dir"; mkdir -p "$log_dir"
echo "[msrun_moe] $workers workers, $(basename "$script") $config, master port $master_port, logs in $log_dir/"
# Only MindSpore's errors in the logs (GLOG_v=3), unless the caller asks for more.
export GLOG_v="${GLOG_v:-3}"
# msrun starts workers with the `python` on PATH: make it the one msrun belongs to.
export PATH="$(dirname "$(command -v msrun)"):$PATH"
msrun --worker_num="$workers" --local_worker_num="$workers" --master_port="$master_port" \
      --log_dir="$log_dir" --join=True "$script" "$config" "${extra[@]}" \
      > "$log_dir/msrun.out" 2>&1 &
msrun_pid=$!
while [ ! -f "$log_dir/worker_0.log" ] && kill -0 "$msrun_pid" 2>/dev/null; do sleep 0.5; done
if [ -f "$log_dir/worker_0.log" ]; then
  tail -n +1 -f --pid="$msrun_pid" "$log_dir/worker_0.log" | grep --line-buffered -v -E "^\[(WARNING|INFO)\]|^Load dynamic library|^$" || true
fi
status=0; wait "$msrun_pid" || status=$?
if [ "$status" -ne 0 ]; then
  echo "[msrun_moe] msrun exited with status $status; errors from the worker logs:" >&2
  grep -h -E "Error|error" "$log_dir"/worker_*.log | grep -v "^\[WARNING\]" | tail -n 20 >&2 || true
fi
exit "$status"
