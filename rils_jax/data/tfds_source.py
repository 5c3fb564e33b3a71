"""A prepared TFDS image-text dataset as a random-access source (`tfds.data_source`).

`tfds.data_source` reads the ArrayRecord files of a dataset that `tfds build` (or
`download_and_prepare` with `file_format='array_record'`) prepared, without TensorFlow, and
decodes each example to numpy: the image comes as a uint8 array (TFDS decodes it; skipping the
decoding needs TensorFlow) and the captions as strings. For `coco_captions` the defaults fit:
`image_key='image'`, `caption_key='captions/text'`.
"""

from typing import Optional

import numpy as np

from rils_jax.data import records


def _captions(value) -> tuple:
  """Text, bytes, or a list / array of them -> tuple of str.

  Raises:
    TypeError: for anything else (e.g. a caption key that names a nested feature dict).
  """
  if isinstance(value, (str, bytes)):
    value = [value]
  if isinstance(value, dict):
    raise TypeError(f'the caption feature is a dict with keys {sorted(value)}: name one of '
                    'them, e.g. captions/text')
  out = []
  for v in np.asarray(value, object).reshape(-1):
    if not isinstance(v, (str, bytes)):
      raise TypeError(f'captions must be text, got {type(v).__name__}')
    out.append(v.decode('utf-8', errors='replace') if isinstance(v, bytes) else v)
  return tuple(out)


def open_data_source(name: str, split: str, data_dir: Optional[str] = None):
  """`tfds.data_source(name, split=split, data_dir=data_dir, download=False)`.

  Raises:
    FileNotFoundError: when the dataset is unknown or not prepared as ArrayRecord there, with
      the `tfds build` command that prepares it (tfds's own message lists every registered
      dataset; only its first and last lines are kept).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises DatasetNotFoundError, AssertionError, ValueError.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = ' ... '.join(dict.fromkeys(lines[:1] + lines[-2:]))
    raise FileNotFoundError(
        f'TFDS dataset {name!r} split {split!r} is not prepared as ArrayRecord under '
        f'data_dir={data_dir or "the TFDS default"} (`tfds build {name} '
        f'--file_format=array_record`): {type(e).__name__}: {reason[:500]}') from e


def lookup(example, key: str):
  """`example[key]`, where '/' in `key` separates nested features.

  Raises:
    KeyError: naming the key and the example's keys.
  """
  if key in example:  # A flat key, which may contain '/' (e.g. 'image/id').
    return example[key]
  value = example
  for part in key.split('/'):
    if not (isinstance(value, dict) and part in value):
      raise KeyError(f'no {key!r} in the example (keys: {sorted(example)})')
    value = value[part]
  return value


class TfdsSource(records.RecordSource):
  """The examples of one split of a prepared TFDS dataset, as `ImageCaptions`.

  Args:
    name: dataset name, optionally with config and version (`coco_captions/2017:1.1.0`).
    split: TFDS split, slicing allowed (`train[:90%]`).
    data_dir: TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    image_key / caption_key: feature paths, '/' separating nested features.

  Raises (constructor):
    FileNotFoundError: if the dataset is not prepared in ArrayRecord format under `data_dir`.
    KeyError: if the first example lacks `image_key` or `caption_key`.
    TypeError: if its `caption_key` does not hold text.
  """

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None,
               image_key: str = 'image', caption_key: str = 'captions/text'):
    self._args = dict(name=name, split=split, data_dir=data_dir)
    self.image_key, self.caption_key = image_key, caption_key
    self.name = f'tfds:{name}[{split}]'
    self._source = None
    self._length = len(self._open())
    if self._length:
      first = self._open()[0]
      lookup(first, image_key)  # Errors now, not mid-run.
      _captions(lookup(first, caption_key))
    self.stats = records.SourceStats(images=self._length)
    self.counts_captions = False

  def _open(self):
    if self._source is None:
      self._source = open_data_source(**self._args)
    return self._source

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_source'] = None  # Each worker opens its own readers.
    return state

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    try:
      example = self._open()[index]
      image = lookup(example, self.image_key)
      return records.ImageCaptions(image if isinstance(image, bytes) else np.asarray(image),
                                   _captions(lookup(example, self.caption_key)),
                                   f'{self.name}:{index}')
    except Exception as e:  # A damaged example must cost itself, not the run.
      return records.BadRecord(f'{self.name} example {index}: {type(e).__name__}: {e}')
