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
from rils_jax.data import tfds_source

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
  workers reopen the source).

  Raises (constructor):
    FileNotFoundError: when the dataset is not prepared (see `tfds_source.open_data_source`).
    KeyError: when the first example lacks `image_key` or `label_key`.
  """

  def __init__(self, name: str, split: str, data_dir: str, image_key: str, label_key: str):
    self._args = dict(name=name, split=split, data_dir=data_dir or None)
    self.image_key, self.label_key = image_key, label_key
    self._source = None
    self._length = len(self._open())
    if self._length:
      first = self._open()[0]
      tfds_source.lookup(first, image_key)  # Errors now, not mid-evaluation.
      int(tfds_source.lookup(first, label_key))

  def _open(self):
    if self._source is None:
      self._source = tfds_source.open_data_source(**self._args)
    return self._source

  def __getstate__(self):
    return dict(self.__dict__, _source=None)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    example = self._open()[int(index)]
    return (np.asarray(tfds_source.lookup(example, self.image_key)),
            int(tfds_source.lookup(example, self.label_key)))


def _check_keys(spec: Dict[str, Any], allowed) -> None:
  unknown = set(spec) - set(allowed)
  if unknown:
    raise ValueError(f'unknown keys {sorted(unknown)} in the dataset spec {spec}; a '
                     f'{spec["kind"]} dataset takes {sorted(allowed)}')


def load(spec: Dict[str, Any]) -> LabelledImages:
  """Opens a dataset spec (see the module docstring).

  Raises:
    ValueError: for an unknown kind or key, a dataset without images, a class folder without
      images, or a TFDS example without the image or label key.
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
    split = spec.get('split', 'test')
    label_key, image_key = spec.get('label_key', 'label'), spec.get('image_key', 'image')
    try:
      items = TfdsLabelled(spec['name'], split, spec.get('data_dir', ''), image_key, label_key)
    except KeyError as e:
      raise ValueError(f'TFDS {spec["name"]}/{split}: {e.args[0]}') from e
    if not len(items):
      raise ValueError(f'TFDS {spec["name"]}/{split} is empty')
    classes = list(spec.get('class_names') or [])
    if not classes:
      # Imported here for start-up time: it takes seconds, and only TFDS specs need it.
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      builder = tfds.builder(spec['name'], data_dir=spec.get('data_dir') or None)
      feature = builder.info.features
      for part in label_key.split('/'):
        feature = feature[part]
      classes = list(getattr(feature, 'names', None) or [])
      if not classes:
        raise ValueError(f'the label feature {label_key!r} of {spec["name"]} has no class '
                         'names: give class_names in the dataset spec')
    return LabelledImages(items, [c.replace('_', ' ') for c in classes],
                          f'{spec["name"]}/{split}')
  raise ValueError(f"a dataset spec's kind must be 'folder' or 'tfds', got {spec}")

