"""XLA:CPU flags that rils_jax adds to `XLA_FLAGS` on request (`RILS_CPU_XLA_FLAGS=onednn` or
`ynn`), before JAX starts a backend.

`onednn` (`CPU_XLA_FLAGS`). Why: on x86 CPUs the float32 matmuls of this jaxlib's default
(YNNPACK, or Eigen without it) run at about 55-85% of PyTorch's MKL on the ViT-B/16 shapes;
oneDNN's, one dot at a time, match it (benchmarks/cpu_vs_pytorch.py has the measurements and
the command). Only whole dots go to oneDNN (`individual_dot`): its `dot` fusion type also takes
neighbouring elementwise ops and then fails at run time on the RILS loss ("partition compile
failed", jaxlib 0.10.2).

Opt-in, not a default: oneDNN is an experimental path of XLA:CPU (its wider fusion fails on
this very step), and the gain measured here is within what a shared 2-core machine's noise
allows; the test suite runs XLA's default path.

`ynn` (`YNN_XLA_FLAGS`): YNNPACK keeps only dots and reductions, and XLA's loop fusions take the
elementwise ops. The ViT-B/16 RILS step at batch 8 ran at 1.032, 1.077 and 0.973 of its
PyTorch twin's speed so on an AVX-512 CPU, against 0.70-1.00 on XLA's default path in the same
hour; with the later conditional NaN guard its own step (8.25 / 8.02 s) was no faster than the
default path's (8.10 / 7.97 s) (README, "Speed"). Opt-in: no gain that holds, measured on one
CPU, and it changes float32 rounding (every result of the default run moves with it).

`apply_defaults` runs when `rils_jax` is imported (rils_jax/__init__.py), which is before any
JAX backend starts in the entry points. With `RILS_CPU_XLA_FLAGS=onednn` or `ynn` it adds each
flag of that mode whose name is not already in `XLA_FLAGS` (the user's value wins flag by flag),
and nothing at all when:
- `RILS_CPU_XLA_FLAGS` is unset or `none` (the default);
- the process may run on an accelerator: `JAX_PLATFORMS` names another platform than cpu, or
  it is unset and a GPU / TPU plugin is installed (libtpu, a `jax_plugins` entry point). XLA
  aborts on a flag name it does not know, and a TPU's libtpu is built from another XLA than
  jaxlib's;
- jaxlib is not a version these flags were measured on (`MEASURED_JAXLIB`), for the same
  reason and because another version's defaults need measuring again;
- a JAX backend has already started: XLA has read `XLA_FLAGS` already.
"""

import importlib.metadata
import importlib.util
import os
import sys
from typing import MutableMapping, Optional, Tuple

ENV = 'RILS_CPU_XLA_FLAGS'
CPU_XLA_FLAGS = (
    '--xla_cpu_use_onednn=true',
    '--xla_cpu_experimental_onednn_fusion_type=individual_dot',
)
# YNNPACK (this jaxlib's default for dots) keeps the dots and reductions; the elementwise ops it
# would also take go to XLA's own loop fusions, where the optimizer update fuses into fewer
# passes over the parameters (`benchmarks/cpu_vs_pytorch.py`: README, "Speed").
YNN_XLA_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=dot,reduce',)
MODES = {'none': (), 'onednn': CPU_XLA_FLAGS, 'ynn': YNN_XLA_FLAGS}
# (major, minor) of the jaxlib releases the flags of MODES were measured on.
MEASURED_JAXLIB = ((0, 10),)


def flag_name(flag: str) -> str:
  """'--xla_foo=1' -> '--xla_foo'."""
  return flag.split('=', 1)[0]


def missing(xla_flags: str, defaults: Tuple[str, ...] = CPU_XLA_FLAGS) -> Tuple[str, ...]:
  """The flags of `defaults` whose name `xla_flags` (an `XLA_FLAGS` value) does not set."""
  named = {flag_name(word) for word in xla_flags.split()}
  return tuple(flag for flag in defaults if flag_name(flag) not in named)


def _jaxlib_version() -> Optional[Tuple[int, int]]:
  try:
    major, minor = importlib.metadata.version('jaxlib').split('.')[:2]
    return int(major), int(minor)
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return None


def _accelerator_plugins() -> bool:
  if importlib.util.find_spec('libtpu') is not None:
    return True
  return bool(list(importlib.metadata.entry_points(group='jax_plugins')))


def _backend_started() -> bool:
  bridge = sys.modules.get('jax._src.xla_bridge')  # Not imported yet: nothing has started.
  return bridge is not None and bridge.backends_are_initialized()


def cpu_only(environ: MutableMapping[str, str]) -> bool:
  """Whether this process runs JAX on the CPU only (see the module docstring)."""
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms:
    return {p.strip() for p in platforms.split(',') if p.strip()} == {'cpu'}
  return not _accelerator_plugins()


def apply_defaults(environ: Optional[MutableMapping[str, str]] = None) -> Tuple[str, ...]:
  """Adds the flags of the `RILS_CPU_XLA_FLAGS` mode (`MODES`: `CPU_XLA_FLAGS` for 'onednn',
  `YNN_XLA_FLAGS` for 'ynn') to `environ['XLA_FLAGS']` (default `os.environ`) where the module
  docstring says so.

  Returns:
    The flags added (empty when none).

  Raises:
    ValueError: when `RILS_CPU_XLA_FLAGS` is not one of `MODES`.
  """
  environ = os.environ if environ is None else environ
  mode = environ.get(ENV, 'none') or 'none'
  if mode not in MODES:
    raise ValueError(f"{ENV}={mode} must be one of {', '.join(MODES)}")
  if (mode == 'none' or _jaxlib_version() not in MEASURED_JAXLIB or not cpu_only(environ)
      or _backend_started()):
    return ()
  current = environ.get('XLA_FLAGS', '')
  added = missing(current, MODES[mode])
  if added:
    environ['XLA_FLAGS'] = ' '.join((current.strip(),) + added).strip()
  return added
