"""Linear probe and low-shot transfer: L2-regularised multinomial logistic regression on frozen
features (CLIP, Radford et al. 2021, Sec. 3.2 / App. A.3: logistic regression with the L2
strength chosen on a validation split; MAE / BEiT report the same protocol as "linear probe").

Features are standardised with the training set's mean and standard deviation. The objective is
  mean_i CE(softmax(x_i W + b), y_i) + l2 / 2 * ||W||^2   (the bias is not regularised),
minimised with optax's L-BFGS (zoom line search) in float32 until the gradient's max norm falls
below `tol` or `max_steps` is reached. `fit_probe` sweeps `l2` on a stratified
`val_fraction` of the training set, keeps the value of best validation accuracy (the larger one
on ties), refits on the whole training set and reports test accuracy.
"""

import functools
from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rils_jax.evals import settings

DEFAULT_L2 = tuple(10.0 ** np.arange(-6, 1))


@functools.partial(jax.jit, static_argnames=('num_classes', 'max_steps'))
def _fit(x, y, l2, num_classes: int, max_steps: int, tol):
  params = (jnp.zeros((x.shape[1], num_classes), jnp.float32),
            jnp.zeros((num_classes,), jnp.float32))

  def objective(p):
    w, b = p
    logits = x @ w + b
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            + 0.5 * l2 * jnp.sum(w * w))

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    p, state, i, _ = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = solver.update(grad, state, p, value=value, grad=grad, value_fn=objective)
    gmax = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grad)]))
    return optax.apply_updates(p, updates), state, i + 1, gmax

  def running(carry):
    _, _, i, gmax = carry
    return (i < max_steps) & (gmax > tol)

  params, _, steps, _ = jax.lax.while_loop(
      running, step, (params, solver.init(params), 0, jnp.asarray(jnp.inf, jnp.float32)))
  return params, objective(params), steps


def logistic_regression(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float,
                        max_steps: int = 1000, tol: float = 1e-5
                        ) -> Tuple[np.ndarray, np.ndarray, float, int]:
  """Fits the module's objective on already standardised features.

  Args:
    x: float (n, d) features.
    y: int (n,) labels in [0, num_classes).
    num_classes: C.
    l2: the L2 strength (>= 0).
    max_steps, tol: L-BFGS stopping rule (max |gradient| below `tol`).

  Returns:
    (W float32 (d, C), b float32 (C,), final objective value, L-BFGS steps taken).
  """
  (w, b), value, steps = _fit(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32),
                              jnp.float32(l2), num_classes, max_steps, jnp.float32(tol))
  return np.asarray(w), np.asarray(b), float(value), int(steps)


def standardise(train: np.ndarray, *others: np.ndarray):
  """(train - mean) / std with the training set's statistics (std floored at 1e-6), applied
  to `train` and each of `others`."""
  mean, std = train.mean(0), np.maximum(train.std(0), 1e-6)
  return tuple((a - mean) / std for a in (train, *others))


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """(train indices, validation indices): `fraction` of each class (at least one example of
  every class with two or more) goes to validation."""
  train, val = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_val = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
    val.extend(idx[:n_val])
    train.extend(idx[n_val:])
  return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(val, np.int64))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
  """Top-1 and top-min(5, C) accuracy of (n, C) scores."""
  k = min(5, logits.shape[1])
  top = np.argsort(-logits, axis=1)[:, :k]
  return dict(top1=float(np.mean(top[:, 0] == labels)),
              top5=float(np.mean(np.any(top == labels[:, None], axis=1))))


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
              num_classes: int, l2_values: Sequence[float] = DEFAULT_L2,
              val_fraction: float = 0.2, seed: int = 0, max_steps: int = 1000
              ) -> Dict[str, float]:
  """Linear probe with the L2 strength chosen on a validation split (module docstring).

  Args:
    train_x, test_x: float (n, d) frozen features.
    train_y, test_y: int (n,) labels.
    num_classes: C.
    l2_values: the sweep.
    val_fraction: share of each class held out to choose `l2`.
    seed: the split's seed.

  Returns:
    dict with `top1`, `top5` on the test set, `l2` (chosen), `val_top1` (its validation
    accuracy) and `train_examples`.

  Raises:
    ValueError: for an empty set or an empty sweep.
  """
  if not len(train_x) or not len(test_x) or not len(l2_values):
    raise ValueError(f'the linear probe needs training ({len(train_x)}) and test '
                     f'({len(test_x)}) examples and L2 values ({list(l2_values)})')
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  fit_idx, val_idx = stratified_split(train_y, val_fraction, np.random.default_rng(seed))
  best_l2, best_val = l2_values[0], -1.0
  if len(val_idx):
    x_fit, x_val = standardise(train_x[fit_idx], train_x[val_idx])
    for l2 in sorted(l2_values):
      w, b, _, _ = logistic_regression(x_fit, train_y[fit_idx], num_classes, l2, max_steps)
      val = accuracy(x_val @ w + b, train_y[val_idx])['top1']
      if val >= best_val:
        best_l2, best_val = l2, val
  x_train, x_test = standardise(train_x, test_x)
  w, b, _, _ = logistic_regression(x_train, train_y, num_classes, best_l2, max_steps)
  return dict(accuracy(x_test @ w + b, test_y), l2=float(best_l2), val_top1=best_val,
              train_examples=len(train_x))


def label_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
  """Sorted indices of a class-balanced `fraction` of the labelled examples (low-shot: 1% or
  10% of ImageNet's labels); round(fraction * n_c), at least one, per class c."""
  out = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    out.extend(rng.choice(idx, size=max(1, round(fraction * len(idx))), replace=False))
  return np.sort(np.asarray(out, np.int64))


# The `linear_probe` evaluator kind (rils_jax/evals/runner.py): settings `train`, `test`,
# `l2` (the sweep), `val_fraction`, `max_steps`, `seed`.
DEFAULTS = dict(train=None, test=None, l2=DEFAULT_L2, val_fraction=0.2, max_steps=1000, seed=0)
DATASETS = {'train': 'images', 'test': 'images'}


def check_settings(name: str, spec: settings.Spec) -> None:
  settings.numbers(name, spec, 'l2')
  settings.fraction(name, spec, 'val_fraction')
  settings.integer(name, spec, 'max_steps')
  settings.integer(name, spec, 'seed', low=0)


def run(ev, spec: settings.Spec, params, embedder, cache) -> Dict[str, float]:
  """`fit_probe` on the frozen features of the train and test sets."""
  train, test, classes, extra = ev.train_test(spec, params, embedder, cache)
  out = fit_probe(train['features'], train['label'], test['features'], test['label'],
                  classes, tuple(spec['l2']), spec['val_fraction'], spec['seed'],
                  spec['max_steps'])
  return dict(out, **settings.chance_levels(classes), **extra)
