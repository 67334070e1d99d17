#!/usr/bin/env bash
# HOPE 760M (configs/hope_760m.yaml) on 2 nodes x 8 H100: `sbatch launch/hope_760m.sh [ARGS]` from the
# repository root. ARGS and the HOPE_* variables of docs/launch.md override anything here.
#SBATCH --job-name=hope_760m
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=launch/logs/%x-%j.out
set -uo pipefail
HOPE_CONFIG=${HOPE_CONFIG:-configs/hope_760m.yaml}
HOPE_SCRIPT=$(realpath "${BASH_SOURCE[0]}")
# Run directly, common.sh sits beside this script; under sbatch this is a copy in slurmd's spool.
here=$(dirname "$HOPE_SCRIPT")
[[ -f $here/common.sh ]] && HOPE_REPO=${HOPE_REPO:-$(dirname "$here")} || HOPE_REPO=${HOPE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $HOPE_REPO/launch/common.sh ]] || { echo "launch: no launch/common.sh in $HOPE_REPO: submit from the repository root or set HOPE_REPO" >&2; exit 2; }
# shellcheck disable=SC1091
source "$HOPE_REPO/launch/common.sh"
hope_main "$@"
