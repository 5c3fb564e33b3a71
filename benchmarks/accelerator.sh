#!/usr/bin/env bash
# The accelerator benchmark: ViT-B/16 in bfloat16, `rils` and `clip`, every attention
# implementation and remat policy, each at the largest batch that fits, as one table
# (rils_jax/benchmark_grid.py says what each column is). Ends within 8 minutes on one H200.
#
#   benchmarks/prepare_wheels.sh       # once, where pip reaches a registry
#   benchmarks/accelerator.sh          # on the accelerator machine, from anywhere
#   benchmarks/accelerator.sh --config.model.scan_layers=true --kinds=rils --out=/tmp/b.jsonl
#
# Flags after the script's name are rils_jax.benchmark_grid's and override its defaults (e.g.
# another --config). The machine needs JAX for its accelerator; what
# else the benchmark imports and the machine lacks is installed from benchmarks/wheels/ into a
# temporary folder (nothing is installed system-wide).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
needs='import ml_collections, ftfy, flax, optax, jax'
if ! "$python" -c "$needs" 2>/dev/null; then
  if ! ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    echo "error: $python lacks the benchmark's packages and benchmarks/wheels/ holds no wheels:" \
         "run benchmarks/prepare_wheels.sh where pip reaches a registry, then copy the folder" >&2
    exit 2
  fi
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    benchmarks/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  if ! missing=$("$python" -c "$needs" 2>&1); then
    echo "error: still missing after installing benchmarks/wheels/: ${missing##*$'\n'}" >&2
    exit 2
  fi
fi
# The batch search fills the device; JAX's default pool is 75% of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
# A second --config would redefine the first one's override flags: the default goes only when
# the command line names none.
config=--config=configs/vit_b16.py:dtype=bfloat16
for arg in "$@"; do
  case $arg in --config=*|--config) config= ;; esac
done
"$python" -m rils_jax.benchmark_grid ${config:+"$config"} --budget_s=420 "$@"
