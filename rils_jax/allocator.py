"""Which malloc this process runs on, and how CPU runs keep their steps fast.

Why it matters on CPU: XLA:CPU allocates and frees the step's buffers every step. glibc's
malloc serves blocks above its mmap threshold (at most 32 MB) with fresh 4 KB pages from the
kernel and returns them when freed, so every step faults in and zeroes its buffers again (a
ViT-B/16 step at batch 8: several GB; the tiny default model: 73,000 page faults a step),
page by page. Three remedies:
- `keep_freed_memory` (applied when `rils_jax` is imported by a CPU-only process on glibc;
  `RILS_CPU_MALLOC=default` leaves glibc as it is): `mallopt` so that glibc serves every block
  from one heap (no mmap, one arena) and never hands freed memory back (no trim). The next
  step reuses the pages the last one faulted in. Set from inside the process, since the
  mallopt parameters, unlike the allocator, can change after it started;
- `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc 2.35 and later; nothing to install): glibc
  asks for transparent huge pages for those blocks, 512 times fewer faults;
- jemalloc, preloaded (`LD_PRELOAD`, `MALLOC_CONF` below): keeps freed pages for the next step,
  on huge pages.
Each keeps the process at its peak memory (ViT-B/16 at batch 8: 11.5 GB kept, 13.0 GB with
jemalloc, against 7.5 GB on glibc's defaults).
Measured on the 2-core CPU machine, `python -m rils_jax.benchmark --config=configs/vit_b16.py
--config.input.batch_size=8` (README, "CPU hosts: the allocator"): 10.5-18.1 s a step on
glibc's defaults, 12.0 s with the glibc tunable, 9.4 s with freed memory kept, 9.0-9.3 s with
jemalloc so configured.

`advice` says how to start faster on a CPU run that starts on glibc's defaults with nothing
kept (`rils_jax.main` logs it); the benchmarks report `describe()`.
"""

import ctypes
import glob
import os
import sys
from typing import MutableMapping, Optional

# Shared-object name -> allocator, as they appear in /proc/self/maps.
KNOWN = (('libjemalloc', 'jemalloc'), ('libtcmalloc', 'tcmalloc'), ('libmimalloc', 'mimalloc'))
# Never hand freed pages back to the kernel (decay -1), and back large blocks by transparent
# huge pages where the kernel allows them (fewer faults and TLB misses on GB-sized buffers).
JEMALLOC_CONF = 'thp:always,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1'
# Where distributions install it (Debian / Ubuntu, any architecture: apt-get install
# libjemalloc2; Fedora / RHEL: dnf install jemalloc) and where a source build does.
SEARCH = ('/usr/lib/*/libjemalloc.so.2', '/usr/lib64/libjemalloc.so.2',
          '/usr/lib/libjemalloc.so.2', '/usr/local/lib/libjemalloc.so.2')


def loaded(maps: Optional[str] = None) -> str:
  """The allocator mapped into this process: 'jemalloc', 'tcmalloc', 'mimalloc', or 'glibc'
  when none of them is (glibc's malloc then serves every allocation); 'unknown' without
  /proc (not Linux).

  Args:
    maps: the text of a /proc/PID/maps file; default this process's.
  """
  if maps is None:
    try:
      with open('/proc/self/maps') as f:
        maps = f.read()
    except OSError:
      return 'unknown'
  # Fields: address, perms, offset, device, inode[, path]; only mapped files have a path.
  names = {os.path.basename(fields[5]) for fields in map(str.split, maps.splitlines())
           if len(fields) >= 6}
  for prefix, name in KNOWN:
    if any(n.startswith(prefix) for n in names):
      return name
  return 'glibc'


ENV = 'RILS_CPU_MALLOC'
MODES = ('keep', 'default')
# mallopt parameters (glibc's malloc.h). mallopt takes an int: -1 for the trim threshold
# becomes SIZE_MAX inside glibc (never trim), where 2**31 - 1 would still trim a top chunk
# above 2 GB, which a ViT-B/16 step frees at once.
_MALLOPT = ((-1, -1),  # M_TRIM_THRESHOLD: never hand the heap's top back to the kernel.
            (-4, 0),   # M_MMAP_MAX: no block from mmap; large ones come from the heap too.
            (-8, 1))   # M_ARENA_MAX: one arena; other threads' own arenas would still take
                       # large blocks from mmap (their heaps are at most 64 MB).
_kept = False


def find_jemalloc() -> Optional[str]:
  """The path of an installed jemalloc shared library (`SEARCH`), or None."""
  found = [path for pattern in SEARCH for path in sorted(glob.glob(pattern))]
  return found[0] if found else None


def preload_command(path: str) -> str:
  """'LD_PRELOAD=PATH MALLOC_CONF=...': the environment to start a CPU run with."""
  return f'LD_PRELOAD={path} MALLOC_CONF={JEMALLOC_CONF}'


def hugetlb(environ=os.environ) -> bool:
  """Whether glibc's malloc was told to use huge pages (`glibc.malloc.hugetlb` 1 or 2 in
  `GLIBC_TUNABLES`, read by glibc when the process started)."""
  return any(t in ('glibc.malloc.hugetlb=1', 'glibc.malloc.hugetlb=2')
             for t in _tunables(environ))


def _tunables(environ):
  return [t.strip() for t in environ.get('GLIBC_TUNABLES', '').split(':')]


def _glibc_tuned(environ) -> bool:
  return any(t.startswith('glibc.malloc.') for t in _tunables(environ))


def keep_freed_memory(cpu_only: bool,
                      environ: Optional[MutableMapping[str, str]] = None) -> bool:
  """Makes glibc's malloc keep what this process frees for its next allocations (`_MALLOPT`:
  no trim, no mmap, one arena), so that a CPU step reuses the pages the last one faulted in.

  Does nothing (returns False) unless all of: `RILS_CPU_MALLOC` is unset or 'keep'; Linux,
  with glibc's malloc serving the process (`loaded()`: no jemalloc / tcmalloc preloaded);
  `cpu_only` (accelerators keep their buffers on the device, and their hosts' memory is better
  left to glibc); `GLIBC_TUNABLES` sets no `glibc.malloc.*` (the user chose). Calling it again
  is harmless.

  Cost: the process keeps its peak memory (freed pages stay mapped for reuse). Measured
  effect: see the module docstring (issue 18; README, "CPU hosts: the allocator").

  Args:
    cpu_only: whether this process runs JAX on the CPU only (`rils_jax.xla_cpu.cpu_only`;
      passed in, so that this module imports nothing of rils_jax, which imports it).
    environ: default `os.environ`.

  Returns:
    Whether glibc now keeps freed memory (also when an earlier call set it).

  Raises:
    ValueError: `RILS_CPU_MALLOC` is neither 'keep' nor 'default'.
  """
  global _kept
  environ = os.environ if environ is None else environ
  mode = environ.get(ENV, 'keep') or 'keep'
  if mode not in MODES:
    raise ValueError(f"{ENV}={mode} must be 'keep' or 'default'")
  if _kept:
    return True
  if mode == 'default' or not sys.platform.startswith('linux') or _glibc_tuned(environ):
    return False
  if not cpu_only or loaded() != 'glibc':
    return False
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):  # musl and other libcs: nothing to tune.
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  _kept = all([mallopt(param, value) == 1 for param, value in _MALLOPT])
  return _kept


def describe() -> str:
  """`loaded()`, with ' (hugetlb)' on glibc told to use huge pages and ' (freed memory kept)'
  after `keep_freed_memory`: the benchmarks' label."""
  name = loaded()
  if name != 'glibc':
    return name
  if hugetlb():
    return 'glibc (hugetlb)'
  return 'glibc (freed memory kept)' if _kept else 'glibc'


def advice(platform: str) -> Optional[str]:
  """One line for a run on `platform` ('cpu', 'gpu', 'tpu') that starts on glibc's malloc
  without huge pages: how to start it faster (jemalloc where installed, else the glibc
  tunable); None otherwise (accelerators keep their buffers on the device) and when
  `keep_freed_memory` applied (jemalloc is then 0-5% faster, not worth a line in every run)."""
  if platform != 'cpu' or loaded() != 'glibc' or hugetlb() or _kept:
    return None
  path = find_jemalloc()
  start = preload_command(path) if path else 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1'
  return (f'This CPU run allocates with glibc\'s defaults, which cost a ViT-B/16 step half its '
          f'speed; start large CPU runs as `{start} python -m ...` (README, "CPU hosts: the '
          'allocator")')
