#!/usr/bin/env bash
# The language-model main job under msrun: train, then generate (scripts/run_lm.py), one CPU
# worker per rank. Options as scripts/msrun_moe.sh; ARGS after "--" go to run_lm.py:
#
#   scripts/msrun_lm.sh CONFIG.yaml [--workers N] [--log-dir DIR] -- --out RUN_DIR [ARGS]
#
# Another script of the family: --script train.py or --script generate.py.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
case "$1" in -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
config=$1; shift
exec "$(dirname "$0")/msrun_moe.sh" "$config" --script run_lm.py "$@"
