"""Runs `rils_jax.finetune` on a JSON config with every step slowed down, for
tests/test_finetune.py (so that a test can signal or kill the process at a known step).

  python -m tests.finetune_runner --slow_steps=1.0 --config_json=PATH --workdir=DIR
"""

import json
import time

import ml_collections
from absl import app
from absl import flags

from rils_jax import finetune
from rils_jax import metric_writer

_SLOW = flags.DEFINE_float('slow_steps', 0.0, 'Extra seconds per logged step.')
_CONFIG = flags.DEFINE_string('config_json', None, 'The fine-tuning config as JSON.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The fine-tuning workdir.')


def main(argv):
  del argv
  write = metric_writer.MetricWriter.write

  def slow_write(self, step, metrics):
    time.sleep(_SLOW.value)
    write(self, step, metrics)

  metric_writer.MetricWriter.write = slow_write  # The loop writes the loss at every step.
  with open(_CONFIG.value, encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  try:
    finetune.finetune(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    raise SystemExit(f'error: {e}') from e


if __name__ == '__main__':
  app.run(main)
