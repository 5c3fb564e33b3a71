"""The `lowshot` evaluator kind: the linear probe (linear.py) trained on class-balanced
fractions of the training labels (1% and 10% of ImageNet's labels in SimCLR / BYOL / MAE-style
semi-supervised tables), averaged over seeds.

Settings: `train`, `test`, `fractions` (of the training labels, each in (0, 1]), `seeds`, `l2`
(the sweep), `val_fraction`, `max_steps`. Metrics per fraction f (written as a percentage,
e.g. `10pct`): `{f}_top1` (mean over seeds), `{f}_top1_std`, `{f}_examples`.
"""

from typing import Dict

import numpy as np

from rils_jax.evals import linear
from rils_jax.evals import settings

DEFAULTS = dict(train=None, test=None, fractions=(0.01, 0.1), seeds=1, l2=linear.DEFAULT_L2,
                val_fraction=0.2, max_steps=1000)
DATASETS = {'train': 'images', 'test': 'images'}


def check_settings(name: str, spec: settings.Spec) -> None:
  settings.numbers(name, spec, 'fractions', 0.0, 1.0, open_low=True)
  settings.integer(name, spec, 'seeds')
  settings.numbers(name, spec, 'l2')
  settings.fraction(name, spec, 'val_fraction')
  settings.integer(name, spec, 'max_steps')


def run(ev, spec: settings.Spec, params, embedder, cache) -> Dict[str, float]:
  """Low-shot top-1 per fraction (see the module docstring)."""
  train, test, classes, extra = ev.train_test(spec, params, embedder, cache)
  out = dict(extra, chance_top1=settings.chance_levels(classes)['chance_top1'])
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
