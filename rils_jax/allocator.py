"""Which malloc this process runs on, and how to start CPU runs so that their steps are fast.

Why it matters on CPU: XLA:CPU allocates and frees the step's buffers every step. glibc's
malloc serves blocks above its mmap threshold (at most 32 MB) with fresh 4 KB pages from the
kernel and returns them when freed, so every step faults in and zeroes its buffers again (a
ViT-B/16 step at batch 8: several GB), page by page. Two remedies, both chosen when the process
starts (the environment), so rils_jax cannot apply them from inside:
- `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc 2.35 and later; nothing to install): glibc
  asks for transparent huge pages for those blocks, 512 times fewer faults;
- jemalloc, preloaded (`LD_PRELOAD`, `MALLOC_CONF` below): keeps freed pages for the next step,
  on huge pages. The process then keeps its peak (12.1 GB instead of 7.2 GB for that step).
Measured on the 2-core CPU machine, `python -m rils_jax.benchmark --config=configs/vit_b16.py
--config.input.batch_size=8` (README, "CPU hosts: the allocator"): 15.4-18.1 s a step on glibc's
defaults, 12.0 s with the glibc tunable, 9.3 s with jemalloc so configured.

`advice` says this once on a CPU run that starts on glibc's defaults (`rils_jax.main` logs it);
the benchmarks report `describe()`. Nothing is changed by default: the preload is
the host's choice, as PyTorch's CPU tuning guides leave it.
"""

import glob
import os
from typing import Optional

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
  tunables = environ.get('GLIBC_TUNABLES', '')
  return any(t.strip() in ('glibc.malloc.hugetlb=1', 'glibc.malloc.hugetlb=2')
             for t in tunables.split(':'))


def describe() -> str:
  """`loaded()`, with ' (hugetlb)' on glibc told to use huge pages: the benchmarks' label."""
  name = loaded()
  return f'{name} (hugetlb)' if name == 'glibc' and hugetlb() else name


def advice(platform: str) -> Optional[str]:
  """One line for a run on `platform` ('cpu', 'gpu', 'tpu') that starts on glibc's malloc
  without huge pages: how to start it faster (jemalloc where installed, else the glibc
  tunable); None otherwise (accelerators keep their buffers on the device)."""
  if platform != 'cpu' or loaded() != 'glibc' or hugetlb():
    return None
  path = find_jemalloc()
  start = preload_command(path) if path else 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1'
  return (f'This CPU run allocates with glibc\'s defaults, which cost a ViT-B/16 step half its '
          f'speed; start large CPU runs as `{start} python -m ...` (README, "CPU hosts: the '
          'allocator")')
