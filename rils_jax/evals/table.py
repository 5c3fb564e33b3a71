"""Evaluation results as a person reads them: one table, accuracies and recalls in percent beside
the chance level of each, counts as counts; and the exact values for JSON, without the float
noise of means and float32.

  evaluator  metric    result   chance
  zeroshot   top1      37.50 %   5.00 %
  zeroshot   top5      81.25 %  25.00 %
  zeroshot   images       400
"""

import math
import re
from typing import Dict, Mapping, Optional

import numpy as np

# Metrics that are fractions of examples (shown in percent): top-k accuracies, recalls at K,
# their standard deviations over seeds.
_FRACTION = re.compile(r'(top\d+|_r\d+)(_std)?$')
# Kept out of the table: what the run or checkpoint is, not how it scored.
_NOT_SHOWN = ('step', 'checkpoint')


def exact(value):
  """`value` without float noise: a float rounded to 12 significant digits (a mean of 0/1 hits
  over seeds reads 0.3366, not 0.33660000000000007), a float32 to the 7 it holds (0.7, not
  0.699999988079071); NumPy integers as int; anything else unchanged."""
  if isinstance(value, (np.floating, float)) and math.isfinite(value):
    digits = 7 if isinstance(value, np.float32) else 12
    return float(f'{float(value):.{digits}g}')
  if isinstance(value, np.integer):
    return int(value)
  return value


def exact_metrics(metrics: Mapping[str, object]) -> Dict[str, object]:
  """`exact` of every value of a flat {metric: value} dict."""
  return {k: exact(v) for k, v in metrics.items()}


def is_fraction(metric: str) -> bool:
  """Whether a metric is a fraction of examples (top-k accuracy, recall at K, or a standard
  deviation of one), shown in percent."""
  return bool(_FRACTION.search(metric))


def chance_of(metrics: Mapping[str, object], name: str) -> Optional[float]:
  """The chance level of `name` in one evaluator's metrics: `chance_<name>`, else for a top-k
  metric of a classifier with several variants (`5shot_top1`, `10pct_top1`) the evaluator's
  `chance_top<k>`; None when there is none (standard deviations, counts)."""
  if f'chance_{name}' in metrics:
    return float(metrics[f'chance_{name}'])
  match = re.search(r'(top\d+)$', name)
  if match and f'chance_{match.group(1)}' in metrics:
    return float(metrics[f'chance_{match.group(1)}'])
  return None


def _number(value) -> str:
  value = exact(value)
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  return f'{value:,}' if isinstance(value, int) else f'{value:g}'


def table(results: Mapping[str, Mapping[str, object]]) -> str:
  """One text table of {evaluator: {metric: value}}: a row per metric in the evaluators' order,
  fractions in percent with two decimals and their chance level, other numbers as they are
  (counts, the chosen l2, k); the chance levels themselves are not rows."""
  rows = [('evaluator', 'metric', 'result', 'chance')]
  for name, metrics in results.items():
    for metric, value in metrics.items():
      if metric.startswith('chance_') or metric in _NOT_SHOWN or isinstance(value, str):
        continue
      if is_fraction(metric):
        chance = chance_of(metrics, metric)
        rows.append((name, metric, f'{100 * float(value):.2f} %',
                     '' if chance is None else f'{100 * chance:.2f} %'))
      else:
        rows.append((name, metric, _number(value), ''))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  lines = []
  for r in rows:
    lines.append(f'{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  '
                 f'{r[3]:>{widths[3]}}'.rstrip())
  return '\n'.join(lines)


def unflatten(flat: Mapping[str, object]) -> Dict[str, Dict[str, object]]:
  """{'name/metric': v} -> {name: {metric: v}}, in the order of `flat` (runner.flatten's
  inverse)."""
  out: Dict[str, Dict[str, object]] = {}
  for key, value in flat.items():
    name, _, metric = key.partition('/')
    out.setdefault(name, {})[metric] = value
  return out
