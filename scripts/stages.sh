# Sourced by the multi-stage scripts (quickstart, VQA, synthesis, diffusion): `run_stage NAME COMMAND...` runs
# one stage; when it fails or is stopped (SIGTERM → 143, Ctrl-C → 130: the trainers save first), it says
# which stage, that the later stages were not run and how to continue, and ends the script with that status.
# While a stage runs, this shell only notes SIGTERM / SIGINT (the trainer, in the same process group, gets
# them too and stops at a step boundary), so the message below is printed instead of the shell dying first.
STAGES_SCRIPT=${STAGES_SCRIPT:-$(basename "$0" .sh)}
trap ':' TERM INT   # not '': an ignored signal would be ignored by the trainers too

run_stage() {
    local name=$1 rc=0
    shift
    "$@" || rc=$?
    if [ "$rc" -eq 0 ]; then
        return 0
    fi
    if [ "$rc" -eq 143 ] || [ "$rc" -eq 130 ]; then
        echo "[$STAGES_SCRIPT] $name was stopped (exit $rc) after saving; the stages after it were not run." \
             "${RESUME_HINT:-Run the same command again with --resume auto to continue.}" >&2
    else
        echo "[$STAGES_SCRIPT] $name failed (exit $rc); the stages after it were not run." >&2
    fi
    exit "$rc"
}
