"""k-nearest-neighbour classification on frozen features (Wu et al. 2018; DINO, Caron et al.
2021, Sec. 4.1 / their `eval_knn`: cosine similarity, k = 20, votes weighted by
exp(similarity / temperature) with temperature 0.07).
"""

from typing import Dict

import numpy as np

from rils_jax.evals import settings

TEST_BLOCK = 1024  # Test rows scored at once: memory is TEST_BLOCK x n_train floats.


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> Dict[str, float]:
  """Weighted k-NN top-1 / top-5 accuracy.

  Args:
    train_x, test_x: float (n, d) features (L2-normalised here).
    train_y, test_y: int (n,) labels.
    num_classes: C.
    k: neighbours (capped at the training set's size).
    temperature: vote weight exp(cos / temperature).

  Returns:
    dict with `top1` and `top5` (top-min(5, C)) in [0, 1], and `k`.
  """
  def unit(a):
    a = np.asarray(a, np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

  train, test = unit(train_x), unit(test_x)
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  k = min(k, len(train))
  top = min(5, num_classes)
  hits1 = hits5 = 0
  for start in range(0, len(test), TEST_BLOCK):
    sim = test[start:start + TEST_BLOCK] @ train.T
    nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sim, nearest, axis=1) / temperature)
    votes = np.zeros((sim.shape[0], num_classes), np.float64)
    np.add.at(votes, (np.arange(sim.shape[0])[:, None], train_y[nearest]), weights)
    ranked = np.argsort(-votes, axis=1, kind='stable')[:, :top]
    labels = test_y[start:start + TEST_BLOCK]
    hits1 += int(np.sum(ranked[:, 0] == labels))
    hits5 += int(np.sum(np.any(ranked == labels[:, None], axis=1)))
  return dict(top1=hits1 / len(test), top5=hits5 / len(test), k=k)


# The `knn` evaluator kind (rils_jax/evals/runner.py): settings `train`, `test`, `k`,
# `temperature`.
DEFAULTS = dict(train=None, test=None, k=20, temperature=0.07)
DATASETS = {'train': 'images', 'test': 'images'}


def check_settings(name: str, spec: settings.Spec) -> None:
  settings.integer(name, spec, 'k')
  settings.positive(name, spec, 'temperature')


def run(ev, spec: settings.Spec, params, embedder, cache) -> Dict[str, float]:
  """`knn_accuracy` of the test set's features against the training set's."""
  train, test, classes, extra = ev.train_test(spec, params, embedder, cache)
  out = knn_accuracy(train['features'], train['label'], test['features'], test['label'],
                     classes, spec['k'], spec['temperature'])
  return dict(out, **settings.chance_levels(classes), **extra)
