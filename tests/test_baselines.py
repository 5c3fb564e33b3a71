"""The baselines in the same code (issue 19): SigLIP's sigmoid loss, MAE's pixel loss and FLIP's
visible-patch pooling against NumPy references written from the papers' formulas; every kind
on 8 devices against 1 and accumulated against the full batch; FLIP's unmasked tuning; LiT's
locked towers; MAE's refused text evaluators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rils_jax import losses
from rils_jax import main as main_lib
from rils_jax import train_step as train_step_lib
from rils_jax.data import transforms
from rils_jax.models import rils as rils_lib
from rils_jax.models import vit
from tests import tiny


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_sigmoid_loss(img, txt, t, b):
  """SigLIP eq. 1 with its gradients, float64: L = -1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b))."""
  logits = t * img @ txt.T + b
  z = 2 * np.eye(len(img)) - 1
  loss = np.sum(np.log1p(np.exp(-z * logits))) / len(img)
  d_logits = -z / (1 + np.exp(z * logits)) / len(img)  # d/dl of -log sigmoid(z l) / B.
  return loss, dict(img=t * d_logits @ txt, txt=t * d_logits.T @ img,
                    t=np.sum(d_logits * (img @ txt.T)), b=np.sum(d_logits))


@pytest.fixture
def pairs():
  rng = np.random.default_rng(0)
  img = _normalize(rng.normal(size=(7, 6)))
  txt = _normalize(img + 0.8 * rng.normal(size=(7, 6)))
  return img, txt


@pytest.mark.parametrize('chunk_size', [0, 3])
def test_sigmoid_loss_and_gradients_match_numpy(pairs, chunk_size):
  img, txt = pairs
  t, b = 10.0, -10.0 + 7.5  # A bias away from its init, so that both terms weigh.
  want, grads = _np_sigmoid_loss(img, txt, t, b)

  def loss(i, x, s, c):
    return losses.sigmoid_loss(i, x, s, c, chunk_size)[0]

  got = loss(img, txt, t, b)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  g = jax.grad(loss, argnums=(0, 1, 2, 3))(jnp.float32(img), jnp.float32(txt), jnp.float32(t),
                                           jnp.float32(b))
  for got_g, name in zip(g, ('img', 'txt', 't', 'b')):
    np.testing.assert_allclose(got_g, grads[name], rtol=1e-4, atol=1e-6, err_msg=name)
  _, logits = losses.sigmoid_loss(img, txt, t, b, chunk_size)
  np.testing.assert_allclose(logits, t * img @ txt.T + b, rtol=1e-5)


def test_sigmoid_rils_loss_gates_on_the_sigmoid_logits(pairs):
  img, txt = pairs
  config = tiny.tiny_config(**{'loss.contrastive': 'sigmoid', 'loss.gate': True}).loss
  rng = np.random.default_rng(1)
  student = _normalize(rng.normal(size=(7, 3, 6)))
  teacher = _normalize(rng.normal(size=(7, 3, 6)))
  out = dict(image_embed=img, text_embed=txt, logit_scale=np.log(10.0), logit_bias=-3.0,
             student=student, teacher=teacher)
  loss, metrics = losses.rils_loss(out, config)
  l_con, _ = _np_sigmoid_loss(img, txt, 10.0, -3.0)
  gate = (np.argmax(img @ txt.T, axis=1) == np.arange(7)).astype(np.float32)
  assert 0 < gate.sum() < 7  # The gate selects some samples, not all.
  l_rec = losses.rils_reconstruction_loss(
      student, teacher, txt, np.broadcast_to(gate[:, None], (7, 3)),
      student_temperature=config.student_temperature,
      teacher_temperature=config.teacher_temperature)
  np.testing.assert_allclose(metrics['clip_loss'], l_con, rtol=1e-5)
  np.testing.assert_allclose(loss, l_con + config.weight * l_rec, rtol=1e-5)
  np.testing.assert_allclose(metrics['gate_fraction'], gate.mean())


@pytest.mark.parametrize('norm_pix', [True, False])
def test_mae_loss_matches_numpy(norm_pix):
  rng = np.random.default_rng(2)
  pred, target = rng.normal(size=(2, 5, 12)), rng.normal(size=(2, 5, 12)) * 3 + 1
  want_target = target
  if norm_pix:  # MAE's forward_loss: torch's var is unbiased.
    mean = target.mean(-1, keepdims=True)
    var = ((target - mean) ** 2).sum(-1, keepdims=True) / (target.shape[-1] - 1)
    want_target = (target - mean) / np.sqrt(var + 1e-6)
  want = np.mean([np.mean((pred[b, i] - want_target[b, i]) ** 2)
                  for b in range(2) for i in range(5)])
  np.testing.assert_allclose(losses.mae_loss(pred, target, norm_pix), want, rtol=1e-5)


def test_patchify_is_maes_order():
  rng = np.random.default_rng(3)
  images = rng.normal(size=(2, 8, 12, 3)).astype(np.float32)
  p = 4
  # MAE's patchify on NCHW: reshape (N, 3, h, p, w, p), einsum 'nchpwq->nhwpqc'.
  nchw = images.transpose(0, 3, 1, 2).reshape(2, 3, 2, p, 3, p)
  want = np.einsum('nchpwq->nhwpqc', nchw).reshape(2, 6, p * p * 3)
  np.testing.assert_array_equal(vit.patchify(images, p), want)


def _model_and_params(kind, **overrides):
  config = tiny.tiny_config(**{'loss.kind': kind, **overrides})
  model = rils_lib.build_model(config, eot_id=2)
  return config, model, rils_lib.init_params(model, jax.random.PRNGKey(0))


def test_flip_pools_the_visible_patches_and_mae_targets_the_masked_pixels():
  config, flip, params = _model_and_params('flip')
  batch = tiny.random_batch()
  images = transforms.normalize(batch['image'], config.input)
  masking = vit.random_masking(jax.random.PRNGKey(1), 8, 16, 0.5)
  out = flip.apply({'params': params}, images, batch['text'], masking)
  tokens = flip.apply({'params': params}, images, masking.ids_keep,
                      method=lambda m, x, ids: m.visual(x, ids))
  pooled = np.asarray(tokens)[:, 1:].mean(axis=1) @ np.asarray(params['image_projection'])
  np.testing.assert_allclose(out['image_embed'], _normalize(pooled), rtol=1e-4, atol=1e-6)
  assert tokens.shape[1] == 1 + 8  # CLS + the 8 visible patches of 16.
  full = flip.apply({'params': params}, images, batch['text'], None)  # Unmasked tuning.
  whole = flip.apply({'params': params}, images, method=rils_lib.RILS.encode_image)[0]
  np.testing.assert_allclose(full['image_embed'], whole, rtol=1e-5)

  config, mae, params = _model_and_params('mae')
  assert sorted(params) == ['decoder', 'visual']
  masking = vit.random_masking(jax.random.PRNGKey(1), 8, 16, 0.75)
  out = mae.apply({'params': params}, images, batch['text'], masking)
  patches = np.asarray(images).reshape(8, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(8, 16, 8 * 8 * 3)
  want = np.stack([patches[b, np.asarray(masking.ids_masked[b])] for b in range(8)])
  np.testing.assert_allclose(out['target'], want, rtol=1e-6)
  assert out['pred'].shape == (8, 12, 8 * 8 * 3)
  with pytest.raises(ValueError, match='no text tower'):
    mae.apply({'params': params}, batch['text'], method=rils_lib.RILS.encode_text)


# rils and clip (softmax) are covered by test_train_step and test_grad_cache.
KINDS = [('flip', {}), ('mae', {}), ('rils', {'loss.contrastive': 'sigmoid'}),
         ('clip', {'loss.contrastive': 'sigmoid', 'loss.contrastive_chunk_size': 3})]


@pytest.mark.parametrize('kind,overrides', KINDS)
def test_every_kind_on_eight_devices_and_accumulated_matches_one_device(kind, overrides):
  # eps = 1e-3: see test_train_step.test_eight_devices_match_one_device.
  config = tiny.tiny_config(**{'loss.kind': kind, 'optim.eps': 1e-3, 'input.batch_size': 16,
                               **overrides})
  batches = [tiny.random_batch(16, seed=s) for s in (0, 1)]
  one = tiny.train(config, jax.devices()[:1], 2, batches)
  # Both at once (one compile fewer): the mesh and the accumulation each change the arithmetic.
  accumulated = tiny.apply_overrides(config.copy_and_resolve_references(),
                                     **{'optim.accum_steps': 2})
  tiny.assert_same_run(one, tiny.train(accumulated, jax.devices(), 2, batches))
  assert one[1][-1]['loss'] > 0


def test_sigmoid_starts_at_siglips_init_or_the_configured_bias():
  _, _, params = _model_and_params('clip', **{'loss.contrastive': 'sigmoid'})
  np.testing.assert_allclose([params['logit_scale'], params['logit_bias']], [np.log(10.0), -10.0])
  _, _, params = _model_and_params('clip', **{'loss.contrastive': 'sigmoid',
                                              'loss.sigmoid_bias_init': -4.0})
  assert float(params['logit_bias']) == -4.0
  _, _, params = _model_and_params('clip')
  assert 'logit_bias' not in params


def test_flip_unmasked_tuning_is_the_clip_step():
  flip = tiny.tiny_config(**{'loss.kind': 'flip'})
  clip = tiny.tiny_config(**{'loss.kind': 'clip'})
  batch = tiny.random_batch()
  batch['skipped'] = np.zeros(8, np.int32)
  out = []
  for config, unmasked in ((flip, True), (clip, False), (flip, False)):
    setup = train_step_lib.setup(config, jax.devices()[:1])
    state = train_step_lib.create_train_state(setup, 0)
    _, metrics = train_step_lib.make_train_step(setup, config, unmasked)(state, batch)
    out.append(float(metrics['loss']))
  assert out[0] == out[1] != out[2]
  flip.total_steps, flip.flip.unmasked_steps = 20, 5
  assert train_step_lib.unmasked_from(flip) == 16
  assert train_step_lib.unmasked_from(clip) == 21


def test_locked_image_tower_gets_no_update_and_no_moments():
  config = tiny.tiny_config(**{'loss.kind': 'clip', 'model.freeze': 'image'})
  free = tiny.tiny_config(**{'loss.kind': 'clip'})
  setup = train_step_lib.setup(config, jax.devices()[:1])
  start = train_step_lib.create_train_state(setup, 0)
  state, history = tiny.train(config, jax.devices()[:1], 3, [tiny.random_batch()])
  for name in ('visual', 'image_projection'):
    for a, b in zip(jax.tree.leaves(start.params[name]), jax.tree.leaves(state.params[name])):
      np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start.params['text']),
                                                      jax.tree.leaves(state.params['text']))]
  assert all(changed) and history[-1]['loss'] < history[0]['loss']

  def moment_size(cfg):
    s = train_step_lib.setup(cfg, jax.devices()[:1])
    return sum(x.size for x in jax.tree.leaves(s.abstract_state.opt_state))

  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  locked = size(start.params['visual']) + size(start.params['image_projection'])
  # Adam keeps two moments per trained parameter; the locked ones have none.
  assert moment_size(free) - moment_size(config) == 2 * locked


def test_config_errors_of_the_baselines(tmp_path):
  with pytest.raises(ValueError, match="'rils', 'clip', 'flip', 'mae'"):
    train_step_lib.setup(tiny.tiny_config(**{'loss.kind': 'simclr'}), jax.devices()[:1])
  with pytest.raises(ValueError, match="'softmax' or 'sigmoid'"):
    train_step_lib.setup(tiny.tiny_config(**{'loss.contrastive': 'hinge'}), jax.devices()[:1])
  with pytest.raises(ValueError, match='release_gpus'):
    train_step_lib.setup(tiny.tiny_config(**{'loss.contrastive': 'sigmoid',
                                             'loss.release_gpus': 2}), jax.devices()[:1])
  with pytest.raises(ValueError, match="freeze must be '', 'image' or 'text'"):
    train_step_lib.setup(tiny.tiny_config(**{'model.freeze': 'vision'}), jax.devices()[:1])
  with pytest.raises(ValueError, match='image tower only'):
    train_step_lib.setup(tiny.tiny_config(**{'loss.kind': 'mae', 'model.freeze': 'image'}),
                         jax.devices()[:1])
  config = tiny.get_config(f'root={tmp_path / "data"},steps=2')
  config.loss.kind = 'mae'
  with pytest.raises(ValueError, match='no text tower'):
    main_lib.validate_config(config)
  config = tiny.get_config(f'root={tmp_path / "data"},steps=2')
  config.model.freeze = 'image'
  with pytest.raises(ValueError, match='init_from'):
    main_lib.validate_config(config)


def test_compare_trains_evaluates_and_times_each_variant(tmp_path):
  from rils_jax import compare
  config = tiny.get_config(f'root={tmp_path / "data"},steps=2')
  evals = tiny.get_config(f'root={tmp_path / "data"},steps=2')
  shapes = evals.evals.zeroshot.data
  evals.evals.knn = dict(kind='knn', train=shapes, test=shapes, k=3)
  workdir = str(tmp_path / 'compare')
  results = compare.compare(config, evals, workdir, ['siglip', 'mae'], speed_steps=1)
  for variant in ('siglip', 'mae'):
    assert results[variant]['step images per s (same process)'] > 0
    assert np.isfinite(results[variant]['final loss'])
    assert results[variant]['model GFLOP per step'] > 0
  assert 0 <= results['siglip']['zeroshot/top1'] <= 1
  assert 'zeroshot/top1' not in results['mae']  # No text tower: zero-shot is left out...
  assert 0 <= results['mae']['knn/top1'] <= 1  # ...the frozen-feature evaluators run.
  markdown = compare.table(results, ['siglip', 'mae'])
  assert markdown.splitlines()[0] == '| figure | siglip | mae |'
  assert '| zeroshot/top1 | ' in markdown and ' | n/a |' in markdown


def _final_params(workdir):
  from rils_jax.evals import restore as restore_lib
  restored = restore_lib.restore(workdir)
  return restored.step, jax.device_get(restored.params)


def _train_then_resume(config, workdir):
  """Trains `config` in `workdir` (checkpoints at steps 2 and 4), then again in a copy that
  lost its step-4 checkpoint, so that it resumes at step 2. Returns both final parameter trees
  (the resumed run's must be the uninterrupted run's, bitwise)."""
  import shutil
  main_lib.train(config, workdir)
  copy = workdir + '_resumed'
  shutil.copytree(workdir, copy)
  shutil.rmtree(f'{copy}/checkpoints/4')
  main_lib.train(config, copy)
  (step, straight), (resumed_step, resumed) = _final_params(workdir), _final_params(copy)
  assert step == resumed_step == 4
  assert jax.tree.structure(straight) == jax.tree.structure(resumed)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))
  return straight


def test_kinds_resume_exactly_lit_locks_a_trained_tower_and_mae_exports_its_encoder(tmp_path):
  from rils_jax import export
  root = tmp_path / 'data'
  run = lambda **o: tiny.apply_overrides(  # noqa: E731
      tiny.get_config(f'root={root},steps=4,every=2,evals=false'), **o)
  # MAE (no text tower, its own decoder) and FLIP with the sigmoid term (logit_bias, and the
  # unmasked step at the end) resume where they stopped.
  mae = _train_then_resume(run(**{'loss.kind': 'mae'}), str(tmp_path / 'mae'))
  assert 'text' not in mae and 'logit_bias' not in mae
  flip_dir = str(tmp_path / 'flip')
  flip = _train_then_resume(run(**{'loss.kind': 'flip', 'loss.contrastive': 'sigmoid',
                                   'flip.unmasked_steps': 1}), flip_dir)
  # LiT through main: a text tower trained against FLIP's locked image tower, resumed too.
  lit = _train_then_resume(run(**{'loss.kind': 'clip', 'model.freeze': 'image',
                                  'init_from': flip_dir}), str(tmp_path / 'lit'))
  for name in ('visual', 'image_projection'):
    for a, b in zip(jax.tree.leaves(flip[name]), jax.tree.leaves(lit[name])):
      np.testing.assert_array_equal(b, a)
  assert not np.array_equal(lit['text']['token_embedding']['embedding'],
                            flip['text']['token_embedding']['embedding'])
  # An MAE run has no image_projection to lock: refused with what to do.
  with pytest.raises(ValueError, match='does not hold them all'):
    main_lib.train(run(**{'loss.kind': 'clip', 'model.freeze': 'image',
                          'init_from': str(tmp_path / 'mae')}), str(tmp_path / 'lit_mae'))
  # MAE's encoder exports to timm (test_export loads such a file into timm); open_clip, which
  # needs a text tower, is refused before anything is written.
  out = str(tmp_path / 'mae_vit.safetensors')
  printed = export._export('timm', str(tmp_path / 'mae'), None, out, 'none')
  assert 'decoder (' in printed and 'text tower' not in printed
  with pytest.raises(ValueError, match='no text tower'):
    export._export('open_clip', str(tmp_path / 'mae'), None, str(tmp_path / 'oc'), 'none')
  assert not (tmp_path / 'oc').exists()
