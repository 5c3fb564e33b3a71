"""Model structure: masking, position embeddings, output shapes for the standard sizes."""

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from rils_jax.models import rils as rils_lib
from rils_jax.models import text as text_lib
from rils_jax.models import vit
from tests import tiny


@pytest.mark.parametrize('num_patches,mask_ratio,rounding,keep', [
    (196, 0.75, 'floor', 49), (64, 0.75, 'floor', 16), (10, 0.33, 'floor', 6),
    (196, 0.9, 'floor', 19), (196, 0.9, 'round', 20), (10, 0.33, 'round', 7)])
def test_masking_keeps_exact_count_differs_and_restores(num_patches, mask_ratio, rounding, keep):
  # 'floor' is the release's (and MAE's) len_keep = int(L * (1 - mask_ratio)).
  batch = 6
  m = vit.random_masking(jax.random.PRNGKey(3), batch, num_patches, mask_ratio, rounding)
  assert keep == (int(num_patches * (1 - mask_ratio)) if rounding == 'floor'
                  else round(num_patches * (1 - mask_ratio)))
  assert m.ids_keep.shape == (batch, keep)
  assert m.ids_masked.shape == (batch, num_patches - keep)
  np.testing.assert_array_equal(np.asarray(m.mask).sum(1), num_patches - keep)
  # Samples get different masks.
  assert len({tuple(np.sort(np.asarray(r))) for r in m.ids_keep}) == batch
  # The mask marks exactly the masked ids.
  for b in range(batch):
    assert set(np.flatnonzero(np.asarray(m.mask[b]))) == set(np.asarray(m.ids_masked[b]))
  # ids_restore undoes the shuffle: gathering a raster-ordered sequence in shuffle order and
  # then by ids_restore gives the raster order back.
  x = jnp.broadcast_to(jnp.arange(num_patches), (batch, num_patches))
  shuffled = jnp.concatenate([jnp.take_along_axis(x, m.ids_keep, 1),
                              jnp.take_along_axis(x, m.ids_masked, 1)], axis=1)
  np.testing.assert_array_equal(jnp.take_along_axis(shuffled, m.ids_restore, 1), x)


def test_masking_rejects_degenerate_ratio():
  with pytest.raises(ValueError, match='mask_ratio'):
    vit.random_masking(jax.random.PRNGKey(0), 2, 4, 0.99)
  with pytest.raises(ValueError, match="keep_rounding must be 'floor' or 'round'"):
    vit.random_masking(jax.random.PRNGKey(0), 2, 4, 0.5, 'ceil')


@pytest.mark.parametrize('bias_init', ['release', 'zeros'])
def test_biases_the_release_leaves_at_pytorch_default(bias_init):
  # The release zeroes the ViT's linear biases (MAE's _init_weights) and CLIP's attention
  # biases, but leaves the patch embedding's conv bias and the text MLP's biases at PyTorch's
  # default U(+-fan_in^-0.5).
  config = tiny.tiny_config(**{'model.bias_init': bias_init})
  model = rils_lib.build_model(config, eot_id=2)
  params = jax.device_get(jax.jit(lambda: rils_lib.init_params(model, jax.random.PRNGKey(0)))())
  patch, width = model.patch_size, model.text_width
  text = params['text']['blocks_0']
  for bias, fan_in in [(params['visual']['patch_embed']['bias'], 3 * patch * patch),
                       (text['fc1']['bias'], width), (text['fc2']['bias'], 4 * width)]:
    bound = fan_in ** -0.5
    if bias_init == 'zeros':
      assert not np.any(bias)
    else:  # Uniform on (-bound, bound): inside it, and spread over it.
      assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.8 * bound
      assert abs(float(np.mean(bias))) < 0.25 * bound and np.std(bias) > 0.4 * bound
  for zero in (params['visual']['blocks_0']['mlp']['fc1']['bias'], text['qkv']['bias'],
               text['proj']['bias'], params['decoder']['decoder_embed']['bias']):
    assert not np.any(zero)
  with pytest.raises(ValueError, match="bias_init must be 'release' or 'zeros'"):
    rils_lib.build_model(tiny.tiny_config(**{'model.bias_init': 'torch'}), eot_id=2)


def test_sincos_pos_embed_matches_formula():
  width, grid = 16, (3, 5)
  emb = vit.sincos_pos_embed_2d(width, grid)
  assert emb.shape == (1, 1 + 15, width)
  np.testing.assert_array_equal(emb[0, 0], 0.0)
  omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
  row, col = 2, 3  # patch index 2 * 5 + 3
  want = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                         np.sin(row * omega), np.cos(row * omega)])
  np.testing.assert_allclose(emb[0, 1 + row * 5 + col], want, rtol=1e-6)


def test_image_size_must_divide_by_patch():
  with pytest.raises(ValueError, match='divisible'):
    vit.grid_size(225, 16)
  config = tiny.tiny_config(**{'model.image_size': 36})
  with pytest.raises(ValueError, match='divisible'):
    rils_lib.build_model(config, eot_id=2)


@pytest.mark.parametrize('variant,image_size,width,depth', [
    ('Ti/16', 224, 192, 12), ('S/16', 224, 384, 12), ('B/16', 224, 768, 12),
    ('L/16', 224, 1024, 24), ('B/14', 224, 768, 12), ('S/16', 160, 384, 12)])
def test_vit_output_shapes(variant, image_size, width, depth):
  w, d, heads, patch = rils_lib.vision_size(variant)
  assert (w, d) == (width, depth)
  encoder = vit.Encoder(patch, w, d, heads)
  images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
  n = (image_size // patch) ** 2
  variables = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), images)
  out = jax.eval_shape(encoder.apply, variables, images)
  assert out.shape == (2, 1 + n, width)
  masking = vit.random_masking(jax.random.PRNGKey(0), 2, n, 0.75)
  out = jax.eval_shape(lambda v, x: encoder.apply(v, x, masking.ids_keep), variables, images)
  assert out.shape == (2, 1 + int(round(n * 0.25)), width)
  params = nn.unbox(variables['params'])
  assert params['blocks_0']['attn']['qkv']['kernel'].shape == (w, 3, heads, w // heads)
  assert 'bias' not in params['blocks_0']['attn']['qkv']  # No k bias: only q_bias and v_bias.
  assert params['blocks_0']['attn']['q_bias'].shape == (heads, w // heads)


def test_rils_outputs_are_normalised_with_expected_shapes():
  config = tiny.tiny_config()
  model = rils_lib.build_model(config, eot_id=2)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  tokens = np.full((3, 8), 5, np.int32)
  tokens[:, 4] = 2
  masking = vit.random_masking(jax.random.PRNGKey(0), 3, 16, 0.75)
  params = model.init(jax.random.PRNGKey(1), images, tokens, masking)['params']
  out = model.apply({'params': params}, images, tokens, masking)
  assert out['image_embed'].shape == (3, 16) and out['text_embed'].shape == (3, 16)
  assert out['student'].shape == (3, 12, 16) and out['teacher'].shape == (3, 12, 16)
  for key in ('image_embed', 'text_embed', 'student', 'teacher'):
    np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(params['logit_scale'], np.log(1 / 0.07), rtol=1e-6)
  # CLIP baseline: no masked branch (the RILS parameters hold the CLIP model's and more).
  assert set(model.clone(kind='clip').apply({'params': params}, images, tokens)) == {
      'image_embed', 'text_embed', 'logit_scale'}


def test_text_tower_is_causal_and_pools_end_of_text():
  model = text_lib.TextTransformer(vocab_size=20, context_length=6, width=16, num_layers=2,
                                   num_heads=2, eot_id=2)
  tokens = np.array([[5, 6, 2, 0, 0, 0]], np.int32)
  params = model.init(jax.random.PRNGKey(0), tokens)
  base = model.apply(params, tokens)
  # Tokens after the end-of-text token cannot change the pooled feature (causal mask).
  after = model.apply(params, np.array([[5, 6, 2, 9, 9, 9]], np.int32))
  np.testing.assert_allclose(after, base, atol=1e-6)
  # Tokens before it do.
  before = model.apply(params, np.array([[7, 6, 2, 0, 0, 0]], np.int32))
  assert np.abs(before - base).max() > 1e-4


def test_remat_policy_name_is_checked():
  with pytest.raises(ValueError, match='remat'):
    rils_lib.build_model(tiny.tiny_config(**{'model.remat': 'sometimes'}), eot_id=2)
