# shellcheck shell=bash
# Helpers shared by the launch scripts (tpu.sh, slurm.sh, slurm.sbatch, gpu_multinode.sh), which
# source this file. Before sourcing it a script sets PROG (its name in messages) and, after it,
# defines usage() (its --help text, which parse_options prints).

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
