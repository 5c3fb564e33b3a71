"""rils_jax.allocator: which malloc a process runs on, read from its real memory map and
environment, and glibc's malloc told to keep freed memory (page faults counted in a real
process)."""

import os
import statistics
import subprocess
import sys

import pytest

from rils_jax import allocator
from tests import tiny

LIBC = ('7f1c2a000000-7f1c2a028000 r--p 00000000 08:01 1234  '
        '/usr/lib/x86_64-linux-gnu/libc.so.6')
JEMALLOC = ('7f1c2b000000-7f1c2b040000 r-xp 00000000 08:01 5678  '
            '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2')


def _describe_in_subprocess(env):
  return subprocess.run([sys.executable, '-c',
                         'from rils_jax import allocator; print(allocator.describe())'],
                        cwd=tiny.REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def _described_in_subprocess(env):
  out = _describe_in_subprocess(env)
  assert out.returncode == 0, out.stderr
  return out.stdout.strip()


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ('LD_PRELOAD', 'MALLOC_CONF', 'GLIBC_TUNABLES', allocator.ENV)}
  env.update(JAX_PLATFORMS='cpu', **extra)
  return env


def test_the_allocator_is_read_from_the_memory_map():
  assert allocator.loaded(LIBC + '\n[heap]\n') == 'glibc'
  assert allocator.loaded('\n'.join([LIBC, JEMALLOC])) == 'jemalloc'
  assert allocator.loaded(LIBC.replace('libc.so.6', 'libtcmalloc_minimal.so.4')) == 'tcmalloc'
  env = _clean_env()
  # Importing rils_jax in a CPU-only process tunes glibc unless told not to or tuned already.
  assert _described_in_subprocess(env) == 'glibc (freed memory kept)'
  assert _described_in_subprocess(dict(env, RILS_CPU_MALLOC='default')) == 'glibc'
  # A process that may run on an accelerator leaves its host's malloc alone.
  assert _described_in_subprocess(dict(env, JAX_PLATFORMS='cuda')) == 'glibc'
  assert _described_in_subprocess(
      dict(env, GLIBC_TUNABLES='glibc.malloc.hugetlb=1')) == 'glibc (hugetlb)'
  assert not allocator.hugetlb({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
  assert allocator.hugetlb({'GLIBC_TUNABLES': 'glibc.malloc.check=0:glibc.malloc.hugetlb=2'})
  assert allocator.advice('gpu') is None and allocator.advice('tpu') is None


def test_a_preloaded_jemalloc_is_seen_and_advised():
  path = allocator.find_jemalloc()
  if path is None:
    pytest.skip('no jemalloc installed (apt-get install libjemalloc2; .ci/run installs it)')
  env = dict(os.environ, LD_PRELOAD=path, MALLOC_CONF=allocator.JEMALLOC_CONF)
  assert _described_in_subprocess(env) == 'jemalloc'
  # Nor is glibc tuned on top of it: keep_freed_memory is for glibc only.
  assert _described_in_subprocess(dict(_clean_env(), LD_PRELOAD=path)) == 'jemalloc'


def test_the_advice_names_jemalloc_or_the_tunable_only_on_glibc_as_it_is(monkeypatch):
  if allocator.loaded() != 'glibc':
    pytest.skip('this process does not run on glibc\'s malloc')
  monkeypatch.setattr(allocator, '_kept', False)
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  path = allocator.find_jemalloc()
  start = (f'LD_PRELOAD={path} MALLOC_CONF=thp:always' if path
           else 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1')
  assert start in allocator.advice('cpu')
  monkeypatch.setattr(allocator, '_kept', True)
  assert allocator.advice('cpu') is None


# A step-like program: XLA allocates and frees its temporaries (three of 64 MB) on every call.
# The pause lets XLA's threads free the last call's buffers before the next call allocates.
_FAULTS = """
import resource, time
import rils_jax
import jax, jax.numpy as jnp
from rils_jax import allocator
f = jax.jit(lambda x: jnp.cumsum(x * 2 + 1)[-1] + jnp.cumsum(x[::-1])[-1])
x = jnp.ones((16 << 20,), jnp.float32)
faults = []
for _ in range(12):
  time.sleep(0.2)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(allocator.describe(), *faults)
"""


def _faults(env):
  out = subprocess.run([sys.executable, '-c', _FAULTS], cwd=tiny.REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  words = out.stdout.split()
  return ' '.join(words[:-12]), [int(n) for n in words[-12:]]


def test_kept_freed_memory_stops_the_page_faults_of_every_call():
  if not sys.platform.startswith('linux'):
    pytest.skip('glibc and /proc: Linux only')
  name, faults = _faults(_clean_env())
  assert name == 'glibc (freed memory kept)'
  # Once the first calls have grown the heap, a call reuses its pages: most calls fault in no
  # page (a call that allocates before XLA's threads freed the last one's buffers grows the
  # heap again, hence the median).
  assert statistics.median(faults[-8:]) < 1000, faults
  name, faults = _faults(_clean_env(RILS_CPU_MALLOC='default'))
  assert name == 'glibc'
  # glibc's defaults: each 64 MB block comes from mmap and goes back; 16,384 pages each.
  assert statistics.median(faults[-8:]) > 16384, faults


def test_glibc_is_left_alone_where_the_user_or_the_platform_says_so(monkeypatch):
  monkeypatch.setattr(allocator, '_kept', False)
  assert not allocator.keep_freed_memory(False, {})
  assert not allocator.keep_freed_memory(True, {'RILS_CPU_MALLOC': 'default'})
  assert not allocator.keep_freed_memory(True, {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'})
  assert 'kept' not in allocator.describe()
  with pytest.raises(ValueError, match="RILS_CPU_MALLOC=on must be 'keep' or 'default'"):
    allocator.keep_freed_memory(True, {'RILS_CPU_MALLOC': 'on'})


def test_a_mistyped_mode_is_one_warning_and_changes_nothing():
  out = _describe_in_subprocess(_clean_env(RILS_CPU_MALLOC='kept'))
  assert out.returncode == 0 and out.stdout.strip() == 'glibc', (out.stdout, out.stderr)
  assert ("warning: RILS_CPU_MALLOC=kept must be 'keep' or 'default'; glibc's malloc left as "
          'it is') in out.stderr.splitlines(), out.stderr
