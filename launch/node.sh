#!/usr/bin/env bash
# Runs once per node (srun starts it) and becomes torchrun: `launch/node.sh torchrun ARGS...`.
# The agent ignores SIGUSR1, which would otherwise kill it (or make it kill its workers 30 s
# later); the training processes install their own handler and stop together at one step.
# Triton's cache is node-local so that compiles never race on a shared filesystem.
# Before that it fails in a second, naming the node, where torchrun would fail late or obscurely:
# torchrun or python missing on this node, or the rendezvous port already taken on the
# rendezvous host (torchrun would then join whatever listens there, as a client).
node_die() { echo "launch/node.sh on $(hostname): $*" >&2; exit 2; }
trap '' USR1
for tool in "$1" python; do
    command -v "$tool" >/dev/null || node_die "$tool is not in PATH ($PATH): the job's Python environment is not" \
        "visible on this node; put the virtualenv (HOPE_VENV) on a filesystem every node mounts"
done
endpoint=
for arg in "$@"; do
    if [[ $arg == --rdzv-endpoint=* ]]; then endpoint=${arg#*=}; fi
done
host=${endpoint%:*} port=${endpoint##*:}
is_rendezvous_host() {
    case $1 in "${SLURMD_NODENAME:-localhost}" | "$(hostname)" | "$(hostname -s)" | localhost | 127.0.0.1) return 0 ;; esac
    return 1
}
if [[ -n $endpoint ]] && is_rendezvous_host "$host"; then
    python -c 'import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[1])))' "$port" 2>/dev/null || node_die "the rendezvous port $port on $host is already in" \
        "use (another job, or a torchrun left over): set HOPE_RDZV_PORT to a free port and submit again"
fi
cache_root=${HOPE_CACHE_ROOT:-/tmp/hope-${USER:-$(id -un)}}
export TRITON_CACHE_DIR="$cache_root/triton-${SLURM_JOB_ID:-local}-${SLURMD_NODENAME:-$(hostname)}"
mkdir -p "$TRITON_CACHE_DIR"
exec "$@"
