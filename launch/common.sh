# Shared launch logic, sourced by launch/hope_*.sh (docs/launch.md tells the whole story).
#
# Inside a job (`sbatch launch/hope_1b3.sh ARGS`) it starts one torchrun per node with srun (c10d
# rendezvous on the first node), forwards the time-limit warning (SIGUSR1) to the training
# processes, and requeues the job when training stopped for it. Outside a job
# (`bash launch/hope_1b3.sh ARGS`) it submits that script with sbatch, turning HOPE_NNODES,
# HOPE_GPUS_PER_NODE, HOPE_CPUS_PER_TASK, HOPE_TIME, HOPE_PARTITION, HOPE_ACCOUNT and
# HOPE_SBATCH_ARGS into sbatch options. `--dry-run` prints the commands instead of running them.
# Every other argument goes to hope_dist/pretrain.py after `--config $HOPE_CONFIG` and
# `--run_dir=$HOPE_RUN_DIR` and `--parallel.engine=$HOPE_ENGINE` (when set), so later arguments win.

hope_die() { echo "launch: $*" >&2; exit 2; }

hope_print_cmd() { printf '%q ' "$@"; echo; }

# The value of `#SBATCH --NAME=VALUE` in the calling script (the default when not in a job).
hope_header() { sed -n "s/^#SBATCH --$1=\([^ ]*\).*/\1/p" "$HOPE_SCRIPT" | head -n 1; }

# HOPE_USER_ARGS: the caller's arguments less --dry-run (which sets HOPE_DRY_RUN=1);
# HOPE_ARGS: pretrain.py's.
hope_parse_args() {
    HOPE_USER_ARGS=()
    local arg
    for arg in "$@"; do
        if [[ $arg == --dry-run ]]; then HOPE_DRY_RUN=1; else HOPE_USER_ARGS+=("$arg"); fi
    done
    HOPE_ARGS=(--config "$HOPE_CONFIG")
    if [[ -n ${HOPE_RUN_DIR:-} ]]; then HOPE_ARGS+=("--run_dir=$HOPE_RUN_DIR"); fi
    if [[ -n ${HOPE_ENGINE:-} ]]; then HOPE_ARGS+=("--parallel.engine=$HOPE_ENGINE"); fi  # native | deepspeed
    HOPE_ARGS+=("${HOPE_USER_ARGS[@]}")
}

# The first host of the allocation, where the c10d rendezvous runs; an error, never an empty host,
# when SLURM_JOB_NODELIST is unset, scontrol is missing or the list does not expand.
hope_first_node() {
    local list=${SLURM_JOB_NODELIST:-} hosts
    [[ -n $list ]] || hope_die "SLURM_JOB_ID=$SLURM_JOB_ID is set but SLURM_JOB_NODELIST is empty: run inside an" \
        "sbatch/salloc allocation, or unset SLURM_JOB_ID to submit the job"
    command -v scontrol >/dev/null || hope_die "scontrol is not in PATH ($PATH); it expands" \
        "SLURM_JOB_NODELIST=$list into the rendezvous host: load the SLURM module or add SLURM's bin folder to PATH"
    hosts=$(scontrol show hostnames "$list" 2>/dev/null) && hosts=${hosts%%$'\n'*}
    if [[ ! $hosts =~ ^[A-Za-z0-9._-]+$ ]]; then  # scontrol may print an error, or junk, and still exit 0
        local why
        why=$(scontrol show hostnames "$list" 2>&1 | head -n 4)
        hope_die "SLURM_JOB_NODELIST=$list does not expand to host names (scontrol show hostnames:" \
            "${why//$'\n'/ }): check the allocation's node list and SLURM's configuration (SLURM_CONF)"
    fi
    echo "$hosts"
}

# HOPE_NPROC, HOPE_CPUS, HOPE_WORLD, HOPE_TORCHRUN and HOPE_SRUN from the allocation (or, before
# submission, from the HOPE_* variables and the script's #SBATCH defaults).
hope_plan() {
    local nnodes=${SLURM_JOB_NUM_NODES:-${HOPE_NNODES:-$(hope_header nodes)}}
    local gpus=${SLURM_GPUS_ON_NODE:-${HOPE_GPUS_PER_NODE:-$(hope_header gpus-per-node)}}
    HOPE_NPROC=${HOPE_NPROC_PER_NODE:-${gpus:-0}}
    [[ $HOPE_NPROC =~ ^[1-9][0-9]*$ ]] || hope_die "no GPUs per node and HOPE_NPROC_PER_NODE unset:" \
        "set HOPE_NPROC_PER_NODE to the number of training processes per node (e.g. 2 for a CPU run)"
    HOPE_WORLD=$((nnodes * HOPE_NPROC))
    local head='<first node>'
    if [[ -n ${SLURM_JOB_ID:-} ]]; then head=$(hope_first_node) || exit 2; fi
    local port=${HOPE_RDZV_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
    [[ $port =~ ^[0-9]+$ ]] && ((port >= 1024 && port <= 65535)) ||
        hope_die "HOPE_RDZV_PORT=$port is not a port number in 1024-65535: set HOPE_RDZV_PORT to a free port"
    HOPE_TORCHRUN=(torchrun --nnodes="$nnodes" --nproc-per-node="$HOPE_NPROC"
        --rdzv-backend=c10d --rdzv-endpoint="$head:$port" --rdzv-id="hope-${SLURM_JOB_ID:-0}"
        --max-restarts="${HOPE_MAX_RESTARTS:-0}" hope_dist/pretrain.py)
    # srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): pass it on.
    HOPE_CPUS=${SLURM_CPUS_PER_TASK:-${HOPE_CPUS_PER_TASK:-$(hope_header cpus-per-task)}}
    HOPE_SRUN=(srun --nodes="$nnodes" --ntasks-per-node=1 ${HOPE_CPUS:+--cpus-per-task="$HOPE_CPUS"}
        --kill-on-bad-exit=1 launch/node.sh)
}

# NCCL/torch defaults for InfiniBand H100 nodes; whatever is already in the environment wins.
hope_export_env() {
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}  # abort a timed-out rank
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # Workers get a fresh store per torchrun attempt: with the agent's shared store a restarted
    # worker can read a dead peer's address from the failed attempt (pytorch/pytorch#135712).
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
    local threads=$(( ${HOPE_CPUS:-$HOPE_NPROC} / HOPE_NPROC ))
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
    export PYTHONUNBUFFERED=1
}

# Validate the config for this world size (fails in seconds, not after the GPUs start) and set
# RUN_DIR; append the data-parallel fill (e.g. --parallel.dp_shard=32) when the config leaves it open.
hope_resolve() {
    local resolved FILL
    resolved=$(python "$HOPE_REPO/launch/resolve_job.py" "$HOPE_WORLD" "${HOPE_ARGS[@]}") || exit 2
    eval "$resolved"  # sets RUN_DIR and FILL
    if [[ -n $FILL ]]; then HOPE_ARGS+=("$FILL"); fi
}

hope_show_plan() {
    echo "# run dir: $RUN_DIR"
    echo "# world size $HOPE_WORLD ($HOPE_NPROC per node); environment:"
    env | grep -E '^(NCCL|TORCH_NCCL|CUDA_DEVICE|OMP_NUM)[A-Z_]*=' | sort | sed 's/^/#   /'
    hope_print_cmd "${HOPE_SRUN[@]}" "${HOPE_TORCHRUN[@]}" "${HOPE_ARGS[@]}"
}

hope_submit() {
    hope_plan
    local cmd=(sbatch)
    if [[ -n ${HOPE_NNODES:-} ]]; then cmd+=("--nodes=$HOPE_NNODES"); fi
    if [[ -n ${HOPE_GPUS_PER_NODE:-} ]]; then cmd+=("--gpus-per-node=$HOPE_GPUS_PER_NODE"); fi
    if [[ -n ${HOPE_CPUS_PER_TASK:-} ]]; then cmd+=("--cpus-per-task=$HOPE_CPUS_PER_TASK"); fi
    if [[ -n ${HOPE_TIME:-} ]]; then cmd+=("--time=$HOPE_TIME"); fi
    if [[ -n ${HOPE_PARTITION:-} ]]; then cmd+=("--partition=$HOPE_PARTITION"); fi
    if [[ -n ${HOPE_ACCOUNT:-} ]]; then cmd+=("--account=$HOPE_ACCOUNT"); fi
    # shellcheck disable=SC2206  # a list of sbatch options by design
    if [[ -n ${HOPE_SBATCH_ARGS:-} ]]; then cmd+=($HOPE_SBATCH_ARGS); fi
    cmd+=("$HOPE_SCRIPT" "${HOPE_USER_ARGS[@]}")
    if [[ $HOPE_DRY_RUN == 1 ]]; then
        echo "# submit:"
        hope_print_cmd "${cmd[@]}"
        echo "# then the job runs, from $HOPE_REPO:"
        hope_resolve
        hope_export_env
        hope_show_plan
        return 0
    fi
    mkdir -p launch/logs
    "${cmd[@]}"
}

# What reproduces this run besides config.yaml and run_info.jsonl: git state, the exact command,
# the allocation, the environment and the installed packages.
hope_write_env_summary() {
    local out="$RUN_DIR/env/job-$SLURM_JOB_ID-restart-${SLURM_RESTART_COUNT:-0}.txt"
    mkdir -p "$RUN_DIR/env"
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "git_commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
        echo "git_modified_files: $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l)"
        echo "command: $(hope_print_cmd "${HOPE_SRUN[@]}" "${HOPE_TORCHRUN[@]}" "${HOPE_ARGS[@]}")"
        echo "python: $(python --version 2>&1) at $(command -v python)"
        if command -v nvidia-smi >/dev/null; then nvidia-smi -L | sed 's/^/gpu: /'; fi
        echo "--- environment"
        env | grep -E '^(SLURM|HOPE|NCCL|TORCH|CUDA|OMP|TRITON)_[A-Z_]*=' | sort
        echo "--- packages"
        python -m pip freeze 2>/dev/null
    } >"$out"
}

hope_forward_signal() {  # the batch shell got SIG$1: pass it to every process of the job's steps
    if [[ $1 == TERM ]]; then HOPE_GOT_TERM=1; fi
    echo "launch: got SIG$1, forwarding it to the training processes"
    scancel --signal="$1" "$SLURM_JOB_ID"
}

hope_run_job() {
    hope_plan
    hope_resolve
    hope_export_env
    if [[ $HOPE_DRY_RUN == 1 ]]; then
        hope_show_plan
        return 0
    fi
    mkdir -p "$RUN_DIR/logs"
    exec > >(tee -a "$RUN_DIR/logs/slurm-$SLURM_JOB_ID.log") 2>&1
    echo "launch: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST," \
         "world size $HOPE_WORLD, run dir $RUN_DIR"
    hope_write_env_summary
    rm -f "$RUN_DIR/PREEMPTED"  # only a stop of this run may requeue the job

    HOPE_GOT_TERM=0
    trap 'hope_forward_signal USR1' USR1
    trap 'hope_forward_signal TERM' TERM
    "${HOPE_SRUN[@]}" "${HOPE_TORCHRUN[@]}" "${HOPE_ARGS[@]}" &
    local pid=$! rc
    while true; do  # a trapped signal interrupts `wait`: wait again until srun is really gone
        wait "$pid"; rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1 TERM

    if [[ -f $RUN_DIR/COMPLETE ]]; then
        echo "launch: run complete at step $(cat "$RUN_DIR/COMPLETE")"
        exit 0
    fi
    # A stop that SIGTERM caused (scancel, the hard time limit) is not requeued: the user or
    # SLURM ended the job. A stop for the time-limit warning (SIGUSR1) is.
    if [[ -f $RUN_DIR/PREEMPTED && $HOPE_GOT_TERM == 0 && ${HOPE_REQUEUE:-1} == 1 ]]; then
        echo "launch: training stopped for requeue ($(cat "$RUN_DIR/PREEMPTED")); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    if [[ -f $RUN_DIR/PREEMPTED ]]; then
        echo "launch: training stopped with a checkpoint ($(cat "$RUN_DIR/PREEMPTED")); not requeued" \
             "(SIGTERM or HOPE_REQUEUE=0): submit again to resume"
        exit 0
    fi
    echo "launch: training ended without finishing (srun exit $rc); not requeueing" >&2
    exit $((rc == 0 ? 1 : rc))
}

# Entry point of launch/hope_*.sh, which set HOPE_CONFIG and HOPE_SCRIPT first.
hope_main() {
    HOPE_DRY_RUN=${HOPE_DRY_RUN:-0}
    hope_parse_args "$@"
    cd "$HOPE_REPO" || hope_die "cannot cd to HOPE_REPO=$HOPE_REPO"  # relative paths start here
    local venv=${HOPE_VENV:-$HOPE_REPO/.venv}  # a cluster's module/conda setup can go before sbatch
    # shellcheck disable=SC1091
    if [[ -f $venv/bin/activate ]]; then
        source "$venv/bin/activate"
    elif [[ -n ${HOPE_VENV:-} ]]; then
        hope_die "HOPE_VENV=$HOPE_VENV has no bin/activate: point it at the virtualenv hope_dist is installed in," \
            "or unset it to use $HOPE_REPO/.venv"
    fi
    command -v python >/dev/null || hope_die "no python in PATH and no virtualenv at $venv: run" \
        "bash scripts/setup.sh (creates .venv), set HOPE_VENV, or load your cluster's Python before sbatch"
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        export HOPE_REPO
        hope_submit
    else
        hope_run_job
    fi
}
