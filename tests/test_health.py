"""Run health (rils_jax/health.py): the skip-fraction rule that stops a run reading mostly
unreadable images. Non-finite steps end to end: tests/test_faults.py."""

import pytest

from rils_jax import health


def test_skip_fraction_stops_the_run():
  health.check_skips(99, 0, 0.5)  # Fewer than 100 skips never stop a run.
  health.check_skips(100, 100, 0.5)
  with pytest.raises(RuntimeError, match='101 of 201 examples were skipped'):
    health.check_skips(101, 100, 0.5)
