#!/usr/bin/env bash
# Runs the trainer in a Kubernetes pod (the command of launch/xpk.sh's and launch/jobset.sh's
# pods, inside the image of launch/Dockerfile): launch/pod_run.sh COMMAND ARGS...
#
# Kubernetes stops a pod with SIGTERM (preemption, node maintenance, Kueue evicting the
# workload). rils_jax then saves a checkpoint at the end of the step and exits 0; on several
# hosts JAX's preemption service makes every process do so. Exit 0 would mark this pod
# Succeeded, as if training were over. So this script passes SIGTERM on to COMMAND and, when
# COMMAND ends with 0 after one, exits 143 (128 + SIGTERM) instead: the pod fails, its Job fails,
# and the JobSet's failure policy recreates all pods, which resume from the checkpoint in the
# workdir. Any other exit status is passed on unchanged.
set -uo pipefail

readonly PROG=launch/pod_run.sh
if (($# == 0)); then
  printf '%s: error: no command; usage: launch/pod_run.sh COMMAND ARGS...\n' "$PROG" >&2
  exit 2
fi

terminated=0
child=''
# shellcheck disable=SC2329  # Called by the trap.
on_term() {
  terminated=1
  [[ -z $child ]] || kill -TERM "$child" 2>/dev/null || true
}
trap on_term TERM

"$@" &
child=$!
# `wait` returns early (status > 128) when the trap runs: wait again until COMMAND has ended,
# then once more for its exit status (bash keeps it for a child already waited for).
while kill -0 "$child" 2>/dev/null; do
  wait "$child"
done
wait "$child"
status=$?
if ((terminated && status == 0)); then
  printf '%s: stopped by SIGTERM after saving a checkpoint; exit 143 so that the JobSet restarts the run and it resumes\n' "$PROG" >&2
  exit 143
fi
exit "$status"
