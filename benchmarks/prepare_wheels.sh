#!/usr/bin/env bash
# Downloads, into benchmarks/wheels/, the wheels that benchmarks/accelerator.sh installs on an
# accelerator machine that has JAX, Flax, Optax, Orbax, NumPy, Pillow, sentencepiece and
# tokenizers but reaches no package registry. Run it where pip reaches one:
#
#   benchmarks/prepare_wheels.sh [PYTHON_VERSION]     # default 3.12, the accelerator's Python
#
# The versions are requirements.txt's. Only what `rils_jax.benchmark_grid` imports beyond that
# preinstalled set is fetched (about 0.3 MB), so the folder travels with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
pin() { grep -i "^$1==" requirements.txt | cut -d' ' -f1; }
mkdir -p benchmarks/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d benchmarks/wheels "$(pin ml_collections)" "$(pin ftfy)" wcwidth==0.9.4
ls benchmarks/wheels
