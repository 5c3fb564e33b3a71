"""Metric logging to `workdir/metrics.jsonl`, TensorBoard event files and, optionally, a
Weights & Biases run (rils_jax/wandb_run.py).

TensorBoard events are written with tensorboardX, which needs no TensorFlow (clu's
`metric_writers` would import TensorFlow, +1.5 GB). Only the process given `enabled=True`
(process 0) writes. `workdir` is a local folder: for a URL workdir, the local staging folder
that rils_jax/storage.py uploads.
"""

import json
import os
from typing import Mapping, Optional

import numpy as np
from tensorboardX import SummaryWriter

from rils_jax import wandb_run
from rils_jax.evals import table


class MetricWriter:
  """Appends `{"step": s, name: value, ...}` lines to metrics.jsonl and scalars to TensorBoard
  and to `tracker` (a wandb run) when given."""

  def __init__(self, workdir: str, enabled: bool = True,
               tracker: Optional[wandb_run.WandbRun] = None):
    self.enabled = enabled
    self.tracker = tracker
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      self._tb = SummaryWriter(logdir=os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Writes scalar metrics (numbers or 0-d arrays) for `step`."""
    if not self.enabled:
      return
    values = {k: float(table.exact(np.asarray(v)[()])) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), **values}) + '\n')
    self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, int(step))
    self._tb.flush()
    if self.tracker:
      self.tracker.log(int(step), values)

  def summary(self, results: Mapping[str, float]) -> None:
    """The final evaluation, also kept as the wandb run's summary."""
    if self.enabled and self.tracker:
      self.tracker.summary({k: float(np.asarray(v)) for k, v in results.items()})

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
    if self.tracker:
      self.tracker.close()
