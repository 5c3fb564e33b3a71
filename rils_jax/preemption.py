"""Preemption notices: SIGTERM on GPU and CPU hosts, maintenance events on Cloud TPU.

A scheduler (SLURM, Kubernetes, spot and preemptible VMs) sends SIGTERM some seconds before it
kills a job. The train loop asks `Watcher.reached(step)` after every step; when it answers True
the loop saves a checkpoint of that step and exits with status 0.

- One process: a Python SIGTERM handler records the signal.
- Several processes (`jax.distributed` initialised): JAX's preemption service (the coordination
  service's notifier, which listens for SIGTERM and for TPU maintenance events) tells every
  process, and `multihost_utils.reached_preemption_sync_point` answers True on all processes at
  the same step, so that they save the same step together. No Python handler is installed then,
  because it would replace the service's own.

A second SIGTERM while the checkpoint is being written only logs: the save finishes, and orbax's
atomic commit means that even a SIGKILL at that point leaves the previous checkpoints intact.
"""

import signal
from typing import Optional

import jax
from absl import logging
from jax.experimental import multihost_utils


class Watcher:
  """Records preemption notices from the moment it is created until `close`.

  Must be created on the main thread (Python delivers signals there).
  """

  def __init__(self):
    self.signals = 0
    self.signal_name: Optional[str] = None
    self._previous = None
    self._multihost = jax.distributed.is_initialized()
    if not self._multihost:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    self.signals += 1
    self.signal_name = signal.Signals(signum).name
    if self.signals == 1:
      logging.warning('%s received: saving a checkpoint after the current step, then exiting',
                      self.signal_name)
    else:
      logging.warning('%s received again: the checkpoint is being saved, exiting when it is '
                      'complete', self.signal_name)

  def reached(self, step: int) -> bool:
    """True when the run should save `step` and stop (the same step on every process)."""
    if self._multihost:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signal_name = self.signal_name or 'preemption notice'
          return True
      except RuntimeError:  # The preemption service is disabled (jax_enable_preemption_service).
        pass
      return False
    return self.signals > 0

  def close(self) -> None:
    """Puts back the SIGTERM handler that was there before."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
