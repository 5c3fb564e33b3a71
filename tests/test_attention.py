"""config.model.attention: each implementation that runs here equals a plain NumPy softmax
attention, the 'auto' rule, and the clear errors where 'cudnn' cannot run (before anything is
written)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from rils_jax import config_lib
from rils_jax import finetune as finetune_lib
from rils_jax import main as main_lib
from rils_jax.models import rils as rils_lib
from rils_jax.models import text as text_lib
from rils_jax.models import vit
from tests import tiny

CPU_IMPLEMENTATIONS = ('xla', 'auto')  # 'cudnn' needs a GPU.


def _reference_attention(q, k, v, causal=False):
  """softmax(q k^T / sqrt(d)) v per head, float64. q, k, v: (B, T, heads, d)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  if causal:
    length = q.shape[1]
    logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
  return np.einsum('bhqk,bkhd->bqhd', special.softmax(logits, axis=-1), v)


def _layer_norm(x, p, eps):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _noisy(params, seed=0):
  """Every leaf plus noise: the zero-initialised q / v and qkv biases take part."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + 0.3 * rng.standard_normal(x.shape), params)


@pytest.mark.parametrize('implementation', CPU_IMPLEMENTATIONS)
def test_encoder_attention_equals_reference(implementation):
  x = np.random.default_rng(1).standard_normal((2, 7, 32)).astype(np.float32)
  module = vit.Attention(num_heads=4, attention=implementation)
  params = _noisy(nn.unbox(module.init(jax.random.PRNGKey(0), x)['params']))
  out = module.apply({'params': params}, x)
  qkv = np.einsum('btw,wshd->btshd', x, params['qkv']['kernel'])
  q = qkv[:, :, 0] + params['q_bias']
  v = qkv[:, :, 2] + params['v_bias']
  attended = _reference_attention(q, qkv[:, :, 1], v)
  expected = np.einsum('bthd,hdw->btw', attended, params['proj']['kernel']) + params['proj']['bias']
  assert np.abs(params['q_bias']).min() > 0 and np.abs(params['v_bias']).min() > 0
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('implementation', CPU_IMPLEMENTATIONS)
def test_causal_text_block_equals_reference(implementation):
  x = np.random.default_rng(2).standard_normal((2, 6, 32)).astype(np.float32)
  module = text_lib.TextBlock(num_heads=4, num_layers=2, attention=implementation)
  p = _noisy(nn.unbox(module.init(jax.random.PRNGKey(0), x)['params']))
  out = module.apply({'params': p}, x)
  y = _layer_norm(x.astype(np.float64), p['ln_1'], 1e-5)
  qkv = np.einsum('btw,wshd->btshd', y, p['qkv']['kernel']) + p['qkv']['bias']
  attended = _reference_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
  x = x + np.einsum('bthd,hdw->btw', attended, p['proj']['kernel']) + p['proj']['bias']
  y = _layer_norm(x, p['ln_2'], 1e-5) @ p['fc1']['kernel'] + p['fc1']['bias']
  y = y * special.expit(1.702 * y)
  expected = x + y @ p['fc2']['kernel'] + p['fc2']['bias']
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_auto_rule():
  pick = vit.attention_implementation
  assert pick('auto', jnp.bfloat16, 64, backend='gpu') == 'cudnn'
  assert pick('auto', jnp.float16, 128, backend='gpu') == 'cudnn'
  assert pick('auto', jnp.float32, 64, backend='gpu') == 'xla'
  assert pick('auto', jnp.bfloat16, 12, backend='gpu') == 'xla'  # Not a multiple of 8.
  assert pick('auto', jnp.bfloat16, 64, backend='tpu') == 'xla'
  assert pick('auto', jnp.bfloat16, 64, backend='cpu') == 'xla'
  assert pick('auto', jnp.float32, 64) == 'xla'  # This machine.
  assert pick('cudnn', jnp.bfloat16, 64, backend='gpu') == 'cudnn'
  assert pick('xla', jnp.bfloat16, 64, backend='gpu') == 'xla'
  with pytest.raises(ValueError, match="'cudnn' needs attention heads of a multiple of 8"):
    pick('cudnn', jnp.bfloat16, 12, backend='gpu')
  with pytest.raises(ValueError, match='needs a GPU and bfloat16/float16 compute; this run has '
                     'gpu / float32'):
    pick('cudnn', jnp.float32, 64, backend='gpu')


def test_cudnn_here_and_unknown_names_are_clear_errors(tmp_path):
  message = ("config.model.attention='cudnn' needs a GPU and bfloat16/float16 compute; this run "
             'has cpu / float32')
  with pytest.raises(ValueError, match=message):
    rils_lib.build_model(tiny.tiny_config(**{'model.attention': 'cudnn'}), eot_id=2)
  with pytest.raises(ValueError, match="needs a GPU and bfloat16/float16 compute; this run has "
                     'cpu / bfloat16'):
    rils_lib.build_model(tiny.tiny_config(**{'model.attention': 'cudnn',
                                             'model.dtype': 'bfloat16'}), eot_id=2)
  with pytest.raises(ValueError, match="config.model.attention must be 'auto', 'xla' or "
                     "'cudnn', got 'flash'"):
    rils_lib.build_model(tiny.tiny_config(**{'model.attention': 'flash'}), eot_id=2)
  x = np.zeros((1, 4, 32), np.float32)
  with pytest.raises(ValueError, match=message):
    vit.Attention(num_heads=4, attention='cudnn').init(jax.random.PRNGKey(0), x)
  # The run refuses it in validate_config, before the workdir exists.
  workdir = str(tmp_path / 'run')
  with pytest.raises(ValueError, match=message):
    main_lib.train(tiny.apply_overrides(tiny.get_config(f'root={tmp_path}/data'),
                                        **{'model.attention': 'cudnn'}), workdir)
  assert not os.path.exists(workdir) and not os.path.exists(tmp_path / 'data')
  config = config_lib.finetune_base_config()
  config.init_from, config.attention = str(tmp_path), 'flash'
  with pytest.raises(ValueError, match="config.attention must be one of .*got 'flash'"):
    finetune_lib.check_config(config)
