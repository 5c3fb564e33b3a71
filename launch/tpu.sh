#!/usr/bin/env bash
# Creates Cloud TPU VMs / pods, installs rils_jax on every worker and starts the trainer there.
# Run `launch/tpu.sh --help` for the options; `--dry_run` prints the commands without running them.
set -euo pipefail

readonly PROG=launch/tpu.sh
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT
readonly MEGASCALE_PORT=8081  # The port Cloud TPU multislice uses between slices.
readonly RHOME='~'  # The workers' home directory in commands run there (their shell expands it).
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh SUBCOMMAND --name=NAME --zone=ZONE [options] [-- extra trainer args]

Creates a Cloud TPU VM or pod slice, installs rils_jax on all of its workers and starts
`python -m rils_jax.main --config=CONFIG --workdir=WORKDIR --distributed=on` on every worker
(jax.distributed.initialize() finds the other workers by itself on Cloud TPU).

Subcommands:
  create   create the TPU VM (gcloud compute tpus tpu-vm create), or, with --queued, request it
           as a queued resource (gcloud compute tpus queued-resources create)
  setup    on all workers: get the code (git clone --repo at --branch, or --copy of this
           checkout), then python -m venv ~/rils_venv and pip install -r requirements.txt jax[tpu]
  run      on all workers: start the trainer under nohup, output to ~/rils_logs/NAME.log, so that
           it keeps running after ssh returns (a previous run must have ended: it holds the TPU)
  logs     follow worker 0's log (tail -f)
  delete   delete the TPU VM (with --queued: the queued resource and its TPUs)
  all      create, (with --queued: wait until the TPUs are ACTIVE,) setup, run

Options (each as --option=value or --option value; '-' and '_' are the same in names):
  --name=NAME          TPU VM / queued resource name (required).            e.g. --name=rils-v4
  --zone=ZONE          Cloud zone (required).                               e.g. --zone=us-central2-b
  --project=PROJECT    Cloud project (default: gcloud's configured one).    e.g. --project=my-proj
  --accelerator=TYPE   accelerator type, required by create/all.            e.g. --accelerator=v4-32
  --version=RUNTIME    TPU software version. Default from the accelerator: tpu-ubuntu2204-base
                       for v4 / v5p, v2-alpha-tpuv5-lite for v5litepod, v2-alpha-tpuv6e for v6e.
                                                                            e.g. --version=tpu-ubuntu2204-base
  --spot               create Spot (preemptible) TPUs.                      e.g. --spot
  --queued             use a queued resource instead of creating the VM directly (create, all,
                       delete; with --num_slices also setup, run, logs).    e.g. --queued
  --num_slices=K       K > 1 slices as one multislice queued resource (needs --queued; default 1):
                       nodes NAME-0 .. NAME-(K-1); run sets MEGASCALE_COORDINATOR_ADDRESS (worker 0
                       of NAME-0), MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID and MEGASCALE_PORT on
                       every worker. The config's mesh needs a `slice` axis of size K: pass
                       `-- --config.mesh.slice=K`.                          e.g. --num_slices=2
  --config=CONFIG      config file[:argument], relative to the code directory (required by
                       run/all).          e.g. --config=configs/vit_b16.py:platform=tpu_v4_32,data=shared
  --workdir=WORKDIR    output directory that every worker sees and that outlives the TPU VMs (a
                       preempted VM loses its disk): a gs:// bucket path, or a shared mount such
                       as Filestore (required by run/all).                  e.g. --workdir=gs://my-bucket/run1
  --repo=URL           git repository that setup clones (required by setup/all unless --copy).
                                                                            e.g. --repo=https://github.com/me/rils_jax.git
  --branch=BRANCH      branch or tag that setup checks out (default main).  e.g. --branch=dev
  --copy               setup copies this checkout instead of cloning: a `git archive` tarball of
                       the files committed at HEAD (uncommitted changes are not copied).
                                                                            e.g. --copy
  --code_dir=DIR       code directory on the workers, relative to the home directory unless
                       absolute (default rils_jax, i.e. ~/rils_jax).        e.g. --code_dir=src/rils_jax
  --python=PYTHON      Python that creates the venv on the workers (default python3.11: the
                       requirements need Python >= 3.11 and the TPU images are Ubuntu 22.04 with
                       Python 3.10; setup apt-installs PYTHON and PYTHON-venv if the venv cannot
                       be made).                                            e.g. --python=python3.12
  --jax_version=V      version of jax[tpu] that setup installs (default 0.10.2, the version of
                       requirements.txt).                                   e.g. --jax_version=0.10.2
  --dry_run            print the commands (one a line) instead of running them.
  -h, --help           print this help.
  -- ARGS...           everything after `--` is passed to rils_jax.main.   e.g. -- --config.total_steps=1000

Platform presets of the configs (`CONFIG:platform=PRESET`) and their accelerator types:
  tpu_v4_32    --accelerator=v4-32          16 chips, 4 hosts
  tpu_v4_64    --accelerator=v4-64          32 chips, 8 hosts
  tpu_v5e_256  --accelerator=v5litepod-256  256 chips, 64 hosts
(gpu_8xh100 and gpu_2x8xh100 are for launch/slurm.sh and launch/gpu_multinode.sh.)

Examples:
  # v4-32 pod, code cloned from git, everything in one go:
  launch/tpu.sh all --name=rils-v4 --zone=us-central2-b --accelerator=v4-32 \
      --repo=https://github.com/me/rils_jax.git \
      --config=configs/vit_b16.py:platform=tpu_v4_32,data=shared --workdir=gs://my-bucket/run1 --dry_run
  # v5e-256 as a Spot queued resource, code copied from this checkout:
  launch/tpu.sh all --queued --spot --name=rils-v5e --zone=us-west4-a --accelerator=v5litepod-256 \
      --copy --config=configs/vit_b16.py:platform=tpu_v5e_256 --workdir=gs://my-bucket/run2
  # two v5e-256 slices (multislice):
  launch/tpu.sh all --queued --num_slices=2 --name=rils-ms --zone=us-west4-a \
      --accelerator=v5litepod-256 --copy --config=configs/vit_b16.py:platform=tpu_v5e_256 \
      --workdir=gs://my-bucket/run3 -- --config.mesh.slice=2
  launch/tpu.sh logs --name=rils-v4 --zone=us-central2-b
  launch/tpu.sh delete --name=rils-v4 --zone=us-central2-b

Prerequisites: gcloud installed and authenticated (gcloud auth login), the Cloud TPU API
enabled, and a GCS bucket for WORKDIR that the TPU VMs' service account can write.
EOF
}

# A path on the workers as shell text: relative paths are under the home directory.
remote_path() {
  local p=${1#\~/}
  if [[ $p == /* ]]; then
    shq "$p"
  else
    printf '%s/%s' "$RHOME" "$(shq "$p")"
  fi
}

# --- Options ------------------------------------------------------------------------------------
subcommand=''
opt_name='' opt_zone='' opt_project='' opt_accelerator='' opt_version='' opt_num_slices=1
opt_config='' opt_workdir='' opt_repo='' opt_branch=main opt_code_dir=rils_jax
opt_python=python3.11 opt_jax_version=0.10.2
spot=0 queued=0 copy=0 dry_run=0
extra=()


parse_options 'spot queued copy dry_run' \
  'name zone project accelerator version num_slices config workdir repo branch code_dir python jax_version' \
  set_subcommand "$@"

check_subcommand 'create setup run logs delete all'

require() {  # require OPTION...: every named option must be non-empty.
  local o v
  for o in "$@"; do
    v=opt_$o
    [[ -n ${!v} ]] || die "--$o is required for '$subcommand'"
  done
}

require name zone code_dir python jax_version branch
[[ $opt_num_slices =~ ^[1-9][0-9]*$ ]] || die "--num_slices must be a positive integer"
if ((opt_num_slices > 1 && !queued)); then
  die "--num_slices=$opt_num_slices needs --queued (multislice TPUs are queued resources)"
fi
case $subcommand in create | all) require accelerator ;; esac
case $subcommand in run | all) require config workdir ;; esac
if [[ -n $opt_workdir ]]; then
  # Each worker runs the trainer under nohup: a bad workdir would only show in their logs.
  case $opt_workdir in
    gs://?*) ;;
    *://*) die "--workdir=$opt_workdir: Cloud TPU workdirs are gs://BUCKET/PATH (or an absolute path every worker mounts)" ;;
    /*) ;;
    *) die "--workdir=$opt_workdir must be gs://BUCKET/PATH or an absolute path that every worker mounts (a relative path would be each worker's own disk)" ;;
  esac
fi
case $subcommand in
  setup | all) ((copy)) || [[ -n $opt_repo ]] || die "--repo is required for '$subcommand' (or use --copy)" ;;
esac

gflags=(--zone="$opt_zone")
[[ -z $opt_project ]] || gflags+=(--project="$opt_project")

# The TPU VM nodes: NAME, or NAME-0 .. NAME-(K-1) for a multislice queued resource.
nodes=("$opt_name")
if ((opt_num_slices > 1)); then
  nodes=()
  for ((k = 0; k < opt_num_slices; k++)); do
    nodes+=("$opt_name-$k")
  done
fi

code=$(remote_path "$opt_code_dir")
venv=$RHOME/rils_venv
log=$RHOME/rils_logs/$(shq "$opt_name.log")

# The TPU software version: --version, or the default for the accelerator type.
runtime=$opt_version
if [[ -z $runtime && -n $opt_accelerator ]]; then
  case $opt_accelerator in
    v4-* | v5p-*) runtime=tpu-ubuntu2204-base ;;
    v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    *) [[ $subcommand != create && $subcommand != all ]] ||
      die "no default --version for --accelerator=$opt_accelerator; pass --version=RUNTIME" ;;
  esac
fi

# --- Subcommands --------------------------------------------------------------------------------
do_create() {
  local spot_flag=()
  ((!spot)) || spot_flag=(--spot)
  if ((queued)); then
    local node_flags=(--node-id="$opt_name")
    ((opt_num_slices == 1)) || node_flags=(--node-count="$opt_num_slices" --node-prefix="$opt_name")
    run gcloud compute tpus queued-resources create "$opt_name" "${node_flags[@]}" "${gflags[@]}" \
      --accelerator-type="$opt_accelerator" --runtime-version="$runtime" "${spot_flag[@]}"
  else
    run gcloud compute tpus tpu-vm create "$opt_name" "${gflags[@]}" \
      --accelerator-type="$opt_accelerator" --version="$runtime" "${spot_flag[@]}"
  fi
}

# Waits until a queued resource is ACTIVE (its TPUs exist); prints the query with --dry_run.
wait_active() {
  local query=(gcloud compute tpus queued-resources describe "$opt_name" "${gflags[@]}"
    --format='value(state.state)')
  if ((dry_run)); then
    show "${query[@]}"
    return
  fi
  local state
  while true; do
    state=$("${query[@]}")
    printf '%s: queued resource %s is %s\n' "$PROG" "$opt_name" "$state" >&2
    case $state in
      ACTIVE) return ;;
      FAILED | SUSPENDED) printf '%s: error: queued resource %s is %s\n' "$PROG" "$opt_name" "$state" >&2; exit 1 ;;
    esac
    sleep 30
  done
}

ssh_all() {  # ssh_all NODE COMMAND: runs COMMAND on every worker of NODE.
  run gcloud compute tpus tpu-vm ssh "$1" "${gflags[@]}" --worker=all --command="$2"
}

do_setup() {
  local get_code node py
  py=$(shq "$opt_python")
  local install
  install="cd $code && { $py -m venv $venv || { sudo apt-get update -q && sudo apt-get install -y -q $py $(shq "$opt_python-venv") && $py -m venv $venv; }; } && $venv/bin/pip install -r requirements.txt \"jax[tpu]==$opt_jax_version\""
  if ((copy)); then
    local tarball=${TMPDIR:-/tmp}/rils_jax_$opt_name.tar.gz
    run git -C "$REPO_ROOT" archive --format=tar.gz --output="$tarball" HEAD
    if ((!dry_run)) && ! git -C "$REPO_ROOT" diff --quiet HEAD; then
      printf '%s: warning: uncommitted changes are not copied (git archive HEAD)\n' "$PROG" >&2
    fi
    get_code="mkdir -p $code && tar -xzf $RHOME/rils_jax_src.tar.gz -C $code && rm -f $RHOME/rils_jax_src.tar.gz"
    for node in "${nodes[@]}"; do
      run gcloud compute tpus tpu-vm scp --recurse "$tarball" "$node:rils_jax_src.tar.gz" "${gflags[@]}" \
        --worker=all
    done
  else
    local branch repo
    branch=$(shq "$opt_branch")
    repo=$(shq "$opt_repo")
    get_code="if [ -d $code/.git ]; then git -C $code fetch --depth=1 origin $branch && git -C $code checkout --force FETCH_HEAD; else git clone --depth=1 --branch=$branch $repo $code; fi"
  fi
  for node in "${nodes[@]}"; do
    ssh_all "$node" "$get_code && $install"
  done
}

do_run() {
  local trainer=(-m rils_jax.main --config="$opt_config" --workdir="$opt_workdir" --distributed=on
    "${extra[@]}")
  local cmd a k env_vars coordinator_ip
  cmd="$venv/bin/python"
  for a in "${trainer[@]}"; do
    cmd+=" $(shq_arg "$a")"
  done
  if ((opt_num_slices > 1)); then
    printf '%s: note: %s slices: the config mesh needs a slice axis of size %s (--config.mesh.slice=%s)\n' \
      "$PROG" "$opt_num_slices" "$opt_num_slices" "$opt_num_slices" >&2
    local query=(gcloud compute tpus tpu-vm describe "${nodes[0]}" "${gflags[@]}"
      --format='value(networkEndpoints[0].ipAddress)')
    if ((dry_run)); then
      show "${query[@]}"
      coordinator_ip="IP_OF_${nodes[0]}_WORKER_0"
    else
      coordinator_ip=$("${query[@]}")
      [[ -n $coordinator_ip ]] || { printf '%s: error: no IP address for %s\n' "$PROG" "${nodes[0]}" >&2; exit 1; }
    fi
  fi
  for k in "${!nodes[@]}"; do
    env_vars=''
    if ((opt_num_slices > 1)); then
      env_vars="MEGASCALE_COORDINATOR_ADDRESS=$(shq "$coordinator_ip:$MEGASCALE_PORT") MEGASCALE_NUM_SLICES=$opt_num_slices MEGASCALE_SLICE_ID=$k MEGASCALE_PORT=$MEGASCALE_PORT "
    fi
    ssh_all "${nodes[k]}" "cd $code && mkdir -p $RHOME/rils_logs && { ${env_vars}nohup $cmd > $log 2>&1 < /dev/null & }"
  done
  if ((!dry_run)); then
    printf '%s: started on %s; follow it with: %s logs --name=%s --zone=%s\n' \
      "$PROG" "${nodes[*]}" "$PROG" "$opt_name" "$opt_zone" >&2
  fi
}

do_logs() {
  run gcloud compute tpus tpu-vm ssh "${nodes[0]}" "${gflags[@]}" --worker=0 --command="tail -n 100 -f $log"
}

do_delete() {
  if ((queued)); then
    run gcloud compute tpus queued-resources delete "$opt_name" "${gflags[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$opt_name" "${gflags[@]}" --quiet
  fi
}

case $subcommand in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  logs) do_logs ;;
  delete) do_delete ;;
  all)
    do_create
    ((!queued)) || wait_active
    do_setup
    do_run
    ;;
esac
