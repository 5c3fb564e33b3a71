"""Type and range checks of evaluator settings, shared by the evaluator kinds.

Each check raises ValueError('config.evals.NAME.KEY must be WANT, got VALUE'): NAME is the
evaluator's name in `config.evals`, KEY the setting.
"""

from typing import Any, Dict

import numpy as np

Spec = Dict[str, Any]


def is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v) -> bool:
  return (is_int(v) or isinstance(v, (float, np.floating))) and np.isfinite(v)


def check(ok: bool, name: str, key: str, want: str, value) -> None:
  if not ok:
    raise ValueError(f'config.evals.{name}.{key} must be {want}, got {value!r}')


def integer(name: str, spec: Spec, key: str, low: int = 1) -> None:
  check(is_int(spec[key]) and spec[key] >= low, name, key, f'an integer >= {low}', spec[key])


def positive(name: str, spec: Spec, key: str) -> None:
  check(is_number(spec[key]) and spec[key] > 0, name, key, 'a finite number > 0', spec[key])


def fraction(name: str, spec: Spec, key: str) -> None:
  check(is_number(spec[key]) and 0 <= spec[key] < 1, name, key, 'a number in [0, 1)', spec[key])


def integers(name: str, spec: Spec, key: str, low: int = 1) -> None:
  v = spec[key]
  check(isinstance(v, (list, tuple)) and len(v) > 0 and all(is_int(x) and x >= low for x in v),
        name, key, f'a non-empty list of integers >= {low}', v)


def numbers(name: str, spec: Spec, key: str, low: float = 0.0, high: float = np.inf,
            open_low: bool = False) -> None:
  v = spec[key]
  check(isinstance(v, (list, tuple)) and len(v) > 0 and all(
      is_number(x) and (x > low if open_low else x >= low) and x <= high for x in v),
      name, key, f'a non-empty list of numbers in {"(" if open_low else "["}{low}, {high}]', v)


def chance_levels(num_classes: int) -> Dict[str, float]:
  """The top-1 and top-5 accuracy of a uniformly random classifier over `num_classes` classes:
  1 / C and min(5, C) / C (the same top-min(5, C) as the evaluators' top5)."""
  return dict(chance_top1=1.0 / num_classes, chance_top5=min(5, num_classes) / num_classes)
