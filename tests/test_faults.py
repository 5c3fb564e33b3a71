"""Fault tolerance end to end: SIGKILL and restart, SIGTERM, a kill in the middle of an
asynchronous save, non-finite steps, warm starts, and the checkpoint policies.

The interrupted runs are real `python -m tests.fault_runner` processes (rils_jax.main with a
fault injected); their restarts and the uninterrupted reference run in this process, all on 8
CPU devices, so that the final parameters can be compared bitwise.
"""

import os
import re
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rils_jax import checkpoints as checkpoints_lib
from rils_jax import config_lib
from rils_jax import health
from rils_jax import main as main_lib
from rils_jax import tokenizer as tokenizer_lib
from tests import tiny

STEPS = 8


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """The data, a tokenizer and the uninterrupted reference run of STEPS steps."""
  tmp = tmp_path_factory.mktemp('faults')
  root, tok = str(tmp / 'shapes'), str(tmp / 'tok.model')
  tiny.generate_data(root, tok)
  reference = str(tmp / 'reference')
  main_lib.train(_config(root, tok), reference)
  return dict(root=root, tokenizer=tok, reference=reference)


def _config(root, tokenizer, every=4, **overrides) -> ml_collections.ConfigDict:
  c = tiny.get_config(f'root={root},steps={STEPS},every={every},evals=false')
  c.tokenizer.model = tokenizer
  c.input.log_example_ids = True
  return tiny.apply_overrides(c, **overrides)


def _launch(setup, workdir, *fault_flags, every=4) -> tiny.Output:
  command = [sys.executable, '-m', 'tests.fault_runner', *fault_flags,
             f'--config=tests/tiny.py:root={setup["root"]},steps={STEPS},every={every},'
             'evals=false', f'--config.tokenizer.model={setup["tokenizer"]}',
             '--config.input.log_example_ids=true', f'--workdir={workdir}']
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu'}
  return tiny.Output(subprocess.Popen(command, cwd=tiny.REPO_ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))


def _committed_steps(workdir):
  return sorted(ocp.utils.checkpoint_steps(os.path.join(workdir, 'checkpoints')))


def _assert_same_run(workdir, reference):
  """Bitwise-equal final train state and the same examples at every step."""
  a, b = checkpoints_lib.read_state(workdir), checkpoints_lib.read_state(reference)
  assert int(a['step']) == int(b['step']) == STEPS
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  for (path, x), y in zip(flat_a, jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  ids = tiny.example_ids(workdir)
  assert sorted(ids) == list(range(1, STEPS + 1))
  assert ids == tiny.example_ids(reference)


def test_sigkill_then_restart_matches_the_uninterrupted_run(setup, tmp_path):
  workdir = str(tmp_path / 'killed')
  output = _launch(setup, workdir, '--slow_steps=0.5')
  output.wait_for(rf'^step 5/{STEPS}')
  while 4 not in _committed_steps(workdir):
    time.sleep(0.1)
  output.process.send_signal(signal.SIGKILL)
  assert output.process.wait(timeout=60) == -signal.SIGKILL
  assert _committed_steps(workdir) == [4]
  assert max(tiny.example_ids(workdir)) >= 5  # It had gone past the checkpoint.

  main_lib.train(_config(setup['root'], setup['tokenizer']), workdir)
  _assert_same_run(workdir, setup['reference'])


def test_sigterm_saves_the_current_step_and_exits_0(setup, tmp_path):
  workdir = str(tmp_path / 'preempted')
  output = _launch(setup, workdir, '--slow_steps=0.5')
  output.wait_for(rf'^step 2/{STEPS}')
  output.process.send_signal(signal.SIGTERM)
  time.sleep(0.3)
  output.process.send_signal(signal.SIGTERM)  # A second notice while it saves.
  assert output.process.wait(timeout=300) == 0
  line = output.wait_for(r'^Preempted \(SIGTERM\) at step \d+')
  step = int(re.search(r'at step (\d+)', line).group(1))
  assert 2 <= step < STEPS, line
  assert _committed_steps(workdir) == [4, step] if step > 4 else [step]
  assert int(checkpoints_lib.read_state(workdir, step)['step']) == step
  assert 'Final evaluation' not in output.text() and 'Training done' not in output.text()

  main_lib.train(_config(setup['root'], setup['tokenizer']), workdir)
  _assert_same_run(workdir, setup['reference'])


def test_kill_during_an_async_save_keeps_the_previous_checkpoint(setup, tmp_path):
  workdir = str(tmp_path / 'killed_in_save')
  output = _launch(setup, workdir, '--kill_in_save=6', every=2)
  assert output.process.wait(timeout=300) == -signal.SIGKILL
  assert 'fault_runner: SIGKILL while committing' in output.text()
  assert _committed_steps(workdir) == [2, 4]  # keep_checkpoints=2; 6 never completed.
  leftovers = [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.startswith('6')]
  assert leftovers and all('tmp' in n for n in leftovers), leftovers

  main_lib.train(_config(setup['root'], setup['tokenizer'], every=2), workdir)
  assert _committed_steps(workdir) == [6, 8]
  assert not [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'tmp' in n]
  _assert_same_run(workdir, setup['reference'])


def test_warm_start_then_nonfinite_steps(setup, tmp_path):
  """init_from loads the reference's parameters; NaN steps leave the state as it was; three in
  a row stop the run with a message naming the last good checkpoint."""
  workdir = str(tmp_path / 'warm')
  config = _config(setup['root'], setup['tokenizer'], every=1, keep_checkpoints=10,
                   max_consecutive_nonfinite=3, init_from=setup['reference'],
                   **{'debug.nan_loss_steps': (1, 4, 5, 6)})
  with pytest.raises(health.NonFiniteError,
                     match=r'stopping at step 6: steps 4-6 \(3 in a row.*parameters are those '
                           r'after step 3; the last good checkpoint is step 3 in '):
    main_lib.train(config, workdir)
  assert _committed_steps(workdir) == [1, 2, 3, 4, 5, 6]
  state = {s: checkpoints_lib.read_state(workdir, s) for s in (1, 3, 5)}

  def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  # Step 1 skipped: the parameters are exactly the reference's.
  assert same(state[1]['params'], checkpoints_lib.read_state(setup['reference'])['params'])
  # Parameters only: the optimizer starts fresh (its first moment is still zero after step 1).
  mu = [x for path, x in jax.tree_util.tree_leaves_with_path(state[1]['opt_state'])
        if 'mu' in jax.tree_util.keystr(path)]
  assert mu and all((x == 0).all() for x in mu)
  assert (int(state[1]['nonfinite_steps']), int(state[1]['consecutive_nonfinite'])) == (1, 1)
  # Steps 2 and 3 update (the schedule counts applied updates: step 2 has the warm-up's zero
  # rate); steps 4 and 5 leave parameters and moments as they were.
  assert not same(state[1]['params'], state[3]['params'])
  assert same((state[3]['params'], state[3]['opt_state']),
              (state[5]['params'], state[5]['opt_state']))
  assert (int(state[3]['nonfinite_steps']), int(state[3]['consecutive_nonfinite'])) == (1, 0)
  assert (int(state[5]['nonfinite_steps']), int(state[5]['consecutive_nonfinite'])) == (3, 2)
  metrics = tiny.logged_metrics(workdir)
  assert np.isnan(metrics[1]['loss']) and metrics[1]['nonfinite'] == 1
  assert np.isfinite(metrics[3]['loss']) and metrics[3]['nonfinite'] == 0


def test_init_from_errors(setup, tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    main_lib.train(_config(setup['root'], setup['tokenizer'], init_from=str(tmp_path)),
                   str(tmp_path / 'a'))
  like = {'params': {'w': jnp.zeros((3,))}}
  with pytest.raises(ValueError, match='do not fit this model'):
    checkpoints_lib.load_params(setup['reference'], like)


def test_checkpoint_policies_keep_the_last_k_and_every_mth(tmp_path):
  config = config_lib.base_config()
  config.checkpoint_every, config.keep_checkpoints, config.keep_every = 1, 2, 4
  tok = str(tmp_path / 'tok.model')
  tokenizer_lib.train_tokenizer(['a red circle', 'a blue square'] * 5, 20, tok)
  data = iter(grain.MapDataset.range(100).to_iter_dataset())
  manager = checkpoints_lib.Checkpoints(str(tmp_path / 'run'), config)
  state = {'w': jnp.arange(3.0)}
  for step in range(1, 11):
    next(data)
    assert manager.should_save(step)
    manager.save(step, state, data, config, tok)
  manager.close()
  assert _committed_steps(str(tmp_path / 'run')) == [4, 8, 9, 10]
  restored_data = iter(grain.MapDataset.range(100).to_iter_dataset())
  manager = checkpoints_lib.Checkpoints(str(tmp_path / 'run'), config)
  assert manager.restore(9, state, restored_data)['w'].tolist() == [0.0, 1.0, 2.0]
  assert next(restored_data) == 9  # The data position of step 9: 9 elements consumed.
  assert manager.read_json(9, 'config')['keep_every'] == 4
  with open(tok, 'rb') as f:
    assert manager.tokenizer_model(9) == f.read()
  manager.close()

  # Time-based: with checkpoint_minutes=1/60 a step is due once a second has passed.
  config.checkpoint_every, config.checkpoint_minutes = 1000, 1 / 60
  manager = checkpoints_lib.Checkpoints(str(tmp_path / 'timed'), config)
  assert manager.should_save(1)  # No checkpoint yet.
  manager.save(1, state, data, config, tok)
  manager.wait()
  assert not manager.should_save(2)
  time.sleep(1.2)
  assert manager.should_save(3)
  manager.close()
