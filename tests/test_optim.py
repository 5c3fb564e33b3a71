"""Optimizers (rils_jax/optim.py): the weight-decay mask, the learning-rate schedule, and the
layer-wise learning-rate decay of fine-tuning."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from rils_jax import finetune
from rils_jax import optim
from rils_jax.models import rils as rils_lib
from tests import tiny


def _mask(path, tree):
  for p in path:
    tree = tree[p]
  return tree


def test_slip_weight_decay_mask_decays_all_but_biases_norms_and_scale():
  # SLIP's rule: p.ndim >= 2 and no 'bias' / 'ln' / 'bn' in the name, on PyTorch's shapes.
  params = jax.eval_shape(lambda: rils_lib.init_params(
      rils_lib.build_model(tiny.tiny_config(), eot_id=2), jax.random.PRNGKey(0)))
  mask = optim.decay_mask_fn('slip')(params)
  for path in [('visual', 'blocks_0', 'attn', 'qkv', 'kernel'), ('visual', 'patch_embed', 'kernel'),
               ('image_projection',), ('text_projection',), ('visual', 'cls_token'),
               ('decoder', 'mask_token'), ('text', 'token_embedding', 'embedding'),
               ('text', 'positional_embedding'), ('decoder', 'decoder_pred', 'kernel')]:
    assert _mask(path, mask) is True, path
  for path in [('logit_scale',), ('visual', 'blocks_0', 'attn', 'q_bias'),
               ('visual', 'blocks_0', 'attn', 'v_bias'), ('visual', 'norm', 'scale'),
               ('visual', 'norm', 'bias'), ('text', 'blocks_0', 'qkv', 'bias'),
               ('text', 'ln_final', 'scale'), ('visual', 'patch_embed', 'bias'),
               ('visual', 'blocks_0', 'mlp', 'fc1', 'bias')]:
    assert _mask(path, mask) is False, path
  with pytest.raises(ValueError, match="weight_decay_mask must be 'slip' or 'kernels'"):
    optim.make_optimizer(tiny.tiny_config(**{'optim.weight_decay_mask': 'all'}))


def test_weight_decay_mask_excludes_biases_norms_embeddings_tokens_and_scale():
  config = tiny.tiny_config()
  model = rils_lib.build_model(config, eot_id=2)
  params = jax.eval_shape(lambda: rils_lib.init_params(model, jax.random.PRNGKey(0)))
  mask = optim.decay_mask_fn('kernels')(params)
  assert mask['visual']['blocks_0']['attn']['qkv']['kernel']
  assert mask['visual']['patch_embed']['kernel']
  assert mask['image_projection'] and mask['text_projection']
  for path in [('visual', 'cls_token'), ('decoder', 'mask_token'), ('logit_scale',),
               ('visual', 'blocks_0', 'attn', 'q_bias'), ('visual', 'norm', 'scale'),
               ('text', 'token_embedding', 'embedding'), ('text', 'positional_embedding'),
               ('visual', 'blocks_0', 'mlp', 'fc1', 'bias')]:
    node = mask
    for p in path:
      node = node[p]
    assert node is False, path


def test_schedule_warms_up_then_decays():
  config = tiny.tiny_config(**{'total_steps': 100, 'optim.warmup_steps': 10, 'optim.lr': 1.0,
                               'optim.lr_start': 0.0, 'optim.min_lr_ratio': 0.0})
  schedule = optim.learning_rate_schedule(config)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(55)) == pytest.approx(0.5, abs=1e-6)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-6)


def test_schedule_of_slip_starts_at_1e_6_and_ends_at_1e_5():
  config = tiny.tiny_config(**{'total_steps': 100, 'optim.warmup_steps': 10, 'optim.lr': 5e-4,
                               'optim.lr_start': 1e-6, 'optim.min_lr_ratio': 1e-5 / 5e-4})
  schedule = optim.learning_rate_schedule(config)
  assert float(schedule(0)) == pytest.approx(1e-6, rel=1e-5)  # float32
  assert float(schedule(10)) == pytest.approx(5e-4, rel=1e-5)
  assert float(schedule(100)) == pytest.approx(1e-5, rel=1e-5)


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
