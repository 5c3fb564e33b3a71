"""gs:// workdirs against a real GCS API server on localhost (tests/gcs_server.py): preemption
and SIGKILL on a bucket resume bitwise-equal to an uninterrupted local run, two processes write
one checkpoint there that one process evaluates and exports, and the storage layer's uploads,
downloads and errors.

The tests skip, saying why, when the server cannot start (the package that bundles it is not
installed); on the development machine and in CI it runs.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath
from safetensors.numpy import load_file

from rils_jax import checkpoints as checkpoints_lib
from rils_jax import export
from rils_jax import main as main_lib
from rils_jax import storage
from rils_jax.evals import restore as restore_lib
from tests import tiny

STEPS = 8


@pytest.fixture(scope='module')
def setup(tmp_path_factory, gcs):
  """Data, a tokenizer, a bucket and the uninterrupted local reference run."""
  tmp = tmp_path_factory.mktemp('bucket')
  root, tok = str(tmp / 'shapes'), str(tmp / 'tok.model')
  tiny.generate_data(root, tok)
  reference = str(tmp / 'reference')
  main_lib.train(_config(root, tok), reference)
  return dict(root=root, tokenizer=tok, reference=reference, tmp=tmp,
              bucket=gcs.create_bucket('rils-runs'), gcs=gcs)


def _config(root, tokenizer, **overrides):
  c = tiny.get_config(f'root={root},steps={STEPS},every=4,evals=false')
  c.tokenizer.model = tokenizer
  c.input.log_example_ids = True
  c.log_upload_seconds = 0.5
  return tiny.apply_overrides(c, **overrides)


def _trainer(setup, workdir, module='tests.fault_runner', *extra, devices=8, evals='false'):
  command = [sys.executable, '-m', module, *extra,
             f'--config=tests/tiny.py:root={setup["root"]},steps={STEPS},every=4,evals={evals}',
             f'--config.tokenizer.model={setup["tokenizer"]}',
             '--config.input.log_example_ids=true', '--config.log_upload_seconds=0.5',
             f'--workdir={workdir}']
  # TMPDIR: the staging folder of a SIGKILLed run stays in the test's folder, not in /tmp.
  env = {**os.environ, **setup['gcs'].env, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
         'TMPDIR': str(setup['tmp'])}
  return subprocess.Popen(command, cwd=tiny.REPO_ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _committed(workdir):
  root = epath.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def test_preempted_and_killed_on_a_bucket_resumes_like_the_uninterrupted_run(setup):
  workdir = f'{setup["bucket"]}/preempted'
  # SIGTERM: the checkpoint of the current step goes to the bucket and the run exits 0.
  output = tiny.Output(_trainer(setup, workdir, 'tests.fault_runner', '--slow_steps=0.5'))
  output.wait_for(rf'^step 2/{STEPS}')
  output.process.send_signal(signal.SIGTERM)
  assert output.process.wait(timeout=300) == 0, output.text()[-3000:]
  line = output.wait_for(r'^Preempted \(SIGTERM\) at step \d+')
  preempted = int(re.search(r'at step (\d+)', line).group(1))
  assert 2 <= preempted < 4 and f'{workdir}/checkpoints/{preempted}' in line
  assert _committed(workdir) == [preempted]
  assert sorted(tiny.logged_metrics(workdir)) == list(range(1, preempted + 1))

  # Restarted from the bucket, then SIGKILLed after the checkpoint of step 4.
  output = tiny.Output(_trainer(setup, workdir, 'tests.fault_runner', '--slow_steps=0.5'))
  output.wait_for(rf'^step 5/{STEPS}')
  while 4 not in _committed(workdir):
    time.sleep(0.1)
  time.sleep(1.0)  # One upload interval, so that the bucket's logs pass the checkpoint.
  output.process.send_signal(signal.SIGKILL)
  assert output.process.wait(timeout=60) == -signal.SIGKILL
  assert f'step {preempted + 1}/{STEPS}' in output.text() and 'step 1/' not in output.text()
  printed = [int(s) for s in re.findall(r'^step (\d+)/', output.text(), re.M)]
  logged = sorted(tiny.logged_metrics(workdir))
  # Every line up to the checkpoint is in the bucket; at most the last interval's are not.
  assert logged[:4] == [1, 2, 3, 4] and set(logged) <= set(range(1, max(printed) + 1))
  print(f'SIGKILL at step {max(printed)}: the bucket has metrics lines up to step '
        f'{max(logged)} ({max(printed) - max(logged)} lost)')
  assert _committed(workdir) == [preempted, 4]

  # Resumed in this process: the same parameters and optimizer state, bit for bit, and the same
  # examples at every step as the run that was never interrupted.
  main_lib.train(_config(setup['root'], setup['tokenizer']), workdir)
  a, b = checkpoints_lib.read_state(workdir), checkpoints_lib.read_state(setup['reference'])
  assert int(a['step']) == int(b['step']) == STEPS
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  ids = tiny.example_ids(workdir)
  assert sorted(ids) == list(range(1, STEPS + 1)) and ids == tiny.example_ids(setup['reference'])
  assert sorted(tiny.logged_metrics(workdir)) == list(range(1, STEPS + 1))
  names = {p.name for p in epath.Path(workdir).iterdir()}
  assert {'config.json', f'config.resume_{preempted}.json', 'config.resume_4.json',
          'tokenizer.model', 'metrics.jsonl', 'tensorboard', 'example_ids'} <= names
  assert (epath.Path(workdir) / 'tokenizer.model').read_bytes() == open(
      setup['tokenizer'], 'rb').read()
  events = list((epath.Path(workdir) / 'tensorboard').iterdir())
  assert len(events) == 3 and all(e.name.startswith('events.out.tfevents') for e in events)


def test_two_processes_write_one_checkpoint_that_one_process_evaluates_and_exports(setup):
  workdir = f'{setup["bucket"]}/two_processes'
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = [tiny.Output(_trainer(
      setup, workdir, 'rils_jax.main', f'--coordinator_address=127.0.0.1:{port}',
      '--num_processes=2', f'--process_id={i}', devices=4)) for i in range(2)]
  for i, p in enumerate(procs):
    assert p.process.wait(timeout=600) == 0, f'process {i}:\n{p.text()[-3000:]}'
  assert _committed(workdir) == [4, STEPS]
  data = {p.name for p in (epath.Path(workdir) / 'checkpoints' / str(STEPS) / 'data').iterdir()}
  # Each process's input position, and orbax's commit marker (an object store has no rename).
  assert data == {'process_0-of-2.json', 'process_1-of-2.json', 'commit_success.txt'}
  assert {p.name for p in (epath.Path(workdir) / 'example_ids').iterdir()} == {
      'process_0.jsonl', 'process_1.jsonl'}
  saved = checkpoints_lib.read_state(workdir)
  reference = checkpoints_lib.read_state(setup['reference'])
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(reference['params']),
                          jax.tree.leaves(saved['params'])):
    np.testing.assert_allclose(b, a, atol=1e-5, err_msg=jax.tree_util.keystr(path))

  # One process evaluates it from the bucket and appends its lines to a file there.
  out = f'{workdir}/evals.jsonl'
  evaluate = subprocess.run(
      [sys.executable, '-m', 'rils_jax.evaluate',
       f'--config=tests/tiny.py:root={setup["root"]},steps={STEPS}', f'--checkpoint={workdir}',
       f'--output={out}', '--print=json'], cwd=tiny.REPO_ROOT, text=True, capture_output=True,
      timeout=600,
      env={**os.environ, **setup['gcs'].env})
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  printed = [json.loads(line) for line in evaluate.stdout.splitlines() if line.startswith('{')]
  assert {r['evaluator'] for r in printed} == {'zeroshot', 'retrieval'}
  assert all(r['step'] == STEPS and r['checkpoint'] == f'{workdir}/checkpoints/{STEPS}'
             for r in printed)
  stored = [json.loads(line) for line in epath.Path(out).read_text().splitlines()]
  assert stored == printed

  # Restored (as evaluate, export, fine-tuning and init_from read it) and exported from there.
  restored = restore_lib.restore(workdir)
  assert restored.step == STEPS and restored.path == f'{workdir}/checkpoints/{STEPS}'
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(saved['params']),
                          jax.tree.leaves(jax.device_get(restored.params))):
    np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))
  target = str(setup['tmp'] / 'exported.safetensors')
  printed = export._export('timm', workdir, None, target, 'none')  # pylint: disable=protected-access
  assert f'step {STEPS} of {workdir}/checkpoints/{STEPS}' in printed
  expected = export.timm_state_dict(saved['params'], restored.config)
  tensors = load_file(target)
  assert sorted(tensors) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(tensors[name], value, err_msg=name)
  warm = checkpoints_lib.load_params(workdir, jax.device_get(restored.params))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(warm),
                                                  jax.tree.leaves(saved['params'])))


def test_mirror_uploads_whole_lines_and_a_resumed_run_continues_its_logs(setup, tmp_path):
  workdir = f'{setup["bucket"]}/mirror'
  logs = storage.Mirror(workdir, uploads=('metrics.jsonl', 'tensorboard'),
                        continues=('metrics.jsonl',), interval=3600)
  assert logs.local != workdir and os.path.isdir(logs.local)
  with open(os.path.join(logs.local, 'metrics.jsonl'), 'w') as f:
    f.write('{"step": 1}\n{"step": 2}\n{"step": 3')  # The third line is being written.
  os.makedirs(os.path.join(logs.local, 'tensorboard'))
  with open(os.path.join(logs.local, 'tensorboard', 'events.a'), 'wb') as f:
    f.write(b'\x00\x01')
  assert logs.flush() == 2
  assert (epath.Path(workdir) / 'metrics.jsonl').read_text() == '{"step": 1}\n{"step": 2}\n'
  assert (epath.Path(workdir) / 'tensorboard' / 'events.a').read_bytes() == b'\x00\x01'
  assert logs.flush() == 0  # Nothing changed: nothing uploaded.
  with open(os.path.join(logs.local, 'metrics.jsonl'), 'a') as f:
    f.write('}\n')
  assert logs.flush() == 1
  logs.close()
  assert not os.path.exists(logs.local)  # The staging folder is removed.

  resumed = storage.Mirror(workdir, uploads=('metrics.jsonl',), continues=('metrics.jsonl',),
                           interval=0.2)
  with open(os.path.join(resumed.local, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 4}\n')
  deadline = time.time() + 10
  while time.time() < deadline and '"step": 4' not in (
      epath.Path(workdir) / 'metrics.jsonl').read_text():
    time.sleep(0.1)  # The background thread uploads it.
  assert [json.loads(line)['step'] for line in
          (epath.Path(workdir) / 'metrics.jsonl').read_text().splitlines()] == [1, 2, 3, 4]
  resumed.close()

  local = storage.Mirror(str(tmp_path), uploads=('metrics.jsonl',))
  assert local.local == str(tmp_path) and local.flush() == 0
  local.close()


def test_line_file_appends_to_an_object(setup):
  path = f'{setup["bucket"]}/lines/out.jsonl'
  for line in ('a', 'b'):
    out = storage.LineFile(path)
    out.write_line(line)
    out.close()
  assert epath.Path(path).read_text() == 'a\nb\n'


def test_a_missing_bucket_is_one_line_and_leaves_nothing(setup):
  config = _config(setup['root'], setup['tokenizer'])
  with pytest.raises(ValueError, match=r'cannot write to the workdir gs://no-such-bucket/run'):
    main_lib.train(config, 'gs://no-such-bucket/run')
  run = subprocess.run(
      [sys.executable, '-m', 'rils_jax.main', '--config=configs/default.py',
       '--workdir=gs://no-such-bucket/run'], cwd=tiny.REPO_ROOT, text=True,
      capture_output=True, timeout=300, env={**os.environ, **setup['gcs'].env})
  assert run.returncode == 1, run.stderr[-2000:]
  assert 'Traceback' not in run.stderr
  errors = [line for line in run.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and errors[0].startswith(
      'error: cannot write to the workdir gs://no-such-bucket/run'), run.stderr[-2000:]
  with pytest.raises(FileNotFoundError, match='empty does not exist'):
    checkpoints_lib.checkpoint_path(f'{setup["bucket"]}/empty')
  with pytest.raises(ValueError, match='log_upload_seconds=0.0 must be > 0'):
    main_lib.validate_config(tiny.apply_overrides(config, log_upload_seconds=0))


def test_malformed_urls_and_outputs_are_refused_before_anything_is_written(setup, tmp_path,
                                                                         monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = _config(setup['root'], setup['tokenizer'])
  for workdir, message in (('gs:/rils-runs/run', 'looks like a URL with one slash'),
                           ('gcs://rils-runs/run', 'gcs:// is not a storage rils_jax can open'),
                           ('gs:///run', 'names no bucket')):
    with pytest.raises(ValueError, match=message):
      main_lib.train(config, workdir)
    with pytest.raises(ValueError, match=message):
      checkpoints_lib.checkpoint_path(workdir)
  assert not os.listdir(tmp_path)  # No local folder named 'gs:'.
  # An evaluation output that names a run's folder, or ends in '/', is not written as an object.
  storage.write_text(f'{setup["bucket"]}/folder/config.json', '{}')
  for path in (f'{setup["bucket"]}/folder', f'{setup["bucket"]}/other/'):
    with pytest.raises(ValueError, match='is a folder'):
      storage.LineFile(path)
  assert not storage.is_file(f'{setup["bucket"]}/folder')
  with pytest.raises(ValueError, match='must be a local path'):
    export.check_out('timm', f'{setup["bucket"]}/model.safetensors')
  with pytest.raises(ValueError, match='must be a local path'):
    export.check_out('open_clip', 'gs:/rils-runs/open_clip')
