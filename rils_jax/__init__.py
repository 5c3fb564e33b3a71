"""rils_jax: RILS (masked visual Reconstruction In Language semantic Space) pre-training, JAX/Flax.

Method: Yang et al., "RILS: Masked Visual Reconstruction in Language Semantic Space", CVPR 2023
(arXiv:2301.06958). See README.md for the entry points.
"""

# Before any JAX backend starts: XLA reads XLA_FLAGS once (see rils_jax/xla_cpu.py), and
# glibc's malloc is best tuned before XLA's threads make their own arenas (rils_jax/allocator.py).
import os as _os
import sys as _sys

from rils_jax import allocator as _allocator
from rils_jax import xla_cpu as _xla_cpu

try:
  _xla_cpu.apply_defaults()
except ValueError as _e:  # A mistyped environment variable: say so, change nothing.
  _sys.stderr.write(f'warning: {_e}; no XLA:CPU flags added\n')

try:
  _allocator.keep_freed_memory(_xla_cpu.cpu_only(_os.environ))
except ValueError as _e:
  _sys.stderr.write(f'warning: {_e}; glibc\'s malloc left as it is\n')
