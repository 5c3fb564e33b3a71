"""Labelled image sets for the classification evaluations: image folders and TFDS datasets.

A dataset spec is a dict:
  dict(kind='folder', root=PATH, per_class='', max_per_class=0)
      `<root>/<class_name>/<image>`; classes are the sorted folder names (underscores read as
      spaces in prompts); `per_class` ('start:stop', e.g. ':500') keeps a slice of each class's
      sorted files, so one folder can give disjoint train and test sets.
  dict(kind='tfds', name='cifar10', split='test', data_dir='', image_key='image',
       label_key='label', class_names=[])
      a prepared TFDS dataset read with `tfds.data_source` (no TensorFlow; ArrayRecord files).
      `split` takes TFDS slicing ('train[:10%]'). Class names come from the label feature, or
      from `class_names`.
"""

import dataclasses
import os
from typing import Any, Dict, List, Sequence

import numpy as np

from rils_jax.data import sources

FOLDER_KEYS = {'kind', 'root', 'per_class', 'max_per_class'}
TFDS_KEYS = {'kind', 'name', 'split', 'data_dir', 'image_key', 'label_key', 'class_names'}


@dataclasses.dataclass
class LabelledImages:
  """`items[i]` is `(image, label)`: image a path or a uint8 array, label an int class index.

  `items` is a list (folders) or a lazy random-access source (TFDS, read on access).
  """
  items: Sequence
  classes: List[str]
  name: str

  def __len__(self) -> int:
    return len(self.items)


class TfdsLabelled:
  """Random-access `(image uint8 (H, W, 3), label)` over a `tfds.data_source`; picklable (grain
  workers reopen the source)."""

  def __init__(self, name: str, split: str, data_dir: str, image_key: str, label_key: str):
    self._args = dict(name=name, split=split, data_dir=data_dir or None)
    self.image_key, self.label_key = image_key, label_key
    self._source = None
    self._length = len(self._open())

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # Imported on use: it is slow to import.
      self._source = tfds.data_source(**self._args)
    return self._source

  def __getstate__(self):
    return dict(self.__dict__, _source=None)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    example = self._open()[int(index)]
    return np.asarray(example[self.image_key]), int(example[self.label_key])


def _check_keys(spec: Dict[str, Any], allowed) -> None:
  unknown = set(spec) - set(allowed)
  if unknown:
    raise ValueError(f'unknown keys {sorted(unknown)} in the dataset spec {spec}; a '
                     f'{spec["kind"]} dataset takes {sorted(allowed)}')


def load(spec: Dict[str, Any]) -> LabelledImages:
  """Opens a dataset spec (see the module docstring).

  Raises:
    ValueError: for an unknown kind or key, or a dataset without images.
    FileNotFoundError: for a missing folder, or a TFDS dataset that is not prepared.
  """
  spec = dict(spec)
  kind = spec.get('kind')
  if kind == 'folder':
    _check_keys(spec, FOLDER_KEYS)
    if not spec.get('root'):
      raise ValueError(f'a folder dataset needs a root, got {spec}')
    paths, labels, classes = sources.read_image_folder(
        spec['root'], spec.get('max_per_class') or None, spec.get('per_class', ''))
    name = os.path.basename(os.path.normpath(spec['root'])) + (
        f'[{spec["per_class"]} per class]' if spec.get('per_class') else '')
    return LabelledImages(list(zip(paths, labels)), [c.replace('_', ' ') for c in classes],
                          name)
  if kind == 'tfds':
    _check_keys(spec, TFDS_KEYS)
    if not spec.get('name'):
      raise ValueError(f'a tfds dataset needs a name, got {spec}')
    import tensorflow_datasets as tfds
    split = spec.get('split', 'test')
    try:
      builder = tfds.builder(spec['name'], data_dir=spec.get('data_dir') or None)
    except Exception as e:  # tfds raises its own DatasetNotFoundError for unknown names.
      raise FileNotFoundError(f'TFDS dataset {spec["name"]!r}: {e}') from e
    label_key, image_key = spec.get('label_key', 'label'), spec.get('image_key', 'image')
    try:
      items = TfdsLabelled(spec['name'], split, spec.get('data_dir', ''), image_key, label_key)
    except Exception as e:
      raise FileNotFoundError(
          f'cannot read TFDS {spec["name"]}/{split} from {builder.data_dir}: {e}. Prepare it '
          f'once with `tfds build {spec["name"]} --file_format=array_record`') from e
    classes = list(spec.get('class_names') or [])
    if not classes:
      feature = builder.info.features[label_key]
      classes = list(getattr(feature, 'names', None) or [])
      if not classes:
        raise ValueError(f'the label feature {label_key!r} of {spec["name"]} has no class '
                         'names: give class_names in the dataset spec')
    if not len(items):
      raise ValueError(f'TFDS {spec["name"]}/{split} is empty')
    return LabelledImages(items, [c.replace('_', ' ') for c in classes],
                          f'{spec["name"]}/{split}')
  raise ValueError(f"a dataset spec's kind must be 'folder' or 'tfds', got {spec}")

