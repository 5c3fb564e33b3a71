"""Scale-out: FSDP and tensor sharding against data parallelism, gradient accumulation,
rematerialisation, bfloat16 moments, the release's local CLIP gradient and chunked logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rils_jax import losses
from rils_jax import optim
from rils_jax import sharding
from rils_jax import train_step as train_step_lib
from rils_jax.models import rils as rils_lib
from tests import tiny


def _config(**overrides):
  # eps = 1e-3: see test_train_step.test_eight_devices_match_one_device.
  return tiny.tiny_config(**{'optim.eps': 1e-3, **overrides})


def _assert_same_run(run_a, run_b, atol=1e-5):
  (state_a, hist_a), (state_b, hist_b) = run_a, run_b
  for ha, hb in zip(hist_a, hist_b):
    np.testing.assert_allclose(hb['loss'], ha['loss'], rtol=1e-5, atol=1e-5)
  flat_a = jax.tree_util.tree_leaves_with_path(state_a.params)
  for (path, a), b in zip(flat_a, jax.tree.leaves(state_b.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_fsdp_and_tensor_meshes_match_data_parallelism_and_shard_the_state():
  batches = [tiny.random_batch(16, seed) for seed in range(2)]
  config = _config(**{'input.batch_size': 16})
  data_parallel = tiny.train(config, jax.devices(), 2, batches)  # mesh data=8.
  assert data_parallel[0].params['visual']['blocks_0']['mlp']['fc1']['kernel'].sharding.spec == P(
      None, None)  # Replicated.
  config.mesh = {'data': 1, 'fsdp': 8}
  fsdp = tiny.train(config, jax.devices(), 2, batches)
  _assert_same_run(data_parallel, fsdp)
  state = fsdp[0]
  fc1 = state.params['visual']['blocks_0']['mlp']['fc1']['kernel']  # (32, 128)
  assert fc1.sharding.spec == P('fsdp', None)
  assert fc1.addressable_shards[0].data.shape == (4, 128)
  mu = optax.tree_utils.tree_get(state.opt_state, 'mu')['visual']['blocks_0']['mlp']['fc1']
  assert mu['kernel'].sharding.spec == P('fsdp', None)
  assert state.params['logit_scale'].sharding.spec == P()

  config.mesh = {'data': 2, 'fsdp': 2, 'tensor': 2}
  mixed = tiny.train(config, jax.devices(), 2, batches)
  _assert_same_run(data_parallel, mixed)
  attn = mixed[0].params['visual']['blocks_0']['attn']
  assert attn['qkv']['kernel'].sharding.spec == P('fsdp', None, 'tensor', None)
  assert attn['proj']['kernel'].sharding.spec == P('tensor', None, 'fsdp')


def test_mesh_spec_replicates_dimensions_that_do_not_divide():
  mesh = sharding.make_mesh(_config(**{'mesh.data': 1, 'mesh.fsdp': 4, 'mesh.tensor': 2}))
  rules = sharding.DEFAULT_RULES
  # 3 heads over tensor=2: heads replicated; width 12 over fsdp=4: sharded.
  assert sharding.mesh_spec(('embed', None, 'heads', 'kv'), (12, 3, 3, 4), mesh, rules) == P(
      'fsdp', None, None, None)
  assert sharding.mesh_spec(('batch', 'length', 'act_embed'), (8, 5, 12), mesh, rules) == P(
      'fsdp', None, None)  # data has size 1, so the batch goes over fsdp only.
  assert sharding.mesh_spec(('embed',), (6,), mesh, rules) == P(None)


def test_accumulated_gradient_equals_full_batch_gradient():
  batches = [tiny.random_batch(16, seed) for seed in range(2)]
  full = tiny.train(_config(**{'input.batch_size': 16}), jax.devices()[:2], 2, batches)
  accum = tiny.train(_config(**{'input.batch_size': 16, 'optim.accum_steps': 4}),
                 jax.devices()[:2], 2, batches)
  _assert_same_run(full, accum)
  for ha, hb in zip(full[1], accum[1]):
    np.testing.assert_allclose(hb['grad_norm'], ha['grad_norm'], rtol=1e-5)
    assert hb['clip_acc'] == ha['clip_acc'] and hb['gate_fraction'] == ha['gate_fraction']


def test_accumulation_needs_micro_batches_that_divide():
  config = _config(**{'optim.accum_steps': 3})
  model = rils_lib.build_model(config, eot_id=2)
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  with pytest.raises(ValueError, match='accum_steps=3'):
    train_step_lib.make_train_step(model, optim.make_optimizer(config), config, mesh)


def test_remat_gives_the_same_training():
  batches = [tiny.random_batch(8)]
  # 'full' recomputes every block; the dry-run test shows what each policy keeps.
  base = tiny.train(_config(), jax.devices()[:1], 2, batches)
  _assert_same_run(base, tiny.train(_config(**{'model.remat': 'full'}), jax.devices()[:1], 2,
                                batches), atol=1e-6)


def test_remat_policy_name_is_checked():
  with pytest.raises(ValueError, match='remat'):
    rils_lib.build_model(_config(**{'model.remat': 'sometimes'}), eot_id=2)


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


def _embeddings(batch, dim, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, batch, dim))
  return [jnp.asarray(v / np.linalg.norm(v, axis=1, keepdims=True), jnp.float32) for v in x]


def test_local_gradients_reproduce_the_release_per_device_loss():
  images, texts = _embeddings(8, 6, 0)
  scale, world = 10.0, 4

  def release(images, texts):
    # SLIP's CLIPLoss on `world` GPUs: local rows against all_gather'ed (gradient-free)
    # columns, labels offset by the rank; DDP averages the ranks' gradients.
    all_i, all_t = jax.lax.stop_gradient(images), jax.lax.stop_gradient(texts)
    total = 0.0
    for rank, rows in enumerate(np.split(np.arange(8), world)):
      labels = rows
      li = jax.nn.log_softmax(scale * images[rows] @ all_t.T, axis=1)
      lt = jax.nn.log_softmax(scale * texts[rows] @ all_i.T, axis=1)
      total += 0.5 * (-li[np.arange(len(rows)), labels].mean()
                      - lt[np.arange(len(rows)), labels].mean())
    return total / world

  def ours(local):
    return lambda i, t: losses.clip_loss(i, t, scale, local_gradients=local)[0]

  np.testing.assert_allclose(ours(True)(images, texts), release(images, texts), rtol=1e-6)
  np.testing.assert_allclose(ours(False)(images, texts), release(images, texts), rtol=1e-6)
  want = jax.grad(release, argnums=(0, 1))(images, texts)
  got = jax.grad(ours(True), argnums=(0, 1))(images, texts)
  exact = jax.grad(ours(False), argnums=(0, 1))(images, texts)
  for g, w, e in zip(got, want, exact):
    np.testing.assert_allclose(g, w, atol=1e-6)
    assert np.abs(np.asarray(e) - np.asarray(w)).max() > 1e-3  # The switch matters.


def test_chunked_reconstruction_loss_equals_unchunked():
  rng = np.random.default_rng(1)

  def unit(*shape):
    x = rng.normal(size=shape)
    return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), jnp.float32)

  student, teacher, protos = unit(4, 12, 8), unit(4, 12, 8), unit(4, 8)
  weights = jnp.asarray(rng.integers(0, 2, size=(4, 12)), jnp.float32)

  def loss(s, p, chunk):
    return losses.rils_reconstruction_loss(s, teacher, p, weights, student_temperature=0.1,
                                           teacher_temperature=0.04, chunk_size=chunk)

  base, base_grads = jax.value_and_grad(loss, argnums=(0, 1))(student, protos, 0)
  for chunk in (5, 4, 1):  # 5 pads 12 patches to 15.
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(student, protos, chunk)
    np.testing.assert_allclose(value, base, rtol=1e-6)
    for g, b in zip(grads, base_grads):
      np.testing.assert_allclose(g, b, atol=1e-6)


def test_config_validation_names_mesh_and_accumulation_errors():
  from rils_jax import main as main_lib
  with pytest.raises(ValueError, match='needs 3 devices, 8 are available'):
    main_lib.validate_config(_config(**{'mesh.data': 3}))
  with pytest.raises(ValueError, match='accum_steps=2 micro-batches'):
    main_lib.validate_config(_config(**{'optim.accum_steps': 2}))  # 8 / 2 over 8 devices.
  with pytest.raises(ValueError, match='mu_dtype'):
    main_lib.validate_config(_config(**{'optim.mu_dtype': 'float16', 'input.sources': [{}]}))
