"""Image-caption ArrayRecord shards: the random-access format that `python -m
rils_jax.data.convert` writes and the `arrayrecord` source kind reads.

Each record is a msgpack map (msgpack ships with flax):
  {'key': str (the source's name of the image), 'image': bytes (encoded JPEG/PNG/...),
   'captions': [str, ...]}
Shards are named `PREFIX-00000-of-00008.array_record` and written with `group_size:1`, so that
reading one record decompresses only that record (grain's recommendation for random access).
"""

import glob
import os
from typing import List, Optional, Sequence, Union

import grain
import msgpack
from array_record.python import array_record_module

from rils_jax import storage
from rils_jax.data import shards
from rils_jax.data import records

WRITER_OPTIONS = 'group_size:1'
SUFFIX = '.array_record'


def encode(key: str, image: bytes, captions: Sequence[str]) -> bytes:
  """One record (see the module docstring)."""
  return msgpack.packb({'key': key, 'image': bytes(image), 'captions': list(captions)},
                       use_bin_type=True)


def decode(data: bytes) -> records.ImageCaptions:
  """The `ImageCaptions` (image as bytes) of a record.

  Raises:
    ValueError: for bytes that are not such a record.
  """
  try:
    record = msgpack.unpackb(data, raw=False)
    image, captions = record['image'], record['captions']
    if not isinstance(image, bytes):
      raise TypeError(f'image is {type(image).__name__}, not bytes')
    captions = [captions] if isinstance(captions, str) else captions
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
      raise TypeError(f'captions must be a list of strings, got {captions!r:.100}')
    return records.ImageCaptions(image, tuple(captions), str(record.get('key', '')))
  except Exception as e:  # msgpack raises several types (ExtraData, UnpackValueError, ...).
    raise ValueError(f'not an image-caption record: {type(e).__name__}: {e}') from e


def shard_names(prefix: str, num_shards: int) -> List[str]:
  return [f'{prefix}-{i:05d}-of-{num_shards:05d}{SUFFIX}' for i in range(num_shards)]


def _unreadable(paths: Sequence[str], error: Exception) -> str:
  for path in paths:
    try:
      array_record_module.ArrayRecordReader(path).close()
    except Exception as e:  # pylint: disable=broad-except
      return f'{path} is not a readable ArrayRecord file: {type(e).__name__}: {e or "damaged"}'
  return f'cannot read the ArrayRecord shards {paths[:3]}...: {type(error).__name__}: {error}'


class ArrayRecordSource(records.RecordSource):
  """Random access to the records of ArrayRecord shards (grain's ArrayRecordDataSource), in
  shard-pattern order.

  Raises (constructor):
    ValueError: if the pattern names no file (see `shards.expand`), or a shard is not a
      readable ArrayRecord file (named in the message).
    FileNotFoundError: if a named shard does not exist.
  """

  def __init__(self, files: Union[str, Sequence[str]], name: Optional[str] = None):
    paths = shards.expand(files)
    for path in paths:
      if not storage.is_url(path) and not os.path.isfile(path):
        raise FileNotFoundError(f'ArrayRecord shard not found: {path}')
    try:
      self._source = grain.sources.ArrayRecordDataSource(paths)
    except Exception as e:  # array_record raises RuntimeError, often without the file's name.
      raise ValueError(_unreadable(paths, e)) from e
    self.paths = paths
    self.name = name or (files if isinstance(files, str) else paths[0])
    # Caption counts would need a pass over every record; the converter printed them.
    self.stats = records.SourceStats(images=len(self._source))
    self.counts_captions = False

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    try:
      return decode(self._source[index])
    except Exception as e:  # A damaged shard must cost its record, not the run.
      return records.BadRecord(f'{self.name}[{index}]: {e}')

  def __repr__(self) -> str:
    return f'ArrayRecordSource({len(self.paths)} shards, {len(self)} records)'


def existing_shards(prefix: str) -> List[str]:
  """Shards (of any count) that already carry `prefix`."""
  return sorted(glob.glob(f'{glob.escape(prefix)}-[0-9]*-of-[0-9]*{SUFFIX}'))


class ShardWriter:
  """Writes the records made from `total` inputs to `num_shards` shards: the record of input i
  goes to shard i * num_shards // total, so that reading the shards in order gives the records in
  input order (inputs that made no record leave no gap in the output).

  Shards are written under temporary names and all renamed by `close`: a failed or killed
  conversion never leaves a set that looks complete, nor replaces an earlier one. `abort`
  removes the temporary files.
  """

  def __init__(self, prefix: str, num_shards: int, total: int):
    if num_shards < 1 or total < 1:
      raise ValueError(f'cannot write {total} inputs to {num_shards} shards')
    self.paths = shard_names(prefix, num_shards)
    self.written = 0
    self._total, self._last, self._shard, self._writer = total, -1, -1, None
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)

  def write(self, index: int, record: bytes) -> None:
    """Appends the record of input `index` (indices must increase)."""
    if not self._last < index < self._total:
      raise ValueError(f'input {index} after {self._last} (of {self._total})')
    self._last = index
    shard = index * len(self.paths) // self._total
    while self._shard < shard:
      self._next_shard()
    self._writer.write(record)
    self.written += 1

  def _next_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
    self._shard += 1
    self._writer = (array_record_module.ArrayRecordWriter(self.paths[self._shard] + '.tmp',
                                                          WRITER_OPTIONS)
                    if self._shard < len(self.paths) else None)

  def close(self) -> List[str]:
    """Finishes every shard (a shard whose inputs all failed is written empty), then gives them
    their final names; returns the shard paths."""
    while self._shard < len(self.paths):
      self._next_shard()
    for path in self.paths:
      os.replace(path + '.tmp', path)
    return self.paths

  def abort(self) -> None:
    """Removes the temporary files (after an error)."""
    if self._writer is not None:
      try:
        self._writer.close()
      except Exception:  # pylint: disable=broad-except  (already failing; the files go anyway)
        pass
      self._writer = None
    for path in self.paths:
      if os.path.exists(path + '.tmp'):
        os.remove(path + '.tmp')
