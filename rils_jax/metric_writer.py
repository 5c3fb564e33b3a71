"""Metric logging to `workdir/metrics.jsonl` and TensorBoard event files.

TensorBoard events are written with tensorboardX, which needs no TensorFlow (clu's
`metric_writers` would import TensorFlow, +1.5 GB). Only the process given `enabled=True`
(process 0) writes.
"""

import json
import os
from typing import Mapping

import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
  """Appends `{"step": s, name: value, ...}` lines to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      self._tb = SummaryWriter(logdir=os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Writes scalar metrics (numbers or 0-d arrays) for `step`."""
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), **values}) + '\n')
    self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
