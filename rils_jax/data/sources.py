"""Readers of image-caption and labelled-image datasets into in-memory record lists.

- CSV `image,caption` + an image folder (the Flickr8k / Kaggle layout): one row per caption.
- COCO captions JSON (`images[].id/file_name`, `annotations[].image_id/caption`) + image folder.
- Image folder `<class_name>/<file>` for zero-shot classification.

Records group all captions of an image, in file order. Empty or whitespace-only captions and
repeats of a caption of the same image are dropped and counted; an image left with no caption
is dropped and counted. CSV lines that are not UTF-8 are read as Windows-1252 (the usual
origin of such files) and counted. Images are not opened here: missing or corrupt files are
found (and counted) by the input pipeline.
"""

import codecs
import collections
import csv
import io
import dataclasses
import json
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging

# Long captions are legal (the tokenizer truncates them); the csv module's default 128 KB field
# limit would turn one into a crash.
csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


@dataclasses.dataclass(frozen=True)
class ImageCaptions:
  """One image and all its captions. `image` is a file path."""
  image: str
  captions: Tuple[str, ...]


@dataclasses.dataclass
class SourceStats:
  """What a reader kept and dropped."""
  images: int = 0
  captions: int = 0
  empty_captions: int = 0
  images_without_caption: int = 0
  captions_without_image: int = 0  # COCO annotations whose image_id is not in `images`.
  duplicate_captions: int = 0  # Repeats of a caption of the same image.
  duplicate_image_ids: int = 0  # COCO `images` entries whose id was already listed.
  non_utf8_lines: int = 0  # CSV lines decoded as Windows-1252.

  def add(self, other: 'SourceStats') -> 'SourceStats':
    return SourceStats(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                dataclasses.astuple(other))))


def _group(pairs: Sequence[Tuple[str, str]], image_dir: str, order: Sequence[str],
           ) -> Tuple[List[ImageCaptions], SourceStats]:
  captions: Dict[str, List[str]] = collections.OrderedDict((name, []) for name in order)
  stats = SourceStats()
  for name, caption in pairs:
    caption = ' '.join(caption.split()) if caption else ''
    if not caption:
      stats.empty_captions += 1
      captions.setdefault(name, [])
      continue
    if caption in captions.setdefault(name, []):
      stats.duplicate_captions += 1
      continue
    captions[name].append(caption)
  records = []
  for name, caps in captions.items():
    if not caps:
      stats.images_without_caption += 1
      continue
    records.append(ImageCaptions(os.path.join(image_dir, name), tuple(caps)))
    stats.captions += len(caps)
  stats.images = len(records)
  return records, stats


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


def read_csv_captions(captions_csv: str, image_dir: str) -> Tuple[List[ImageCaptions], SourceStats]:
  """Reads a CSV with header `image,caption` (extra columns ignored, any number of rows per image).

  Raises:
    FileNotFoundError: if the CSV or the image folder does not exist.
    ValueError: if the header lacks `image` or `caption`, or the file is malformed (the message
      names the line).
  """
  if not os.path.isfile(captions_csv):
    raise FileNotFoundError(f'captions CSV not found: {captions_csv}')
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f'image folder not found: {image_dir}')
  lines, non_utf8 = read_text(captions_csv)
  with io.StringIO(lines, newline='') as f:
    reader = csv.DictReader(f)
    if not {'image', 'caption'} <= set(reader.fieldnames or []):
      raise ValueError(f'{captions_csv}: header must contain "image" and "caption", '
                       f'got {reader.fieldnames}')
    pairs = []
    try:
      for row in reader:
        caption = row['caption'] or ''
        if '\n' in caption or '\r' in caption:
          # An unbalanced quote swallows every following row into one field.
          raise ValueError(f'{captions_csv}, line {reader.line_num}: a caption spans several '
                           'lines (an unbalanced " quote?)')
        pairs.append((row['image'] or '', caption))
    except csv.Error as e:
      raise ValueError(f'{captions_csv}, line {reader.line_num}: {e}') from e
  order = list(dict.fromkeys(name for name, _ in pairs if name))
  records, stats = _group([p for p in pairs if p[0]], image_dir, order)
  stats.non_utf8_lines = non_utf8
  return records, stats


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


def read_coco_captions(annotations_json: str, image_dir: str
                       ) -> Tuple[List[ImageCaptions], SourceStats]:
  """Reads the official COCO captions JSON layout, images in the order of `images`.

  Raises:
    FileNotFoundError: if the JSON or the image folder does not exist.
    ValueError: if the file is not valid JSON in the COCO captions layout.
  """
  if not os.path.isfile(annotations_json):
    raise FileNotFoundError(f'COCO captions JSON not found: {annotations_json}')
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f'image folder not found: {image_dir}')
  try:
    with open(annotations_json, 'rb') as f:
      raw = f.read()
    try:
      text = raw.decode('utf-8-sig')
    except UnicodeDecodeError:
      # JSON must be UTF-8; keep the readable captions rather than lose the whole file.
      logging.warning('%s is not valid UTF-8; undecodable bytes are replaced', annotations_json)
      text = raw.decode('utf-8-sig', errors='replace')
    data = json.loads(text)
    names, duplicate_ids = {}, 0
    for img in data['images']:
      if img['id'] in names:  # The first entry of an id wins.
        duplicate_ids += 1
        continue
      names[img['id']] = img['file_name']
    annotations = [(a.get('image_id'), str(a.get('caption') or ''))
                   for a in data['annotations']]
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f'{annotations_json} is not a COCO captions file (needs "images" with '
                     f'"id" and "file_name", and "annotations"): {type(e).__name__}: {e}') from e
  pairs = [(names[i], caption) for i, caption in annotations if i in names]
  records, stats = _group(pairs, image_dir, list(names.values()))
  stats.captions_without_image = len(annotations) - len(pairs)
  stats.duplicate_image_ids = duplicate_ids
  return records, stats


def read_image_captions(source: Mapping[str, Any]) -> Tuple[List[ImageCaptions], SourceStats]:
  """Reads one source config: `kind` ('csv' or 'coco'), `captions` (file), `images` (folder),
  optional `select` (slice of the image list, see `select`).

  Raises:
    ValueError: for an unknown kind or a missing key; the readers' errors otherwise.
  """
  readers = {'csv': read_csv_captions, 'coco': read_coco_captions}
  for key in ('kind', 'captions', 'images'):
    if key not in source:
      raise ValueError(f'image-caption source {dict(source)} lacks {key!r}')
  if source['kind'] not in readers:
    raise ValueError(f"unknown image-caption source kind {source['kind']!r}; one of "
                     f'{list(readers)}')
  records, stats = readers[source['kind']](source['captions'], source['images'])
  records = select(records, source.get('select'))
  return records, dataclasses.replace(stats, images=len(records),
                                      captions=sum(len(r.captions) for r in records))


def read_sources(sources: Sequence[Mapping[str, Any]]
                 ) -> Tuple[List[ImageCaptions], SourceStats]:
  """Concatenates the records of several sources (see `read_image_captions`)."""
  records, stats = [], SourceStats()
  for source in sources:
    r, s = read_image_captions(source)
    records.extend(r)
    stats = stats.add(s)
  return records, stats


def read_image_folder(root: str, max_per_class: Optional[int] = None
                      ) -> Tuple[List[str], List[int], List[str]]:
  """Reads an image-folder dataset `<root>/<class_name>/<image>`.

  Classes are the sorted sub-folder names; files are sorted within a class; the first
  `max_per_class` files of each class are kept when given.

  Returns:
    (paths, labels, class_names).

  Raises:
    FileNotFoundError: if `root` does not exist.
    ValueError: if it holds no class folder with images.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f'image folder dataset not found: {root}')
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  paths, labels = [], []
  for label, name in enumerate(classes):
    files = sorted(f for f in os.listdir(os.path.join(root, name))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    files = files[:max_per_class] if max_per_class else files
    paths.extend(os.path.join(root, name, f) for f in files)
    labels.extend([label] * len(files))
  if not paths:
    raise ValueError(f'{root} holds no <class>/<image> files')
  return paths, labels, classes
