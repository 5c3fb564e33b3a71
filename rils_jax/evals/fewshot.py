"""Few-shot transfer on frozen features: closed-form regularised least squares (big_vision's
few-shot evaluator; Kolesnikov et al. 2020, "Big Transfer", few-shot linear regression).

For each seed, `shots` training examples per class are drawn; their features are standardised
with their own mean and standard deviation, a constant column `BIAS` is appended (so the bias is
barely regularised), and the targets are one-hot vectors scaled to {-1, +1}. The weights are
  W = argmin ||X W - Y||^2 + l2 ||W||^2 = (X^T X + l2 I)^-1 X^T Y = X^T (X X^T + l2 I)^-1 Y,
computed in whichever form has the smaller matrix (n x n when the shots are fewer than the
feature width). Test images are assigned the class of largest score X_test W.
"""

import functools
from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rils_jax.evals import settings

BIAS = 100.0
DEFAULT_L2 = 2.0 ** 10  # big_vision's default regulariser.


def _design(x, mean, std):
  x = (x - mean) / std
  return jnp.concatenate([x, jnp.full((x.shape[0], 1), BIAS, x.dtype)], axis=1)


@functools.partial(jax.jit, static_argnames=('num_classes',))
def ridge_weights(x, y, l2, num_classes: int):
  """Closed-form ridge regression on standardised features with a bias column.

  Args:
    x: float32 (n, d) training features.
    y: int32 (n,) labels.
    l2: the regulariser (> 0).
    num_classes: C.

  Returns:
    (W float32 (d + 1, C), mean (d,), std (d,)): scores are `_design(x, mean, std) @ W`.
  """
  mean = x.mean(0)
  std = jnp.maximum(x.std(0), 1e-6)
  a = _design(x, mean, std)
  targets = 2.0 * jax.nn.one_hot(y, num_classes, dtype=jnp.float32) - 1.0
  n, d = a.shape
  if n < d:  # Dual form: an n x n system.
    w = a.T @ jnp.linalg.solve(a @ a.T + l2 * jnp.eye(n, dtype=a.dtype), targets)
  else:
    w = jnp.linalg.solve(a.T @ a + l2 * jnp.eye(d, dtype=a.dtype), a.T @ targets)
  return w, mean, std


@jax.jit
def ridge_scores(x, w, mean, std):
  """float32 (n, C) class scores of test features `x` (n, d)."""
  return _design(x, mean, std) @ w


def draw_shots(labels: np.ndarray, shots: int, num_classes: int, rng: np.random.Generator
               ) -> np.ndarray:
  """Indices of `shots` examples of every class, drawn without replacement.

  Raises:
    ValueError: when a class has fewer than `shots` examples.
  """
  out = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) < shots:
      raise ValueError(f'{shots}-shot needs {shots} training examples of every class; class '
                       f'{c} has {len(idx)}')
    out.extend(rng.choice(idx, size=shots, replace=False))
  return np.asarray(out, np.int64)


def fewshot_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                     test_y: np.ndarray, num_classes: int, shots: Sequence[int] = (1, 5, 10, 25),
                     seeds: int = 3, l2: float = DEFAULT_L2) -> Dict[str, float]:
  """Few-shot top-1 accuracy, mean and standard deviation over `seeds` draws.

  Args:
    train_x, test_x: float (n, d) frozen features; train_x is the pool the shots come from.
    train_y, test_y: int (n,) labels.
    num_classes: C.
    shots: examples per class.
    seeds: draws per shot count (seed s draws with numpy's default_rng(s)).
    l2: the ridge regulariser.

  Returns:
    dict with `{k}shot_top1` and `{k}shot_top1_std` for each k in `shots`.

  Raises:
    ValueError: when a class has too few training examples (see `draw_shots`).
  """
  test = jnp.asarray(test_x, jnp.float32)
  train_y = np.asarray(train_y)
  out = {}
  for k in shots:
    accs = []
    for seed in range(seeds):
      idx = draw_shots(train_y, k, num_classes, np.random.default_rng(seed))
      w, mean, std = ridge_weights(jnp.asarray(train_x[idx], jnp.float32),
                                   jnp.asarray(train_y[idx], jnp.int32), jnp.float32(l2),
                                   num_classes)
      pred = np.asarray(jnp.argmax(ridge_scores(test, w, mean, std), axis=1))
      accs.append(float(np.mean(pred == np.asarray(test_y))))
    out[f'{k}shot_top1'] = float(np.mean(accs))
    out[f'{k}shot_top1_std'] = float(np.std(accs))
  return out


# The `fewshot` evaluator kind (rils_jax/evals/runner.py): settings `train` (the pool the shots
# are drawn from), `test`, `shots`, `seeds`, `l2`.
DEFAULTS = dict(train=None, test=None, shots=(1, 5, 10, 25), seeds=3, l2=DEFAULT_L2)
DATASETS = {'train': 'images', 'test': 'images'}


def check_settings(name: str, spec: settings.Spec) -> None:
  settings.integers(name, spec, 'shots')
  settings.integer(name, spec, 'seeds')
  settings.positive(name, spec, 'l2')


def check_data(spec: settings.Spec, data: Dict[str, Any]) -> None:
  """Raises ValueError when an image folder has fewer images of a class than the most shots
  (labels of lazy TFDS sets are only known when read: `draw_shots` raises then)."""
  train = data['train']
  if isinstance(train.items, list):
    counts = np.bincount([label for _, label in train.items], minlength=len(train.classes))
    if max(spec['shots']) > counts.min():
      raise ValueError(f'{max(spec["shots"])}-shot needs that many training images of every '
                       f'class; {train.classes[int(counts.argmin())]!r} has {counts.min()}')


def run(ev, spec: settings.Spec, params, embedder, cache) -> Dict[str, float]:
  """`fewshot_accuracy` on the frozen features of the train and test sets."""
  train, test, classes, extra = ev.train_test(spec, params, embedder, cache)
  out = fewshot_accuracy(train['features'], train['label'], test['features'], test['label'],
                         classes, tuple(spec['shots']), spec['seeds'], spec['l2'])
  return dict(out, chance_top1=settings.chance_levels(classes)['chance_top1'], **extra)
