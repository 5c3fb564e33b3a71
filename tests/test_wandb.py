"""Weights & Biases tracking (rils_jax/wandb_run.py) in offline mode: the run folder, id file,
logged history, config and summary read back from the run's `.wandb` file; resume; disabled
mode and config errors. The tests that open runs are skipped without wandb
(requirements-wandb.txt); nothing reaches the network or leaves the test's folders."""

import glob
import json
import os
import struct
import sys
import time

import ml_collections
import pytest

from rils_jax import config_lib
from rils_jax import wandb_run


@pytest.fixture(scope='module')
def wandb_env(tmp_path_factory):
  """wandb with its settings, caches and service logs under a temporary folder, no error
  reports, and no WANDB_* variable of the caller's shell (a WANDB_MODE or WANDB_RUN_ID there
  would change the runs)."""
  wandb = pytest.importorskip('wandb', reason='wandb is optional: pip install -r '
                              'requirements-wandb.txt')
  home = tmp_path_factory.mktemp('wandb_home')
  with pytest.MonkeyPatch.context() as m:
    for name in list(os.environ):
      if name.startswith('WANDB_'):
        m.delenv(name)
    for name in ('HOME', 'XDG_CACHE_HOME', 'XDG_CONFIG_HOME', 'WANDB_CONFIG_DIR',
                 'WANDB_CACHE_DIR', 'WANDB_DATA_DIR', 'WANDB_ARTIFACT_DIR'):
      m.setenv(name, str(home / name.lower()))
    m.setenv('WANDB_SILENT', 'true')
    m.setenv('WANDB_ERROR_REPORTING', 'false')
    yield wandb
    # Ends wandb's service process, which was started with this environment.
    wandb.teardown()


def _config(**wandb_settings) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.seed = 7
  c.wandb.mode = 'offline'
  c.wandb.update(wandb_settings)
  return c


def _records(run_folder, timeout: float = 60.0):
  """The records of a finished run's `.wandb` file, once they end with its `exit` record:
  `run.finish()` can return before wandb's service has written the file out (a CI run read it
  without its `run` record, which was there a second later)."""
  deadline = time.monotonic() + timeout
  from google.protobuf import message  # pylint: disable=import-outside-toplevel
  while True:
    try:
      records = list(_read_records(run_folder))
    except message.DecodeError:  # A record written in part.
      records = []
    if (records and records[-1].WhichOneof('record_type') == 'exit') or (
        time.monotonic() > deadline):
      return records
    time.sleep(0.2)


def _read_records(run_folder):
  """The records of the run's `.wandb` file (wandb's transaction log: a 7-byte header, then
  LevelDB log blocks of 32 KiB whose chunks hold serialised `wandb_internal_pb2.Record`s; wandb
  0.31 ships no Python reader of its own)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  [path] = glob.glob(os.path.join(run_folder, 'run-*.wandb'))
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:4] == b':W&B'
  pos, block, chunks = 7, 32768, []
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # A block's tail too short for a header is padding.
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
    if kind == 0:  # Zero padding up to the block's end.
      pos += block - pos % block
      continue
    chunks.append(data[pos + 7:pos + 7 + length])
    pos += 7 + length
    if kind in (1, 4):  # FULL or LAST chunk: a record is complete.
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b''.join(chunks))
      chunks = []
      yield record


def _key(item) -> str:
  return item.key or '/'.join(item.nested_key)


def _history(run_folder) -> dict:
  """Step -> the metrics of its history row (without wandb's own `_` keys)."""
  rows = {}
  for r in _records(run_folder):
    if r.WhichOneof('record_type') == 'history':
      rows[r.history.step.num] = {_key(i): json.loads(i.value_json) for i in r.history.item
                                  if not _key(i).startswith('_')}
  return rows


def _summary(run_folder) -> dict:
  out = {}
  for r in _records(run_folder):
    if r.WhichOneof('record_type') == 'summary':
      out.update({_key(u): json.loads(u.value_json) for u in r.summary.update})
  return out


def _run_record(run_folder):
  [run] = [r.run for r in _records(run_folder) if r.WhichOneof('record_type') == 'run']
  return run


def _run_folders(workdir, run_id):
  """The offline run folders of `run_id`, oldest first (wandb adds -1, -2... to the name of a
  second folder started within the same second)."""
  pattern = os.path.join(workdir, 'wandb', f'offline-run-*-{run_id}')
  folders = glob.glob(pattern) + glob.glob(pattern + '-*')
  return sorted(folders, key=lambda f: _run_record(f).start_time.ToMicroseconds())


def test_fresh_run_logs_history_config_and_summary(tmp_path, wandb_env):
  workdir = str(tmp_path / 'tiny_run')
  config = _config(tags=('tiny', 'test'))
  tracker = wandb_run.open_run(config, workdir, resume_step=None)
  with open(os.path.join(workdir, 'wandb_run_id.txt')) as f:
    assert f.read().strip() == tracker.id
  tracker.log(0, {'data/images': 64, 'num_params': 1234})
  tracker.log(1, {'loss': 2.5, 'learning_rate': 1e-4})
  tracker.log(2, {'loss': 2.25, 'learning_rate': 2e-4})
  tracker.log(2, {'zeroshot/top1': 0.125})  # A final evaluation at the last training step.
  tracker.summary({'zeroshot/top1': 0.125, 'retrieval/i2t_r1': 0.5})
  tracker.close()
  tracker.close()  # Harmless.

  [folder] = _run_folders(workdir, tracker.id)
  assert sorted(os.listdir(workdir)) == ['wandb', 'wandb_run_id.txt']
  assert _history(folder) == {0: {'data/images': 64, 'num_params': 1234},
                              1: {'loss': 2.5, 'learning_rate': 1e-4},
                              2: {'loss': 2.25, 'learning_rate': 2e-4, 'zeroshot/top1': 0.125}}
  summary = _summary(folder)
  assert summary['zeroshot/top1'] == 0.125 and summary['retrieval/i2t_r1'] == 0.5
  run = _run_record(folder)
  assert (run.run_id, run.display_name, run.project, list(run.tags)) == (
      tracker.id, 'tiny_run', 'rils_jax', ['tiny', 'test'])
  run_config = {u.key: json.loads(u.value_json) for u in run.config.update}
  assert run_config['seed'] == 7 and run_config['input']['batch_size'] == 4096
  assert run_config['wandb']['mode'] == 'offline'


def test_resume_continues_the_run_id(tmp_path, wandb_env):
  workdir = str(tmp_path / 'run')
  config = _config(name='named')
  first = wandb_run.open_run(config, workdir, resume_step=None)
  for step in range(1, 6):  # Interrupted after step 5; the last checkpoint is step 3.
    first.log(step, {'loss': 10.0 + step})
  first.close()
  resumed = wandb_run.open_run(config, workdir, resume_step=3)
  assert resumed.id == first.id
  for step in range(4, 9):
    resumed.log(step, {'loss': 20.0 + step})
  resumed.log(6, {'loss': -1.0})  # Below a logged step: skipped (wandb would drop it).
  resumed.close()

  # wandb 0.31 does not resume offline runs: a second folder of the same id, which
  # `wandb sync` appends to the run, holds the steps from the checkpoint on.
  folders = _run_folders(workdir, first.id)
  assert len(folders) == 2 and _run_record(folders[1]).display_name == 'named'
  assert _history(folders[0]) == {s: {'loss': 10.0 + s} for s in range(1, 6)}
  assert _history(folders[1]) == {s: {'loss': 20.0 + s} for s in range(4, 9)}


class _FakeRun:
  """What `WandbRun` uses of a wandb run, resumed online at `starting_step`."""

  def __init__(self, starting_step):
    self.id, self.starting_step, self.logged = 'fake', starting_step, []

  def log(self, data, step):
    self.logged.append((step, data))


def test_steps_that_wandb_already_holds_are_skipped():
  # Online, wandb resumes the run after the last step it holds (here 5): the redone steps 4
  # and 5 keep the values logged before the restart, instead of a dropped-data warning each.
  run = _FakeRun(starting_step=6)
  tracker = wandb_run.WandbRun(run)
  for step in range(4, 8):
    tracker.log(step, {'loss': float(step)})
  tracker.log(7, {'zeroshot/top1': 0.5})
  assert run.logged == [(6, {'loss': 6.0}), (7, {'loss': 7.0}), (7, {'zeroshot/top1': 0.5})]


def test_run_id_file(tmp_path):
  workdir = str(tmp_path / 'run')
  first = wandb_run.run_id(workdir, resume_step=None)
  assert len(first) == 8 and wandb_run.run_id(workdir, resume_step=3) == first
  # A fresh start (no checkpoint) is a new wandb run, also where an earlier attempt left an id.
  second = wandb_run.run_id(workdir, resume_step=None)
  assert second != first and wandb_run.run_id(workdir, resume_step=3) == second
  with open(os.path.join(workdir, 'wandb_run_id.txt'), 'w') as f:
    f.write('a/b\n')
  with pytest.raises(ValueError, match="holds 'a/b', not a wandb run id"):
    wandb_run.run_id(workdir, resume_step=3)
  # A resumed run whose workdir has no id yet (wandb turned on later) starts a wandb run.
  assert len(wandb_run.run_id(str(tmp_path / 'other'), resume_step=3)) == 8


def test_url_workdir_names_and_local_folder(monkeypatch, tmp_path):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert wandb_run.local_dir('gs://bucket/runs/vit_b16/', 'abc') == str(
      tmp_path / 'rils_jax' / 'wandb' / 'abc')
  assert wandb_run.run_name(_config(), 'gs://bucket/runs/vit_b16/') == 'vit_b16'
  assert wandb_run.local_dir('/runs/vit_b16', 'abc') == '/runs/vit_b16'
  assert wandb_run.run_name(_config(), '/runs/vit_b16/') == 'vit_b16'
  assert wandb_run.run_name(_config(name='mine'), '/runs/vit_b16') == 'mine'


def test_disabled_returns_none_imports_and_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # An import of wandb would now fail.
  workdir = tmp_path / 'run'
  assert wandb_run.open_run(config_lib.base_config(), str(workdir), resume_step=None) is None
  assert wandb_run.open_run(config_lib.base_config(), str(workdir), resume_step=3) is None
  assert not workdir.exists()


def test_config_errors(monkeypatch):
  config = config_lib.base_config()
  config_lib.check_keys(config)
  wandb_run.check_config(config.wandb)  # The defaults pass.

  def check(**settings):
    wandb_config = ml_collections.ConfigDict(dict(config.wandb, **settings))
    with pytest.raises(ValueError) as e:
      wandb_run.check_config(wandb_config)
    return str(e.value)

  assert check(mode='on') == ("config.wandb.mode must be 'disabled', 'online' or 'offline', "
                              "got 'on'")
  assert check(tags='vit').startswith('config.wandb.tags must be a tuple of strings of 1 to 64 '
                                      "characters, e.g. ('vit_b16', 'cc12m'), got 'vit'")
  assert "got ('x', '')" in check(tags=('x', ''))
  assert 'got (' in check(tags=('a' * 65,))
  assert check(project=None) == 'config.wandb.project must be a string, got None'
  monkeypatch.setitem(sys.modules, 'wandb', None)  # As if wandb were not installed.
  wandb_run.check_config(config.wandb)  # Disabled: not needed.
  message = 'config.wandb.mode=online needs wandb: pip install -r requirements-wandb.txt'
  assert check(mode='online') == message
  config.wandb.mode = 'online'
  with pytest.raises(ValueError, match=message):
    wandb_run.open_run(config, '/nonexistent/run', resume_step=None)


def test_online_mode_needs_an_api_key(monkeypatch, tmp_path):
  pytest.importorskip('wandb', reason='wandb is optional: pip install -r requirements-wandb.txt')
  config = ml_collections.ConfigDict(dict(config_lib.base_config().wandb, mode='online'))
  for name in ('WANDB_API_KEY', 'WANDB_BASE_URL'):
    monkeypatch.delenv(name, raising=False)
  netrc_path = tmp_path / 'netrc'
  monkeypatch.setenv('NETRC', str(netrc_path))  # Missing: no key.
  with pytest.raises(ValueError, match=r'online needs a W&B API key: run `wandb login`'):
    wandb_run.check_config(config)
  netrc_path.write_text('machine api.wandb.ai\n  login user\n  password 0123456789\n')
  wandb_run.check_config(config)  # The entry `wandb login` writes.
  netrc_path.write_text('')
  monkeypatch.setenv('WANDB_API_KEY', 'x' * 40)
  wandb_run.check_config(config)


def test_training_logs_the_same_metrics_as_metrics_jsonl_and_resumes_the_run(tmp_path,
                                                                             wandb_env):
  # pylint: disable-next=import-outside-toplevel
  from rils_jax import main as main_lib
  from tests import tiny  # pylint: disable=import-outside-toplevel
  root, tok = str(tmp_path / 'shapes'), str(tmp_path / 'tok.model')
  tiny.generate_data(root, tok)
  workdir = str(tmp_path / 'run')
  for steps in (3, 5):  # The second start resumes from the checkpoint of step 3.
    c = tiny.get_config(f'root={root},steps={steps},every=3,evals=false')
    c.tokenizer.model = tok
    c.log_every = 1
    c.wandb.mode = 'offline'
    main_lib.train(c, workdir)
  run_id = open(os.path.join(workdir, 'wandb_run_id.txt')).read().strip()
  folders = _run_folders(workdir, run_id)
  assert len(folders) == 2
  logged = tiny.logged_metrics(workdir)
  for folder, steps in zip(folders, ([1, 2, 3], [4, 5])):
    history = _history(folder)
    assert [s for s in history if 'loss' in history[s]] == steps
    for step in steps:
      assert history[step]['loss'] == pytest.approx(logged[step]['loss'], rel=1e-6)
  assert _run_record(folders[0]).display_name == 'run'
