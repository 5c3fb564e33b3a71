"""The evaluators a config names, run at the end of training, every N steps, or on a checkpoint.

`config.evals` holds `batch_size` (images or texts per embedding batch) and any number of named
evaluators (big_vision style), each a dict with `kind`, `every` (run every N training steps; 0:
only at the end of training and by `rils_jax.evaluate`) and the kind's own keys:

  zeroshot      data (dataset spec, see datasets.py), templates ('short', 'clip_imagenet_7',
                'clip_imagenet_80', 'clip_cifar_18' or a list), class_names (optional list)
  retrieval     sources (caption sources as in config.input.sources: csv / coco, ...)
  linear_probe  train, test (dataset specs), l2 (sweep), val_fraction, max_steps, seed
  fewshot       train (the pool shots are drawn from), test, shots, seeds, l2
  lowshot       train, test, fractions (of the training labels), seeds, l2 (sweep),
                val_fraction, max_steps
  knn           train, test, k, temperature

Metrics are `NAME/metric` (e.g. `zeroshot/top1`, `fewshot/5shot_top1`), plus
`NAME/skipped_images` for images that could not be decoded. Evaluators run in name order.
Settings are checked and datasets opened when the evaluators are built (a missing folder, a
mistyped setting, train and test sets with different classes, or too few images for the shots
fail before training starts); each run embeds a dataset that several evaluators share once.

Each kind is a module that owns its defaults, its checks and its run function (see `KINDS`):
`DEFAULTS` (its settings; a dataset setting defaults to None), `DATASETS` (the settings that
name data: 'images' for a labelled image set, see datasets.py, 'captions' for caption
sources), `check_settings(name, spec)`, optionally `check_data(spec, data)`, and
`run(evaluations, spec, params, embedder, cache) -> {metric: value}`. A new kind is a new
module and one line in `KINDS`.
"""


import json
import time
from typing import Any, Dict, List

import ml_collections
import numpy as np
from absl import logging

from rils_jax.data import records
from rils_jax.data import sources
from rils_jax.evals import datasets
from rils_jax.evals import fewshot
from rils_jax.evals import knn
from rils_jax.evals import linear
from rils_jax.evals import lowshot
from rils_jax.evals import retrieval
from rils_jax.evals import settings
from rils_jax.evals import zeroshot

KINDS = {'zeroshot': zeroshot, 'retrieval': retrieval, 'linear_probe': linear,
         'fewshot': fewshot, 'lowshot': lowshot, 'knn': knn}
_COMMON = dict(kind=None, every=0)
# Kinds that embed text: a model without a text tower (`config.loss.kind='mae'`) cannot run them.
TEXT_KINDS = ('zeroshot', 'retrieval')


def check_model_kind(evals: ml_collections.ConfigDict, loss_kind: str) -> None:
  """Refuses evaluators that need a text tower for a model that has none (MAE).

  Raises:
    ValueError: naming the evaluators and what an MAE model is evaluated with.
  """
  if loss_kind != 'mae':
    return
  names = sorted(name for name, value in _plain(evals).items()
                 if isinstance(value, dict) and value.get('kind') in TEXT_KINDS)
  if names:
    raise ValueError(f'config.evals {", ".join(names)} embed text, and a '
                     "config.loss.kind='mae' model has no text tower: evaluate it with "
                     'linear_probe, fewshot, lowshot, knn or fine-tuning (rils_jax.finetune)')


def _plain(value):
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  return value


def evaluator_specs(evals: ml_collections.ConfigDict) -> Dict[str, Dict[str, Any]]:
  """name -> the evaluator's settings with the kind's defaults filled in, in name order.

  Raises:
    ValueError: for a bad `batch_size`, an entry that is not a dict, an unknown kind or key, a
      missing dataset, or a setting of the wrong type or range (naming the key).
  """
  out = {}
  evals = _plain(evals)
  batch = evals.get('batch_size')
  if not settings.is_int(batch) or batch < 1:
    raise ValueError(f'config.evals.batch_size must be an integer >= 1, got {batch!r}')
  for name, value in evals.items():
    if name == 'batch_size':
      continue
    if not isinstance(value, dict):
      raise ValueError(f'config.evals.{name} must be a dict with a kind (one of '
                       f'{sorted(KINDS)}), got {value!r}; only evals.batch_size is a value')
    kind = KINDS.get(value.get('kind'))
    if kind is None:
      raise ValueError(f'config.evals.{name}.kind must be one of {sorted(KINDS)}, got '
                       f'{value.get("kind")!r}')
    allowed = {**_COMMON, **kind.DEFAULTS}
    unknown = set(value) - set(allowed)
    if unknown:
      raise ValueError(f'unknown keys {sorted(unknown)} in config.evals.{name} '
                       f'({value["kind"]}); it takes {sorted(allowed)}')
    spec = {**allowed, **value}
    for key, what in kind.DATASETS.items():
      if what == 'images' and not spec[key]:
        raise ValueError(f'config.evals.{name} ({value["kind"]}) needs `{key}`: a dataset spec '
                         "such as dict(kind='folder', root=PATH) or dict(kind='tfds', "
                         "name='cifar10', split='test')")
    settings.integer(name, spec, 'every', low=0)
    kind.check_settings(name, spec)
    out[name] = spec
  return dict(sorted(out.items()))


def _caption_records(specs) -> List[records.ImageCaptions]:
  found, _ = sources.read_sources([_plain(s) for s in specs])
  if not found:
    raise ValueError('the sources hold no image with a caption')
  return found


_OPENERS = {'images': lambda spec: datasets.load(_plain(spec)), 'captions': _caption_records}


class Evaluations:
  """The evaluators of `config.evals`, with their datasets opened."""

  def __init__(self, config: ml_collections.ConfigDict):
    """Raises ValueError / FileNotFoundError for a bad evaluator or dataset (see
    `evaluator_specs`, `datasets.load`, `sources.read_sources`), train and test sets with
    different classes, or data that a kind's `check_data` refuses (e.g. too few training
    images of a class for the shots asked)."""
    self.specs = evaluator_specs(config.evals)
    self._data: Dict[str, Any] = {}  # Dataset key -> LabelledImages or caption records.
    for name, spec in self.specs.items():
      kind = KINDS[spec['kind']]
      try:
        for field, what in kind.DATASETS.items():
          key = self._key(spec[field])
          if key not in self._data:
            self._data[key] = _OPENERS[what](spec[field])
        opened = {field: self.data(spec[field]) for field in kind.DATASETS}
        if 'train' in opened and 'test' in opened:
          train, test = opened['train'], opened['test']
          if train.classes != test.classes:
            raise ValueError(f'the train and test sets have different classes: '
                             f'{train.classes[:10]} and {test.classes[:10]} (first 10)')
        if hasattr(kind, 'check_data'):
          kind.check_data(spec, opened)
      except (ValueError, FileNotFoundError) as e:
        raise type(e)(f'config.evals.{name}: {e}') from e

  @staticmethod
  def _key(spec) -> str:
    return json.dumps(_plain(spec), sort_keys=True, default=list)

  def __bool__(self) -> bool:
    return bool(self.specs)

  def due(self, step: int) -> List[str]:
    """Names of the evaluators that run every N steps and are due at `step`."""
    return [n for n, s in self.specs.items() if s['every'] and step % s['every'] == 0]

  def run(self, params, embedder, names=None, cache=None) -> Dict[str, Dict[str, float]]:
    """Runs the evaluators `names` (default: all), in name order.

    `cache` (a dict, default a new one) keeps the embedded datasets between calls with the
    same parameters.

    Returns:
      name -> {metric: value} (see the module docstring for the names).

    Raises:
      EvaluationError: naming the evaluator whose evaluation failed, from its error.
    """
    cache = {} if cache is None else cache
    results = {}
    for name in self.specs if names is None else names:
      spec = self.specs[name]
      start = time.time()
      logging.info('Evaluating %s (%s)...', name, spec['kind'])
      try:
        results[name] = KINDS[spec['kind']].run(self, spec, params, embedder, cache)
      except Exception as e:
        raise EvaluationError(f'evaluator {name!r} ({spec["kind"]}) failed: '
                              f'{type(e).__name__}: {e}') from e
      logging.info('Evaluated %s in %.1f s', name, time.time() - start)
    return results

  def data(self, spec):
    """The opened dataset of a dataset setting: `datasets.LabelledImages` for an image set,
    a list of `records.ImageCaptions` for caption sources."""
    return self._data[self._key(spec)]

  def images(self, field_spec, params, embedder, cache) -> Dict[str, np.ndarray]:
    """Embeddings, features and labels of an image set (embedded once per `cache`)."""
    key = self._key(field_spec)
    if key not in cache:
      data = self._data[key]
      out = embedder.images(params, data.items)
      out['skipped'] = len(data) - len(out['index'])
      out['classes'] = data.classes
      cache[key] = out
    return cache[key]

  def train_test(self, spec, params, embedder, cache):
    """(train, test, number of classes, {'skipped_images': n}) for a kind with `train` and
    `test` image sets (see `images`)."""
    train = self.images(spec['train'], params, embedder, cache)
    test = self.images(spec['test'], params, embedder, cache)
    return train, test, len(train['classes']), dict(
        skipped_images=train['skipped'] + test['skipped'])


class EvaluationError(RuntimeError):
  """An evaluator failed while it ran (its cause is chained)."""


def flatten(results: Dict[str, Dict[str, float]]) -> Dict[str, float]:
  """{name: {metric: v}} -> {'name/metric': v}."""
  return {f'{name}/{k}': v for name, metrics in results.items() for k, v in metrics.items()}
