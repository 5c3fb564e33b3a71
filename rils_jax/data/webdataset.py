"""Random access to WebDataset `.tar` shards (the img2dataset `webdataset` output format).

A sample is the run of tar members sharing a key (the member path up to the first dot of its
file name, the WebDataset convention): `000123.jpg` + `000123.txt` (+ `000123.json`, ignored).
Opening the source reads every shard's tar headers (in threads; no image data is read) into an
index of (offset, size) per image and caption, so that sample i can be read with one seek: the
global order and the grain iterator state are then what they are for ArrayRecord, which is what
makes the stream deterministic and resumable. Samples without an image or a caption are left
out and counted. Uncompressed tars only: a compressed one has no seekable members. A shard that
is cut off or damaged part-way keeps its samples before the damage and is logged and counted
(`data/damaged_shards`); a file that is not a tar at all is an error.

Local and NFS paths are read with `os.pread`; URLs (`gs://...`) through `etils.epath`. At LAION
scale (thousands of shards) the header scan is repeated by every host and worker; converting
once to ArrayRecord (`python -m rils_jax.data.convert`) avoids it.
"""

import bisect
import collections
import concurrent.futures
import dataclasses
import os
import tarfile
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from absl import logging
from etils import epath

from rils_jax import progress as progress_lib
from rils_jax import storage
from rils_jax.data import shards
from rils_jax.data import records

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')


@dataclasses.dataclass
class ShardIndex:
  """Where the samples of one shard are: int64 byte offsets and sizes, and keys."""
  keys: List[str]
  image: np.ndarray    # int64 (n, 2): offset, size of the image member.
  caption: np.ndarray  # int64 (n, 2): offset, size of the caption member.
  without_caption: int = 0
  without_image: int = 0
  damaged: str = ''  # What was wrong with a shard that was read only up to some point.


def _split_name(name: str) -> Tuple[str, str]:
  directory, _, base = name.rpartition('/')
  stem, dot, ext = base.partition('.')
  return (f'{directory}/{stem}' if directory else stem), (ext.lower() if dot else '')


def index_shard(path: str, image_ext: Sequence[str], caption_ext: str) -> ShardIndex:
  """Reads the tar headers of one shard.

  A shard that starts as a tar but is cut off or damaged further on (a bad header, a member
  whose data runs past the end, no end-of-archive blocks) keeps the samples before the damage;
  `ShardIndex.damaged` says what was wrong (tarfile itself would stop there silently).

  Raises:
    FileNotFoundError: if the shard does not exist.
    ValueError: if it is not an uncompressed tar file at all.
  """
  members: Dict[str, Dict[str, Tuple[int, int]]] = collections.OrderedDict()
  damaged = ''
  try:
    with epath.Path(path).open('rb') as f:
      size = f.seek(0, os.SEEK_END)
      f.seek(0)
      with tarfile.open(fileobj=f, mode='r:') as tar:
        try:
          for info in tar:
            if info.offset_data + info.size > size:
              damaged = f'member {info.name!r} is cut off at byte {size}'
              break
            if info.isfile():
              key, ext = _split_name(info.name)
              members.setdefault(key, {})[ext] = (info.offset_data, info.size)
        except tarfile.TarError as e:
          damaged = f'{e} after byte {tar.offset}'
        if not damaged:
          # tarfile stops quietly at the first bad header; a whole tar ends with zero blocks
          # (then zero padding), so anything else there is damage or a second, concatenated tar.
          f.seek(tar.offset)
          tail = f.read(64 * 1024)
          if len(tail) < 512 or tail.count(0) != len(tail):
            damaged = (f'no end-of-archive blocks at byte {tar.offset}: a damaged header, a '
                       'file cut off, or several tars concatenated')
  except FileNotFoundError as e:
    raise FileNotFoundError(f'WebDataset shard not found: {path}') from e
  except IsADirectoryError as e:
    raise ValueError(f'{path} is a folder, not a tar shard') from e
  except tarfile.TarError as e:
    raise ValueError(f'{path} is not an uncompressed tar file: {e}') from e
  if damaged:
    logging.warning('WebDataset shard %s is damaged: %s; its %d complete samples before that '
                    'are used', path, damaged, len(members))
  keys, image, caption = [], [], []
  without_caption = without_image = 0
  for key, parts in members.items():
    found = next((parts[e] for e in image_ext if e in parts), None)
    if found is None:
      without_image += 1
      continue
    if caption_ext not in parts:
      without_caption += 1
      continue
    keys.append(key)
    image.append(found)
    caption.append(parts[caption_ext])
  as_array = lambda x: np.asarray(x, np.int64).reshape(-1, 2)
  return ShardIndex(keys, as_array(image), as_array(caption), without_caption, without_image,
                    damaged)


class WebDatasetSource(records.RecordSource):
  """The samples of WebDataset shards in shard-pattern order, then tar order.

  Each record is `ImageCaptions(image=bytes, captions=(text,), key='SHARD:KEY')`; the text is
  decoded as UTF-8 (bad bytes replaced) and an empty one is dropped later with a count.

  Raises (constructor):
    ValueError: for a pattern that names no file, or a shard that is not an uncompressed tar.
    FileNotFoundError: for a named shard that does not exist.
  """

  def __init__(self, files: Union[str, Sequence[str]],
               image_ext: Sequence[str] = IMAGE_EXTENSIONS, caption_ext: str = 'txt',
               num_threads: int = 16):
    self.paths = shards.expand(files)
    self.name = files if isinstance(files, str) else self.paths[0]
    self._image_ext = tuple(e.lower().lstrip('.') for e in (
        [image_ext] if isinstance(image_ext, str) else image_ext))
    self._caption_ext = caption_ext.lower().lstrip('.')
    progress = progress_lib.Progress(f'Indexing the shards of {self.name}', len(self.paths))
    with concurrent.futures.ThreadPoolExecutor(min(num_threads, len(self.paths))) as pool:
      indices = []
      for index in pool.map(self._index, self.paths):
        indices.append(index)
        progress.update()
    self._indices: Dict[int, ShardIndex] = dict(enumerate(indices))
    self._offsets = np.cumsum([0] + [len(i.keys) for i in indices]).tolist()
    self.stats = records.SourceStats(
        images=len(self), captions=len(self),
        images_without_caption=sum(i.without_caption for i in indices),
        captions_without_image=sum(i.without_image for i in indices),
        damaged_shards=sum(bool(i.damaged) for i in indices))

  def _index(self, path: str) -> ShardIndex:
    return index_shard(path, self._image_ext, self._caption_ext)

  def __len__(self) -> int:
    return self._offsets[-1]

  def __getstate__(self):
    # Workers rebuild each shard's index when they first read from it, rather than receive
    # millions of offsets through a pipe.
    state = dict(self.__dict__)
    state['_indices'] = {}
    return state

  def _read(self, shard: int, offset: int, size: int) -> bytes:
    path = self.paths[shard]
    if storage.is_url(path):
      with epath.Path(path).open('rb') as f:
        f.seek(offset)
        return f.read(size)
    # Opened per read: grain reads from several threads, and thousands of shards kept open
    # would exhaust the file descriptors.
    fd = os.open(path, os.O_RDONLY)
    try:
      data = os.pread(fd, size, offset)
    finally:
      os.close(fd)
    if len(data) != size:
      raise ValueError(f'{size} bytes at {offset} expected, the file has {len(data)}')
    return data

  def __getitem__(self, index: int):
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} of {len(self)}')
    shard = bisect.bisect_right(self._offsets, index) - 1
    row = index - self._offsets[shard]
    try:
      if shard not in self._indices:
        self._indices[shard] = self._index(self.paths[shard])
      idx = self._indices[shard]
      image = self._read(shard, *idx.image[row])
      text = self._read(shard, *idx.caption[row]).decode('utf-8', errors='replace')
      return records.ImageCaptions(image, (text,), f'{self.paths[shard]}:{idx.keys[row]}')
    except (OSError, ValueError, IndexError) as e:  # A shard changed or vanished under us.
      return records.BadRecord(f'{self.paths[shard]} sample {row}: {type(e).__name__}: {e}')

  def __repr__(self) -> str:
    return f'WebDatasetSource({len(self.paths)} shards, {len(self)} samples)'
