"""GradCache (rils_jax/grad_cache.py): the accumulated gradient of a batch-coupled loss against
the full-batch gradient, on a contrastive toy and in the RILS train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rils_jax import grad_cache
from rils_jax import sharding
from rils_jax import train_step as train_step_lib
from tests import tiny


def _config(**overrides):
  # eps = 1e-3: see test_train_step.test_eight_devices_match_one_device.
  return tiny.tiny_config(**{'optim.eps': 1e-3, **overrides})


def _toy(batch=16, dim=8, width=4, seed=0):
  """Two linear towers, a learnable temperature, and a batch of paired inputs."""
  rng = np.random.default_rng(seed)
  params = {'image': jnp.asarray(rng.normal(size=(dim, width)), jnp.float32),
            'text': jnp.asarray(rng.normal(size=(dim, width)), jnp.float32),
            'log_scale': jnp.asarray(1.5, jnp.float32)}
  inputs = (jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32),
            jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32))
  return params, inputs


def _features(params, inputs):
  def unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  x, y = inputs
  return {'image': unit(jnp.tanh(x @ params['image'])), 'text': unit(jnp.tanh(y @ params['text']))}


def _loss(params, outputs):
  """Symmetric InfoNCE over the whole batch (couples every row), with a learnable scale."""
  logits = jnp.exp(params['log_scale']) * outputs['image'] @ outputs['text'].T
  labels = jnp.arange(logits.shape[0])
  ce = lambda l: -jnp.take_along_axis(jax.nn.log_softmax(l, axis=1), labels[:, None], 1).mean()
  return 0.5 * (ce(logits) + ce(logits.T)), {'accuracy': jnp.mean(logits.argmax(1) == labels)}


@pytest.mark.parametrize('micro_batches', [1, 2, 4, 16])
def test_grad_cache_equals_the_full_batch_gradient_on_a_contrastive_toy(micro_batches):
  params, inputs = _toy()
  (want_loss, want_aux), want = jax.value_and_grad(
      lambda p: _loss(p, _features(p, inputs)), has_aux=True)(params)
  (loss, aux), grads = jax.jit(lambda p, i: grad_cache.grad_cache(
      _features, _loss, p, i, micro_batches))(params, inputs)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  assert float(aux['accuracy']) == float(want_aux['accuracy'])
  for key in params:  # The scale's gradient comes from the loss alone, the towers' through vjps.
    np.testing.assert_allclose(grads[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # Summing the gradients of independent micro-batch losses is another objective.
  if micro_batches > 1:
    parts = [jax.grad(lambda p, i=i: _loss(p, _features(p, i))[0])(params)
             for i in zip(*(np.split(np.asarray(x), micro_batches) for x in inputs))]
    naive = jax.tree.map(lambda *g: sum(g) / micro_batches, *parts)
    assert np.abs(np.asarray(naive['image'] - want['image'])).max() > 1e-3


def test_grad_cache_under_a_mesh_matches_one_device():
  params, inputs = _toy()
  mesh = sharding.make_mesh(tiny.tiny_config(**{'mesh.data': 2, 'mesh.fsdp': 4}))
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  replicated = sharding.replicated(mesh)
  param_shardings = {'image': NamedSharding(mesh, P('fsdp', None)),
                     'text': NamedSharding(mesh, P(None, 'fsdp')), 'log_scale': replicated}

  @jax.jit
  def sharded(p, i):
    return grad_cache.grad_cache(
        _features, _loss, p, i, 2,
        micro_batch_sharding=NamedSharding(mesh, P(None, sharding.BATCH_AXES)),
        param_shardings=param_shardings)

  (loss, _), grads = sharded(jax.device_put(params, param_shardings),
                             jax.device_put(inputs, rows))
  (want_loss, _), want = jax.value_and_grad(
      lambda p: _loss(p, _features(p, inputs)), has_aux=True)(params)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for key in params:
    np.testing.assert_allclose(grads[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert grads['image'].sharding.spec == P('fsdp', None)


def test_accumulated_gradient_equals_full_batch_gradient():
  batches = [tiny.random_batch(16, seed) for seed in range(2)]
  full = tiny.train(_config(**{'input.batch_size': 16}), jax.devices()[:2], 2, batches)
  accum = tiny.train(_config(**{'input.batch_size': 16, 'optim.accum_steps': 4}),
                 jax.devices()[:2], 2, batches)
  tiny.assert_same_run(full, accum)
  for ha, hb in zip(full[1], accum[1]):
    np.testing.assert_allclose(hb['grad_norm'], ha['grad_norm'], rtol=1e-5)
    assert hb['clip_acc'] == ha['clip_acc'] and hb['gate_fraction'] == ha['gate_fraction']


def test_accumulation_needs_micro_batches_that_divide():
  config = _config(**{'optim.accum_steps': 3})
  with pytest.raises(ValueError, match='accum_steps=3'):
    train_step_lib.setup(config, jax.devices()[:1])
