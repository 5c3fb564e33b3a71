#!/usr/bin/env bash
# Starts rils_jax on several GPU hosts over ssh (no SLURM): one process per host, all its GPUs.
# Run `launch/gpu_multinode.sh --help` for the options; `--dry_run` prints the commands only.
set -euo pipefail

readonly PROG=launch/gpu_multinode.sh
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_multinode.sh --hosts=HOST1,HOST2,... --config=CONFIG --workdir=WORKDIR
                               [--coordinator_port=PORT] [--coordinator_host=HOST]
                               [--code_dir=PATH] [--venv=PATH] [--gpu_xla_flags=MODE] [--dry_run]
                               [-- extra trainer args]
       launch/gpu_multinode.sh --local --process_id=I --hosts=... --config=... --workdir=... [...]

Runs one rils_jax process per host, each using all the GPUs of its host. For host i (0-based, in
the order of --hosts) it runs, over ssh and in the background,
  cd CODE_DIR && XLA_FLAGS=... VENV/bin/python -m rils_jax.main --config=CONFIG --workdir=WORKDIR \
      --distributed=on --coordinator_address=HOST1:PORT --num_processes=N --process_id=i ARGS...
prefixes each output line with [host], waits for all and exits non-zero if any failed (then
stopping the others' ssh sessions, which ends their processes). The first host is the coordinator.
With --local it runs that command for --process_id on this machine instead, without ssh: run it
by hand on each host. XLA_FLAGS holds the GPU XLA flags of launch/common.sh (launch/README.md
says which and why), then your XLA_FLAGS here, whose entries replace ours of the same name.

Options (each as --option=value or --option value; '-' and '_' are the same in names):
  --hosts=H1,H2,...     hosts, comma-separated, as ssh reaches them, [user@]host (required).
                                                        e.g. --hosts=gpu-node1,gpu-node2
  --config=CONFIG       config file[:argument] (required).
                                  e.g. --config=configs/vit_b16.py:platform=gpu_2x8xh100,data=shared
  --workdir=WORKDIR     output directory that every host sees: a shared filesystem path or a
                        gs:// bucket path (required).   e.g. --workdir=/shared/runs/run1
  --coordinator_port=P  free TCP port on the first host for JAX's coordinator (default 12345).
                                                        e.g. --coordinator_port=12345
  --coordinator_host=H  address of the first host as the others reach it (default: the first
                        of --hosts without its user@).  e.g. --coordinator_host=10.0.0.1
  --code_dir=PATH       rils_jax checkout on every host (default: this checkout's path).
                                                        e.g. --code_dir=/shared/rils_jax
  --venv=PATH           virtual environment on every host (default: CODE_DIR/.venv).
                                                        e.g. --venv=/shared/venvs/rils
  --gpu_xla_flags=MODE  default: set the GPU XLA flags (your XLA_FLAGS entries win, flag by
                        flag); none: only your XLA_FLAGS. Same as RILS_GPU_XLA_FLAGS=MODE.
                                                        e.g. --gpu_xla_flags=none
  --local               run the command of --process_id here, without ssh.   e.g. --local
  --process_id=I        with --local: this host's index in --hosts.          e.g. --process_id=1
  --dry_run             print the commands (one a line) instead of running them.
  -h, --help            print this help.
  -- ARGS...            passed to rils_jax.main.        e.g. -- --config.total_steps=1000

Platform presets of the configs (`CONFIG:platform=PRESET`): gpu_8xh100 (1 host x 8 GPUs),
gpu_2x8xh100 (2 hosts x 8 GPUs).

Examples:
  launch/gpu_multinode.sh --hosts=host1,host2 --coordinator_port=12345 \
      --config=configs/vit_b16.py:platform=gpu_2x8xh100,data=shared --workdir=/shared/runs/run1 --dry_run
  # the same by hand: on host1 with --process_id=0, on host2 with --process_id=1
  launch/gpu_multinode.sh --local --process_id=1 --hosts=host1,host2 \
      --config=configs/vit_b16.py:platform=gpu_2x8xh100,data=shared --workdir=/shared/runs/run1

Prerequisites: passwordless ssh (BatchMode) from here to every host, the checkout and its venv
(with "jax[cuda13]==0.10.2") at the same paths on every host, the workdir on a shared
filesystem or in a bucket, and the coordinator port open between the hosts.
EOF
}

opt_hosts='' opt_config='' opt_workdir='' opt_coordinator_port=12345 opt_coordinator_host=''
opt_code_dir=$REPO_ROOT opt_venv='' opt_process_id='' opt_gpu_xla_flags=''
local_mode=0 dry_run=0
extra=()

parse_options 'dry_run local:local_mode' \
  'hosts config workdir coordinator_port coordinator_host code_dir venv process_id gpu_xla_flags' '' "$@"
set_gpu_xla_flags_option "$opt_gpu_xla_flags"

[[ -n $opt_hosts ]] || die "--hosts is required"
[[ -n $opt_config ]] || die "--config is required"
[[ -n $opt_workdir ]] || die "--workdir is required"
if [[ ! $opt_coordinator_port =~ ^[1-9][0-9]{0,4}$ ]] || ((opt_coordinator_port > 65535)); then
  die "--coordinator_port must be a TCP port number"
fi
[[ -n $opt_code_dir ]] || die "--code_dir must not be empty"

IFS=, read -r -a host_list <<<"$opt_hosts"
hosts=()
for h in "${host_list[@]}"; do
  [[ -z $h ]] || hosts+=("$h")
done
((${#hosts[@]} > 0)) || die "--hosts has no host"
num_processes=${#hosts[@]}

if ((local_mode)); then
  [[ -n $opt_process_id ]] || die "--process_id is required with --local"
  if [[ ! $opt_process_id =~ ^(0|[1-9][0-9]*)$ ]] || ((opt_process_id >= num_processes)); then
    die "--process_id must be 0 .. $((num_processes - 1)) (the host's index in --hosts)"
  fi
else
  [[ -z $opt_process_id ]] || die "--process_id only goes with --local"
fi

coordinator=${opt_coordinator_host:-${hosts[0]#*@}}:$opt_coordinator_port
python=${opt_venv:-${opt_code_dir%/}/.venv}
python=${python%/}/bin/python
xla=$(gpu_xla_flags "${XLA_FLAGS:-}")
xla_env=()
[[ -z $xla ]] || xla_env=(XLA_FLAGS="$xla")

# The command of process I, as a line for a shell.
host_command() {
  printf 'cd %s && %s' "$(shq "$opt_code_dir")" "$(join_q "${xla_env[@]}" "$python" -m rils_jax.main \
    --config="$opt_config" --workdir="$opt_workdir" --distributed=on \
    --coordinator_address="$coordinator" --num_processes="$num_processes" --process_id="$1" \
    "${extra[@]}")"
}

if ((local_mode)); then
  line=$(host_command "$opt_process_id")
  if ((dry_run)); then
    printf '%s\n' "$line"
    exit 0
  fi
  printf '+ %s\n' "$line" >&2
  cd "$opt_code_dir"
  [[ -z $xla ]] || export XLA_FLAGS=$xla
  exec "$python" -m rils_jax.main --config="$opt_config" --workdir="$opt_workdir" --distributed=on \
    --coordinator_address="$coordinator" --num_processes="$num_processes" \
    --process_id="$opt_process_id" "${extra[@]}"
fi

ssh_command() {  # ssh_command I: the argv that runs process I on its host.
  # -tt: the remote process gets a terminal, so it ends (SIGHUP) when its ssh session is stopped.
  ssh_argv=(ssh -tt -n -o BatchMode=yes "${hosts[$1]}" "$(host_command "$1")")
}

if ((dry_run)); then
  for i in "${!hosts[@]}"; do
    ssh_command "$i"
    join_q "${ssh_argv[@]}"
    printf '\n'
  done
  exit 0
fi

prefix() {  # Copies stdin to stdout, each line prefixed with [$1] (and without a terminal's CR).
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    printf '[%s] %s\n' "$1" "${line%$'\r'}"
  done
}

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    [[ -z $pid ]] || kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for i in "${!hosts[@]}"; do
  ssh_command "$i"
  printf '+ %s\n' "$(join_q "${ssh_argv[@]}")" >&2
  "${ssh_argv[@]}" > >(prefix "${hosts[i]}") 2>&1 &
  pids[i]=$!
done

failed=0
running=$num_processes
while ((running > 0)); do
  status=0
  wait -n || status=$?
  ((status != 127)) || sleep 1  # No child to wait for: do not spin.
  for i in "${!pids[@]}"; do
    pid=${pids[i]}
    if [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null; then
      continue  # Already reaped, or still running.
    fi
    rc=0
    wait "$pid" || rc=$?
    pids[i]=''
    running=$((running - 1))
    if ((rc != 0 && failed)); then
      printf '%s: process %s on %s stopped (exit %s)\n' "$PROG" "$i" "${hosts[i]}" "$rc" >&2
    elif ((rc != 0)); then
      printf '%s: process %s on %s failed (exit %s)\n' "$PROG" "$i" "${hosts[i]}" "$rc" >&2
      if ((running > 0)); then
        printf '%s: stopping the other ssh sessions\n' "$PROG" >&2
        stop_all
      fi
      failed=1
    fi
  done
done
wait  # for the output prefixers
if ((failed)); then
  exit 1
fi
printf '%s: all %s processes finished\n' "$PROG" "$num_processes" >&2
