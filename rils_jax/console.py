"""What the commands show the user: the absl log without the libraries' chatter, and the lines
that process 0 prints.

Every command installs `quiet_libraries()` first; multi-host runs print through `say`, so that
each line appears once, not once per host.
"""

import os

import jax
from absl import logging

# Libraries whose INFO lines are dropped (matched as a folder in the logging call's path).
QUIET_LIBRARIES = ('orbax', 'grain', 'jax', 'gcsfs', 'fsspec')


class QuietLibraries:
  """A `logging.Filter` that drops INFO lines from orbax, grain and jax internals (dozens per
  checkpoint, and jax's "Unable to initialize backend 'tpu'" on every start) and orbax's
  warning that a checkpoint item has no metadata file of its own (reading the `state` item of a
  multi-item checkpoint, whose metadata sits one folder up: expected). Warnings and errors of
  the libraries, and every line of rils_jax, pass."""

  def filter(self, record) -> bool:
    if record.getMessage().startswith('Metadata file does not exist'):
      return False
    return record.levelno > logging.converter.STANDARD_INFO or not any(
        f'{os.sep}{lib}{os.sep}' in record.pathname for lib in QUIET_LIBRARIES)


def quiet_libraries() -> None:
  """Installs `QuietLibraries` on absl's log handler (once per process is enough; again is
  harmless)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, QuietLibraries) for f in handler.filters):
    handler.addFilter(QuietLibraries())


def say(*parts) -> None:
  """Prints a line for the user on process 0 only, flushed at once (a user follows it live,
  and a preempted run must not lose it in a buffer)."""
  if jax.process_index() == 0:
    print(*parts, flush=True)
