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
"""

import json
import time
from typing import Any, Dict, List

import ml_collections
import numpy as np
from absl import logging

from rils_jax.data import sources
from rils_jax.evals import datasets
from rils_jax.evals import fewshot
from rils_jax.evals import knn
from rils_jax.evals import linear
from rils_jax.evals import retrieval
from rils_jax.evals import templates as templates_lib
from rils_jax.evals import zeroshot

_COMMON = dict(kind=None, every=0)
DEFAULTS = {
    'zeroshot': dict(data=None, templates='short', class_names=()),
    'retrieval': dict(sources=()),
    'linear_probe': dict(train=None, test=None, l2=linear.DEFAULT_L2, val_fraction=0.2,
                         max_steps=1000, seed=0),
    'fewshot': dict(train=None, test=None, shots=(1, 5, 10, 25), seeds=3, l2=fewshot.DEFAULT_L2),
    'lowshot': dict(train=None, test=None, fractions=(0.01, 0.1), seeds=1, l2=linear.DEFAULT_L2,
                    val_fraction=0.2, max_steps=1000),
    'knn': dict(train=None, test=None, k=20, temperature=0.07),
}
_DATASET_KEYS = ('data', 'train', 'test')


def _plain(value):
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  return value


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
  return (_is_int(v) or isinstance(v, (float, np.floating))) and np.isfinite(v)


def _check(ok: bool, name: str, key: str, want: str, value) -> None:
  if not ok:
    raise ValueError(f'config.evals.{name}.{key} must be {want}, got {value!r}')


def _check_settings(name: str, spec: Dict[str, Any]) -> None:
  """Type and range checks of one evaluator's settings (ValueError naming the key)."""
  kind = spec['kind']

  def ints(key, low=1):
    v = spec[key]
    _check(isinstance(v, (list, tuple)) and len(v) > 0
           and all(_is_int(x) and x >= low for x in v),
           name, key, f'a non-empty list of integers >= {low}', v)

  def numbers(key, low=0.0, high=np.inf, open_low=False):
    v = spec[key]
    _check(isinstance(v, (list, tuple)) and len(v) > 0 and all(
        _is_number(x) and (x > low if open_low else x >= low) and x <= high for x in v),
        name, key, f'a non-empty list of numbers in {"(" if open_low else "["}{low}, {high}]',
        v)

  def integer(key, low=1):
    _check(_is_int(spec[key]) and spec[key] >= low, name, key, f'an integer >= {low}',
           spec[key])

  def positive(key):
    _check(_is_number(spec[key]) and spec[key] > 0, name, key, 'a finite number > 0',
           spec[key])

  def fraction(key):
    _check(_is_number(spec[key]) and 0 <= spec[key] < 1, name, key, 'a number in [0, 1)',
           spec[key])

  integer('every', low=0)
  if kind == 'zeroshot':
    templates_lib.get_templates(spec['templates'])
    names = spec['class_names']
    _check(isinstance(names, (list, tuple)) and all(isinstance(n, str) and n for n in names),
           name, 'class_names', 'a list of non-empty strings (or empty: the dataset\'s)', names)
  elif kind == 'retrieval':
    _check(isinstance(spec['sources'], (list, tuple)) and len(spec['sources']) > 0, name,
           'sources', 'a non-empty list of caption sources', spec['sources'])
  elif kind == 'linear_probe':
    numbers('l2')
    fraction('val_fraction')
    integer('max_steps')
    integer('seed', low=0)
  elif kind == 'fewshot':
    ints('shots')
    integer('seeds')
    positive('l2')
  elif kind == 'lowshot':
    numbers('fractions', 0.0, 1.0, open_low=True)
    integer('seeds')
    numbers('l2')
    fraction('val_fraction')
    integer('max_steps')
  elif kind == 'knn':
    integer('k')
    positive('temperature')


def evaluator_specs(evals: ml_collections.ConfigDict) -> Dict[str, Dict[str, Any]]:
  """name -> the evaluator's settings with the kind's defaults filled in, in name order.

  Raises:
    ValueError: for a bad `batch_size`, an entry that is not a dict, an unknown kind or key, a
      missing dataset, or a setting of the wrong type or range (naming the key).
  """
  out = {}
  evals = _plain(evals)
  batch = evals.get('batch_size')
  if not _is_int(batch) or batch < 1:
    raise ValueError(f'config.evals.batch_size must be an integer >= 1, got {batch!r}')
  for name, value in evals.items():
    if name == 'batch_size':
      continue
    if not isinstance(value, dict):
      raise ValueError(f'config.evals.{name} must be a dict with a kind (one of '
                       f'{sorted(DEFAULTS)}), got {value!r}; only evals.batch_size is a value')
    kind = value.get('kind')
    if kind not in DEFAULTS:
      raise ValueError(f'config.evals.{name}.kind must be one of {sorted(DEFAULTS)}, got '
                       f'{kind!r}')
    allowed = {**_COMMON, **DEFAULTS[kind]}
    unknown = set(value) - set(allowed)
    if unknown:
      raise ValueError(f'unknown keys {sorted(unknown)} in config.evals.{name} ({kind}); it '
                       f'takes {sorted(allowed)}')
    spec = {**allowed, **value}
    for key in _DATASET_KEYS:
      if key in spec and not spec[key]:
        raise ValueError(f'config.evals.{name} ({kind}) needs `{key}`: a dataset spec such as '
                         "dict(kind='folder', root=PATH) or dict(kind='tfds', name='cifar10', "
                         "split='test')")
    _check_settings(name, spec)
    out[name] = spec
  return dict(sorted(out.items()))


class Evaluations:
  """The evaluators of `config.evals`, with their datasets opened."""

  def __init__(self, config: ml_collections.ConfigDict):
    """Raises ValueError / FileNotFoundError for a bad evaluator or dataset (see
    `evaluator_specs`, `datasets.load`, `sources.read_sources`), train and test sets with
    different classes, or too few training images of a class for the shots asked."""
    self.specs = evaluator_specs(config.evals)
    self._data: Dict[str, Any] = {}  # Dataset key -> LabelledImages or caption records.
    for name, spec in self.specs.items():
      try:
        if spec['kind'] == 'retrieval':
          key = self._key(spec['sources'])
          if key not in self._data:
            records, _ = sources.read_sources([_plain(s) for s in spec['sources']])
            if not records:
              raise ValueError('the sources hold no image with a caption')
            self._data[key] = records
        for field in _DATASET_KEYS:
          if field in spec:
            key = self._key(spec[field])
            if key not in self._data:
              self._data[key] = datasets.load(_plain(spec[field]))
        self._check_data(spec)
      except (ValueError, FileNotFoundError) as e:
        raise type(e)(f'config.evals.{name}: {e}') from e

  def _check_data(self, spec) -> None:
    if spec['kind'] == 'zeroshot' and spec['class_names']:
      classes = self._data[self._key(spec['data'])].classes
      if len(spec['class_names']) != len(classes):
        raise ValueError(f'{len(spec["class_names"])} class_names for a dataset of '
                         f'{len(classes)} classes')
    if 'train' not in spec:
      return
    train = self._data[self._key(spec['train'])]
    test = self._data[self._key(spec['test'])]
    if train.classes != test.classes:
      raise ValueError(f'the train and test sets have different classes: {train.classes[:10]} '
                       f'and {test.classes[:10]} (first 10)')
    if spec['kind'] == 'fewshot' and isinstance(train.items, list):  # Folder: labels known.
      counts = np.bincount([label for _, label in train.items], minlength=len(train.classes))
      if max(spec['shots']) > counts.min():
        raise ValueError(f'{max(spec["shots"])}-shot needs that many training images of every '
                         f'class; {train.classes[int(counts.argmin())]!r} has {counts.min()}')

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
      try:
        results[name] = _KINDS[spec['kind']](self, spec, params, embedder, cache)
      except Exception as e:
        raise EvaluationError(f'evaluator {name!r} ({spec["kind"]}) failed: '
                              f'{type(e).__name__}: {e}') from e
      logging.info('Evaluation %s (%s) in %.1f s: %s', name, spec['kind'], time.time() - start,
                   results[name])
    return results

  def images(self, field_spec, params, embedder, cache) -> Dict[str, np.ndarray]:
    """Embeddings, features and labels of a dataset spec (embedded once per `cache`)."""
    key = self._key(field_spec)
    if key not in cache:
      data = self._data[key]
      out = embedder.images(params, data.items)
      out['skipped'] = len(data) - len(out['index'])
      out['classes'] = data.classes
      cache[key] = out
    return cache[key]

  def records(self, spec) -> List[sources.ImageCaptions]:
    return self._data[self._key(spec)]


class EvaluationError(RuntimeError):
  """An evaluator failed while it ran (its cause is chained)."""


def flatten(results: Dict[str, Dict[str, float]]) -> Dict[str, float]:
  """{name: {metric: v}} -> {'name/metric': v}."""
  return {f'{name}/{k}': v for name, metrics in results.items() for k, v in metrics.items()}


def _zeroshot(ev: Evaluations, spec, params, embedder, cache):
  data = ev.images(spec['data'], params, embedder, cache)
  classes = list(spec['class_names'] or data['classes'])
  class_embeds = zeroshot.class_embeddings(embedder, params, classes,
                                           templates_lib.get_templates(spec['templates']))
  out = zeroshot.zeroshot_accuracy(data['embed'], data['label'], class_embeds)
  return dict(out, images=len(data['label']), skipped_images=data['skipped'])


def _retrieval(ev: Evaluations, spec, params, embedder, cache):
  del cache
  records = ev.records(spec['sources'])
  data = embedder.images(params, [r.image for r in records])
  kept = data['index']
  texts = [c for i in kept for c in records[i].captions]
  text_to_image = np.repeat(np.arange(len(kept)), [len(records[i].captions) for i in kept])
  out = retrieval.retrieval_recall(data['embed'], embedder.texts(params, texts), text_to_image)
  return dict(out, skipped_images=len(records) - len(kept), images=len(kept),
              captions=len(texts))


def _train_test(ev, spec, params, embedder, cache):
  train = ev.images(spec['train'], params, embedder, cache)
  test = ev.images(spec['test'], params, embedder, cache)
  return train, test, len(train['classes']), dict(
      skipped_images=train['skipped'] + test['skipped'])


def _linear_probe(ev, spec, params, embedder, cache):
  train, test, classes, extra = _train_test(ev, spec, params, embedder, cache)
  out = linear.fit_probe(train['features'], train['label'], test['features'], test['label'],
                         classes, tuple(spec['l2']), spec['val_fraction'], spec['seed'],
                         spec['max_steps'])
  return dict(out, **extra)


def _fewshot(ev, spec, params, embedder, cache):
  train, test, classes, extra = _train_test(ev, spec, params, embedder, cache)
  out = fewshot.fewshot_accuracy(train['features'], train['label'], test['features'],
                                 test['label'], classes, tuple(spec['shots']), spec['seeds'],
                                 spec['l2'])
  return dict(out, **extra)


def _lowshot(ev, spec, params, embedder, cache):
  train, test, classes, extra = _train_test(ev, spec, params, embedder, cache)
  out = dict(extra)
  for fraction in spec['fractions']:
    accs = []
    for seed in range(spec['seeds']):
      idx = linear.label_subset(train['label'], fraction, np.random.default_rng(seed))
      accs.append(linear.fit_probe(train['features'][idx], train['label'][idx],
                                   test['features'], test['label'], classes, tuple(spec['l2']),
                                   spec['val_fraction'], seed, spec['max_steps'])['top1'])
    pct = f'{100 * fraction:g}pct'
    out[f'{pct}_top1'] = float(np.mean(accs))
    out[f'{pct}_top1_std'] = float(np.std(accs))
    out[f'{pct}_examples'] = len(idx)
  return out


def _knn(ev, spec, params, embedder, cache):
  train, test, classes, extra = _train_test(ev, spec, params, embedder, cache)
  out = knn.knn_accuracy(train['features'], train['label'], test['features'], test['label'],
                         classes, spec['k'], spec['temperature'])
  return dict(out, **extra)


_KINDS = {'zeroshot': _zeroshot, 'retrieval': _retrieval, 'linear_probe': _linear_probe,
          'fewshot': _fewshot, 'lowshot': _lowshot, 'knn': _knn}
