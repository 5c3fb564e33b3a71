"""The record types every image-caption source shares, and the caption text helpers.

A training source is a random-access sequence of records (grain's RandomAccessDataSource
protocol: `__len__`, `__getitem__`): `RecordSource`. Record `i` is an `ImageCaptions` (one
image and all its captions) or a `BadRecord` (one that could not be read, skipped and counted by
the input pipeline). `SourceStats` counts what a reader kept and dropped. The concrete sources
(rils_jax/data/sources.py for CSV / COCO files, arrayrecord.py, webdataset.py, tfds_source.py)
and the tokenizer trainer build on this module; it imports none of them.
"""

import abc
import bisect
import codecs
import dataclasses
import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import logging


@dataclasses.dataclass(frozen=True)
class ImageCaptions:
  """One image and all its captions. `image` is a file path, the encoded bytes, or a decoded
  uint8 array (see transforms.load_image); `key` names it in messages (default: the path)."""
  image: Any
  captions: Tuple[str, ...]
  key: str = ''

  @property
  def name(self) -> str:
    return self.key or (self.image if isinstance(self.image, str) else '')


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """Stands for a record that could not be read (a damaged shard entry); the pipeline skips
  and counts it like an undecodable image."""
  reason: str


def _skipped():
  return dataclasses.field(default=0, metadata={'skipped': True})


@dataclasses.dataclass
class SourceStats:
  """What a reader kept and dropped (numbers of images, captions, lines or shards).

  The fields marked `skipped` are logged as `data/<field>_skipped`, the others as
  `data/<field>` (see `metrics`).
  """
  images: int = 0
  captions: int = 0
  empty_captions: int = _skipped()
  duplicate_captions: int = _skipped()  # Repeats of a caption of the same image.
  images_without_caption: int = 0
  captions_without_image: int = 0  # COCO annotations whose image_id is not in `images`.
  duplicate_image_ids: int = _skipped()  # COCO `images` entries whose id was already listed.
  non_utf8_lines: int = 0  # CSV lines decoded as Windows-1252.
  damaged_shards: int = 0  # WebDataset shards read only up to a cut or damaged header.

  def __str__(self) -> str:
    """'64 images, 192 captions' and the other non-zero counts, e.g. ', 2 empty captions'."""
    return ', '.join(f'{v:,} {f.name.replace("_", " ")}' for f, v in zip(
        dataclasses.fields(self), dataclasses.astuple(self))
                     if v or f.name in ('images', 'captions'))

  def add(self, other: 'SourceStats') -> 'SourceStats':
    return SourceStats(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                dataclasses.astuple(other))))

  def metrics(self, counts_captions: bool = True) -> Dict[str, int]:
    """The counts as metrics, e.g. {'data/images': 4000, 'data/empty_captions_skipped': 0};
    without `data/captions` when the sources do not count captions (`counts_captions`)."""
    out = {}
    for field in dataclasses.fields(self):
      if field.name == 'captions' and not counts_captions:
        continue
      suffix = '_skipped' if field.metadata.get('skipped') else ''
      out[f'data/{field.name}{suffix}'] = getattr(self, field.name)
    return out


def clean_captions(captions: Sequence[str]) -> List[str]:
  """The captions with whitespace runs made single spaces, empty ones left out, in order."""
  return [c for c in (' '.join(c.split()) for c in captions) if c]


def select(records: Sequence, spec: Optional[str]):
  """Python-style slice of the image list, e.g. ':-100' (all but the last 100) or '-100:'.

  Raises:
    ValueError: for a malformed spec.
  """
  if not spec:
    return list(records)
  parts = spec.split(':')
  if len(parts) != 2:
    raise ValueError(f'select must look like "start:stop", got {spec!r}')
  try:
    start, stop = (int(p) if p.strip() else None for p in parts)
  except ValueError as e:
    raise ValueError(f'select must look like "start:stop", got {spec!r}') from e
  return list(records)[start:stop]


def read_text(path: str) -> Tuple[str, int]:
  """The text of a caption file that should be UTF-8, and how many of its lines were not (those
  are decoded as Windows-1252, undefined bytes replaced). A byte-order mark (Excel) is dropped.
  The training readers and the tokenizer trainer both read captions through it, so that they
  see the same text."""
  with open(path, 'rb') as f:
    data = f.read()
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8):]
  try:
    return data.decode('utf-8'), 0
  except UnicodeDecodeError:
    pass
  lines, bad = [], 0
  for line in data.splitlines(keepends=True):
    try:
      lines.append(line.decode('utf-8'))
    except UnicodeDecodeError:
      lines.append(line.decode('cp1252', errors='replace'))
      bad += 1
  logging.warning('%s: %d lines are not UTF-8; read them as Windows-1252', path, bad)
  return ''.join(lines), bad


class RecordSource(abc.ABC):
  """A random-access image-caption source: `len(source)` records, `source[i]` an
  `ImageCaptions` or a `BadRecord`. Subclasses set `name` and may set `stats`;
  `counts_captions` is False where `stats.captions` is unknown (it would take a pass over every
  record: ArrayRecord, TFDS)."""
  name: str = ''
  stats: SourceStats = SourceStats()
  counts_captions: bool = True

  @abc.abstractmethod
  def __len__(self) -> int:
    """The number of records."""

  def __repr__(self) -> str:  # Logged: a name and a size, not an object address.
    return f'{self.name or type(self).__name__} ({len(self):,} records)'

  @abc.abstractmethod
  def __getitem__(self, index: int):
    """Record `index`: an `ImageCaptions`, or a `BadRecord` for one that cannot be read."""


class ListSource(RecordSource):
  """In-memory records (the csv and coco kinds)."""

  def __init__(self, records: Sequence[ImageCaptions], name: str = 'records',
               stats: Optional[SourceStats] = None):
    self.records, self.name = list(records), name
    self.stats = stats or SourceStats(images=len(self.records),
                                      captions=sum(len(r.captions) for r in self.records))

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int):
    return self.records[index]


class SliceSource(RecordSource):
  """The records `range(len(parent))[start:stop]` of a source (`select`)."""

  def __init__(self, parent: RecordSource, spec: str):
    self._parent, self._indices = parent, select(range(len(parent)), spec)
    self.name = f'{parent.name}[{spec}]'
    self.stats = dataclasses.replace(parent.stats, images=len(self._indices), captions=0)
    self.counts_captions = False

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    return self._parent[self._indices[index]]


class ConcatSource(RecordSource):
  """Several sources one after the other; record ids are positions in the concatenation."""

  def __init__(self, parts: Sequence[RecordSource]):
    self.parts = list(parts)
    self.offsets = [0]
    for part in self.parts:
      self.offsets.append(self.offsets[-1] + len(part))
    self.name = ' + '.join(p.name for p in self.parts)
    self.stats = functools.reduce(SourceStats.add, (p.stats for p in self.parts), SourceStats())
    self.counts_captions = all(p.counts_captions for p in self.parts)

  def __len__(self) -> int:
    return self.offsets[-1]

  def __getitem__(self, index: int):
    part = bisect.bisect_right(self.offsets, index) - 1
    return self.parts[part][index - self.offsets[part]]


def sample_captions(source: RecordSource, max_records: int = 50_000) -> List[str]:
  """The captions of at most `max_records` records spread evenly over `source` (all of them for
  in-memory sources): what the tokenizer is trained on when config.tokenizer.model is empty."""
  if isinstance(source, ConcatSource):
    per_part = max(1, max_records // max(1, len(source.parts)))
    return [c for p in source.parts for c in sample_captions(p, per_part)]
  if isinstance(source, ListSource):
    return [c for r in source.records for c in r.captions]
  indices = np.linspace(0, len(source) - 1, min(len(source), max_records)).round().astype(int)
  out = []
  for i in dict.fromkeys(indices.tolist()):
    record = source[i]
    if isinstance(record, ImageCaptions):
      out.extend(record.captions)
  return out


