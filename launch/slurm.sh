#!/usr/bin/env bash
# Submits launch/slurm.sbatch: rils_jax on N nodes x G GPUs of a SLURM cluster, one process per GPU.
# Run `launch/slurm.sh --help` for the options; `--dry_run` prints the commands without running them.
set -euo pipefail

readonly PROG=launch/slurm.sh
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh --config=CONFIG --workdir=WORKDIR [--nodes=N] [--gpus_per_node=G]
                       [--partition=P] [--time=HH:MM:SS] [--account=A] [--venv=PATH]
                       [--job_name=NAME] [--gpu_xla_flags=MODE] [--dry_run] [-- extra trainer args]

Submits launch/slurm.sbatch with
  sbatch --nodes=N --ntasks-per-node=G --gpus-per-node=G ...
(one process per GPU: JAX's SLURM detection gives each process the GPU of its SLURM_LOCALID),
exporting RILS_CONFIG, RILS_WORKDIR and RILS_PYTHON to it; the batch script then runs
  env XLA_FLAGS=... srun --kill-on-bad-exit=1 VENV/bin/python -m rils_jax.main --config=CONFIG --workdir=WORKDIR --distributed=on ARGS...
in this checkout (sbatch --chdir), which every node must see at the same path. XLA_FLAGS holds the
GPU XLA flags of launch/common.sh (launch/README.md says which and why), then your XLA_FLAGS
(sbatch --export=ALL passes it on), whose entries replace ours of the same name.

Options (each as --option=value or --option value; '-' and '_' are the same in names):
  --config=CONFIG       config file[:argument] (required).
                                  e.g. --config=configs/vit_b16.py:platform=gpu_2x8xh100,data=shared
  --workdir=WORKDIR     output directory that every node sees: a shared filesystem path or a
                        gs:// bucket path (required).   e.g. --workdir=/shared/runs/run1
  --nodes=N             number of nodes (default 1).                e.g. --nodes=2
  --gpus_per_node=G     GPUs, and so processes, per node (default 8). e.g. --gpus_per_node=8
  --partition=P         SLURM partition (default: the cluster's).   e.g. --partition=gpu
  --time=HH:MM:SS       time limit (default: the partition's).      e.g. --time=48:00:00
  --account=A           account to charge (default: yours).         e.g. --account=my-lab
  --venv=PATH           virtual environment with the requirements, on the shared filesystem
                        (default: .venv of this checkout).          e.g. --venv=/shared/venvs/rils
  --job_name=NAME       SLURM job name (default rils_jax).          e.g. --job_name=vitb16-run1
  --gpu_xla_flags=MODE  default: set the GPU XLA flags (your XLA_FLAGS entries win, flag by
                        flag); none: only your XLA_FLAGS. Same as RILS_GPU_XLA_FLAGS=MODE.
                                                                    e.g. --gpu_xla_flags=none
  --dry_run             print the sbatch command and the srun command of the batch script,
                        one a line, and submit nothing.
  -h, --help            print this help.
  -- ARGS...            passed to rils_jax.main.                    e.g. -- --config.total_steps=1000

Platform presets of the configs (`CONFIG:platform=PRESET`):
  gpu_8xh100     --nodes=1 --gpus_per_node=8
  gpu_2x8xh100   --nodes=2 --gpus_per_node=8

Example (2 nodes x 8 H100):
  launch/slurm.sh --nodes=2 --gpus_per_node=8 --partition=gpu --time=24:00:00 \
      --config=configs/vit_b16.py:platform=gpu_2x8xh100,data=shared --workdir=/shared/runs/run1 --dry_run

Prerequisites: a SLURM cluster with GPUs and a filesystem shared by all nodes holding this
checkout, its venv (python3 -m venv .venv && .venv/bin/pip install -r requirements.txt
"jax[cuda13]==0.10.2") and the workdir. Job output goes to slurm-JOBID.out in the checkout.
EOF
}

opt_config='' opt_workdir='' opt_nodes=1 opt_gpus_per_node=8 opt_partition='' opt_time=''
opt_account='' opt_venv=$REPO_ROOT/.venv opt_job_name=rils_jax opt_gpu_xla_flags=''
dry_run=0
extra=()

parse_options dry_run \
  'config workdir nodes gpus_per_node partition time account venv job_name gpu_xla_flags' '' "$@"
set_gpu_xla_flags_option "$opt_gpu_xla_flags"

[[ -n $opt_config ]] || die "--config is required"
[[ -n $opt_workdir ]] || die "--workdir is required"
[[ $opt_nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer"
[[ $opt_gpus_per_node =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node must be a positive integer"
[[ -n $opt_venv ]] || die "--venv must not be empty"

python=${opt_venv%/}/bin/python
sbatch_cmd=(env RILS_CONFIG="$opt_config" RILS_WORKDIR="$opt_workdir" RILS_PYTHON="$python")
[[ -z $opt_gpu_xla_flags ]] || sbatch_cmd+=(RILS_GPU_XLA_FLAGS="$opt_gpu_xla_flags")
sbatch_cmd+=(sbatch --export=ALL --job-name="$opt_job_name" --nodes="$opt_nodes"
  --ntasks-per-node="$opt_gpus_per_node" --gpus-per-node="$opt_gpus_per_node")
[[ -z $opt_partition ]] || sbatch_cmd+=(--partition="$opt_partition")
[[ -z $opt_time ]] || sbatch_cmd+=(--time="$opt_time")
[[ -z $opt_account ]] || sbatch_cmd+=(--account="$opt_account")
sbatch_cmd+=(--chdir="$REPO_ROOT" "$REPO_ROOT/launch/slurm.sbatch")
((${#extra[@]} == 0)) || sbatch_cmd+=(-- "${extra[@]}")

if ((dry_run)); then
  show "${sbatch_cmd[@]}"
  # The srun command, as the batch script itself prints it in its dry-run mode.
  RILS_CONFIG=$opt_config RILS_WORKDIR=$opt_workdir RILS_PYTHON=$python \
    bash "$REPO_ROOT/launch/slurm.sbatch" --dry_run -- "${extra[@]}"
  exit 0
fi
if [[ ! -x $python ]]; then
  printf '%s: warning: %s is not here; the nodes must have it\n' "$PROG" "$python" >&2
fi
printf '+ %s\n' "$(show "${sbatch_cmd[@]}")" >&2
exec "${sbatch_cmd[@]}"
