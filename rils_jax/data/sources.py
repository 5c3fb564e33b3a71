"""Training sources opened from their config dicts, the CSV / COCO caption readers, and the
reader of labelled image folders.

`open_source` opens one entry of `config.input.sources` as a `records.RecordSource`:
- `csv`: CSV `image,caption` + an image folder (the Flickr8k / Kaggle layout), one row per
  caption; `captions`, `images`.
- `coco`: COCO captions JSON (`images[].id/file_name`, `annotations[].image_id/caption`) + an
  image folder; `captions`, `images`.
- `txt`: a folder of images, each with its captions in a `.txt` file of the same name (one
  caption per line: `dog.jpg` + `dog.txt`), sub-folders included; `images`.
- `arrayrecord`: shards written by `python -m rils_jax.data.convert`; `files` (a shard pattern,
  see rils_jax/data/shards.py).
- `webdataset`: img2dataset / WebDataset `.tar` shards of `KEY.jpg` + `KEY.txt`; `files`.
- `tfds`: a prepared TFDS dataset read with `tfds.data_source` (no TensorFlow); `name`,
  `split`, optional `data_dir`, `image_key` ('image'), `caption_key` ('captions/text').
Every kind takes `select` (a slice of its records, e.g. ':-100') and `weight` (mixtures: see
rils_jax/data/pipeline.py). Image-folder datasets `<class_name>/<file>` are read by
`read_image_folder` for zero-shot classification.

Records group all captions of an image, in file order. Empty or whitespace-only captions and
repeats of a caption of the same image are dropped and counted; an image left with no caption
is dropped and counted. CSV lines that are not UTF-8 are read as Windows-1252 (the usual
origin of such files) and counted. Images are not opened here: missing or corrupt files are
found (and counted) by the input pipeline; a CSV or COCO source is refused when none of a
sample of its image files exists (`check_images_exist`: a wrong image folder).
"""

import collections
import csv
import dataclasses
import io
import json
import math
import numbers
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from rils_jax.data import arrayrecord
from rils_jax.data import records as records_lib
from rils_jax.data import tfds_source
from rils_jax.data import webdataset
from rils_jax.data.records import ImageCaptions, SourceStats

# Long captions are legal (the tokenizer truncates them); the csv module's default 128 KB field
# limit would turn one into a crash.
csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


def _check_path(path: str, what: str, folder: bool) -> None:
  """FileNotFoundError naming `what` when `path` is not a folder (`folder`) or not a file:
  missing, or the other kind; ValueError for a URL (these readers use local file calls)."""
  if '://' in path:
    raise ValueError(f'{what} {path}: CSV, COCO and txt sources read local files; copy them to a '
                     'local disk, or give the data as WebDataset or ArrayRecord shards, whose '
                     '`files` may be gs:// URLs')
  want, other = ('folder', 'file') if folder else ('file', 'folder')
  if not (os.path.isdir(path) if folder else os.path.isfile(path)):
    problem = f'is a {other}, not a {want}' if os.path.exists(path) else 'not found'
    raise FileNotFoundError(f'{what} {problem}: {path}')


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


def read_csv_captions(captions_csv: str, image_dir: str) -> Tuple[List[ImageCaptions], SourceStats]:
  """Reads a CSV with header `image,caption` (extra columns ignored, any number of rows per image).

  Raises:
    FileNotFoundError: if the CSV or the image folder does not exist (or is a folder / a file).
    ValueError: for a URL (local files only); if the header lacks `image` or `caption`, or the
      file is malformed (the message names the line).
  """
  _check_path(captions_csv, 'captions CSV', folder=False)
  _check_path(image_dir, 'image folder', folder=True)
  lines, non_utf8 = records_lib.read_text(captions_csv)
  with io.StringIO(lines, newline='') as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames:
      raise ValueError(f'{captions_csv} is empty: it needs a header "image,caption" and a row '
                       'per caption')
    # "image, caption" and "Image,Caption" too.
    reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
    if not {'image', 'caption'} <= set(reader.fieldnames):
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


def read_coco_captions(annotations_json: str, image_dir: str
                       ) -> Tuple[List[ImageCaptions], SourceStats]:
  """Reads the official COCO captions JSON layout, images in the order of `images`.

  Raises:
    FileNotFoundError: if the JSON or the image folder does not exist (or is a folder / a file).
    ValueError: for a URL (local files only); if the file is not valid JSON in the COCO
      captions layout.
  """
  _check_path(annotations_json, 'COCO captions JSON', folder=False)
  _check_path(image_dir, 'image folder', folder=True)
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


def read_txt_captions(image_dir: str) -> Tuple[List[ImageCaptions], SourceStats]:
  """Reads a folder of images with a `.txt` of captions (one per line) beside each, in sorted
  path order, sub-folders included; an image without its `.txt` counts as without caption.

  Raises:
    FileNotFoundError: if the folder does not exist (or is a file).
    ValueError: for a URL (local files only).
  """
  _check_path(image_dir, 'image folder', folder=True)
  names = sorted(os.path.relpath(os.path.join(folder, f), image_dir)
                 for folder, _, files in os.walk(image_dir) for f in files
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  pairs, non_utf8 = [], 0
  for name in names:
    text_path = os.path.join(image_dir, os.path.splitext(name)[0] + '.txt')
    if not os.path.isfile(text_path):
      continue
    text, bad = records_lib.read_text(text_path)
    non_utf8 += bad
    pairs += [(name, line) for line in text.splitlines()]
  records, stats = _group(pairs, image_dir, names)
  stats.non_utf8_lines = non_utf8
  return records, stats


def read_image_captions(source: Mapping[str, Any]) -> Tuple[List[ImageCaptions], SourceStats]:
  """Reads one source config: `kind` ('csv', 'coco' or 'txt'), `captions` (file; not for
  'txt'), `images` (folder), optional `select` (slice of the image list, see `select`).

  Raises:
    ValueError: for an unknown kind or a missing key; the readers' errors otherwise.
  """
  readers = {'csv': read_csv_captions, 'coco': read_coco_captions}
  kind = source.get('kind')
  for key in ('kind', 'images') + (('captions',) if kind != 'txt' else ()):
    if key not in source:
      raise ValueError(f'image-caption source {dict(source)} lacks {key!r}')
  if kind == 'txt':
    records, stats = read_txt_captions(source['images'])
  elif kind in readers:
    records, stats = readers[kind](source['captions'], source['images'])
  else:
    raise ValueError(f"unknown image-caption source kind {kind!r}; one of "
                     f"{list(readers) + ['txt']}")
  records = records_lib.select(records, source.get('select'))
  if kind != 'txt':  # The txt reader lists files that exist.
    check_images_exist(records, source['captions'], source['images'])
  return records, dataclasses.replace(stats, images=len(records),
                                      captions=sum(len(r.captions) for r in records))


# (captions, image folder) of the sources whose missing images this process has warned about.
_WARNED_MISSING = set()


def check_images_exist(records: Sequence[ImageCaptions], captions: str, image_dir: str,
                       sample: int = 64) -> None:
  """Looks for `sample` of the records' image files, evenly spread over the list, before any is
  decoded: a wrong image folder is refused at once rather than after a thousand skipped
  examples, and a partly missing folder is said once per process (the pipeline skips and counts
  each missing image).

  Raises:
    FileNotFoundError: if none of the sampled images exists.
  """
  if not records:
    return
  picks = sorted(set(np.linspace(0, len(records) - 1, min(sample, len(records))).astype(int)))
  missing = [records[i].image for i in picks if not os.path.isfile(records[i].image)]
  if len(missing) == len(picks):
    raise FileNotFoundError(
        f'none of {len(picks)} images sampled from {captions} is in {image_dir} (e.g. '
        f'{missing[0]}): check the image folder')
  if missing and (captions, image_dir) not in _WARNED_MISSING:
    _WARNED_MISSING.add((captions, image_dir))  # Configs read a source twice (all, then a slice).
    most = (' more than half: a run stops once more than config.input.max_skip_fraction of its '
            'examples are skipped;' if 2 * len(missing) > len(picks) else '')
    logging.warning('%d of %d images sampled from %s %s missing from %s (e.g. %s):%s missing '
                    'images are skipped and counted', len(missing), len(picks), captions,
                    'is' if len(missing) == 1 else 'are', image_dir, missing[0], most)


SOURCE_KINDS = ('csv', 'coco', 'txt', 'arrayrecord', 'webdataset', 'tfds')
_REQUIRED = {'csv': ('captions', 'images'), 'coco': ('captions', 'images'), 'txt': ('images',),
             'arrayrecord': ('files',), 'webdataset': ('files',), 'tfds': ('name', 'split')}
_OPTIONAL = {'select', 'weight'}
_KIND_OPTIONAL = {'webdataset': {'image_ext', 'caption_ext'},
                  'tfds': {'data_dir', 'image_key', 'caption_key'}}


def check_spec(spec: Mapping[str, Any]) -> None:
  """Checks a source config's keys (files are not opened).

  Raises:
    ValueError: for an unknown kind, a missing or unknown key.
  """
  spec = dict(spec)
  kind = spec.get('kind')
  if kind not in SOURCE_KINDS:
    raise ValueError(f'source {spec}: kind must be one of {list(SOURCE_KINDS)}, got {kind!r}')
  missing = [k for k in _REQUIRED[kind] if not spec.get(k)]
  if missing:
    raise ValueError(f'{kind} source {spec} lacks {missing}')
  unknown = set(spec) - {'kind'} - set(_REQUIRED[kind]) - _OPTIONAL - _KIND_OPTIONAL.get(kind,
                                                                                         set())
  if unknown:
    raise ValueError(f'{kind} source {spec}: unknown keys {sorted(unknown)}')
  for key, value in spec.items():
    if key in ('weight', 'image_ext'):
      continue
    if key == 'files' and isinstance(value, (list, tuple)) and all(
        isinstance(v, str) for v in value):
      continue
    if not isinstance(value, str):
      raise ValueError(f'{kind} source {spec}: {key} must be a string, got {value!r}')


def mixture_weights(specs: Sequence[Mapping[str, Any]]) -> Optional[List[float]]:
  """The sources' `weight`s, or None when none has one (the sources are then concatenated).

  Raises:
    ValueError: if only some sources have a weight, or one is not a positive number.
  """
  weights = [spec.get('weight') for spec in specs]
  if all(w is None for w in weights):
    return None
  if any(w is None for w in weights):
    raise ValueError(f'config.input.sources: either every source has a weight (a mixture) or '
                     f'none (concatenated), got {weights}')
  return check_weights(weights)


def check_weights(weights: Sequence[Any]) -> List[float]:
  """`weights` as floats.

  Raises:
    ValueError: unless every weight is a finite positive number.
  """
  out = []
  for w in weights:
    if isinstance(w, (bool, str, bytes)) or not isinstance(w, numbers.Real) or not (
        math.isfinite(w) and w > 0):
      raise ValueError(f'mixture weights must be finite positive numbers, got {list(weights)}')
    out.append(float(w))
  return out


def open_source(spec: Mapping[str, Any]) -> records_lib.RecordSource:
  """Opens one source config (see the module docstring for the kinds and their keys).

  Raises:
    ValueError: for an unknown kind, a missing or unknown key; each reader's errors otherwise
      (FileNotFoundError for missing files).
  """
  check_spec(spec)
  spec = dict(spec)
  kind = spec['kind']
  if kind in ('csv', 'coco', 'txt'):
    records, stats = read_image_captions(spec)
    return records_lib.ListSource(records, spec.get('captions', spec['images']), stats)
  if kind == 'arrayrecord':
    source = arrayrecord.ArrayRecordSource(spec['files'])
  elif kind == 'webdataset':
    source = webdataset.WebDatasetSource(
        spec['files'], image_ext=spec.get('image_ext', webdataset.IMAGE_EXTENSIONS),
        caption_ext=spec.get('caption_ext', 'txt'))
  else:
    source = tfds_source.TfdsSource(
        spec['name'], spec['split'], data_dir=spec.get('data_dir') or None,
        image_key=spec.get('image_key', 'image'),
        caption_key=spec.get('caption_key', 'captions/text'))
  return records_lib.SliceSource(source, spec['select']) if spec.get('select') else source


def open_sources(specs: Sequence[Mapping[str, Any]]) -> records_lib.ConcatSource:
  """Opens every entry of `config.input.sources` (see `open_source`); the concatenation's
  `parts` are the sources in order."""
  return records_lib.ConcatSource([open_source(spec) for spec in specs])


def read_sources(sources: Sequence[Mapping[str, Any]]
                 ) -> Tuple[List[ImageCaptions], SourceStats]:
  """Concatenates the records of several sources (see `read_image_captions`)."""
  records, stats = [], SourceStats()
  for source in sources:
    r, s = read_image_captions(source)
    records.extend(r)
    stats = stats.add(s)
  return records, stats


def read_image_folder(root: str, max_per_class: Optional[int] = None, per_class: str = ''
                      ) -> Tuple[List[str], List[int], List[str]]:
  """Reads an image-folder dataset `<root>/<class_name>/<image>`.

  Classes are the sorted sub-folder names; files are sorted within a class; `per_class` (a
  `select` slice such as ':500' or '500:') then keeps a slice of each class's files, and the
  first `max_per_class` of those are kept when given.

  Returns:
    (paths, labels, class_names).

  Raises:
    FileNotFoundError: if `root` does not exist.
    ValueError: if it holds no class folder with images, or a class folder without any.
  """
  _check_path(root, 'image folder dataset', folder=True)
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  paths, labels = [], []
  for label, name in enumerate(classes):
    files = sorted(f for f in os.listdir(os.path.join(root, name))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    files = records_lib.select(files, per_class)
    files = files[:max_per_class] if max_per_class else files
    paths.extend(os.path.join(root, name, f) for f in files)
    labels.extend([label] * len(files))
  if not paths:
    raise ValueError(f'{root} holds no <class>/<image> files'
                     + (f' in the per-class slice {per_class!r}' if per_class else ''))
  present = set(labels)
  empty = [name for label, name in enumerate(classes) if label not in present]
  if empty:  # It would still count as a class (chance level, zero-shot candidates).
    raise ValueError(f'class folders without images in {root}'
                     + (f' (per-class slice {per_class!r})' if per_class else '')
                     + f': {empty[:10]}; remove them or choose another slice')
  return paths, labels, classes
