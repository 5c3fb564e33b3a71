#!/usr/bin/env bash
# Runs rils_jax on a GKE cluster with xpk (`xpk workload create`): TPU slices or GPU node pools.
# Run `launch/xpk.sh --help` for the options; `--dry_run` prints the xpk commands only.
set -euo pipefail

readonly PROG=launch/xpk.sh
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/xpk.sh create --cluster=CLUSTER --workload=NAME (--tpu_type=TYPE | --device_type=TYPE)
                     --config=CONFIG --workdir=gs://BUCKET/RUN [options] [-- extra trainer args]
       launch/xpk.sh list --cluster=CLUSTER [--project=P] [--zone=Z] [--dry_run]
       launch/xpk.sh delete --cluster=CLUSTER --workload=NAME [--project=P] [--zone=Z] [--dry_run]

Runs the trainer as an xpk workload (a JobSet made by `xpk workload create --docker-image=IMAGE`)
on an existing GKE cluster that xpk manages (`xpk cluster create`). Every pod runs, in the image
of launch/Dockerfile,
  exec launch/pod_run.sh python -m rils_jax.main --config=CONFIG --workdir=WORKDIR --distributed=on ARGS...
- TPU (--tpu_type): one pod per TPU VM host of each slice; jax.distributed.initialize() finds the
  others from the environment GKE sets (TPU_WORKER_HOSTNAMES, TPU_WORKER_ID, and MEGASCALE_* for
  several slices).
- GPU (--device_type): one pod per node, with all its GPUs; JAX does not detect xpk's GPU pods,
  so the command adds --coordinator_address=${JAX_COORDINATOR_ADDRESS}:${JAX_COORDINATOR_PORT}
  --num_processes=${NNODES} --process_id=${NODE_RANK} (the variables xpk sets in GPU pods), and
  --env=XLA_FLAGS=... passes the GPU XLA flags of launch/common.sh (see launch/README.md).
A pod stopped by SIGTERM saves a checkpoint and exits 143 (launch/pod_run.sh), one of the exit
codes on which xpk restarts the JobSet (42, 127-255), up to --max_restarts times; the restarted
run resumes from the checkpoint in WORKDIR.

Subcommands:
  create   xpk workload create ... (the trainer)
  list     xpk workload list --cluster=CLUSTER
  delete   xpk workload delete --cluster=CLUSTER --workload=NAME --force

Options (each as --option=value or --option value; '-' and '_' are the same in names):
  --cluster=CLUSTER     GKE cluster made by `xpk cluster create` (required).  e.g. --cluster=rils-v5e
  --workload=NAME       workload (JobSet) name: lower-case letters, digits and '-', at most 40
                        (create, delete).                     e.g. --workload=vitb16-run1
  --tpu_type=TYPE       TPU slice type, as xpk names it.       e.g. --tpu_type=v5litepod-256
  --num_slices=K        TPU slices (default 1); K > 1 needs a `slice` mesh axis of size K in the
                        config: pass `-- --config.mesh.slice=K`.  e.g. --num_slices=2
  --device_type=TYPE    GPU node type, as xpk names it.        e.g. --device_type=h100-80gb-8
  --num_nodes=N         GPU nodes (default 1).                 e.g. --num_nodes=2
  --config=CONFIG       config file[:argument], relative to the image's /app (required by create).
                                           e.g. --config=configs/vit_b16.py:platform=tpu_v5e_256
  --workdir=WORKDIR     output directory: a gs:// bucket path that every pod writes and that
                        outlives the pods (required by create).  e.g. --workdir=gs://my-bucket/run1
  --shared_mount        accept a --workdir that is not gs://: a path where every pod mounts the
                        same volume (see --storage).           e.g. --shared_mount
  --storage=NAMES       xpk storages to mount (`xpk storage attach`), comma-separated.
                                                               e.g. --storage=rils-filestore
  --image=IMAGE         container image built from launch/Dockerfile (default, from --project:
                        us-docker.pkg.dev/PROJECT/rils/rils-jax:tpu for TPUs and
                        us-docker.pkg.dev/PROJECT/rils/rils-jax:cuda13 for GPUs).
                                           e.g. --image=us-docker.pkg.dev/my-proj/rils/rils-jax:tpu
  --project=PROJECT     Cloud project (default: gcloud's; needed for the default --image).
                                                               e.g. --project=my-proj
  --zone=ZONE           the cluster's zone (default: gcloud's).  e.g. --zone=us-west4-a
  --priority=P          xpk priority: very-low, low, medium, high, very-high (default: xpk's,
                        medium).                               e.g. --priority=high
  --max_restarts=N      JobSet restarts after a failure or preemption (default 10).
                                                               e.g. --max_restarts=20
  --grace_period=S      seconds a pod has after SIGTERM to finish the step and save the
                        checkpoint before it is killed (default 600).  e.g. --grace_period=900
  --gpu_xla_flags=MODE  default: set the GPU XLA flags (your XLA_FLAGS entries win, flag by
                        flag); none: only your XLA_FLAGS. Same as RILS_GPU_XLA_FLAGS=MODE.
                                                               e.g. --gpu_xla_flags=none
  --dry_run             print the xpk command (one line) instead of running it.
  -h, --help            print this help.
  -- ARGS...            passed to rils_jax.main.               e.g. -- --config.total_steps=1000

Examples:
  # v5e-256 (the tpu_v5e_256 preset), workdir in a bucket:
  launch/xpk.sh create --cluster=rils-v5e --workload=vitb16-v5e --tpu_type=v5litepod-256 \
      --project=my-proj --zone=us-west4-a \
      --config=configs/vit_b16.py:platform=tpu_v5e_256 --workdir=gs://my-bucket/vitb16-v5e --dry_run
  # 2 nodes x 8 H100 (the gpu_2x8xh100 preset):
  launch/xpk.sh create --cluster=rils-a3 --workload=vitb16-h100 --device_type=h100-80gb-8 \
      --num_nodes=2 --project=my-proj --zone=us-central1-a \
      --config=configs/vit_b16.py:platform=gpu_2x8xh100 --workdir=gs://my-bucket/vitb16-h100 --dry_run
  launch/xpk.sh list --cluster=rils-v5e --project=my-proj --zone=us-west4-a
  launch/xpk.sh delete --cluster=rils-v5e --workload=vitb16-v5e --project=my-proj --zone=us-west4-a

Prerequisites: xpk installed (pip install xpk) with gcloud and kubectl, a cluster made with
`xpk cluster create`, the image pushed to Artifact Registry (launch/README.md), and a bucket the
cluster's nodes (or their Workload Identity) can write.
EOF
}

subcommand=''
opt_cluster='' opt_workload='' opt_tpu_type='' opt_num_slices=1 opt_device_type='' opt_num_nodes=1
opt_config='' opt_workdir='' opt_storage='' opt_image='' opt_project='' opt_zone='' opt_priority=''
opt_max_restarts=10 opt_grace_period=600 opt_gpu_xla_flags=''
shared_mount=0 dry_run=0
extra=()


parse_options 'dry_run shared_mount' \
  'cluster workload tpu_type num_slices device_type num_nodes config workdir storage image project zone priority max_restarts grace_period gpu_xla_flags' \
  set_subcommand "$@"

check_subcommand 'create list delete'
set_gpu_xla_flags_option "$opt_gpu_xla_flags"

[[ -n $opt_cluster ]] || die "--cluster is required"
gflags=()
[[ -z $opt_project ]] || gflags+=(--project="$opt_project")
[[ -z $opt_zone ]] || gflags+=(--zone="$opt_zone")

if [[ $subcommand == list ]]; then
  run xpk workload list --cluster="$opt_cluster" "${gflags[@]}"
  exit 0
fi

[[ -n $opt_workload ]] || die "--workload is required for '$subcommand'"
if [[ ! $opt_workload =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || ((${#opt_workload} > 40)); then
  die "--workload=$opt_workload must be lower-case letters, digits and '-', start with a letter, end with a letter or digit, at most 40 characters"
fi

if [[ $subcommand == delete ]]; then
  run xpk workload delete --cluster="$opt_cluster" --workload="$opt_workload" "${gflags[@]}" --force
  exit 0
fi

# --- create ---------------------------------------------------------------------------------------
[[ -n $opt_config ]] || die "--config is required for 'create'"
[[ -n $opt_workdir ]] || die "--workdir is required for 'create'"
check_k8s_workdir "$opt_workdir" "$shared_mount"
if [[ -n $opt_tpu_type && -n $opt_device_type ]]; then
  die "--tpu_type and --device_type exclude each other (a TPU or a GPU workload)"
fi
[[ -n $opt_tpu_type || -n $opt_device_type ]] || die "--tpu_type (TPU) or --device_type (GPU) is required for 'create'"
[[ $opt_num_slices =~ ^[1-9][0-9]*$ ]] || die "--num_slices must be a positive integer"
[[ $opt_num_nodes =~ ^[1-9][0-9]*$ ]] || die "--num_nodes must be a positive integer"
[[ $opt_max_restarts =~ ^(0|[1-9][0-9]*)$ ]] || die "--max_restarts must be a non-negative integer"
[[ $opt_grace_period =~ ^[1-9][0-9]*$ ]] || die "--grace_period must be a positive number of seconds"
if [[ -n $opt_device_type ]]; then
  [[ $opt_device_type != v[0-9]* ]] || die "--device_type=$opt_device_type is a TPU: use --tpu_type=$opt_device_type"
  ((opt_num_slices == 1)) || die "--num_slices is for TPUs; GPU workloads take --num_nodes"
else
  ((opt_num_nodes == 1)) || die "--num_nodes is for GPUs; TPU workloads take --num_slices (hosts follow from --tpu_type)"
fi
case $opt_priority in
  '' | very-low | low | medium | high | very-high) ;;
  *) die "--priority must be one of very-low, low, medium, high, very-high" ;;
esac

gpu=0
variant=tpu
if [[ -n $opt_device_type ]]; then
  gpu=1
  variant=cuda13
fi
image=$opt_image
if [[ -z $image ]]; then
  [[ -n $opt_project ]] || die "--image is required (or --project, for the default image $(default_image PROJECT "$variant"))"
  image=$(default_image "$opt_project" "$variant")
fi

cmd=(xpk workload create --cluster="$opt_cluster" --workload="$opt_workload" "${gflags[@]}"
  --docker-image="$image")
env_args=''
if ((gpu)); then
  cmd+=(--device-type="$opt_device_type" --num-nodes="$opt_num_nodes")
  # In single quotes on purpose: the pod's shell expands xpk's variables.
  # shellcheck disable=SC2016
  env_args='--coordinator_address=${JAX_COORDINATOR_ADDRESS}:${JAX_COORDINATOR_PORT} --num_processes=${NNODES} --process_id=${NODE_RANK}'
  xla=$(gpu_xla_flags "${XLA_FLAGS:-}")
  [[ -z $xla ]] || cmd+=(--env=XLA_FLAGS="$xla")
else
  cmd+=(--tpu-type="$opt_tpu_type" --num-slices="$opt_num_slices")
fi
IFS=, read -r -a storages <<<"$opt_storage"
for s in "${storages[@]}"; do
  [[ -z $s ]] || cmd+=(--storage="$s")
done
[[ -z $opt_priority ]] || cmd+=(--priority="$opt_priority")
command_line=$(pod_command "$opt_config" "$opt_workdir" "$env_args" "${extra[@]}")
# xpk writes the command (and --env values) of GPU pods into double-quoted YAML strings.
for value in "$command_line" "${xla:-}"; do
  if [[ $value == *[\"\\]* ]]; then
    die "a double quote or backslash in the trainer command or XLA_FLAGS breaks xpk's manifest: $value"
  fi
done
cmd+=(--max-restarts="$opt_max_restarts" --termination-grace-period-seconds="$opt_grace_period"
  --command="$command_line")

if ((opt_num_slices > 1)); then
  printf '%s: note: %s slices: the config mesh needs a slice axis of size %s (--config.mesh.slice=%s)\n' \
    "$PROG" "$opt_num_slices" "$opt_num_slices" "$opt_num_slices" >&2
fi
run "${cmd[@]}"
