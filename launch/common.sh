# shellcheck shell=bash
# Helpers shared by the launch scripts (tpu.sh, slurm.sh, slurm.sbatch, gpu_multinode.sh, xpk.sh,
# jobset.sh), which source this file. Before sourcing it a script sets PROG (its name in
# messages) and, after it, defines usage() (its --help text, which parse_options prints).

: "${PROG:?set PROG before sourcing launch/common.sh}"

die() {
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  printf "Run '%s --help' for the options.\n" "$PROG" >&2
  exit 2
}

# Quotes one word for a POSIX shell; words of only safe characters stay bare.
shq() {
  local s=$1
  if [[ -n $s && $s != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Quotes a command-line word, keeping `--option=` and `NAME=` outside the quotes for readability.
shq_arg() {
  if [[ $1 =~ ^(--[A-Za-z0-9_-]+=|[A-Za-z_][A-Za-z0-9_]*=)(.*)$ ]]; then
    printf '%s%s' "${BASH_REMATCH[1]}" "$(shq "${BASH_REMATCH[2]}")"
  else
    shq "$1"
  fi
}

# Quotes a command as one shell line (no newline), each word with shq_arg.
join_q() {
  local out='' a
  for a in "$@"; do
    out+=" $(shq_arg "$a")"
  done
  printf '%s' "${out# }"
}

# Prints a command as one shell-quoted line.
show() {
  join_q "$@"
  printf '\n'
}

# parse_options FLAGS OPTIONS POSITIONAL ARGS...: parses the command line ARGS, each option as
# --option=value or --option value, '-' and '_' the same in names:
#   FLAGS      space-separated options without a value, each NAME or NAME:VAR; --NAME sets the
#              variable VAR (default NAME) to 1.
#   OPTIONS    space-separated options with a value; --NAME=VALUE sets the variable opt_NAME.
#   POSITIONAL function called with each argument that is not an option ('' if there are none:
#              such an argument is an error).
# -h and --help print usage() and exit; the arguments after `--` go to the array `extra`.
# shellcheck disable=SC2034  # extra is the caller's.
parse_options() {
  local -a po_flags po_options
  read -r -a po_flags <<<"$1"
  read -r -a po_options <<<"$2"
  local po_positional=$3
  shift 3
  local po_arg po_key po_value po_has_value po_name
  while (($#)); do
    po_arg=$1
    shift
    case $po_arg in
      --) extra=("$@"); break ;;
      -h) usage; exit 0 ;;
      --*=*) po_key=${po_arg%%=*}; po_value=${po_arg#*=}; po_has_value=1 ;;
      --*) po_key=$po_arg; po_value=''; po_has_value=0 ;;
      *)
        [[ -n $po_positional ]] || die "unexpected argument: $po_arg (trainer arguments go after --)"
        "$po_positional" "$po_arg"
        continue
        ;;
    esac
    po_key=${po_key#--}
    po_key=${po_key//-/_}
    if [[ $po_key == help ]]; then
      usage
      exit 0
    fi
    for po_name in "${po_flags[@]}"; do
      if [[ $po_key == "${po_name%%:*}" ]]; then
        ((!po_has_value)) || die "--$po_key takes no value"
        printf -v "${po_name#*:}" 1
        continue 2
      fi
    done
    for po_name in "${po_options[@]}"; do
      if [[ $po_key == "$po_name" ]]; then
        if ((!po_has_value)); then
          [[ $# -gt 0 && $1 != --* ]] || die "--$po_key needs a value"
          po_value=$1
          shift
        fi
        printf -v "opt_$po_key" '%s' "$po_value"
        continue 2
      fi
    done
    die "unknown option: $po_arg"
  done
}

# --- GPU XLA flags --------------------------------------------------------------------------------
# XLA flags for GPU runs (slurm.sbatch, gpu_multinode.sh, and the GPU paths of xpk.sh and
# jobset.sh). Sources: JAX's "GPU performance tips" (docs/gpu_performance_tips.md) and MaxText's
# A3 (H100) scripts (src/maxtext/configs/gpu/a3/llama_2_7b/*.sh); launch/README.md says why each.
# The defaults in the comments are jaxlib 0.10.2's, and tests/test_launch.py checks that its XLA
# takes each of these values.
GPU_XLA_FLAGS=(
  --xla_gpu_enable_latency_hiding_scheduler=true   # overlap collectives with compute (default false)
  --xla_gpu_enable_triton_gemm=false               # cuBLAS matmuls, as MaxText's A3 runs (default true)
  --xla_gpu_enable_command_buffer=                 # no CUDA graphs (default: FUSION, CUBLAS, ...)
  --xla_gpu_all_reduce_combine_threshold_bytes=67108864      # 64 MiB (default about 30 MiB)
  --xla_gpu_all_gather_combine_threshold_bytes=134217728     # 128 MiB: FSDP weight all-gathers
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864  # 64 MiB: FSDP gradient reduce-scatters
  --xla_gpu_enable_pipelined_all_gather=true       # (default false)
  --xla_gpu_enable_pipelined_reduce_scatter=true   # (the default; set here so that it stays on)
  --xla_gpu_enable_pipelined_all_reduce=true       # (default false)
  --xla_gpu_enable_while_loop_double_buffering=true  # (default false)
)

# gpu_xla_flags USER_FLAGS: prints the XLA_FLAGS value of a GPU run: GPU_XLA_FLAGS followed by
# USER_FLAGS (the user's own XLA_FLAGS), leaving out each of ours whose name the user sets, so
# that the user's value wins. RILS_GPU_XLA_FLAGS=none leaves ours out altogether (then it prints
# USER_FLAGS alone); RILS_GPU_XLA_FLAGS=default (or unset) keeps them.
gpu_xla_flags() {
  local mode=${RILS_GPU_XLA_FLAGS:-default} flag word keep
  local -a user=() out=()
  read -r -a user <<<"$1"
  case $mode in
    default)
      for flag in "${GPU_XLA_FLAGS[@]}"; do
        keep=1
        for word in "${user[@]}"; do
          [[ ${word%%=*} != "${flag%%=*}" ]] || keep=0
        done
        ((!keep)) || out+=("$flag")
      done
      ;;
    none) ;;
    *) die "RILS_GPU_XLA_FLAGS=$mode must be 'default' or 'none'" ;;
  esac
  out+=("${user[@]}")
  printf '%s' "${out[*]}"
}

# set_gpu_xla_flags_option VALUE: applies a script's --gpu_xla_flags=default|none option.
set_gpu_xla_flags_option() {
  case ${RILS_GPU_XLA_FLAGS:-default} in  # Checked here, not first inside the allocation.
    default | none) ;;
    *) die "RILS_GPU_XLA_FLAGS=$RILS_GPU_XLA_FLAGS must be 'default' or 'none'" ;;
  esac
  case $1 in
    '') ;;
    default | none) export RILS_GPU_XLA_FLAGS=$1 ;;
    *) die "--gpu_xla_flags must be 'default' or 'none', got '$1'" ;;
  esac
}

# --- Subcommands and dry runs (tpu.sh, xpk.sh, jobset.sh) ---------------------------------------
# The scripts set `subcommand=''` and `dry_run`, and pass set_subcommand to parse_options.
# shellcheck disable=SC2154  # dry_run and subcommand are the calling script's.
# Runs a command, or only prints it with --dry_run.
run() {
  if ((dry_run)); then
    show "$@"
  else
    printf '+ %s\n' "$(show "$@")" >&2
    "$@"
  fi
}

# parse_options' handler for the one argument that is not an option: the subcommand.
set_subcommand() {
  [[ $1 != -* ]] || die "unknown option: $1"
  [[ -z $subcommand ]] || die "unexpected argument: $1 (trainer arguments go after --)"
  subcommand=$1
}

# check_subcommand 'A B C': the subcommand given must be one of these.
check_subcommand() {
  local list=${1// /, }
  [[ -n $subcommand ]] || die "missing SUBCOMMAND (one of $list)"
  [[ " $1 " == *" $subcommand "* ]] || die "unknown subcommand: $subcommand (one of $list)"
}

# --- Kubernetes (xpk.sh, jobset.sh) --------------------------------------------------------------
# The image that launch/Dockerfile builds, as launch/README.md pushes it to Artifact Registry.
default_image() {  # default_image PROJECT VARIANT (tpu or cuda13)
  printf 'us-docker.pkg.dev/%s/rils/rils-jax:%s' "$1" "$2"
}

# check_k8s_workdir WORKDIR SHARED_MOUNT: a GKE pod loses its disk when it is preempted or
# restarted, so the workdir must be a bucket (gs://...) unless the user says it is a mount that
# every pod shares (SHARED_MOUNT=1).
check_k8s_workdir() {
  if [[ $1 != gs://?* ]] && (($2 == 0)); then
    die "--workdir=$1 is not a gs:// bucket: on GKE a pod's disk is lost when it is restarted; use --workdir=gs://BUCKET/RUN, or pass --shared_mount if $1 is a volume that every pod mounts"
  fi
}

# The trainer command of a pod, as one shell line: launch/pod_run.sh (which turns a SIGTERM that
# ended in a saved checkpoint into exit 143, so that the JobSet restarts and the run resumes)
# running rils_jax.main; RAW (not quoted: it expands the pod's environment) goes before ARGS.
# pod_command CONFIG WORKDIR RAW ARGS...
pod_command() {
  local line
  line="exec $(join_q launch/pod_run.sh python -m rils_jax.main --config="$1" --workdir="$2" \
    --distributed=on)"
  [[ -z $3 ]] || line+=" $3"
  shift 3
  (($# == 0)) || line+=" $(join_q "$@")"
  printf '%s' "$line"
}
