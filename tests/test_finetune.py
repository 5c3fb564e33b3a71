"""Fine-tuning (rils_jax/finetune.py): bad configs and workdirs are refused before anything is
read or written; drop path (rils_jax/models/vit.py); a 32 px checkpoint fine-tuned and
evaluated at 40 px with the whole MAE recipe on; a run stopped by SIGTERM, restarted, killed
by SIGKILL and restarted again ends bitwise equal to the uninterrupted run.

RandAugment / random erasing: tests/test_augment.py; mixup / CutMix: tests/test_mixup.py; the
layer-wise decay factors: tests/test_optim.py; a fine-tune from a trained checkpoint:
tests/test_main.py.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import finetune_mae_vit_b16
from rils_jax import checkpoints as checkpoints_lib
from rils_jax import config_lib
from rils_jax import finetune
from rils_jax import tokenizer as tokenizer_lib
from rils_jax.data import transforms
from rils_jax.evals import datasets
from rils_jax.models import rils as rils_lib
from rils_jax.models import vit
from tests import tiny

COLOURS = {'red': (220, 30, 30), 'green': (30, 200, 40), 'blue': (30, 40, 220),
           'yellow': (230, 220, 30)}
STEPS = 8


def _write_pretrained(workdir: str, tmp) -> None:
  """A checkpoint of the tiny 32 px RILS model (tests/tiny.py) at its initialisation: the
  fine-tuning machinery, not the pre-training, is under test."""
  config = tiny.tiny_config()
  tok = tokenizer_lib.train_tokenizer(['a red circle', 'a blue square'] * 5, 20,
                                      str(tmp / 'tok.model'))
  model = rils_lib.build_model(config, tokenizer_lib.Tokenizer(tok).eot_id)
  params = rils_lib.init_params(model, jax.random.PRNGKey(0))
  manager = checkpoints_lib.Checkpoints(workdir, config)
  manager.save(1, {'params': params}, iter(grain.MapDataset.range(4).to_iter_dataset()), config,
               tok)
  manager.close()


def _write_images(root: str) -> None:
  """4 colour classes x 6 noisy 36 x 30 pictures."""
  rng = np.random.default_rng(0)
  for name, colour in COLOURS.items():
    os.makedirs(os.path.join(root, name))
    for i in range(6):
      pixels = np.clip(np.array(colour) + rng.normal(0, 40, (30, 36, 3)), 0, 255)
      Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(root, name, f'{i}.png'))


def _config(root: str, init_from: str, **overrides) -> ml_collections.ConfigDict:
  c = config_lib.finetune_base_config()
  c.init_from = init_from
  finetune_mae_vit_b16.apply_mae_recipe(c)  # Every random part on: drop path, RA, mixing...
  c.total_steps, c.batch_size, c.eval_batch_size = STEPS, 8, 8
  c.log_every, c.checkpoint_every = 1, 2
  c.optim.warmup_steps = 2
  c.image_size = 40  # The checkpoint's is 32: a 5 x 5 patch grid instead of 4 x 4.
  c.data.train = dict(kind='folder', root=root, per_class=':4')
  c.data.test = dict(kind='folder', root=root, per_class='4:')
  return tiny.apply_overrides(c, **overrides)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """The pre-trained checkpoint, the pictures and the uninterrupted reference fine-tune."""
  tmp = tmp_path_factory.mktemp('finetune')
  pretrained, root, reference = str(tmp / 'pretrained'), str(tmp / 'colours'), str(tmp / 'ref')
  _write_pretrained(pretrained, tmp)
  _write_images(root)
  results = finetune.finetune(_config(root, pretrained), reference)
  return dict(pretrained=pretrained, root=root, reference=reference, results=results)


def _checkpoint_steps(workdir):
  return sorted(ocp.utils.checkpoint_steps(os.path.join(workdir, 'checkpoints')))


def _params(workdir):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, 'params'))


def test_finetune_rejects_bad_configs(tmp_path):
  config = ml_collections.ConfigDict(dict(init_from='', batch_size=8, total_steps=1,
                                          optim=dict(layer_decay=0.65)))
  with pytest.raises(ValueError, match='init_from'):
    finetune.finetune(config, str(tmp_path))
  config.init_from = str(tmp_path / 'none')
  config.optim.layer_decay = 1.5
  with pytest.raises(ValueError, match='layer_decay'):
    finetune.finetune(config, str(tmp_path))
  config.optim.layer_decay = 0.65
  for key, value, message in (
      ('drop_path', 1.0, r'drop_path=1.0 must be in \[0, 1\)'),
      ('batch_size', 7, 'batch_size=7 must be even'),
      ('input.rand_augment', 'rand-m9-q3', "unknown section 'q3'"),
      ('input.random_erasing', 2.0, 'random_erasing=2.0 must be a probability')):
    bad = tiny.apply_overrides(finetune.with_defaults(config), **{key: value},
                               **{'mixup.mixup_alpha': 0.8})
    with pytest.raises(ValueError, match=message):
      finetune.finetune(bad, str(tmp_path))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    finetune.finetune(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_finetune_config_keys_are_checked(tmp_path):
  config = config_lib.finetune_base_config()
  config.init_from = str(tmp_path / 'none')
  config.optim.layer_decy = 0.5
  config.eval_evry = 10
  with pytest.raises(ValueError, match=r'unknown config keys: eval_evry \(did you mean '
                     r'eval_every, log_every\?\); optim.layer_decy \(did you mean '
                     r'optim.layer_decay\?\)\. .*finetune_base_config'):
    finetune.finetune(config, str(tmp_path / 'ft'))
  assert not os.path.exists(tmp_path / 'ft')
  config = config_lib.finetune_base_config()
  config.data.train = dict(kind='folder', root='/x', any_key_of_a_dataset_spec=1)
  config_lib.check_finetune_keys(config)  # Dataset specs are checked when opened.


def test_mae_configs_state_the_recipe():
  c = finetune_mae_vit_b16.get_config('init_from=/run,data_dir=/imagenet')
  config_lib.check_finetune_keys(c)
  assert (c.batch_size, c.total_steps, c.optim.warmup_steps) == (1024, 125_100, 6255)
  assert c.optim.lr == pytest.approx(5e-4 * 1024 / 256)
  assert c.optim.lr * c.optim.min_lr_ratio == pytest.approx(1e-6)
  assert (c.optim.layer_decay, c.optim.weight_decay, c.optim.b1, c.optim.b2) == (
      0.65, 0.05, 0.9, 0.999)
  assert (c.drop_path, c.label_smoothing, c.input.random_erasing) == (0.1, 0.1, 0.25)
  assert c.input.rand_augment == 'rand-m9-mstd0.5-inc1'
  assert c.mixup.to_dict() == dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
  assert c.data.test.to_dict() == dict(kind='folder', root='/imagenet/val')
  # The CPU-sized pair differs only in the MAE additions.
  plain = _flat_config('finetune_cifar10')
  mae = _flat_config('finetune_cifar10_mae')
  assert {k for k in plain if plain[k] != mae[k]} == {
      'drop_path', 'input.rand_augment', 'input.random_erasing', 'mixup.mixup_alpha',
      'mixup.cutmix_alpha'}
  assert (mae['total_steps'], mae['batch_size'], mae['optim.lr']) == (300, 64, 1e-3)


def _flat_config(name):
  module = __import__(f'configs.{name}', fromlist=['get_config'])
  config = module.get_config('init_from=/run')
  config_lib.check_finetune_keys(config)
  return finetune._flat(config.to_dict())  # pylint: disable=protected-access


def test_drop_path_keeps_a_fraction_and_rescales():
  x = jnp.arange(1.0, 20001.0).reshape(20000, 1, 1) * jnp.ones((1, 3, 2))
  out = np.asarray(vit.drop_path(x, 0.3, jax.random.PRNGKey(0)))
  kept = np.all(out != 0, axis=(1, 2))
  assert np.all(out[~kept] == 0)  # Whole samples are dropped...
  np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / 0.7, rtol=1e-6)  # ...or scaled.
  assert abs(kept.mean() - 0.7) < 0.01  # 3 sigma = 0.0097 at n = 20000.


def test_block_drop_path_is_the_identity_in_eval_and_drops_branches_in_training():
  x = jax.random.normal(jax.random.PRNGKey(1), (400, 5, 16))
  plain = vit.Block(num_heads=2)
  params = plain.init(jax.random.PRNGKey(2), x)
  reference = plain.apply(params, x)
  for rate, deterministic in ((0.0, False), (0.4, True)):
    block = vit.Block(num_heads=2, drop_path=rate, deterministic=deterministic)
    out = block.apply(params, x, rngs={'dropout': jax.random.PRNGKey(3)})
    np.testing.assert_array_equal(out, reference)
  # Training at rate 0.4: each sample is x + m1 * attn / 0.6, then + m2 * mlp / 0.6, with
  # m1, m2 in {0, 1} drawn per sample; recompute the four outcomes from the block's parts.
  p = params['params']

  def part(module, name, y):
    return module.apply({'params': p[name]}, y)

  def attn(y):
    return part(vit.Attention(2), 'attn', part(vit.layer_norm(1e-6, jnp.float32, 'n'), 'norm1', y))

  def mlp(y):
    return part(vit.Mlp(), 'mlp', part(vit.layer_norm(1e-6, jnp.float32, 'n'), 'norm2', y))

  block = vit.Block(num_heads=2, drop_path=0.4, deterministic=False)
  out = np.asarray(block.apply(params, x, rngs={'dropout': jax.random.PRNGKey(3)}))
  matches = np.zeros((4, 400), bool)
  for i, (m1, m2) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
    h = x + m1 * attn(x) / 0.6
    expected = np.asarray(h + m2 * mlp(h) / 0.6)
    matches[i] = np.all(np.abs(out - expected) < 1e-4, axis=(1, 2))
  assert matches.any(axis=0).all()  # Every sample is one of the four outcomes.
  frequencies = matches.mean(axis=1)  # Expected 0.16, 0.24, 0.24, 0.36.
  np.testing.assert_allclose(frequencies, [0.16, 0.24, 0.24, 0.36], atol=0.075)


def test_encoder_drop_path_grows_linearly_over_the_blocks():
  encoder = vit.Encoder(4, 16, 3, 2, drop_path=0.1)
  images = jnp.zeros((2, 8, 8, 3))
  params = encoder.init(jax.random.PRNGKey(0), images)
  rates = {}

  def record(call, args, kwargs, context):
    if isinstance(context.module, vit.Block):
      rates[context.module.name] = (context.module.drop_path, context.module.deterministic)
    return call(*args, **kwargs)

  with nn.intercept_methods(record):
    encoder.apply(params, images, deterministic=False, rngs={'dropout': jax.random.PRNGKey(1)})
  assert rates == {'blocks_0': (0.0, False), 'blocks_1': (0.05, False),
                   'blocks_2': (0.1, False)}  # timm: linspace(0, 0.1, 3).
  np.testing.assert_array_equal(encoder.apply(params, images),
                                vit.Encoder(4, 16, 3, 2).apply(params, images))


def test_fine_tunes_and_evaluates_at_another_resolution(setup):
  reference, results = setup['reference'], setup['results']
  assert results['test/images'] == 8 and results['test/skipped_images'] == 0
  assert [m['step'] for m in map(json.loads, open(os.path.join(reference, 'metrics.jsonl')))
          if 'loss' in m] == list(range(1, STEPS + 1))
  assert _checkpoint_steps(reference) == [6, 8]  # keep_checkpoints=2.
  # The test top-1 again, from the saved parameters on the 40 px centre crops.
  tuned = _params(reference)
  pretrained = checkpoints_lib.read_state(setup['pretrained'])['params']['visual']
  assert jax.tree.map(np.shape, tuned['visual']) == jax.tree.map(np.shape, pretrained)
  test = datasets.load(dict(kind='folder', root=setup['root'], per_class='4:'))
  pixels = np.stack([transforms.decode_crop(path, 40) for path, _ in test.items])
  assert pixels.shape == (8, 40, 40, 3)
  model = finetune.Classifier(8, 32, 2, 2, num_classes=4)
  logits = model.apply({'params': tuned}, transforms.normalize(
      pixels, config_lib.base_config().input))
  labels = np.array([label for _, label in test.items])
  assert results['test/top1'] == np.mean(np.argmax(logits, axis=1) == labels)


def _launch(config_json, workdir) -> tiny.Output:
  command = [sys.executable, '-m', 'tests.finetune_runner', '--slow_steps=1.0',
             f'--config_json={config_json}', f'--workdir={workdir}']
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu'}
  return tiny.Output(subprocess.Popen(command, cwd=tiny.REPO_ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))


def test_sigterm_then_sigkill_then_restart_matches_the_uninterrupted_run(setup, tmp_path):
  config = _config(setup['root'], setup['pretrained'])
  config_json = tmp_path / 'config.json'
  config_json.write_text(json.dumps(config.to_dict()))
  workdir = str(tmp_path / 'stopped')

  # SIGTERM: the current step is saved, the process exits 0.
  output = _launch(config_json, workdir)
  output.wait_for(rf'^step 2/{STEPS}')
  output.process.send_signal(signal.SIGTERM)
  assert output.process.wait(timeout=300) == 0
  line = output.wait_for(r'^Preempted \(SIGTERM\) at step \d+')
  stopped = int(re.search(r'at step (\d+)', line).group(1))
  assert 2 <= stopped <= 4, line
  assert _checkpoint_steps(workdir)[-1] == stopped
  assert not os.path.exists(os.path.join(workdir, 'params'))

  # Restarted, then SIGKILLed after its next periodic checkpoint and a step past it.
  output = _launch(config_json, workdir)
  output.wait_for(rf'from its checkpoint at step {stopped}$')
  due = stopped + 2 - stopped % 2
  while due not in _checkpoint_steps(workdir):
    time.sleep(0.1)
  output.wait_for(rf'^step {due + 1}/{STEPS}')
  output.process.send_signal(signal.SIGKILL)
  assert output.process.wait(timeout=60) == -signal.SIGKILL
  assert _checkpoint_steps(workdir)[-1] == due

  # Restarted in this process: it ends where the uninterrupted run ended, bit for bit.
  results = finetune.finetune(ml_collections.ConfigDict(json.loads(config_json.read_text())),
                              workdir)
  assert results == setup['results']
  ours, theirs = _params(workdir), _params(setup['reference'])
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  # The same batches, augmentations and mixing at every step: the same losses.
  assert tiny.logged_metrics(workdir).keys() == set(range(1, STEPS + 1))
  for step, metrics in tiny.logged_metrics(setup['reference']).items():
    assert tiny.logged_metrics(workdir)[step]['loss'] == metrics['loss'], step


def test_workdirs_holding_something_else_are_refused(setup, tmp_path):
  config = _config(setup['root'], setup['pretrained'])
  with pytest.raises(ValueError, match='is not empty: it holds a finished fine-tuning run'):
    finetune.finetune(config, setup['reference'])
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match=r'holds no fine-tuning run \(notes.txt\)'):
    finetune.finetune(config, str(other))
  assert os.listdir(other) == ['notes.txt']
  another = tmp_path / 'another'
  another.mkdir()
  (another / 'config.json').write_text(json.dumps(_config(setup['root'], setup['pretrained'],
                                                          seed=1).to_dict()))
  with pytest.raises(ValueError, match=r'another config \(seed: 1 there, 0 here\)'):
    finetune.finetune(config, str(another))
  assert os.listdir(another) == ['config.json']
  with pytest.raises(ValueError, match='is a file'):
    finetune.finetune(config, str(other / 'notes.txt'))
