"""rils_jax.allocator: which malloc a process runs on, read from its real memory map and
environment."""

import os
import subprocess
import sys

import pytest

from rils_jax import allocator
from tests import tiny

LIBC = ('7f1c2a000000-7f1c2a028000 r--p 00000000 08:01 1234  '
        '/usr/lib/x86_64-linux-gnu/libc.so.6')
JEMALLOC = ('7f1c2b000000-7f1c2b040000 r-xp 00000000 08:01 5678  '
            '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2')


def _described_in_subprocess(env):
  out = subprocess.run([sys.executable, '-c',
                        'from rils_jax import allocator; print(allocator.describe())'],
                       cwd=tiny.REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return out.stdout.strip()


def test_the_allocator_is_read_from_the_memory_map():
  assert allocator.loaded(LIBC + '\n[heap]\n') == 'glibc'
  assert allocator.loaded('\n'.join([LIBC, JEMALLOC])) == 'jemalloc'
  assert allocator.loaded(LIBC.replace('libc.so.6', 'libtcmalloc_minimal.so.4')) == 'tcmalloc'
  env = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', 'MALLOC_CONF')}
  assert _described_in_subprocess(env) == 'glibc'
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
  if allocator.loaded() == 'glibc':  # This process: the advice names the library found.
    assert f'LD_PRELOAD={path} MALLOC_CONF=thp:always' in allocator.advice('cpu')
