r"""Converts image-caption data to ArrayRecord shards (rils_jax/data/arrayrecord.py).

  python -m rils_jax.data.convert --kind=csv --captions=../shared/data/flickr8k_1k/captions.csv \
      --images=../shared/data/flickr8k_1k/images --output=/tmp/flickr/train --resize=256
  python -m rils_jax.data.convert --kind=webdataset --files='/data/laion/{00000..00099}.tar' \
      --output=/data/laion_ar/train --num_shards=1024 --resize=384
  python -m rils_jax.data.convert --kind=folder --images=/data/img2dataset_files --output=...

Kinds: `csv` and `coco` (caption file + image folder, as the training sources), `webdataset`
(tar shards, see webdataset.py) and `folder`: an image tree whose images have a caption file
beside them with the same stem (`0001.jpg` + `0001.txt`, one caption per line: img2dataset's
`files` format).

Every image is decoded once, so that the shards hold only images that training can read; an
undecodable or missing image, or one without a caption, is left out and counted. With
`--resize=N` an image whose shorter side exceeds N is downscaled (bicubic) to N and stored as
JPEG (`--quality`), upright (EXIF orientation applied); other images keep their original bytes.
Random access is what makes grain's order deterministic and its iterator checkpointable, and
small JPEGs decode faster: converting LAION-style shards once pays for itself.

Prints one JSON line: records written, skipped by reason, shards, bytes, seconds, records/s.
Train on the output with `dict(kind='arrayrecord', files='PREFIX-*.array_record')`.
"""

import collections
import concurrent.futures
import io
import json
import multiprocessing
import os
import time
from typing import Optional, Tuple

from absl import app
from absl import flags

from rils_jax import console
from rils_jax import progress as progress_lib
from rils_jax.data import arrayrecord
from rils_jax.data import records as records_lib
from rils_jax.data import sources
from rils_jax.data import transforms
from rils_jax.data import webdataset

KINDS = ('csv', 'coco', 'webdataset', 'folder')


def _define_flags():
  flags.DEFINE_enum('kind', None, KINDS, 'Input layout.')
  flags.DEFINE_string('captions', None, 'csv / coco: the caption file.')
  flags.DEFINE_string('images', None, 'csv / coco: the image folder; folder: the image tree.')
  flags.DEFINE_string('files', None, 'webdataset: shard pattern (globs, {a..b} ranges).')
  flags.DEFINE_string('output', None, 'Output prefix: PREFIX-00000-of-00008.array_record.')
  flags.DEFINE_integer('num_shards', 0, 'Output shards (0: one per 10,000 records).')
  flags.DEFINE_integer('resize', 0, 'Downscale images whose shorter side exceeds this (0: keep).')
  flags.DEFINE_integer('quality', 95, 'JPEG quality of resized images.')
  flags.DEFINE_integer('num_workers', os.cpu_count() or 1, 'Decoding processes.')
  flags.DEFINE_bool('overwrite', False, 'Replace shards that already carry the output prefix.')
  flags.mark_flags_as_required(['kind', 'output'])


def read_caption_folder(root: str) -> Tuple[records_lib.ListSource, int]:
  """Images under `root` (recursive, sorted) with a same-stem `.txt` caption file beside them.

  Returns:
    The source (one record per image with at least one non-empty caption line) and the number
    of images without a caption file.

  Raises:
    FileNotFoundError: if `root` is not a folder.
    ValueError: if it holds no captioned image.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f'image folder not found: {root}')
  records, without = [], 0
  for directory, subdirs, files in os.walk(root):
    subdirs.sort()
    for name in sorted(files):
      if not name.lower().endswith(sources.IMAGE_EXTENSIONS):
        continue
      path = os.path.join(directory, name)
      caption_file = os.path.splitext(path)[0] + '.txt'
      if not os.path.isfile(caption_file):
        without += 1
        continue
      text, _ = records_lib.read_text(caption_file)
      captions = tuple(dict.fromkeys(records_lib.clean_captions(text.splitlines())))
      if captions:
        records.append(records_lib.ImageCaptions(path, captions))
      else:
        without += 1
  if not records:
    raise ValueError(f'{root} holds no image with a .txt caption file beside it')
  return records_lib.ListSource(records, root), without


def convert_record(record, resize: int, quality: int, key_root: str = ''
                   ) -> Tuple[Optional[bytes], str]:
  """(ArrayRecord record, '') or (None, reason) for one `ImageCaptions` or `BadRecord`.

  The record's key is the image's path relative to `key_root` when given (its name in the
  dataset), else the source's name for it (WebDataset: SHARD:KEY).
  """
  if isinstance(record, records_lib.BadRecord):
    return None, 'unreadable record'
  captions = records_lib.clean_captions(record.captions)
  if not captions:
    return None, 'no caption'
  try:
    img = transforms.load_image(record.image, record.name)
  except transforms.BadImageError:
    return None, 'bad image'
  if resize and min(img.size) > resize:
    img = transforms.resize_shorter_side(img, resize)
    out = io.BytesIO()
    img.save(out, 'JPEG', quality=quality)
    data = out.getvalue()
  elif isinstance(record.image, str):
    with open(record.image, 'rb') as f:
      data = f.read()
  else:
    data = bytes(record.image)
  key = (os.path.relpath(record.image, key_root) if key_root and isinstance(record.image, str)
         else record.name)
  return arrayrecord.encode(key, data, captions), ''


_WORKER = {}


def _init_worker(source, resize: int, quality: int, key_root: str) -> None:
  # The source reaches each worker once, not with every chunk.
  _WORKER.update(source=source, resize=resize, quality=quality, key_root=key_root)


def _convert_range(start: int, stop: int):
  w = _WORKER
  return [convert_record(w['source'][i], w['resize'], w['quality'], w['key_root'])
          for i in range(start, stop)]


def open_input(kind: str, captions: Optional[str], images: Optional[str], files: Optional[str]
               ) -> Tuple[records_lib.RecordSource, int]:
  """The records to convert and how many inputs the reader already left out.

  Raises:
    ValueError / FileNotFoundError: for missing flags or files (the readers' errors).
  """
  if kind in ('csv', 'coco'):
    if not captions or not images:
      raise ValueError(f'--kind={kind} needs --captions and --images')
    source = sources.open_source(dict(kind=kind, captions=captions, images=images))
    return source, source.stats.images_without_caption
  if kind == 'webdataset':
    if not files:
      raise ValueError('--kind=webdataset needs --files')
    source = webdataset.WebDatasetSource(files)
    return source, source.stats.images_without_caption + source.stats.captions_without_image
  if not images:
    raise ValueError('--kind=folder needs --images')
  return read_caption_folder(images)


def convert(source: records_lib.RecordSource, output: str, num_shards: int = 0, resize: int = 0,
            quality: int = 95, num_workers: int = 1, chunk: int = 64,
            overwrite: bool = False, key_root: str = '') -> dict:
  """Writes the records of `source` to ArrayRecord shards `output-*-of-*.array_record`.

  The shards appear only when all are written; shards of an earlier conversion with the same
  prefix are an error, or with `overwrite` are removed once the new ones are complete. Keys:
  see `convert_record`.

  Returns:
    dict(records, skipped={reason: count}, shards, bytes, seconds, records_per_s, files).

  Raises:
    ValueError: if `source` is empty, nothing could be converted, an option is out of range,
      or shards with this prefix exist and `overwrite` is off.
    OSError: if the output cannot be written.
  """
  if not len(source):
    raise ValueError('no record to convert')
  if resize < 0 or not 1 <= quality <= 100 or num_shards < 0:
    raise ValueError(f'--resize={resize} must be >= 0, --quality={quality} in [1, 100], '
                     f'--num_shards={num_shards} >= 0')
  old = arrayrecord.existing_shards(output)
  if old and not overwrite:
    raise ValueError(f'shards named {output}-*{arrayrecord.SUFFIX} exist already ({len(old)} '
                     f'files, e.g. {old[0]}); choose another --output or pass --overwrite')
  # More shards than records would only add empty files.
  num_shards = min(num_shards or max(1, -(-len(source) // 10_000)), len(source))
  writer = arrayrecord.ShardWriter(output, num_shards, len(source))
  try:
    return _convert(source, writer, old, (resize, quality, key_root), num_workers, chunk,
                    output)
  except BaseException:
    writer.abort()
    raise


def _convert(source, writer, old, options, num_workers, chunk, output) -> dict:
  skipped = collections.Counter()
  start = time.time()
  ranges = collections.deque((i, min(i + chunk, len(source)))
                             for i in range(0, len(source), chunk))
  num_workers = max(1, num_workers)
  progress = progress_lib.Progress(f'Converting to {output}', len(source))
  # Spawned, not forked: forking a process whose JAX or grain threads run can deadlock.
  with concurrent.futures.ProcessPoolExecutor(
      num_workers, mp_context=multiprocessing.get_context('spawn'), initializer=_init_worker,
      initargs=(source, *options)) as pool:
    in_flight = collections.deque()
    while ranges or in_flight:
      while ranges and len(in_flight) < 4 * num_workers:  # Bounded: results wait in memory.
        a, b = ranges.popleft()
        in_flight.append((a, pool.submit(_convert_range, a, b)))
      a, future = in_flight.popleft()  # In order: the shards keep the input order.
      for i, (record, reason) in enumerate(future.result(), a):
        if record is None:
          skipped[reason] += 1
        else:
          writer.write(i, record)
      progress.update(len(future.result()))
  if not writer.written:
    raise ValueError(f'no record could be converted: {dict(skipped)}')
  paths = writer.close()
  for path in old:  # Only now that the new set is in place.
    if path not in paths:
      os.remove(path)
  seconds = time.time() - start
  return dict(records=writer.written, skipped=dict(skipped), shards=len(paths),
              bytes=sum(os.path.getsize(p) for p in paths), seconds=round(seconds, 2),
              records_per_s=round(len(source) / seconds, 1),
              files=f'{output}-*{arrayrecord.SUFFIX}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  source, left_out = open_input(f.kind, f.captions, f.images, f.files)  # Errors: console.run.
  try:
    out = convert(source, f.output, f.num_shards, f.resize, f.quality, f.num_workers,
                  overwrite=f.overwrite, key_root=f.images if f.kind != 'webdataset' else '')
  except RuntimeError as e:  # array_record's writer reports an unwritable output so.
    raise OSError(f'cannot write {f.output}: {e}') from e
  if left_out:
    out['skipped']['no caption or no image (reader)'] = left_out
  print(json.dumps(out))


if __name__ == '__main__':
  _define_flags()
  console.run(main)
