"""Run folders on local disk or on an object store (gs://, and any URL `etils.epath` opens).

A workdir, a checkpoint path or an evaluation output may be a local path or a URL. Orbax writes
checkpoints to either (arrays through tensorstore's drivers, the rest through `etils.epath`);
single files (config.json, tokenizer.model) are written whole through `etils.epath`.

Logs are appended line by line, which object stores cannot do (an object is replaced whole, never
extended). On a URL workdir the logs (metrics.jsonl, TensorBoard events, example ids) are
therefore written to a local staging folder exactly as on local disk, and `Mirror` uploads each
changed file whole: every `interval` seconds from a background thread, and when the caller asks
(at each checkpoint, at the end of a run, on a preemption notice, on an error). An upload
replaces the object atomically, so the bucket always holds a complete earlier version of each
file, and a run killed without warning (SIGKILL, a lost VM) loses at most the lines written in
the last `interval` seconds. A run that resumes first downloads the logs it continues
(metrics.jsonl, its example ids), so that the files keep every earlier line. TensorBoard's own
GCS writer (tensorboardX) does the same: it re-uploads the whole event file at each flush.

Local workdirs are written in place, with no staging and no upload.

Testing against a local GCS server (tests/gcs_server.py) needs these environment variables:
STORAGE_EMULATOR_HOST=http://localhost:PORT (gcsfs, behind `etils.epath`),
TENSORSTORE_GCS_HTTP_URL=http://localhost:PORT and GOOGLE_AUTH_TOKEN_FOR_TESTING=any (tensorstore),
and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (this module's default, see below).
"""

import math
import os
import re
import shutil
import tempfile
import threading
import uuid
from typing import Dict, Optional, Sequence, Tuple

import fsspec
from absl import logging
from etils import epath

# gcsfs (behind etils.epath for gs://) caches directory listings for the life of the process by
# default, so a process would never see the checkpoints that other processes (other hosts, a
# restarted run) wrote after its first listing. Listings are read fresh instead.
for _protocol in ('gs', 'gcs'):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault('use_listings_cache', False)
# gcsfs 2026.10 first asks the Storage Control gRPC API for each bucket's layout (for zonal
# buckets); without permission for it, or against a local server, every operation then warns and
# the first one can wait up to 60 s. Plain regional and multi-regional buckets need none of it;
# set GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=true for zonal buckets. (Read when gcsfs is imported,
# which etils.epath does at the first gs:// path, after this.)
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')


def is_url(path) -> bool:
  """Whether `path` names an object-store location (scheme://...) rather than a local path."""
  return '://' in str(path)


# A scheme followed by one slash (gs:/bucket/run): a mistyped URL, not a local path.
_MALFORMED_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*:/(?!/)')


def looks_like_url(path: str) -> bool:
  """Whether `path` is a URL or a mistyped one (scheme and one slash: gs:/bucket/run)."""
  return is_url(path) or bool(_MALFORMED_URL.match(path))


def check_path(path: str, what: str = 'path') -> str:
  """Returns `path` if it is a local path or a URL that `etils.epath` can open.

  Raises:
    ValueError: for a URL whose scheme no installed back-end opens (gcs://, file://, s3://
      without s3fs: `etils.epath` knows gs:// and s3://), a URL without a bucket (gs:///run),
      or a mistyped URL with one slash (gs:/bucket/run), which would otherwise be created as a
      local folder named 'gs:'.
  """
  if _MALFORMED_URL.match(path):
    raise ValueError(f'{what} {path!r} looks like a URL with one slash after the scheme; '
                     'write gs://bucket/path (or a local path without a colon)')
  if not is_url(path):
    return path
  scheme, _, rest = path.partition('://')
  if not rest or rest.startswith('/'):
    raise ValueError(f'{what} {path!r} names no bucket; write {scheme}://BUCKET/PATH')
  try:
    epath.Path(path)
  except KeyError as e:
    raise ValueError(f'{what} {path!r}: {scheme}:// is not a storage rils_jax can open '
                     '(gs:// for Google Cloud Storage, or a local path)') from e
  return path


def join(base: str, *parts: str) -> str:
  """`base`/`parts` as a string, for local paths and URLs alike."""
  return str(epath.Path(base).joinpath(*parts)) if is_url(base) else os.path.join(base, *parts)


def absolute(path: str) -> str:
  """`path` made absolute when it is local; a URL as it is."""
  return path if is_url(path) else os.path.abspath(path)


def basename(path: str) -> str:
  return epath.Path(path).name if is_url(path) else os.path.basename(path)


def dirname(path: str) -> str:
  return str(epath.Path(path).parent) if is_url(path) else os.path.dirname(path)


def is_dir(path: str) -> bool:
  return epath.Path(path).is_dir() if is_url(path) else os.path.isdir(path)


def is_file(path: str) -> bool:
  return epath.Path(path).is_file() if is_url(path) else os.path.isfile(path)


def read_bytes(path: str) -> bytes:
  """The bytes of the file or object at `path`.

  Raises:
    FileNotFoundError: when there is none; OSError: when it cannot be read.
  """
  return epath.Path(path).read_bytes()


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` whole: an object is replaced atomically (readers see the old or the
  new one); a local file is written in place."""
  epath.Path(path).write_bytes(data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` if needed and checks that this process can write there (for a URL, by
  writing and deleting a small object, so that a missing bucket or permission fails now).

  Raises:
    ValueError: with the storage's own error, when it cannot be created or written.
  """
  check_path(workdir, 'the workdir')
  if not is_url(workdir):
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise ValueError(f'cannot create the workdir {workdir}: {e}') from e
    if not os.access(workdir, os.W_OK):
      raise ValueError(f'the workdir {workdir} is not writable')
    return
  if is_file(workdir):
    raise ValueError(f'the workdir {workdir} is an object (a file), not a folder')
  probe = epath.Path(workdir) / f'.rils_jax_write_check_{uuid.uuid4().hex}'  # One per host.
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    probe.write_text('rils_jax')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  # Each storage client raises its own.
    raise ValueError(f'cannot write to the workdir {workdir}: {type(e).__name__}: '
                     f'{_one_line(e)} (check the bucket name, that it exists, and this '
                     "machine's credentials)") from e


def listdir(folder: str) -> Sequence[str]:
  """The names in `folder` (local or URL), sorted; empty when it does not exist."""
  path = epath.Path(folder)
  return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def remove(path: str) -> None:
  """Removes a file or a folder with everything in it (local or URL); nothing if missing."""
  p = epath.Path(path)
  if p.is_dir():
    p.rmtree()
  elif p.exists():
    p.unlink()


def _one_line(error: BaseException) -> str:
  return ' '.join(str(error).split())[:300]


class LineFile:
  """Lines appended to a small file, local or on an object store (evaluation outputs).

  A local file is opened for appending and flushed after every line. An object is read once,
  then rewritten whole after every line (objects cannot be appended to); meant for files of a
  few lines per command, not for training logs (see `Mirror`).

  Raises (constructor, so that a command fails before its work, not after):
    OSError: when a local file cannot be opened for appending.
    ValueError: when the object cannot be read or written.
  """

  def __init__(self, path: str):
    self.path = check_path(path, '--output')
    self._file = None
    self._text = ''
    if not is_url(path):
      self._file = open(path, 'a', encoding='utf-8')
      return
    if path.endswith('/') or is_dir(path):
      raise ValueError(f'{path} is a folder (objects lie under it); name a file')
    try:
      target = epath.Path(path)
      self._text = target.read_text() if target.exists() else ''
      target.write_text(self._text)
    except Exception as e:  # pylint: disable=broad-except  # Each storage client raises its own.
      raise ValueError(f'cannot write {path}: {type(e).__name__}: {_one_line(e)}') from e

  def write_line(self, line: str) -> None:
    if self._file:
      self._file.write(line + '\n')
      self._file.flush()
    else:
      self._text += line + '\n'
      write_text(self.path, self._text)

  def close(self) -> None:
    if self._file:
      self._file.close()


class Mirror:
  """The local folder where a run writes its logs, kept uploaded to a URL workdir.

  For a local workdir `local` is the workdir itself and `flush` does nothing. For a URL, `local`
  is a new temporary folder; files under the relative paths `uploads` (files, or folders whose
  files are all uploaded) are uploaded whole when they changed since their last upload, by
  `flush` and every `interval` seconds by a background thread. JSON-lines files (`*.jsonl`) are
  uploaded up to their last complete line, so that a line being written is never cut.
  `continues` names the files a resumed run appends to: they are downloaded first.

  Raises (constructor):
    ValueError: when `interval` is not positive.
  """

  def __init__(self, workdir: str, uploads: Sequence[str], continues: Sequence[str] = (),
               interval: float = 30.0):
    if not (interval > 0 and math.isfinite(interval)):
      raise ValueError(f'the log upload interval must be > 0 seconds and finite, got {interval}')
    self.workdir = workdir
    self.remote = is_url(workdir)
    self.local = tempfile.mkdtemp(prefix='rils_jax_logs_') if self.remote else workdir
    self._uploads = tuple(uploads)
    self._uploaded: Dict[str, Tuple[int, int]] = {}  # Relative path -> (size, mtime_ns).
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self.last_error: Optional[str] = None
    if not self.remote:
      return
    for name in continues:
      source = epath.Path(workdir) / name
      if source.exists():
        target = os.path.join(self.local, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, 'wb') as f:
          f.write(source.read_bytes())
        self._uploaded[name] = _stamp(target)
    self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True,
                                    name='rils_jax log upload')
    self._thread.start()

  def _run(self, interval: float) -> None:
    while not self._stop.wait(interval):
      self.flush()

  def _files(self):
    for name in self._uploads:
      path = os.path.join(self.local, name)
      if os.path.isfile(path):
        yield name
      elif os.path.isdir(path):
        for folder, _, files in os.walk(path):
          for f in sorted(files):
            yield os.path.relpath(os.path.join(folder, f), self.local)

  def flush(self) -> int:
    """Uploads every changed file now; returns how many were uploaded (0 for a local
    workdir). A failed upload is logged as a warning (and kept in `last_error`), never raised:
    training goes on, and the next flush uploads the file again."""
    try:
      return self.upload()
    except Exception as e:  # pylint: disable=broad-except  # Each storage client raises its own.
      self.last_error = _one_line(e)
      logging.warning('Uploading the logs to %s failed (retried at the next upload): %s',
                      self.workdir, self.last_error)
      return 0

  def upload(self) -> int:
    """Like `flush`, but raises the storage client's error when an upload fails."""
    if not self.remote:
      return 0
    with self._lock:
      count = 0
      for name in self._files():
        path = os.path.join(self.local, name)
        stamp = _stamp(path)
        if self._uploaded.get(name) == stamp:
          continue
        with open(path, 'rb') as f:
          data = f.read()
        if name.endswith('.jsonl'):
          data = data[:data.rfind(b'\n') + 1]
        write_bytes(join(self.workdir, *name.split(os.sep)), data)
        self._uploaded[name] = stamp
        count += 1
      return count

  def close(self) -> None:
    """Stops the background uploads, uploads what changed, and removes the staging folder
    (kept, with a warning, if that last upload fails)."""
    if not self.remote:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    try:
      self.upload()
    except Exception as e:  # pylint: disable=broad-except
      logging.error('The last upload of the logs to %s failed; they stay in %s: %s',
                    self.workdir, self.local, _one_line(e))
      return
    shutil.rmtree(self.local, ignore_errors=True)


def _stamp(path: str) -> Tuple[int, int]:
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns
