"""CLIP-style causal text transformer (Radford et al. 2021; RILS release text tower).

Token + learned position embedding, pre-norm blocks with QuickGELU and a causal mask, final
LayerNorm, the feature at the end-of-text token. Inits follow CLIP's `initialize_parameters`:
token embedding N(0, 0.02), positional embedding N(0, 0.01), attention in-projection
N(0, width^-0.5), out-projection and MLP output N(0, width^-0.5 * (2 * layers)^-0.5), MLP input
N(0, (2 * width)^-0.5); attention biases zero (PyTorch's `nn.MultiheadAttention`), MLP biases
at PyTorch's `nn.Linear` default U(+-fan_in^-0.5), which CLIP's init leaves as they are
(`bias_init='zeros'` zeroes them). LayerNorm eps 1e-5 (PyTorch default, as in CLIP). Logical axis names,
activation constraints and rematerialisation as in `rils_jax.models.vit`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rils_jax.models.vit import (TOKENS, attention_implementation, constrain, dense, layer_norm,
                                 logical, release_bias, remat_block, scan_blocks)

Dtype = Any


def quick_gelu(x):
  """x * sigmoid(1.702 x) (CLIP's QuickGELU)."""
  return x * jax.nn.sigmoid(1.702 * x)


class TextBlock(nn.Module):
  """Pre-norm causal block: x + attn(ln_1(x)); x + mlp(ln_2(x)). `attention`: see
  `vit.attention_implementation`."""
  num_heads: int
  num_layers: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  bias_init: str = 'release'  # The MLP biases (see `vit.release_bias`).
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'text width {width} is not divisible by heads {self.num_heads}')
    head_dim = width // self.num_heads
    attn_std = width ** -0.5
    proj_std = width ** -0.5 * (2 * self.num_layers) ** -0.5
    x = constrain(x, TOKENS)
    y = layer_norm(1e-5, self.dtype, 'ln_1')(x)
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype,
                          kernel_init=logical(nn.initializers.normal(attn_std),
                                              ('embed', None, 'heads', 'kv')),
                          bias_init=logical(nn.initializers.zeros, (None, 'heads', 'kv')),
                          name='qkv')(y)
    qkv = constrain(qkv, ('batch', 'length', None, 'act_heads', None))
    y = jax.nn.dot_product_attention(
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True,
        implementation=attention_implementation(self.attention, self.dtype, head_dim))
    y = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype,
                        kernel_init=logical(nn.initializers.normal(proj_std),
                                            ('heads', 'kv', 'embed')),
                        bias_init=logical(nn.initializers.zeros, ('embed',)), name='proj')(y)
    x = x + y
    y = layer_norm(1e-5, self.dtype, 'ln_2')(x)
    hidden = int(width * self.mlp_ratio)
    y = dense(hidden, ('embed', 'mlp'), self.dtype, 'fc1',
              kernel_init=nn.initializers.normal((2 * width) ** -0.5),
              bias_init=release_bias(self.bias_init, width))(y)
    y = constrain(quick_gelu(y), ('batch', 'length', 'act_mlp'))
    y = dense(width, ('mlp', 'embed'), self.dtype, 'fc2',
              kernel_init=nn.initializers.normal(proj_std),
              bias_init=release_bias(self.bias_init, hidden))(y)
    return constrain(x + y, TOKENS)


class TextTransformer(nn.Module):
  """Causal text encoder with end-of-text pooling.

  Attributes:
    vocab_size: embedding rows; must exceed every token id.
    context_length: maximum sequence length L.
    width, num_layers, num_heads: transformer size.
    eot_id: id of the end-of-text token whose feature is pooled.
    remat: 'none', 'block' or 'full' (see `vit.remat_block`).
    bias_init: 'release' or 'zeros' (see `vit.release_bias`).
    attention: 'auto', 'xla' or 'cudnn' (see `vit.attention_implementation`).
    scan_layers: the blocks as one `nn.scan` with stacked parameters `blocks` (see
      `vit.scan_blocks`), instead of `blocks_0` ... `blocks_{num_layers-1}`.
  """
  vocab_size: int
  context_length: int
  width: int
  num_layers: int
  num_heads: int
  eot_id: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  remat: str = 'none'
  bias_init: str = 'release'
  attention: str = 'auto'
  scan_layers: bool = False

  @nn.compact
  def __call__(self, tokens):
    """Encodes token ids.

    Args:
      tokens: int32 (B, L), L <= context_length; each row holds exactly one `eot_id` (padding
        after it is ignored thanks to the causal mask).

    Returns:
      (B, width) in `dtype`: the final-LayerNorm feature at the end-of-text position.
    """
    length = tokens.shape[1]
    x = nn.Embed(self.vocab_size, self.width,
                 embedding_init=logical(nn.initializers.normal(0.02), ('vocab', 'embed')),
                 dtype=self.dtype, name='token_embedding')(tokens)
    pos = self.param('positional_embedding',
                     logical(nn.initializers.normal(0.01), (None, 'embed')),
                     (self.context_length, self.width))
    x = x + pos[:length].astype(self.dtype)
    if self.scan_layers:
      x, _ = scan_blocks(TextBlock, self.remat, self.num_layers)(
          self.num_heads, self.num_layers, self.mlp_ratio, self.dtype, self.bias_init,
          self.attention, name='blocks')(x)
    else:
      block = remat_block(TextBlock, self.remat)
      for i in range(self.num_layers):
        x = block(self.num_heads, self.num_layers, self.mlp_ratio, self.dtype, self.bias_init,
                  self.attention, name=f'blocks_{i}')(x)
    x = layer_norm(1e-5, self.dtype, 'ln_final')(x)
    eot = jnp.argmax(tokens == self.eot_id, axis=-1)
    return jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
