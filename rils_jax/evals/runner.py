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
`NAME/skipped_images` for images that could not be decoded. Datasets are opened when the
evaluators are built (a missing folder fails before training starts); each run embeds a dataset
that several evaluators share once.
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


def evaluator_specs(evals: ml_collections.ConfigDict) -> Dict[str, Dict[str, Any]]:
  """name -> the evaluator's settings with the kind's defaults filled in.

  Raises:
    ValueError: for an entry that is not a dict, an unknown kind or key, a missing dataset, or
      a negative `every`.
  """
  out = {}
  for name, value in _plain(evals).items():
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
    if kind == 'retrieval' and not spec['sources']:
      raise ValueError(f'config.evals.{name} (retrieval) needs `sources`')
    if not isinstance(spec['every'], int) or spec['every'] < 0:
      raise ValueError(f'config.evals.{name}.every must be an integer >= 0, got {spec["every"]}')
    if kind == 'zeroshot':
      templates_lib.get_templates(spec['templates'])
    out[name] = spec
  return out


class Evaluations:
  """The evaluators of `config.evals`, with their datasets opened."""

  def __init__(self, config: ml_collections.ConfigDict):
    """Raises ValueError / FileNotFoundError for a bad evaluator or dataset (see
    `evaluator_specs`, `datasets.load`, `sources.read_sources`)."""
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

  def run(self, params, embedder, names=None) -> Dict[str, Dict[str, float]]:
    """Runs the evaluators `names` (default: all), in config order.

    Returns:
      name -> {metric: value} (see the module docstring for the names).
    """
    cache = {}
    results = {}
    for name in self.specs if names is None else names:
      spec = self.specs[name]
      start = time.time()
      results[name] = _KINDS[spec['kind']](self, spec, params, embedder, cache)
      logging.info('Evaluation %s (%s) in %.1f s: %s', name, spec['kind'], time.time() - start,
                   results[name])
    return results

  def images(self, field_spec, params, embedder, cache) -> Dict[str, np.ndarray]:
    """Embeddings, features and labels of a dataset spec (embedded once per `run`)."""
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


def flatten(results: Dict[str, Dict[str, float]]) -> Dict[str, float]:
  """{name: {metric: v}} -> {'name/metric': v}."""
  return {f'{name}/{k}': v for name, metrics in results.items() for k, v in metrics.items()}


def _zeroshot(ev: Evaluations, spec, params, embedder, cache):
  data = ev.images(spec['data'], params, embedder, cache)
  classes = list(spec['class_names'] or data['classes'])
  if len(classes) != len(data['classes']):
    raise ValueError(f'{len(classes)} class_names for a dataset of {len(data["classes"])} '
                     'classes')
  class_embeds = zeroshot.class_embeddings(embedder, params, classes,
                                           templates_lib.get_templates(spec['templates']))
  out = zeroshot.zeroshot_accuracy(data['embed'], data['label'], class_embeds)
  return dict(out, skipped_images=data['skipped'])


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
  if len(train['classes']) != len(test['classes']):
    raise ValueError(f'train has {len(train["classes"])} classes, test '
                     f'{len(test["classes"])}')
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
