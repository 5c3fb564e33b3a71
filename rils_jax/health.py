"""Run health, checked while training: non-finite steps, unreadable images, and the example ids
each step trained on.

The train step counts non-finite updates and skipped images on the devices (they never stop
the step); `Health` reads those counters one step late, so that checking them never makes the
devices wait for the host, and stops a run that has gone wrong with an error that says what to
do. `ExampleIds` records which examples each step saw, for tests and audits of the data order.
"""

import json
import os

import jax
import ml_collections
from absl import logging

from rils_jax import checkpoints as checkpoints_lib


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a NaN or Inf loss or gradient."""


class Health:
  """Checks the counters of each step (non-finite updates, unreadable images) one step late,
  so that reading them never makes the devices wait for the host.

  Raises (from `observe` and `finish`):
    NonFiniteError: after `config.max_consecutive_nonfinite` skipped updates in a row.
    RuntimeError: when the unreadable images pass `config.input.max_skip_fraction`.
  """

  def __init__(self, config: ml_collections.ConfigDict, checkpoints: checkpoints_lib.Checkpoints):
    self._max_nonfinite = config.max_consecutive_nonfinite
    self._max_skip_fraction = config.input.max_skip_fraction
    self._batch_size = config.input.batch_size
    self._checkpoints = checkpoints
    self._pending = None

  def observe(self, step: int, metrics) -> None:
    """Takes step `step`'s device metrics and checks the previous step's."""
    keys = ('loss', 'grad_norm', 'nonfinite', 'consecutive_nonfinite', 'skipped_examples')
    previous, self._pending = self._pending, (step, {k: metrics[k] for k in keys})
    if previous:
      self._check(*previous)

  def finish(self) -> None:
    if self._pending:
      self._check(*self._pending)
      self._pending = None

  def _check(self, step: int, values) -> None:
    values = jax.device_get(values)
    if values['nonfinite']:
      in_a_row = int(values['consecutive_nonfinite'])
      logging.warning('step %d: loss %s, gradient norm %s: update skipped (%d in a row)', step,
                      values['loss'], values['grad_norm'], in_a_row)
      if in_a_row >= self._max_nonfinite:
        first = step - in_a_row + 1
        self._checkpoints.wait()
        good = [s for s in self._checkpoints.all_steps() if s < first]
        where = (f'the last good checkpoint is step {max(good)} in {self._checkpoints.directory}'
                 if good else 'no checkpoint was saved before them')
        raise NonFiniteError(
            f'stopping at step {step}: steps {first}-{step} ({in_a_row} in a row, '
            f'config.max_consecutive_nonfinite={self._max_nonfinite}) had a NaN or Inf loss or '
            f'gradient, so their updates were skipped and the parameters are those after step '
            f'{first - 1}; {where}. Re-running the same command resumes from the latest '
            'checkpoint; lower optim.lr or raise optim.warmup_steps first, or check the data')
    check_skips(int(values['skipped_examples']), step * self._batch_size,
                self._max_skip_fraction)


def check_skips(skipped: int, delivered: int, max_fraction: float) -> None:
  """Stops a run that would silently train on a small part of its data.

  Raises:
    RuntimeError: when more than `max_fraction` of the examples read so far were skipped (after
      at least 100 skips, so that a few bad files early on do not stop a run).
  """
  if skipped >= 100 and skipped > max_fraction * (skipped + delivered):
    raise RuntimeError(
        f'{skipped} of {skipped + delivered} examples were skipped as unreadable images, more '
        f'than config.input.max_skip_fraction={max_fraction}; check the image folders of '
        'config.input.sources (the log names the first skipped files)')


class ExampleIds:
  """With `config.input.log_example_ids`, appends `{"step": s, "example_ids": [...]}` per step
  to WORKDIR/example_ids/process_<i>.jsonl (this process's rows; after a resume the steps since
  the checkpoint appear again, and the last line of a step is the one that counts)."""

  def __init__(self, workdir: str, enabled: bool):
    self._file = None
    if enabled:
      os.makedirs(os.path.join(workdir, 'example_ids'), exist_ok=True)
      self._file = open(os.path.join(workdir, 'example_ids',
                                     f'process_{jax.process_index()}.jsonl'), 'a')

  def write(self, step: int, example_ids) -> None:
    if self._file:
      self._file.write(json.dumps({'step': step, 'example_ids': example_ids.tolist()}) + '\n')
      self._file.flush()

  def close(self) -> None:
    if self._file:
      self._file.close()
