#!/usr/bin/env bash
# Runs once per node (srun starts it) and becomes torchrun: `launch/node.sh torchrun ARGS...`.
# The agent ignores SIGUSR1, which would otherwise kill it (or make it kill its workers 30 s
# later); the training processes install their own handler and stop together at one step.
# Triton's cache is node-local so that compiles never race on a shared filesystem.
trap '' USR1
cache_root=${HOPE_CACHE_ROOT:-/tmp/hope-${USER:-$(id -un)}}
export TRITON_CACHE_DIR="$cache_root/triton-${SLURM_JOB_ID:-local}-${SLURMD_NODENAME:-$(hostname)}"
mkdir -p "$TRITON_CACHE_DIR"
exec "$@"
