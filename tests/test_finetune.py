"""Fine-tuning: layer-wise learning-rate decay factors per parameter, applied by the optimizer."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from rils_jax import finetune
from rils_jax import optim


def _params(depth=2):
  model = finetune.Classifier(patch_size=8, width=16, depth=depth, num_heads=2, num_classes=3)
  return jax.tree.map(np.asarray, finetune.nn.unbox(
      model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))['params']))


def test_layerwise_decay_factor_of_every_parameter():
  params = _params(depth=2)
  scales = traverse_util.flatten_dict(optim.layerwise_lr_scales(params, 0.5, num_blocks=2))
  expected = {'patch_embed': 0.125, 'cls_token': 0.125, 'blocks_0': 0.25, 'blocks_1': 0.5,
              'norm': 1.0, 'head': 1.0}
  seen = set()
  for path, scale in scales.items():
    group = path[1] if path[0] == 'visual' else path[0]
    assert scale == expected[group], (path, scale)
    seen.add(group)
  assert seen == set(expected)
  assert optim.layer_id(('visual', 'blocks_11', 'mlp', 'fc1', 'kernel'), 12) == 12


def test_finetune_optimizer_scales_each_update_by_its_factor():
  params = _params(depth=2)
  config = ml_collections.ConfigDict(dict(total_steps=10, optim=dict(
      lr=1e-2, warmup_steps=0, min_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-12, weight_decay=0.0,
      grad_clip=0.0, layer_decay=0.5)))
  optimizer = optim.make_finetune_optimizer(config, params, num_blocks=2)
  grads = jax.tree.map(lambda p: np.random.default_rng(p.size).normal(size=p.shape) + 0.1,
                       params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  scales = optim.layerwise_lr_scales(params, 0.5, 2)
  # Adam's first step is lr * sign(g) per element (bias-corrected m / sqrt(v) = +-1).
  for u, g, s in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), jax.tree.leaves(scales)):
    np.testing.assert_allclose(np.asarray(u), -1e-2 * s * np.sign(g), rtol=1e-4)


def test_finetune_rejects_bad_configs(tmp_path):
  config = ml_collections.ConfigDict(dict(init_from='', batch_size=8, total_steps=1,
                                          optim=dict(layer_decay=0.65)))
  with pytest.raises(ValueError, match='init_from'):
    finetune.finetune(config, str(tmp_path))
  config.init_from = str(tmp_path / 'none')
  config.optim.layer_decay = 1.5
  with pytest.raises(ValueError, match='layer_decay'):
    finetune.finetune(config, str(tmp_path))
