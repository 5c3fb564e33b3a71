"""Test set-up: 8 virtual CPU devices (must be set before jax is imported), parsed absl flags,
and the local GCS server of the bucket tests."""

import os
import shutil
import tempfile

if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests compile the same tiny programs, in this process and in the subprocesses they start
# (which inherit this environment): a compilation cache shared by the session saves minutes.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='rils_jax_xla_')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import pytest  # noqa: E402
from absl import flags  # noqa: E402

from tests import gcs_server  # noqa: E402

flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
  # The summary says why each skipped test was skipped (e.g. ../shared/data is not present).
  if 's' not in config.option.reportchars:
    config.option.reportchars += 's'


@pytest.fixture(scope='session')
def gcs():
  """A GCS API server on localhost (tests/gcs_server.py) that this process's storage clients
  use; tests that need it skip, saying why, when it cannot start."""
  try:
    server = gcs_server.GcsServer()
  except RuntimeError as e:
    if os.environ.get('RILS_REQUIRE_GCS_SERVER') == '1':  # CI (.ci/run): must not skip.
      raise
    pytest.skip(f'no local GCS server: {e}')
  saved = {k: os.environ.get(k) for k in server.env}
  server.apply()
  yield server
  server.stop()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if '_CACHE' in globals():
    shutil.rmtree(_CACHE, ignore_errors=True)
