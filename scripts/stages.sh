# Sourced by the multi-stage scripts (quickstart, VQA, synthesis, diffusion): `run_stage NAME COMMAND...` runs
# one stage; when it fails or is stopped (SIGTERM → 143, Ctrl-C → 130: the trainers save first), it says
# which stage, that the later stages were not run and how to continue, and ends the script with that status.
# A SIGTERM / Ctrl-C to the whole process group (Slurm, systemd, a terminal) reaches the running stage, which
# stops at a step boundary; one sent to this shell alone is noted (bash acts on it once the stage returns) and
# no later stage starts. Either way the script ends with 143 / 130 and says so.
STAGES_SCRIPT=${STAGES_SCRIPT:-$(basename "$0" .sh)}
STAGES_SIGNAL=0
trap 'STAGES_SIGNAL=143' TERM   # a recorded status, not '' (an ignored signal would be ignored by the trainers too)
trap 'STAGES_SIGNAL=130' INT
# torchrun forwards SIGTERM to its ranks, then kills them after this many seconds: leave time to finish the
# step, agree on the stop and save (its default, 30 s, is shorter than some steps of a large model).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}

stages_stopped() {  # NAME STATUS: the message and exit for a stop
    echo "[$STAGES_SCRIPT] $1 was stopped (exit $2) after saving; the stages after it were not run." \
         "${RESUME_HINT:-Run the same command again with --resume auto to continue.}" >&2
    exit "$2"
}

run_stage() {
    local name=$1 rc=0
    shift
    if [ "$STAGES_SIGNAL" -ne 0 ]; then  # a signal between two stages: start nothing more
        echo "[$STAGES_SCRIPT] stopped (exit $STAGES_SIGNAL) before $name; it and the stages after it were not run." >&2
        exit "$STAGES_SIGNAL"
    fi
    "$@" || rc=$?
    if [ "$rc" -eq 143 ] || [ "$rc" -eq 130 ]; then
        stages_stopped "$name" "$rc"
    elif [ "$rc" -ne 0 ]; then
        echo "[$STAGES_SCRIPT] $name failed (exit $rc); the stages after it were not run." >&2
        exit "$rc"
    elif [ "$STAGES_SIGNAL" -ne 0 ]; then  # the signal reached only this shell: the stage ran to its end
        echo "[$STAGES_SCRIPT] a stop signal arrived while $name ran; it finished, the stages after it were not run." >&2
        exit "$STAGES_SIGNAL"
    fi
}
