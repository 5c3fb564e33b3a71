"""Vision Transformer encoder and MAE-style decoder used by RILS.

Architecture (RILS official release, see ../shared/docs/RILS_METHOD.md "Architectures"):
pre-norm blocks, LayerNorm eps 1e-6, MLP ratio 4, exact GELU, BEiT-style attention bias (learned
q and v biases, no k bias), fixed 2-D sin-cos position embeddings with a zero CLS position
(MAE, He et al. 2022, `get_2d_sincos_pos_embed`), Xavier-uniform linear layers and patch
embedding, zero linear biases, the patch embedding's bias at PyTorch's default (the release
leaves it; `bias_init='zeros'` zeroes it), CLS / mask tokens ~ N(0, 0.02).

All modules compute in `dtype` (float32 or bfloat16) and keep float32 parameters. Every
parameter carries logical axis names (`rils_jax.sharding` maps them to the mesh), the block
inputs and MLP / attention activations are pinned with `sharding.constrain`, and `remat` selects
the rematerialisation of each block (see `remat_block`). `attention` selects the attention kernel
(`attention_implementation`), and `scan_layers` runs the blocks as one `nn.scan` over stacked
parameters (`scan_blocks`; models/layout.py converts between the two layouts).
"""

import functools
from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rils_jax.sharding import constrain

Dtype = Any
xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
ones = nn.initializers.ones
logical = nn.with_logical_partitioning
TOKENS = ('batch', 'length', 'act_embed')  # Logical names of a (B, T, width) activation.

REMAT_POLICIES = {
    # Per block, keep the outputs of the weight matmuls; recompute norms, GELU and attention.
    'block': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Per block, keep only the block's input; recompute the whole block in the backward pass.
    'full': jax.checkpoint_policies.nothing_saveable,
    # As 'block', but the kept matmul outputs wait for the backward pass in host memory
    # (MaxText's offload policies): device memory of 'full', recompute of 'block', paid for in
    # host transfers that XLA overlaps with compute where the backend can.
    'offload': jax.checkpoint_policies.offload_dot_with_no_batch_dims('device', 'pinned_host'),
}


def remat_block(block_cls, remat: str, prevent_cse: bool = True):
  """`block_cls`, rematerialised with policy `remat`: 'none' (keep every activation), 'block',
  'full' or 'offload' (see `REMAT_POLICIES`; `nn.remat` = `jax.checkpoint`, Chen et al. 2016).

  `prevent_cse=False` lets XLA share work between the forward and the recomputation: safe, and
  faster, inside `nn.scan` (whose loop already keeps them apart; see `jax.checkpoint`).

  Raises:
    ValueError: for another name.
  """
  if remat == 'none':
    return block_cls
  if remat not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat must be 'none', 'block', 'full' or 'offload', got "
                     f'{remat!r}')
  return nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse)


# Logical name of the leading axis of scanned layers' stacked parameters (`scan_blocks`).
LAYERS = 'layers'


@functools.lru_cache(maxsize=None)
def _scan_body(block_cls):
  """`block_cls` with the loop-body signature of `nn.scan`: (x, *per-layer inputs) -> (x, None)."""

  class Layer(block_cls):

    @nn.compact
    def __call__(self, x, *xs):
      return super().__call__(x, *xs), None

  Layer.__name__ = Layer.__qualname__ = block_cls.__name__
  return Layer


def scan_blocks(block_cls, remat: str, depth: int):
  """`depth` layers of `block_cls` as one `nn.scan` (compiled once, not `depth` times), each
  layer rematerialised with policy `remat` inside the loop (big_vision, MaxText).

  The returned class is built with `block_cls`'s attributes; an instance is called as
  `x, _ = stack(x, *xs)`, where each of `xs` holds one value per layer on its leading axis. Its
  parameters are those of one layer with a leading axis of size `depth`, logical name `LAYERS`
  (rils_jax/models/layout.py converts to and from the unrolled `<name>_<i>` layout). flax draws
  each layer's init and 'dropout' keys from splits of one key, so the initial values differ
  from an unrolled model's of the same seed; `rils.boxed_params` initialises the unrolled model
  and stacks it instead.

  Raises:
    ValueError: for an unknown `remat`.
  """
  return nn.scan(remat_block(_scan_body(block_cls), remat, prevent_cse=False),
                 variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                 length=depth, metadata_params={nn.PARTITION_NAME: LAYERS})


ATTENTIONS = ('auto', 'xla', 'cudnn')
# cuDNN's fused attention takes head dims that are multiples of 8, up to 128 on every GPU it
# supports (256 from Hopper on).
CUDNN_MAX_HEAD_DIM = 128


def attention_implementation(attention: str, dtype, head_dim: int,
                             backend: Optional[str] = None) -> str:
  """The `implementation` of `jax.nn.dot_product_attention` that `config.model.attention`
  selects: 'xla' (XLA's fused softmax(QK^T)V), 'cudnn' (cuDNN's flash attention), or 'auto':
  'cudnn' on GPU for bfloat16 / float16 compute and a head dim it takes, else 'xla'.

  TPU: JAX's `dot_product_attention` has no TPU implementation ('xla' and 'cudnn' only, JAX
  0.10), and the Pallas TPU kernels (`jax.experimental.pallas.ops.tpu` flash_attention,
  splash_attention) need sequence blocks that are multiples of 128, which RILS's lengths (197
  tokens for ViT-B/16 at 224 px, 50 visible + CLS, 77 text) are not without padding and
  masking; TPU runs use 'xla'.

  Args:
    attention: 'auto', 'xla' or 'cudnn'.
    dtype: the compute dtype.
    head_dim: channels per attention head.
    backend: JAX's backend name (default: `jax.default_backend()`).

  Raises:
    ValueError: for another name, or 'cudnn' where it cannot run: not on a GPU, float32
      compute, or a head dim that is not a multiple of 8 up to `CUDNN_MAX_HEAD_DIM`.
  """
  if attention not in ATTENTIONS:
    raise ValueError(f"config.model.attention must be 'auto', 'xla' or 'cudnn', got "
                     f'{attention!r}')
  backend = jax.default_backend() if backend is None else backend
  half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  fits = head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM
  if attention == 'auto':
    return 'cudnn' if backend == 'gpu' and half and fits else 'xla'
  if attention == 'cudnn' and not (backend == 'gpu' and half):
    raise ValueError(f"config.model.attention='cudnn' needs a GPU and bfloat16/float16 compute; "
                     f"this run has {backend} / {jnp.dtype(dtype).name}: use 'auto' or 'xla'")
  if attention == 'cudnn' and not fits:
    raise ValueError(f"config.model.attention='cudnn' needs attention heads of a multiple of 8 "
                     f'channels, at most {CUDNN_MAX_HEAD_DIM}; this model has {head_dim}: use '
                     "'auto' or 'xla'")
  return attention


def layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
  """LayerNorm over the width, its scale and bias named ('embed',)."""
  return nn.LayerNorm(eps, dtype=dtype, scale_init=logical(ones, ('embed',)),
                      bias_init=logical(zeros, ('embed',)), name=name)


def dense(features: int, names: Tuple[Optional[str], Optional[str]], dtype, name: str,
          kernel_init=xavier_uniform, bias_init=zeros) -> nn.Dense:
  """Dense layer whose (in, out) kernel has logical `names` and whose bias has names[1:]."""
  return nn.Dense(features, dtype=dtype, kernel_init=logical(kernel_init, names),
                  bias_init=logical(bias_init, names[1:]), name=name)


BIAS_INITS = ('release', 'zeros')


def torch_default_bias(fan_in: int):
  """PyTorch's default bias init of `nn.Linear` / `nn.Conv2d`: U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
  fan_in = inputs per output (in_features, or in_channels * kernel area)."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


def release_bias(bias_init: str, fan_in: int):
  """The init of a bias that the RILS release leaves at PyTorch's default (the patch
  embedding's, the text MLP's): PyTorch's default for 'release', zeros for 'zeros'.

  Raises:
    ValueError: for another `bias_init`.
  """
  if bias_init not in BIAS_INITS:
    raise ValueError(f"config.model.bias_init must be 'release' or 'zeros', got {bias_init!r}")
  return torch_default_bias(fan_in) if bias_init == 'release' else zeros


def grid_size(image_size: Union[int, Sequence[int]], patch_size: int) -> Tuple[int, int]:
  """Patch grid (rows, cols) of an image.

  Args:
    image_size: int (square) or (height, width) in pixels.
    patch_size: patch side in pixels.

  Raises:
    ValueError: if a side is not divisible by `patch_size`.
  """
  h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  if h % patch_size or w % patch_size:
    raise ValueError(f'image size {(h, w)} is not divisible by patch size {patch_size}')
  return h // patch_size, w // patch_size


def sincos_pos_embed_2d(width: int, grid: Tuple[int, int], cls_token: bool = True) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding (MAE's `get_2d_sincos_pos_embed`).

  Half of the channels encode the column index, half the row index; each half is
  [sin(pos * omega), cos(pos * omega)] with omega_d = 10000^(-d / (width / 4)).

  Args:
    width: embedding width; must be divisible by 4.
    grid: (rows, cols) of the patch grid.
    cls_token: prepend an all-zero row for the CLS position.

  Returns:
    float32 array (1, [1 +] rows * cols, width), rows in raster order.

  Raises:
    ValueError: if `width` is not divisible by 4.
  """
  if width % 4:
    raise ValueError(f'sin-cos position embedding needs width divisible by 4, got {width}')
  rows, cols = grid
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))

  def embed_1d(pos):
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid_w, grid_h = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
  # MAE concatenates the embedding of the column coordinate first, then the row coordinate.
  emb = np.concatenate([embed_1d(grid_w), embed_1d(grid_h)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, width]), emb], axis=0)
  return emb[None].astype(np.float32)


def patchify(images, patch_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, N, p * p * C) patches in raster order, each flattened as (row, column,
  channel): MAE's `patchify` order ('nchpwq->nhwpqc'), the order of `vit.Encoder`'s patches."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class Masking(NamedTuple):
  """Indices of one per-sample random masking (see `random_masking`)."""
  ids_keep: jax.Array     # int32 (B, K): visible patches, in noise order.
  ids_masked: jax.Array   # int32 (B, N - K): masked patches, in noise order.
  ids_restore: jax.Array  # int32 (B, N): inverse permutation of concat(ids_keep, ids_masked).
  mask: jax.Array         # float32 (B, N): 1 where masked, 0 where visible, raster order.


KEEP_ROUNDINGS = ('floor', 'round')


def random_masking(rng: jax.Array, batch: int, num_patches: int, mask_ratio: float,
                   keep_rounding: str = 'floor') -> Masking:
  """Per-sample random masking by argsort of uniform noise (MAE, He et al. 2022, Sec. 3).

  Exactly `int(num_patches * (1 - mask_ratio))` patches stay visible in every sample
  (`keep_rounding='floor'`: the release's and MAE's `len_keep`, Python float arithmetic
  included), or `round(...)` with 'round' (rils_jax before; the same at mask ratio 0.75 and
  196 or 64 patches, 20 instead of 19 at 0.9 and 196).

  Args:
    rng: PRNG key.
    batch: number of samples B.
    num_patches: patches per image N.
    mask_ratio: fraction of patches to mask, in (0, 1).

  Returns:
    A `Masking`; `take_along_axis(concat(visible, masked), ids_restore)` restores raster order.

  Raises:
    ValueError: if `mask_ratio` leaves no visible or no masked patch, or for another
      `keep_rounding`.
  """
  if keep_rounding not in KEEP_ROUNDINGS:
    raise ValueError(f"config.model.keep_rounding must be 'floor' or 'round', got "
                     f'{keep_rounding!r}')
  kept = num_patches * (1.0 - mask_ratio)
  num_keep = int(kept) if keep_rounding == 'floor' else int(round(kept))
  if not 1 <= num_keep < num_patches:
    raise ValueError(f'mask_ratio={mask_ratio} must keep between 1 and {num_patches - 1} of '
                     f'{num_patches} patches visible (got {num_keep})')
  noise = jax.random.uniform(rng, (batch, num_patches))
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  mask = jnp.ones((batch, num_patches), jnp.float32).at[:, :num_keep].set(0.0)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return Masking(ids_shuffle[:, :num_keep], ids_shuffle[:, num_keep:], ids_restore, mask)


class Attention(nn.Module):
  """Multi-head self-attention with BEiT-style bias: learned q and v biases, no k bias.

  Input/output: (B, T, width) in `dtype`. The qkv kernel is (width, 3, heads, head_dim), Xavier
  uniform over the flattened (width, 3 * width) matrix as in the release. `attention`: 'auto',
  'xla' or 'cudnn' (see `attention_implementation`).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    head_dim = width // self.num_heads
    qkv = nn.DenseGeneral(  # DenseGeneral inits the flat (W, 3W) kernel.
        (3, self.num_heads, head_dim), use_bias=False, dtype=self.dtype,
        kernel_init=logical(xavier_uniform, ('embed', None, 'heads', 'kv')), name='qkv')(x)
    qkv = constrain(qkv, ('batch', 'length', None, 'act_heads', None))
    q_bias = self.param('q_bias', logical(zeros, ('heads', 'kv')), (self.num_heads, head_dim))
    v_bias = self.param('v_bias', logical(zeros, ('heads', 'kv')), (self.num_heads, head_dim))
    q = qkv[:, :, 0] + q_bias.astype(self.dtype)
    k = qkv[:, :, 1]
    v = qkv[:, :, 2] + v_bias.astype(self.dtype)
    out = jax.nn.dot_product_attention(
        q, k, v, implementation=attention_implementation(self.attention, self.dtype, head_dim))
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype,
                           kernel_init=logical(xavier_uniform, ('heads', 'kv', 'embed')),
                           bias_init=logical(zeros, ('embed',)), name='proj')(out)


class Mlp(nn.Module):
  """Two-layer MLP with exact GELU: width -> mlp_ratio * width -> width."""
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = dense(int(width * self.mlp_ratio), ('embed', 'mlp'), self.dtype, 'fc1')(x)
    x = constrain(nn.gelu(x, approximate=False), ('batch', 'length', 'act_mlp'))
    return dense(width, ('mlp', 'embed'), self.dtype, 'fc2')(x)


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Stochastic depth per sample (Huang et al. 2016), as timm's `drop_path`, which BEiT, MAE
  and the RILS release's vision_transformer.py use on each residual branch: sample b's branch
  is zeroed with probability `rate`, else scaled by 1 / (1 - rate) (unchanged expectation).

  Args:
    x: (B, ...) branch output, any float dtype.
    rate: drop probability in [0, 1).
    rng: PRNG key.

  Returns:
    `x`'s shape and dtype.
  """
  keep = 1.0 - rate
  kept = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(kept, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


class Block(nn.Module):
  """Pre-norm transformer block (LayerNorm eps 1e-6): x + attn(ln(x)); x + mlp(ln(x)).

  `drop_path` > 0 with `deterministic=False` drops each residual branch per sample (see
  `drop_path`; needs a 'dropout' rng). Attributes rather than call arguments, so that
  `remat_block` needs no static arguments; at 0 (the default) the block is unchanged.
  `attention`: see `attention_implementation`.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  drop_path: float = 0.0
  deterministic: bool = True
  attention: str = 'auto'

  def _branch(self, y, rate):
    if self.drop_path == 0.0 or self.deterministic:
      return y
    return drop_path(y, self.drop_path if rate is None else rate, self.make_rng('dropout'))

  @nn.compact
  def __call__(self, x, drop_rate: Optional[jax.Array] = None):
    """(B, T, width) -> (B, T, width) in `dtype`. `drop_rate`: this block's drop-path rate
    in place of `drop_path`, which then only says whether to drop: a float32 scalar that
    `scan_blocks` feeds per layer (a traced value cannot be an attribute)."""
    x = constrain(x, TOKENS)
    x = x + self._branch(Attention(self.num_heads, self.dtype, self.attention, name='attn')(
        layer_norm(1e-6, self.dtype, 'norm1')(x)), drop_rate)
    x = x + self._branch(Mlp(self.mlp_ratio, self.dtype, name='mlp')(
        layer_norm(1e-6, self.dtype, 'norm2')(x)), drop_rate)
    return constrain(x, TOKENS)


class Encoder(nn.Module):
  """ViT encoder: patch_embed + sin-cos pos_embed + CLS, `depth` blocks, final LayerNorm.

  Attributes:
    patch_size: patch side in pixels.
    width, depth, num_heads, mlp_ratio: transformer size.
    dtype: compute dtype.
    remat: 'none', 'block' or 'full' (see `remat_block`).
    drop_path: stochastic-depth rate of the last block; block i drops at
      drop_path * i / (depth - 1) (timm / BEiT / MAE: `dpr = linspace(0, rate, depth)`). Used
      only with `deterministic=False` (fine-tuning); 0 (pre-training) leaves the blocks as they
      were. With `scan_layers` each layer's rate is a scanned input of the loop.
    attention: 'auto', 'xla' or 'cudnn' (see `attention_implementation`).
    scan_layers: the blocks as one `nn.scan` with stacked parameters `blocks` (see
      `scan_blocks`), instead of `blocks_0` ... `blocks_{depth-1}`.
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  remat: str = 'none'
  bias_init: str = 'release'  # The patch embedding's bias (see `release_bias`).
  drop_path: float = 0.0
  attention: str = 'auto'
  scan_layers: bool = False

  @nn.compact
  def __call__(self, images, ids_keep: Optional[jax.Array] = None, deterministic: bool = True):
    """Encodes images, optionally only the visible patches.

    Args:
      images: float (B, H, W, 3), normalised pixels.
      ids_keep: optional int32 (B, K) indices of the visible patches (see `random_masking`).
      deterministic: False applies drop path (training); needs a 'dropout' rng then.

    Returns:
      (B, 1 + T, width) in `dtype` after the final LayerNorm, CLS first; T = K if `ids_keep`
      is given, else all N patches in raster order.
    """
    grid = grid_size(images.shape[1:3], self.patch_size)
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding='VALID', dtype=self.dtype,
                kernel_init=logical(
                    nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1),
                    (None, None, None, 'embed')),
                bias_init=logical(release_bias(self.bias_init,
                                               images.shape[-1] * self.patch_size ** 2),
                                  ('embed',)),
                name='patch_embed')(images.astype(self.dtype))
    x = constrain(x.reshape(x.shape[0], -1, self.width), TOKENS)
    pos_embed = jnp.asarray(sincos_pos_embed_2d(self.width, grid), self.dtype)
    x = x + pos_embed[:, 1:]
    if ids_keep is not None:
      x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
    cls_token = self.param('cls_token', logical(nn.initializers.normal(0.02),
                                                (None, None, 'embed')), (1, 1, self.width))
    cls = jnp.broadcast_to(cls_token.astype(self.dtype) + pos_embed[:, :1],
                           (x.shape[0], 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)
    rates = np.linspace(0.0, self.drop_path, self.depth)  # Stochastic depth decay rule (timm).
    if self.scan_layers:
      # The per-layer rates enter the loop as a scanned input; without drop path, nothing.
      xs = (jnp.asarray(rates, jnp.float32),) if self.drop_path else ()
      x, _ = scan_blocks(Block, self.remat, self.depth)(
          self.num_heads, self.mlp_ratio, self.dtype, drop_path=self.drop_path,
          deterministic=deterministic, attention=self.attention, name='blocks')(x, *xs)
    else:
      block = remat_block(Block, self.remat)
      for i in range(self.depth):
        x = block(self.num_heads, self.mlp_ratio, self.dtype, drop_path=float(rates[i]),
                  deterministic=deterministic, attention=self.attention, name=f'blocks_{i}')(x)
    return layer_norm(1e-6, self.dtype, 'norm')(x)


class Decoder(nn.Module):
  """MAE-style decoder predicting an encoder-width feature for every patch (RILS release).

  decoder_embed (linear) -> fill masked positions with `mask_token` -> sin-cos pos embed ->
  `depth` blocks -> decoder_norm -> decoder_pred (linear back to the encoder width).
  `remat`, `attention`, `scan_layers` (stacked parameters `decoder_blocks`): as `Encoder`'s.
  """
  width: int
  depth: int
  num_heads: int
  out_width: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  remat: str = 'none'
  attention: str = 'auto'
  scan_layers: bool = False

  @nn.compact
  def __call__(self, x, ids_restore, grid: Tuple[int, int],
               ids_predict: Optional[jax.Array] = None):
    """Decodes visible-token features into per-patch predictions.

    Args:
      x: (B, 1 + K, encoder width) encoder output on visible tokens, CLS first.
      ids_restore: int32 (B, N) from `random_masking`.
      grid: patch grid (rows, cols), rows * cols = N.
      ids_predict: optional int32 (B, M) patch indices to predict; default all N.

    Returns:
      (B, N or M, out_width) in `dtype`.
    """
    x = dense(self.width, (None, 'embed'), self.dtype, 'decoder_embed')(x)
    batch, num_patches = ids_restore.shape
    mask_token = self.param('mask_token', logical(nn.initializers.normal(0.02),
                                                  (None, None, 'embed')), (1, 1, self.width))
    num_masked = num_patches + 1 - x.shape[1]
    mask_tokens = jnp.broadcast_to(mask_token.astype(self.dtype), (batch, num_masked, self.width))
    tokens = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
    tokens = jnp.take_along_axis(tokens, ids_restore[..., None], axis=1)
    x = jnp.concatenate([x[:, :1], tokens], axis=1)
    x = x + jnp.asarray(sincos_pos_embed_2d(self.width, grid), self.dtype)
    if self.scan_layers:
      x, _ = scan_blocks(Block, self.remat, self.depth)(
          self.num_heads, self.mlp_ratio, self.dtype, attention=self.attention,
          name='decoder_blocks')(x)
    else:
      block = remat_block(Block, self.remat)
      for i in range(self.depth):
        x = block(self.num_heads, self.mlp_ratio, self.dtype, attention=self.attention,
                  name=f'decoder_blocks_{i}')(x)
    x = x[:, 1:]
    if ids_predict is not None:
      # Norm and prediction head are per-token: only the patches the loss uses are computed.
      x = jnp.take_along_axis(x, ids_predict[..., None], axis=1)
    x = layer_norm(1e-6, self.dtype, 'decoder_norm')(x)
    return dense(self.out_width, ('embed', None), self.dtype, 'decoder_pred')(x)
