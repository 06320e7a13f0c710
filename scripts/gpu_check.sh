#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): the bench against learn2learn and higher, then as much of
# the Omniglot 5-way 1-shot reproduction as fits in 9 minutes, all written under $OUT.
#   here, first:         bash ../shared/device/prepare.sh
#   on the GPU machine:  (the install line prepare.sh prints) bash scripts/gpu_check.sh
#   on a CPU, to try it: OUT=/tmp/check bash scripts/gpu_check.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/gpu_check.py "$@"
