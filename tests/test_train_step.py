"""The jitted train step: learning on a fixed batch, sharded == single-device, the logit scale's
clamp, rematerialisation, bfloat16 against float32, and captions cut after their end-of-text."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rils_jax import train_step as train_step_lib
from rils_jax.data import pipeline
from tests import tiny


def _config(**overrides):
  # eps = 1e-3: see test_eight_devices_match_one_device.
  return tiny.tiny_config(**{'optim.eps': 1e-3, **overrides})


@pytest.mark.parametrize('kind', ['rils', 'clip'])
def test_loss_falls_on_a_fixed_batch(kind):
  config = tiny.tiny_config(**{'loss.kind': kind, 'total_steps': 30})
  _, history = tiny.train(config, jax.devices()[:1], 30, [tiny.random_batch()])
  first, last = history[0]['loss'], history[-1]['loss']
  assert last < 0.5 * first, (first, last)
  assert history[-1]['clip_acc'] == 1.0
  if kind == 'rils':
    assert history[-1]['gate_fraction'] == 1.0 and history[-1]['recon_loss'] > 0
  else:
    assert history[-1]['recon_loss'] == 0.0


@pytest.mark.parametrize('grad_clip', [0.0, 0.05])
def test_eight_devices_match_one_device(grad_clip):
  assert len(jax.devices()) == 8, 'conftest.py asks for 8 virtual CPU devices'
  # Adam divides by sqrt(v) + eps: with the default eps (1e-8), float32 reduction-order noise in
  # near-zero gradients can flip the sign of a whole update. eps = 1e-3 keeps such entries'
  # updates proportional to their gradients, so parameters can be compared tightly. A clip
  # below the gradient norm: its own global norm sums over the devices inside the guard.
  config = tiny.tiny_config(**{'total_steps': 3, 'optim.eps': 1e-3, 'optim.grad_clip': grad_clip})
  batch = tiny.random_batch()
  state1, hist1 = tiny.train(config, jax.devices()[:1], 3, [batch])
  state8, hist8 = tiny.train(config, jax.devices(), 3, [batch])
  for h1, h8 in zip(hist1, hist8):
    np.testing.assert_allclose(h8['loss'], h1['loss'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hist8[-1]['grad_norm'], hist1[-1]['grad_norm'], rtol=1e-4)
  if grad_clip:
    assert hist1[-1]['grad_norm'] > 2 * grad_clip  # The clip acts.
  for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
  assert len(state8.params['logit_scale'].sharding.device_set) == 8


def test_logit_scale_is_clamped_after_the_update_and_comes_down_from_the_cap():
  # ln(1/0.07) = 2.66 starts above ln 14, so the first update clamps it to the cap; on random
  # batches a lower scale lowers the loss, and since the forward's exp is not clipped the
  # gradient brings it down (a clipped forward kept it at the cap for ever).
  config = tiny.tiny_config(**{'loss.max_logit_scale': 14.0, 'optim.lr': 0.05,
                               'optim.warmup_steps': 0})
  state, history = tiny.train(config, jax.devices()[:1], 6,
                              [tiny.random_batch(seed=s) for s in range(6)])
  scales = [h['logit_scale'] for h in history]
  assert scales[0] == pytest.approx(1 / 0.07, rel=1e-6)
  assert 0.0 <= float(state.params['logit_scale']) < np.log(14.0) - 0.05, scales
  assert scales[-1] < scales[1] <= 14.0 + 1e-4


@pytest.mark.parametrize('remat', ['full', 'offload'])
def test_remat_gives_the_same_training(remat):
  batches = [tiny.random_batch(8)]
  # 'full' recomputes every block, 'offload' round-trips the kept matmuls through host memory;
  # the dry-run test shows what each policy keeps.
  base = tiny.train(_config(), jax.devices()[:1], 2, batches)
  tiny.assert_same_run(base, tiny.train(_config(**{'model.remat': remat}), jax.devices()[:1], 2,
                                batches), atol=1e-6)


def test_offload_is_refused_on_devices_without_host_memory():
  class Memory:
    kind = 'device'

  class Device:
    device_kind, platform = 'Some accelerator', 'tpu'

    def addressable_memories(self):
      return [Memory()]

  train_step_lib.check_offload('block', [Device()])  # Other policies need no host memory.
  with pytest.raises(ValueError, match=r"remat='offload'.*only memory kinds \['device'\]"):
    train_step_lib.check_offload('offload', [Device()])
  train_step_lib.check_offload('offload', jax.devices())  # XLA:CPU has 'pinned_host'.


def test_bfloat16_moments_and_compute_track_float32():
  batches = [tiny.random_batch(8)]
  f32 = tiny.train(_config(), jax.devices()[:1], 4, batches)
  bf16 = tiny.train(_config(**{'optim.mu_dtype': 'bfloat16', 'model.dtype': 'bfloat16'}),
                jax.devices()[:1], 4, batches)
  moment = lambda name: optax.tree_utils.tree_get(bf16[0].opt_state, name)['visual'][
      'patch_embed']['kernel']
  assert moment('mu').dtype == jnp.bfloat16 and moment('nu').dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16[0].params))
  # Stated tolerance: losses within 2% over 4 steps (bfloat16 keeps 8 mantissa bits).
  for h32, h16 in zip(f32[1], bf16[1]):
    np.testing.assert_allclose(h16['loss'], h32['loss'], rtol=0.02)


def test_the_abstract_state_is_the_created_state_without_values():
  # What a checkpoint is restored into must be what a fresh run creates: same tree, shapes,
  # dtypes and shardings (FSDP-sharded parameters and moments, replicated counters).
  setup = train_step_lib.setup(_config(**{'mesh.data': 2, 'mesh.fsdp': 4}))
  state = train_step_lib.create_train_state(setup, seed=0)
  describe = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)
  assert describe(state) == describe(setup.abstract_state)
  assert setup.shardings.params['visual']['blocks_0']['mlp']['fc1']['kernel'].spec == P(
      'fsdp', None)


def test_trim_text_cuts_after_the_last_end_of_text_at_a_multiple():
  text = np.full((3, 24), 7, np.int32)
  text[[0, 1, 2], [2, 9, 5]] = 2  # Each row's end-of-text: at 2, 9 and 5.
  cut = pipeline.trim_text(text, eot_id=2, multiple=4)
  assert cut.shape == (3, 12)  # The last end-of-text is at 9: 10 tokens, rounded up to 12.
  np.testing.assert_array_equal(cut, text[:, :12])
  assert pipeline.trim_text(text, 2, 5).shape == (3, 10)  # 10 is already a multiple.
  assert pipeline.trim_text(text, 2, 16).shape == (3, 16)
  assert pipeline.trim_text(text, 2, 32).shape == (3, 24)  # Never wider than the rows.
  assert pipeline.trim_text(text, 2, 0) is text  # 0: the whole context.
  text[1, 9], text[1, 23] = 7, 2
  assert pipeline.trim_text(text, 2, 4).shape == (3, 24)  # An end-of-text in the last column.


def test_a_step_on_cut_captions_trains_as_the_whole_context():
  # Tokens after each row's end-of-text are random (not padding): the causal text tower must
  # ignore them, so cutting them changes no loss and no parameter.
  config = _config(**{'model.text.context_length': 24, 'total_steps': 3})
  rng = np.random.default_rng(0)
  batches = []
  for seed in range(3):
    batch = tiny.random_batch(seed=seed)
    text = rng.integers(3, 64, size=(8, 24)).astype(np.int32)
    text[np.arange(8), rng.integers(1, 10, size=8)] = 2
    batches.append({**batch, 'text': text})
  cut = [{**b, 'text': pipeline.trim_text(b['text'], 2, 4)} for b in batches]
  assert [b['text'].shape[1] for b in cut] == [12, 12, 12]
  whole_run = tiny.train(config, jax.devices()[:1], 3, batches)
  cut_run = tiny.train(config, jax.devices()[:1], 3, cut)
  tiny.assert_same_run(whole_run, cut_run, atol=1e-6)


def test_training_batches_are_cut_where_one_process_runs_and_the_cut_can_shorten(caplog):
  config = _config(**{'model.text.context_length': 24})
  assert pipeline.text_trim_multiple(config) == 16
  assert pipeline.text_trim_multiple(_config(**{'input.text_trim': 0,
                                                'model.text.context_length': 24})) == 0
  assert pipeline.text_trim_multiple(_config(**{'input.text_trim': 24,
                                                'model.text.context_length': 24})) == 0
  put = pipeline.TrimmedPut(lambda batch: batch, eot_id=2, multiple=16)
  text = np.full((2, 24), 5, np.int32)
  text[:, 3] = 2
  with caplog.at_level('INFO'):
    lengths = [put({'text': text, 'image': None})['text'].shape[1] for _ in range(3)]
    text[1, 3], text[1, 20] = 5, 2
    lengths.append(put({'text': text})['text'].shape[1])
  assert lengths == [16, 16, 16, 24]
  logged = [r.getMessage() for r in caplog.records if 'Captions cut' in r.getMessage()]
  assert [m.split(': ')[1][:15] for m in logged] == ['16 of 24 tokens', '24 of 24 tokens']


def test_the_conditional_and_the_select_guard_give_the_same_state():
  # One CPU process takes the update inside a lax.cond, other set-ups the leaf-wise select.
  config = _config()
  setup = train_step_lib.setup(config, jax.devices()[:1])
  state = train_step_lib.create_train_state(setup, config.seed)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), state.params)
  guarded = train_step_lib._guarded_update  # pylint: disable=protected-access
  for loss in (1.0, np.nan):
    out = {c: jax.jit(lambda s, g, l, c=c: guarded(s, setup.optimizer, g, l, np.log(100.0), c))(
        state, grads, jnp.float32(loss)) for c in (True, False)}
    for a, b in zip(jax.tree.leaves(out[True]), jax.tree.leaves(out[False])):
      np.testing.assert_array_equal(a, b)
    params, opt_state, _, bad = out[True]
    kept = all(np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves((params, opt_state)),
                   jax.tree.leaves((state.params, state.opt_state))))
    assert (int(bad), kept) == ((1, True) if np.isnan(loss) else (0, False))
