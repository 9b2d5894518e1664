#!/bin/sh
# Container entrypoint: runs its arguments (a `fedquic ...` command line) and, for the compose cluster,
# orders the containers' exits so that `docker-compose up --abort-on-container-exit --exit-code-from server`
# ends only when the whole job is done and reports how it went.
#
# Without the variables below it simply runs the command (exec). With them, once the command has exited 0:
#
#   FEDQUIC_WAIT_FOR      space-separated files to wait for first (missing after FEDQUIC_WAIT_TIMEOUT: exit 1)
#   FEDQUIC_DONE_FILE     then written ("0"): this container's work is complete
#   FEDQUIC_LINGER_FOR    then space-separated files to wait for before exiting (missing after the timeout:
#                         exit 0 all the same, the work is done)
#   FEDQUIC_WAIT_TIMEOUT  seconds for each of the two waits (default 120)
#   FEDQUIC_OK_FILE       written as soon as the command has exited 0, before the waits: the server's
#                         healthcheck reads it, so that a server whose job is complete (its metrics port is
#                         closed by then) is not reported unhealthy while its container still runs
#
# The compose file sets: each client writes /results/client-N/compose.done as soon as its `fedquic client`
# has exited 0 (its adapters are saved by then) and lingers until /results/server/compose.done exists; the
# server, once its job is complete, waits for every client's file and then writes its own. So whichever
# container exits first, it exits after the job is complete and every client's adapters are on disk, and the
# server's exit status is the whole job's.
#
# SIGTERM/SIGINT (docker stop, or compose stopping the others after one exited) are passed on to a running
# command; the container then exits 143, and also while it is still in the first wait (the work is not
# complete). While lingering the work is done: it exits 0.
set -u

if [ -z "${FEDQUIC_DONE_FILE:-}${FEDQUIC_WAIT_FOR:-}${FEDQUIC_LINGER_FOR:-}${FEDQUIC_OK_FILE:-}" ]; then
    exec "$@"
fi

log() { echo "[entrypoint] $*" >&2; }

# Files left by an earlier run in the same results directory must not count as this run's: this container's
# own done file, and the ones it waits for first (the server starts before its clients, so any client file
# present now is stale); the OK file too (a container started again keeps its /tmp).
# shellcheck disable=SC2086  # word splitting intended: lists of paths
rm -f ${FEDQUIC_DONE_FILE:-} ${FEDQUIC_WAIT_FOR:-} ${FEDQUIC_OK_FILE:-}

child=
phase=running
on_signal() {
    if [ "$phase" = lingering ]; then
        exit 0
    fi
    if [ "$phase" = running ] && [ -n "$child" ]; then
        log "signal: stopping the command (PID $child)"
        kill -TERM "$child" 2>/dev/null
        wait "$child" 2>/dev/null
    else
        log "signal while waiting for: ${FEDQUIC_WAIT_FOR:-}"
    fi
    exit 143
}
trap on_signal TERM INT

timeout=${FEDQUIC_WAIT_TIMEOUT:-120}

# wait_for FILES...: 0 once all exist, 1 after $timeout seconds. `wait` on a background sleep returns at
# once when a trapped signal arrives, so the trap runs without delay.
wait_for() {
    start=$(date +%s)
    for f in "$@"; do
        while [ ! -e "$f" ]; do
            if [ $(( $(date +%s) - start )) -ge "$timeout" ]; then
                log "gave up after ${timeout} s waiting for $f"
                return 1
            fi
            sleep 0.2 &
            wait $!
        done
    done
    return 0
}

"$@" &
child=$!
wait "$child"
rc=$?
if [ "$rc" -ne 0 ]; then
    log "command exited with status $rc"
    exit "$rc"
fi

if [ -n "${FEDQUIC_OK_FILE:-}" ]; then
    echo 0 > "$FEDQUIC_OK_FILE"
fi

phase=waiting
# shellcheck disable=SC2086  # word splitting intended: a list of paths
wait_for ${FEDQUIC_WAIT_FOR:-} || exit 1
if [ -n "${FEDQUIC_DONE_FILE:-}" ]; then
    mkdir -p "$(dirname "$FEDQUIC_DONE_FILE")"
    echo 0 > "$FEDQUIC_DONE_FILE"
fi
phase=lingering
# shellcheck disable=SC2086
wait_for ${FEDQUIC_LINGER_FOR:-} || true
exit 0
