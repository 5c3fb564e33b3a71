"""What the commands show the user: the absl log without the libraries' chatter, the lines that
process 0 prints, and a user's mistake as one line.

Every command starts with `run(main)` instead of absl's `app.run(main)`: a mistake on the
command line or in a config file (a mistyped key, a config file that does not exist or raises)
and the user errors that `main` raises (`USER_ERRORS`) print `error: ...` on one line or two and
exit 1, without a traceback (nor the tracebacks of the asynchronous reads that a failed restore
abandons); RILS_JAX_TRACEBACK=1 in the environment shows the traceback. Every
`main` installs `quiet_libraries()` first; multi-host runs print through `say`, so that each
line appears once, not once per host.
"""

import atexit
import os
import sys
from typing import Callable, List

import jax
from absl import app
from absl import flags
from absl import logging

# Set to 1 for the traceback of a user error (a bug report, a config file that raises).
TRACEBACK_ENV = 'RILS_JAX_TRACEBACK'
# grain's worker processes hand batches over in shared memory; the segments of batches still in
# flight when a pipeline stops are unlinked at exit by Python's resource tracker, which warns
# about each (google/grain#398, "leaked shared_memory objects"): freed either way, so the
# tracker, a process of its own that reads PYTHONWARNINGS when it starts, is told not to warn.
QUIET_RESOURCE_TRACKER = 'ignore:resource_tracker:UserWarning'

# Libraries whose INFO lines are dropped (matched as a folder in the logging call's path).
QUIET_LIBRARIES = ('orbax', 'grain', 'jax', 'gcsfs', 'fsspec')


class QuietLibraries:
  """A `logging.Filter` that drops INFO lines from orbax, grain and jax internals (dozens per
  checkpoint, and jax's "Unable to initialize backend 'tpu'" on every start) and orbax's
  warning that a checkpoint item has no metadata file of its own (reading the `state` item of a
  multi-item checkpoint, whose metadata sits one folder up: expected) and that an item was not
  asked for (reading a checkpoint's config, or its state without its data position: expected).
  Warnings and errors of the libraries, and every line of rils_jax, pass."""

  def filter(self, record) -> bool:
    message = record.getMessage()
    if message.startswith('Metadata file does not exist'):
      return False
    if 'was found in the checkpoint, but could not be restored' in message:
      return False  # Reading some items of a checkpoint (its config, or the state alone).
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


def _is_user_error(e: BaseException) -> bool:
  """A mistake of the user's (config, paths, data, a diverged run), whose message says what to
  do: ValueError, OSError (not found, exists, permission, disk full), and rils_jax's plain
  RuntimeErrors and their own subclasses (health.NonFiniteError); XLA's and other libraries'
  RuntimeError subclasses are crashes and keep their traceback."""
  if isinstance(e, (ValueError, OSError)):
    return True
  return isinstance(e, RuntimeError) and (
      type(e) is RuntimeError or type(e).__module__.startswith('rils_jax'))  # pylint: disable=unidiomatic-typecheck


def describe(e: BaseException) -> str:
  """The message of `e` as a person reads it. ml_collections reports a mistyped key as an
  AttributeError around a KeyError holding "'KEY'\\nDid you mean ...": one line here."""
  while len(e.args) == 1 and isinstance(e.args[0], BaseException):
    e = e.args[0]
  if isinstance(e, (KeyError, AttributeError)) and e.args and isinstance(e.args[0], str):
    key, _, hint = e.args[0].partition('\n')
    return f'no config key {key.strip(chr(39))!r}' + (f'. {hint}' if hint else '')
  message = str(e)
  if 'Failed loading config file' in message:  # ml_collections: the cause is the last line.
    return 'cannot load the config file: ' + message.strip().splitlines()[-1].strip()
  # ml_collections re-raises a config file's error with this prefix when the flag is read.
  return message.replace('Configuration is not available because of an earlier failure to '
                         'load: ', '')


def _is_abandoned_async_work(unraisable) -> bool:
  """Whether an unraisable exception is the echo of asynchronous reads that a failed restore
  abandoned: orbax stops at the first array that cannot be read (a damaged checkpoint) and
  closes its event loop, then tensorstore's threads finish the other reads and call back into the
  closed loop ("Event loop is closed"), and the coroutines still awaiting them are closed
  (GeneratorExit). Each printed a traceback around the one-line error of the failure itself."""
  e = unraisable.exc_value
  if isinstance(e, RuntimeError) and str(e) == 'Event loop is closed':
    return True
  return isinstance(e.__cause__ or e.__context__, GeneratorExit) and type(
      unraisable.object).__name__ == 'coroutine'


def _quiet_abandoned_async_work(previous: Callable) -> Callable:
  def hook(unraisable):
    if not _is_abandoned_async_work(unraisable):
      previous(unraisable)
  return hook


def _exit(code: int) -> None:
  # After a failed or interrupted run (whose own clean-up has run), XLA's, orbax's and grain's
  # threads can crash the interpreter's shutdown (a segfault, "Event loop is closed" from
  # orbax's asyncio threads): the exit functions run, then the process ends at once.
  sys.stdout.flush()
  sys.stderr.flush()
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  logging.flush()
  os._exit(code)  # pylint: disable=protected-access


def _fail(e: BaseException, where: str = '') -> None:
  if os.environ.get(TRACEBACK_ENV) == '1':
    raise e
  sys.stderr.write(f'error: {where}{describe(e)}\n(set {TRACEBACK_ENV}=1 for the traceback)\n')
  _exit(1)


def _parse_flags(argv: List[str]) -> List[str]:
  # The config file is loaded and --config.KEY=VALUE applied while the flags are parsed: any
  # error there comes from the user's command line or config file.
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # A missing or malformed flag: absl's message says which.
    message = str(e)
    if 'Error whilst parsing config file' in message and os.environ.get(TRACEBACK_ENV) != '1':
      # ml_collections puts the config file's traceback in the message: its last line is why.
      flag = message.split(':', 1)[0]
      message = (f'{flag}: the config file raised '
                 f'{message.strip().splitlines()[-1].strip()}\n(set {TRACEBACK_ENV}=1 for the '
                 'traceback)')
    elif 'is not supported for overriding' in message:
      # ml_collections lists every overridable type; the user needs what to do instead.
      field = message.split(' of field ', 1)[-1].split(' is not supported', 1)[0]
      message = (f'{field} is a list, which --config.KEY=VALUE cannot set: the configs take '
                 'your own data as an argument (e.g. --config=configs/default.py:data=csv:'
                 'CAPTIONS.csv:IMAGES; README, "Your own data"); anything else goes in a copy '
                 'of the config file')
    else:
      message += '\n(--helpfull lists the flags)'
    sys.stderr.write(f'error: {message}\n')
    sys.exit(1)
  except Exception as e:  # pylint: disable=broad-except
    typo = isinstance(e, (KeyError, AttributeError))
    _fail(e, 'in the config (file or --config.KEY=VALUE): ' if typo else '')
  return []  # Not reached.


def run(main: Callable[[List[str]], None]) -> None:
  """`absl.app.run(main)` with a user's mistakes as one line and exit status 1 (see the module
  docstring); other exceptions keep their traceback."""

  def guarded(argv):
    try:
      main(argv)
    except app.UsageError as e:  # absl would print the module's whole docstring.
      sys.stderr.write(f'error: {e}\n(--help shows the usage)\n')
      sys.exit(1)
    except KeyboardInterrupt:
      sys.stderr.write('error: interrupted\n')
      _exit(130)
    except Exception as e:  # pylint: disable=broad-except
      if not _is_user_error(e):
        raise
      _fail(e)

  if os.environ.get(TRACEBACK_ENV) != '1':
    sys.unraisablehook = _quiet_abandoned_async_work(sys.unraisablehook)
  warnings = os.environ.get('PYTHONWARNINGS', '')
  if QUIET_RESOURCE_TRACKER not in warnings:
    os.environ['PYTHONWARNINGS'] = ','.join(filter(None, (warnings, QUIET_RESOURCE_TRACKER)))
  app.run(guarded, flags_parser=_parse_flags)
