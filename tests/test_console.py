"""What the commands show (rils_jax/console.py): the libraries' INFO chatter is dropped from
the log, their warnings and rils_jax's own lines are kept; `say` prints on process 0."""

import logging as std_logging
import os

from absl import logging

from rils_jax import console


def _record(path, level, message='a message'):
  return std_logging.LogRecord('absl', level, path, 1, message, None, None)


def test_quiet_libraries_drops_library_info_only():
  quiet = console.QuietLibraries()
  site = os.path.join(os.sep, 'venv', 'lib', 'python3.11', 'site-packages')
  for lib in ('orbax', 'grain', 'jax'):
    path = os.path.join(site, lib, '_src', 'module.py')
    assert not quiet.filter(_record(path, std_logging.INFO))
    assert quiet.filter(_record(path, std_logging.WARNING))
  own = os.path.join(os.sep, 'repo', 'rils_jax', 'main.py')
  assert quiet.filter(_record(own, std_logging.INFO))
  assert not quiet.filter(_record(own, std_logging.WARNING,
                                  'Metadata file does not exist: /run/checkpoints/3/state'))


def test_quiet_libraries_installs_once(monkeypatch):
  handler = logging.get_absl_handler()
  monkeypatch.setattr(handler, 'filters', [])
  console.quiet_libraries()
  console.quiet_libraries()
  assert sum(isinstance(f, console.QuietLibraries) for f in handler.filters) == 1


def test_say_prints_on_process_zero_only(capsys, monkeypatch):
  console.say('step', 1)
  assert capsys.readouterr().out == 'step 1\n'
  monkeypatch.setattr(console.jax, 'process_index', lambda: 1)
  console.say('step', 2)
  assert capsys.readouterr().out == ''
