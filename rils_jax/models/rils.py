"""The RILS two-tower model: ViT encoder + decoder, text transformer, joint-space projections.

Forward pass (../shared/docs/RILS_METHOD.md "Forward pass", RILS official release):
- full branch: the encoder on all N patches; image embedding = mean of the N patch tokens after
  the final LayerNorm (CLS excluded) times `image_projection`;
- masked branch: the same encoder (same weights) on the visible patches, the decoder predicts an
  encoder-width feature per masked patch;
- text embedding: the end-of-text feature times `text_projection`;
- student (decoder output) and teacher (full-branch patch tokens) go through the same
  `image_projection` and are L2-normalised.
`logit_scale` is a learnable log-temperature initialised to ln(1/0.07) (CLIP).

The same module builds the baselines (`kind`, `config.loss.kind`), each with only the parameters
its loss uses:
- 'clip': the full branch and the text tower (no decoder);
- 'flip': the encoder on the visible patches only, image embedding = mean of the visible patch
  tokens times `image_projection` (FLIP, Li et al. 2023, Sec. 3); without a masking (FLIP's
  unmasked tuning) the full branch;
- 'mae': the encoder on the visible patches and a decoder predicting the pixels of the masked
  patches (MAE, He et al. 2022): no text tower, projections or logit scale.
`contrastive='sigmoid'` (SigLIP, Zhai et al. 2023) adds a learnable `logit_bias` (init
`logit_bias_init`, SigLIP's -10) and
starts `logit_scale` at ln 10.
"""

import math
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rils_jax.losses import check_config as check_loss_config
from rils_jax.models import layout
from rils_jax.models import text as text_lib
from rils_jax.models import vit

# (width, depth, heads) of the standard ViT sizes (Dosovitskiy et al. 2021; DeiT for Ti/S).
VIT_SIZES = {
    'Ti': (192, 12, 3),
    'S': (384, 12, 6),
    'B': (768, 12, 12),
    'L': (1024, 24, 16),
}


def l2_normalize(x, eps: float = 1e-6):
  """x / max(||x||_2, eps) over the last axis, computed in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class RILS(nn.Module):
  """Image and text towers of RILS. Sizes are plain attributes; see `build_model`. `remat`,
  `attention` and `scan_layers` apply to every tower (see `vit.Encoder`). `kind` and
  `contrastive`: see the module docstring; `decoder_out` is the decoder's output width per
  patch (0: the encoder width, RILS; MAE: patch_size ** 2 * 3 pixels)."""
  image_size: int
  patch_size: int
  vision_width: int
  vision_depth: int
  vision_heads: int
  decoder_width: int
  decoder_depth: int
  decoder_heads: int
  text_width: int
  text_layers: int
  text_heads: int
  vocab_size: int
  context_length: int
  embed_dim: int
  eot_id: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  remat: str = 'none'
  bias_init: str = 'release'
  attention: str = 'auto'
  scan_layers: bool = False
  kind: str = 'rils'
  contrastive: str = 'softmax'
  decoder_out: int = 0
  logit_bias_init: float = -10.0

  def setup(self):
    self.visual = vit.Encoder(self.patch_size, self.vision_width, self.vision_depth,
                              self.vision_heads, self.mlp_ratio, self.dtype, self.remat,
                              bias_init=self.bias_init, attention=self.attention,
                              scan_layers=self.scan_layers)
    self.decoder = vit.Decoder(self.decoder_width, self.decoder_depth, self.decoder_heads,
                               out_width=self.decoder_out or self.vision_width,
                               mlp_ratio=self.mlp_ratio,
                               dtype=self.dtype, remat=self.remat, attention=self.attention,
                               scan_layers=self.scan_layers)
    self.text = text_lib.TextTransformer(self.vocab_size, self.context_length, self.text_width,
                                         self.text_layers, self.text_heads, self.eot_id,
                                         self.mlp_ratio, self.dtype, self.remat,
                                         bias_init=self.bias_init, attention=self.attention,
                                         scan_layers=self.scan_layers)
    if self.kind == 'mae':  # Pixels only: no joint space.
      return
    self.image_projection = self.param(
        'image_projection',
        vit.logical(nn.initializers.normal(self.vision_width ** -0.5), ('embed', 'joint')),
        (self.vision_width, self.embed_dim))
    self.text_projection = self.param(
        'text_projection',
        vit.logical(nn.initializers.normal(self.text_width ** -0.5), ('embed', 'joint')),
        (self.text_width, self.embed_dim))
    sigmoid = self.contrastive == 'sigmoid'
    # SigLIP Sec. 3.2: t' = ln 10, b = -10, so that training starts near the prior of mostly
    # negative pairs; CLIP: 1 / 0.07.
    self.logit_scale = self.param('logit_scale', nn.initializers.constant(
        np.log(10.0) if sigmoid else np.log(1 / 0.07)), ())
    if sigmoid:
      self.logit_bias = self.param('logit_bias',
                                   nn.initializers.constant(self.logit_bias_init), ())

  def grid_shape(self):
    """Patch grid (rows, cols); callable on an unbound module."""
    return vit.grid_size(self.image_size, self.patch_size)

  def _project_image(self, x):
    if self.kind == 'mae':  # No joint space: the pooled feature itself.
      return x
    return x @ self.image_projection.astype(self.dtype)

  def encode_image(self, images):
    """Full-branch image embedding.

    Args:
      images: float (B, H, W, 3) normalised pixels.

    Returns:
      embedding: (B, embed_dim) float32, L2-normalised (for kind 'mae', which has no joint
        space, the L2-normalised (B, vision_width) mean patch token).
      patch_tokens: (B, N, vision_width) in `dtype`, after the encoder's final LayerNorm.
    """
    tokens = self.visual(images)[:, 1:]
    return l2_normalize(self._project_image(tokens.mean(axis=1))), tokens

  def encode_patches(self, images):
    """Full-branch patch embeddings in the joint space: the teacher side of the reconstruction
    loss (RILS forward pass step 6), for patch-text maps.

    Args:
      images: float (B, H, W, 3) normalised pixels.

    Returns:
      (B, N, embed_dim) float32, L2-normalised, patches in raster order.
    """
    return l2_normalize(self._project_image(self.visual(images)[:, 1:]))

  def encode_text(self, tokens):
    """Text embedding: (B, L) int32 token ids -> (B, embed_dim) float32, L2-normalised.

    Raises:
      ValueError: for kind 'mae' (no text tower).
    """
    if self.kind == 'mae':
      raise ValueError("a model of config.loss.kind='mae' has no text tower")
    return l2_normalize(self.text(tokens) @ self.text_projection.astype(self.dtype))

  def __call__(self, images, tokens, masking: Optional[vit.Masking] = None) -> Dict[str, jax.Array]:
    """One train step's forward pass of `kind`.

    Args:
      images: float (B, H, W, 3) normalised pixels.
      tokens: int32 (B, L) caption token ids (unused by 'mae').
      masking: a `vit.Masking`: needed by 'rils' and 'mae', used by 'flip' (None: FLIP's
        unmasked tuning, the full branch), ignored by 'clip'.

    Returns:
      'mae': dict with float32 `pred` (B, M, decoder_out), the decoder's pixels at the M masked
      patches (in `masking.ids_masked` order), and `target` (B, M, p * p * 3), the same patches
      of `images` (`vit.patchify`).
      Otherwise dict with float32 `image_embed` (B, D), `text_embed` (B, D), `logit_scale` ()
      (the raw log-scale), `logit_bias` () with 'sigmoid', and for 'rils' `student` and
      `teacher` (B, M, D): L2-normalised projections of the decoder prediction and of the
      full-branch patch token at each of the M masked patches. The teacher is not
      stop-gradiented here; the loss does that.

    Raises:
      ValueError: for 'rils' or 'mae' without a masking.
    """
    if masking is None and self.kind in ('rils', 'mae'):
      raise ValueError(f'kind {self.kind!r} needs a masking')
    if self.kind == 'mae':
      visible = self.visual(images, masking.ids_keep)
      pred = self.decoder(visible, masking.ids_restore, self.grid_shape(),
                          ids_predict=masking.ids_masked)
      target = jnp.take_along_axis(
          vit.patchify(images.astype(jnp.float32), self.patch_size),
          masking.ids_masked[..., None], axis=1)
      return dict(pred=pred.astype(jnp.float32), target=target)
    if self.kind == 'flip' and masking is not None:
      visible = self.visual(images, masking.ids_keep)[:, 1:]
      image_embed = l2_normalize(self._project_image(visible.mean(axis=1)))
    else:
      image_embed, patch_tokens = self.encode_image(images)
    out = dict(image_embed=image_embed, text_embed=self.encode_text(tokens),
               logit_scale=self.logit_scale)
    if self.contrastive == 'sigmoid':
      out['logit_bias'] = self.logit_bias
    if self.kind == 'rils':
      visible = self.visual(images, masking.ids_keep)
      predicted = self.decoder(visible, masking.ids_restore, self.grid_shape(),
                               ids_predict=masking.ids_masked)
      teacher = jnp.take_along_axis(patch_tokens, masking.ids_masked[..., None], axis=1)
      out['student'] = l2_normalize(self._project_image(predicted))
      out['teacher'] = l2_normalize(self._project_image(teacher))
    return out


def boxed_params(model: RILS, rng: jax.Array):
  """Initial float32 parameters of `model` (masked branch included) as
  `nn.LogicallyPartitioned` leaves, which carry each parameter's logical axis names.

  The parameters depend on `rng`, the model's sizes and its `kind` (which towers exist) only:
  the forward pass that creates them runs on two blank images and captions. With
  `scan_layers` they are the unrolled model's,
  stacked (`layout.stack_layers`): flax's `nn.scan` would draw each layer's init from a split
  of one key, and a run must start from the same values in either layout.
  """
  if model.scan_layers:
    return layout.stack_layers(boxed_params(model.clone(scan_layers=False), rng))
  images = jnp.zeros((2, model.image_size, model.image_size, 3), jnp.float32)
  tokens = jnp.zeros((2, model.context_length), jnp.int32)
  masking = vit.random_masking(jax.random.PRNGKey(0), 2, math.prod(model.grid_shape()), 0.5)
  return model.init(rng, images, tokens, masking)['params']


def init_params(model: RILS, rng: jax.Array):
  """Initial float32 parameters of `model`, as plain arrays (see `boxed_params`)."""
  return nn.unbox(boxed_params(model, rng))


def vision_size(variant: str):
  """Parses a ViT variant name such as 'B/16' or 'Ti/14'.

  Returns:
    (width, depth, heads, patch_size).

  Raises:
    ValueError: for an unknown size or a malformed name.
  """
  try:
    size, patch = variant.split('/')
    return (*VIT_SIZES[size], int(patch))
  except (KeyError, ValueError) as e:
    raise ValueError(f'unknown ViT variant {variant!r}; expected one of '
                     f'{[k + "/16" for k in VIT_SIZES]} (any integer patch size)') from e


def vision_dims(model_config: ml_collections.ConfigDict):
  """(width, depth, heads, patch_size) of `config.model`: the named variant, with non-zero
  `config.model.vision` fields overriding it (for tiny CPU models)."""
  width, depth, heads, patch = vision_size(model_config.variant)
  v = model_config.vision
  return (v.get('width') or width, v.get('depth') or depth, v.get('num_heads') or heads, patch)


def build_model(config: ml_collections.ConfigDict, eot_id: int) -> RILS:
  """Builds a `RILS` module from `config.model` (see configs/*.py for the fields).

  Raises:
    ValueError: for an unknown variant, dtype, remat policy, bias init or attention, an
      attention that cannot run here (`vit.attention_implementation`), or an image size not
      divisible by the patch.
  """
  m = config.model
  vit.remat_block(vit.Block, m.get('remat', 'none'))  # Raises early for an unknown policy.
  vit.release_bias(m.get('bias_init', 'release'), 1)  # Raises early for an unknown init.
  width, depth, heads, patch = vision_dims(m)
  vit.grid_size(m.image_size, patch)  # Raises early for a bad image size.
  dtype = compute_dtype(m.dtype)
  attention = m.get('attention', 'auto')
  kind = config.loss.kind
  check_loss_config(config.loss)  # Raises early for an unknown kind or contrastive loss.
  decoder = decoder_config(config)
  decoder_width, decoder_heads = decoder.width or width, decoder.num_heads or heads
  for tower_width, tower_heads in ((width, heads), (decoder_width, decoder_heads),
                                   (m.text.width, m.text.num_heads)):
    # Raises early for an attention that cannot run here (the head dims of all towers).
    vit.attention_implementation(attention, dtype, tower_width // tower_heads)
  return RILS(
      image_size=m.image_size, patch_size=patch,
      vision_width=width, vision_depth=depth, vision_heads=heads,
      decoder_width=decoder_width, decoder_depth=decoder.depth, decoder_heads=decoder_heads,
      text_width=m.text.width, text_layers=m.text.num_layers, text_heads=m.text.num_heads,
      vocab_size=m.text.vocab_size, context_length=m.text.context_length,
      embed_dim=m.embed_dim, eot_id=eot_id, dtype=dtype,
      remat=m.get('remat', 'none'), bias_init=m.get('bias_init', 'release'),
      attention=attention, scan_layers=bool(m.get('scan_layers', False)), kind=kind,
      contrastive=config.loss.get('contrastive', 'softmax'),
      logit_bias_init=float(config.loss.get('sigmoid_bias_init', -10.0)),
      decoder_out=patch * patch * 3 if kind == 'mae' else 0)


def mask_ratio(config: ml_collections.ConfigDict) -> float:
  """The share of patches `config.loss.kind` masks: `config.flip.mask_ratio` for 'flip' (FLIP:
  0.5), `config.model.mask_ratio` for 'rils' and 'mae' (0.75 in both papers), 0 for 'clip'."""
  kind = config.loss.kind
  if kind == 'clip':
    return 0.0
  return config.flip.mask_ratio if kind == 'flip' else config.model.mask_ratio


def decoder_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The decoder's (width, depth, num_heads) of `config.loss.kind`: `config.mae.decoder` for
  'mae' (MAE's 8 x 512, 16 heads by default), else `config.model.decoder` (RILS: one block of
  the encoder's width); width / heads 0 mean the encoder's."""
  if config.loss.kind == 'mae' and 'mae' in config:
    return config.mae.decoder
  return config.model.decoder


def compute_dtype(name: str):
  """'float32', 'bfloat16', or 'auto': bfloat16 on GPU / TPU (mixed precision), float32 on CPU
  (XLA:CPU has no fast bfloat16 matmul; measured ~10x slower here).

  Raises:
    ValueError: for any other name.
  """
  if name == 'auto':
    return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f"config.model.dtype must be 'float32', 'bfloat16' or 'auto', got {name!r}")
  return jnp.dtype(name)
