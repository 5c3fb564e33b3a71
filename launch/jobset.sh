#!/usr/bin/env bash
# Writes a JobSet manifest that runs rils_jax on GKE without xpk (TPU slices or GPU nodes) and
# applies it with kubectl. Run `launch/jobset.sh --help` for the options; `--dry_run` prints the
# kubectl command with the manifest only.
set -euo pipefail

readonly PROG=launch/jobset.sh
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

readonly REPLICATED_JOB=trainer  # The replicated Job's name: pods are NAME-trainer-J-I.NAME.
readonly CONTAINER=trainer

usage() {
  cat <<'EOF'
Usage: launch/jobset.sh SUBCOMMAND --name=NAME (--tpu_type=TYPE | --gpu_type=TYPE) --config=CONFIG
                        --workdir=gs://BUCKET/RUN [options] [-- extra trainer args]

Makes a JobSet (jobset.x-k8s.io/v1alpha2; the JobSet controller must be installed in the
cluster) that runs the trainer on GKE, one pod per TPU VM host or GPU node, in the image of
launch/Dockerfile; every pod runs
  exec launch/pod_run.sh python -m rils_jax.main --config=CONFIG --workdir=WORKDIR --distributed=on ARGS...
- TPU (--tpu_type): one replicated Job per slice (--num_slices), parallelism = completions =
  the slice's hosts (Indexed), a nodeSelector on cloud.google.com/gke-tpu-accelerator and
  cloud.google.com/gke-tpu-topology, google.com/tpu limits of the chips per host.
  jax.distributed.initialize() reads the hosts from what GKE sets in TPU pods
  (TPU_WORKER_HOSTNAMES, TPU_WORKER_ID; MEGASCALE_* for several slices).
- GPU (--gpu_type): one Job of --num_nodes pods, nvidia.com/gpu limits of --gpus_per_node. The
  command adds --coordinator_address=NAME-trainer-0-0.NAME:PORT (pod 0, by the JobSet's headless
  service: network.enableDNSHostnames), --num_processes=N and
  --process_id=${JOB_COMPLETION_INDEX}; XLA_FLAGS holds the GPU XLA flags of launch/common.sh.
Preemption: SIGTERM makes the trainer save a checkpoint (within terminationGracePeriodSeconds,
--grace_period) and launch/pod_run.sh exit 143; that exit, or a pod evicted (DisruptionTarget),
fails the Job by its podFailurePolicy, and the JobSet recreates all pods (restartStrategy
BlockingRecreate) without counting it against --max_restarts; the new pods resume from the
checkpoint in WORKDIR. Other failures restart it up to --max_restarts times.

Subcommands:
  manifest  print the manifest (or, with --out, write it to FILE)
  create    kubectl apply -f the manifest (--out: keep it in FILE)
  delete    kubectl delete jobset NAME
  logs      follow the log of pod 0 (kubectl logs -f)

Options (each as --option=value or --option value; '-' and '_' are the same in names):
  --name=NAME           JobSet name: lower-case letters, digits and '-', at most 40 (required).
                                                               e.g. --name=vitb16-v5e
  --tpu_type=TYPE       TPU slice type: v4-N, v5p-N (N TensorCores), v5litepod-N or v6e-N
                        (N chips).                             e.g. --tpu_type=v5litepod-256
  --num_slices=K        TPU slices (default 1); K > 1 needs a `slice` mesh axis of size K in the
                        config: pass `-- --config.mesh.slice=K`.  e.g. --num_slices=2
  --gpu_type=TYPE       GKE GPU type (the node label cloud.google.com/gke-accelerator).
                                                               e.g. --gpu_type=nvidia-h100-80gb
  --num_nodes=N         GPU nodes (default 1).                 e.g. --num_nodes=2
  --gpus_per_node=G     GPUs of each node, all used by its pod (default 8).  e.g. --gpus_per_node=8
  --coordinator_port=P  GPU: the coordinator's port on pod 0 (default 12345). e.g. --coordinator_port=6002
  --config=CONFIG       config file[:argument], relative to the image's /app (required).
                                           e.g. --config=configs/vit_b16.py:platform=tpu_v5e_256
  --workdir=WORKDIR     output directory: a gs:// bucket path that every pod writes and that
                        outlives the pods (required).          e.g. --workdir=gs://my-bucket/run1
  --shared_mount        accept a --workdir that is not gs://: a path on a volume that every pod
                        mounts (see --pvc).                    e.g. --shared_mount
  --pvc=CLAIM:PATH      mount the PersistentVolumeClaim CLAIM (Filestore, GCS FUSE, ...) at PATH
                        in every pod.                          e.g. --pvc=rils-filestore:/mnt/shared
  --image=IMAGE         container image built from launch/Dockerfile (default, from --project:
                        us-docker.pkg.dev/PROJECT/rils/rils-jax:tpu for TPUs and
                        us-docker.pkg.dev/PROJECT/rils/rils-jax:cuda13 for GPUs).
                                           e.g. --image=us-docker.pkg.dev/my-proj/rils/rils-jax:tpu
  --project=PROJECT     Cloud project of the default --image.  e.g. --project=my-proj
  --namespace=NS        Kubernetes namespace (default: kubectl's).  e.g. --namespace=ml
  --queue=QUEUE         Kueue LocalQueue: the label kueue.x-k8s.io/queue-name.  e.g. --queue=lq
  --service_account=SA  Kubernetes service account of the pods, e.g. one bound by Workload
                        Identity to a Google service account that can write the bucket.
                                                               e.g. --service_account=rils-trainer
  --max_restarts=N      JobSet restarts after failures other than preemption (default 10).
                                                               e.g. --max_restarts=3
  --grace_period=S      seconds a pod has after SIGTERM to finish the step and save the
                        checkpoint (terminationGracePeriodSeconds, default 600).  e.g. --grace_period=900
  --gpu_xla_flags=MODE  default: set the GPU XLA flags (your XLA_FLAGS entries win, flag by
                        flag); none: only your XLA_FLAGS. Same as RILS_GPU_XLA_FLAGS=MODE.
                                                               e.g. --gpu_xla_flags=none
  --out=FILE            manifest: write it to FILE instead of printing it; create: keep the
                        applied manifest in FILE.              e.g. --out=vitb16-v5e.yaml
  --dry_run             create/delete/logs: print the kubectl command (create: with the manifest
                        as a here-document) instead of running it.
  -h, --help            print this help.
  -- ARGS...            passed to rils_jax.main.               e.g. -- --config.total_steps=1000

Examples:
  # v5e-256 (the tpu_v5e_256 preset) through Kueue:
  launch/jobset.sh create --name=vitb16-v5e --tpu_type=v5litepod-256 --project=my-proj \
      --queue=lq --service_account=rils-trainer \
      --config=configs/vit_b16.py:platform=tpu_v5e_256 --workdir=gs://my-bucket/vitb16-v5e --dry_run
  # 2 nodes x 8 H100 (the gpu_2x8xh100 preset), manifest written to a file:
  launch/jobset.sh manifest --name=vitb16-h100 --gpu_type=nvidia-h100-80gb --num_nodes=2 \
      --project=my-proj --config=configs/vit_b16.py:platform=gpu_2x8xh100 \
      --workdir=gs://my-bucket/vitb16-h100 --out=vitb16-h100.yaml
  launch/jobset.sh logs --name=vitb16-v5e
  launch/jobset.sh delete --name=vitb16-v5e

Prerequisites: kubectl with the cluster's credentials (gcloud container clusters
get-credentials), the JobSet controller (v0.7 or later) in the cluster, TPU or GPU node pools of
the requested shape, the image pushed to Artifact Registry (launch/README.md), and a bucket the
pods can write (Workload Identity: --service_account).
EOF
}

# A YAML double-quoted scalar (JSON string rules; a value with a newline is refused).
yaml_q() {
  local s=$1
  [[ $s != *$'\n'* && $s != *$'\r'* ]] || die "a value with a line break cannot go into the manifest: $s"
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\t'/\\t}
  printf '"%s"' "$s"
}

# tpu_shape TYPE: sets tpu_accelerator (GKE's cloud.google.com/gke-tpu-accelerator), tpu_topology,
# tpu_hosts (pods per slice) and tpu_chips (google.com/tpu per pod), or dies for an unknown type.
tpu_shape() {
  local family=${1%-*} n=${1##*-} chips
  [[ $1 == *-* && $n =~ ^[1-9][0-9]*$ ]] || die "--tpu_type=$1 is not TYPE-N (v4-32, v5p-128, v5litepod-256, v6e-256)"
  case $family in
    v4 | v5p)
      [[ $family == v4 ]] && tpu_accelerator=tpu-v4-podslice || tpu_accelerator=tpu-v5p-slice
      chips=$((n / 2))
      case $chips in
        4) tpu_topology=2x2x1 ;; 8) tpu_topology=2x2x2 ;; 16) tpu_topology=2x2x4 ;;
        32) tpu_topology=2x4x4 ;; 64) tpu_topology=4x4x4 ;; 128) tpu_topology=4x4x8 ;;
        256) tpu_topology=4x8x8 ;; 512) tpu_topology=8x8x8 ;; 1024) tpu_topology=8x8x16 ;;
        2048) tpu_topology=8x16x16 ;; 4096) tpu_topology=16x16x16 ;;
        *) die "--tpu_type=$1: no slice of $chips chips; $family-N takes N = 8, 16, 32, ... 8192 TensorCores" ;;
      esac
      tpu_chips=4
      tpu_hosts=$((chips / 4))
      ;;
    v5litepod | v6e)
      [[ $family == v5litepod ]] && tpu_accelerator=tpu-v5-lite-podslice || tpu_accelerator=tpu-v6e-slice
      case $n in
        1) tpu_topology=1x1 ;; 4) tpu_topology=2x2 ;; 8) tpu_topology=2x4 ;; 16) tpu_topology=4x4 ;;
        32) tpu_topology=4x8 ;; 64) tpu_topology=8x8 ;; 128) tpu_topology=8x16 ;; 256) tpu_topology=16x16 ;;
        *) die "--tpu_type=$1: $family-N takes N = 1, 4, 8, 16, 32, 64, 128 or 256 chips" ;;
      esac
      if ((n <= 8)); then
        tpu_chips=$n tpu_hosts=1
      else
        tpu_chips=4 tpu_hosts=$((n / 4))
      fi
      ;;
    *) die "--tpu_type=$1: unknown TPU family $family (v4, v5p, v5litepod, v6e)" ;;
  esac
}

subcommand=''
opt_name='' opt_tpu_type='' opt_num_slices=1 opt_gpu_type='' opt_num_nodes=1 opt_gpus_per_node=8
opt_coordinator_port=12345 opt_config='' opt_workdir='' opt_pvc='' opt_image='' opt_project=''
opt_namespace='' opt_queue='' opt_service_account='' opt_max_restarts=10 opt_grace_period=600
opt_gpu_xla_flags='' opt_out=''
shared_mount=0 dry_run=0
extra=()


parse_options 'dry_run shared_mount' \
  'name tpu_type num_slices gpu_type num_nodes gpus_per_node coordinator_port config workdir pvc image project namespace queue service_account max_restarts grace_period gpu_xla_flags out' \
  set_subcommand "$@"

check_subcommand 'manifest create delete logs'
set_gpu_xla_flags_option "$opt_gpu_xla_flags"

[[ -n $opt_name ]] || die "--name is required"
if [[ ! $opt_name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || ((${#opt_name} > 40)); then
  die "--name=$opt_name must be lower-case letters, digits and '-', start with a letter, end with a letter or digit, at most 40 characters (pod host names are NAME-trainer-J-I)"
fi
kflags=()
[[ -z $opt_namespace ]] || kflags+=(--namespace="$opt_namespace")

case $subcommand in
  delete)
    run kubectl delete jobset "$opt_name" "${kflags[@]}"
    exit 0
    ;;
  logs)
    run kubectl logs -f --tail=100 "${kflags[@]}" \
      -l "jobset.sigs.k8s.io/jobset-name=$opt_name,jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0"
    exit 0
    ;;
esac

# --- The manifest -------------------------------------------------------------------------------
[[ -n $opt_config ]] || die "--config is required for '$subcommand'"
[[ -n $opt_workdir ]] || die "--workdir is required for '$subcommand'"
check_k8s_workdir "$opt_workdir" "$shared_mount"
if [[ -n $opt_tpu_type && -n $opt_gpu_type ]]; then
  die "--tpu_type and --gpu_type exclude each other (a TPU or a GPU JobSet)"
fi
[[ -n $opt_tpu_type || -n $opt_gpu_type ]] || die "--tpu_type (TPU) or --gpu_type (GPU) is required for '$subcommand'"
for o in num_slices num_nodes gpus_per_node grace_period; do
  v=opt_$o
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--$o must be a positive integer"
done
[[ $opt_max_restarts =~ ^(0|[1-9][0-9]*)$ ]] || die "--max_restarts must be a non-negative integer"
if [[ ! $opt_coordinator_port =~ ^[1-9][0-9]{0,4}$ ]] || ((opt_coordinator_port > 65535)); then
  die "--coordinator_port must be a TCP port number"
fi
if [[ -n $opt_pvc && ! $opt_pvc =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?:/.+$ ]]; then
  die "--pvc=$opt_pvc must be CLAIM:/MOUNT/PATH"
fi
if [[ -n $opt_queue && ! $opt_queue =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$ ]]; then
  die "--queue=$opt_queue is not a Kubernetes name"
fi

gpu=0
variant=tpu
if [[ -n $opt_gpu_type ]]; then
  gpu=1
  variant=cuda13
  ((opt_num_slices == 1)) || die "--num_slices is for TPUs; GPU JobSets take --num_nodes"
  [[ $opt_gpu_type =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$ ]] || die "--gpu_type=$opt_gpu_type is not a GKE accelerator name (e.g. nvidia-h100-80gb)"
else
  ((opt_num_nodes == 1)) || die "--num_nodes is for GPUs; TPU JobSets take --num_slices (hosts follow from --tpu_type)"
  tpu_shape "$opt_tpu_type"
fi
image=$opt_image
if [[ -z $image ]]; then
  [[ -n $opt_project ]] || die "--image is required (or --project, for the default image $(default_image PROJECT "$variant"))"
  image=$(default_image "$opt_project" "$variant")
fi

coordinator=$opt_name-$REPLICATED_JOB-0-0.$opt_name:$opt_coordinator_port
env_args=''
if ((gpu)); then
  # shellcheck disable=SC2016  # The pod's shell expands it.
  env_args="--coordinator_address=$coordinator --num_processes=$opt_num_nodes --process_id="'${JOB_COMPLETION_INDEX}'
  hosts=$opt_num_nodes replicas=1
  xla=$(gpu_xla_flags "${XLA_FLAGS:-}")
else
  hosts=$tpu_hosts replicas=$opt_num_slices
fi
command_line=$(pod_command "$opt_config" "$opt_workdir" "$env_args" "${extra[@]}")

manifest() {
  printf '%s\n' \
    '# Made by launch/jobset.sh; see launch/README.md.' \
    'apiVersion: jobset.x-k8s.io/v1alpha2' \
    'kind: JobSet' \
    'metadata:' \
    "  name: $opt_name"
  [[ -z $opt_namespace ]] || printf '  namespace: %s\n' "$(yaml_q "$opt_namespace")"
  [[ -z $opt_queue ]] || printf '  labels:\n    kueue.x-k8s.io/queue-name: %s\n' "$opt_queue"
  if ((!gpu)); then
    printf '%s\n' '  annotations:' \
      '    # Each slice (a replicated Job) on its own TPU node pool.' \
      '    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool'
  fi
  printf '%s\n' \
    'spec:' \
    '  network:' \
    "    enableDNSHostnames: true  # Pods reachable as NAME-$REPLICATED_JOB-J-I.NAME." \
    '  failurePolicy:' \
    "    maxRestarts: $opt_max_restarts" \
    '    restartStrategy: BlockingRecreate  # All old pods gone before the new ones start.' \
    '    rules:' \
    '    # A preempted pod (exit 143 after saving, or evicted) restarts the JobSet without counting.' \
    '    - name: preempted' \
    '      action: RestartJobSetAndIgnoreMaxRestarts' \
    '      onJobFailureReasons:' \
    '      - PodFailurePolicy' \
    '  replicatedJobs:' \
    "  - name: $REPLICATED_JOB" \
    "    replicas: $replicas" \
    '    template:' \
    '      spec:' \
    "        parallelism: $hosts" \
    "        completions: $hosts" \
    '        completionMode: Indexed' \
    '        backoffLimit: 0' \
    '        podFailurePolicy:' \
    '          rules:' \
    '          - action: FailJob' \
    '            onExitCodes:' \
    "              containerName: $CONTAINER" \
    '              operator: In' \
    '              values: [143]' \
    '          - action: FailJob' \
    '            onPodConditions:' \
    '            - type: DisruptionTarget' \
    '        template:' \
    '          spec:' \
    '            restartPolicy: Never' \
    "            terminationGracePeriodSeconds: $opt_grace_period"
  [[ -z $opt_service_account ]] || printf '            serviceAccountName: %s\n' "$(yaml_q "$opt_service_account")"
  if ((gpu)); then
    printf '%s\n' \
      '            nodeSelector:' \
      "              cloud.google.com/gke-accelerator: $opt_gpu_type" \
      '            tolerations:' \
      '            - key: nvidia.com/gpu' \
      '              operator: Exists' \
      '              effect: NoSchedule'
  else
    printf '%s\n' \
      '            hostNetwork: true' \
      '            dnsPolicy: ClusterFirstWithHostNet' \
      '            nodeSelector:' \
      "              cloud.google.com/gke-tpu-accelerator: $tpu_accelerator" \
      "              cloud.google.com/gke-tpu-topology: $tpu_topology" \
      '            tolerations:' \
      '            - key: google.com/tpu' \
      '              operator: Exists' \
      '              effect: NoSchedule'
  fi
  printf '%s\n' \
    '            containers:' \
    "            - name: $CONTAINER" \
    "              image: $(yaml_q "$image")" \
    '              command:' \
    '              - bash' \
    '              - -c' \
    "              - $(yaml_q "$command_line")"
  if ((gpu)) && [[ -n $xla ]]; then
    printf '%s\n' \
      '              env:' \
      '              - name: XLA_FLAGS' \
      "                value: $(yaml_q "$xla")"
  fi
  printf '%s\n' \
    '              resources:' \
    '                limits:'
  if ((gpu)); then
    printf '                  nvidia.com/gpu: %s\n' "$opt_gpus_per_node"
  else
    printf '                  google.com/tpu: %s\n' "$tpu_chips"
  fi
  printf '%s\n' \
    '              volumeMounts:' \
    '              - name: dshm  # Shared memory for the input pipeline workers.' \
    '                mountPath: /dev/shm'
  [[ -z $opt_pvc ]] || printf '              - name: shared\n                mountPath: %s\n' "$(yaml_q "${opt_pvc#*:}")"
  printf '%s\n' \
    '            volumes:' \
    '            - name: dshm' \
    '              emptyDir:' \
    '                medium: Memory'
  [[ -z $opt_pvc ]] || printf '            - name: shared\n              persistentVolumeClaim:\n                claimName: %s\n' "${opt_pvc%%:*}"
}

if ((opt_num_slices > 1)); then
  printf '%s: note: %s slices: the config mesh needs a slice axis of size %s (--config.mesh.slice=%s)\n' \
    "$PROG" "$opt_num_slices" "$opt_num_slices" "$opt_num_slices" >&2
fi

if [[ $subcommand == manifest ]]; then
  if [[ -n $opt_out ]]; then
    manifest >"$opt_out"
    printf '%s: wrote %s; apply it with: kubectl apply -f %s\n' "$PROG" "$opt_out" "$(shq "$opt_out")" >&2
  else
    manifest
  fi
  exit 0
fi

# create
if ((dry_run)); then
  [[ -z $opt_out ]] || manifest >"$opt_out"
  printf '%s <<%s\n' "$(show kubectl apply "${kflags[@]}" -f -)" "'EOF'"
  manifest
  printf 'EOF\n'
  exit 0
fi
file=$opt_out
if [[ -z $file ]]; then
  file=$(mktemp "${TMPDIR:-/tmp}/rils_jobset_XXXXXX.yaml")
  trap 'rm -f "$file"' EXIT
fi
manifest >"$file"
run kubectl apply "${kflags[@]}" -f "$file"
printf '%s: submitted JobSet %s; follow it with: %s logs --name=%s\n' "$PROG" "$opt_name" "$PROG" "$opt_name" >&2
