"""PyTorch twin of rils_jax's RILS train step: the reference that benchmarks/cpu_vs_pytorch.py
times beside the JAX step.

Same model, loss and update as `rils_jax.train_step.make_train_step` with a RILS config
(../shared/docs/RILS_METHOD.md), built from the standard PyTorch parts:
- vision encoder: timm's `VisionTransformer` (pre-norm, LayerNorm eps 1e-6, exact GELU, MLP
  ratio 4) with `QVBiasAttention` (BEiT-style q and v biases, no k bias, as the release; timm's
  `qkv_bias=True` would add a k bias, 768 parameters per block) and fixed 2-D sin-cos positions
  (`rils_jax.models.vit.sincos_pos_embed_2d`, a buffer, not a parameter);
- decoder: MAE-style, timm `Block`s of the same kind, predicting only the masked patches;
- text tower: open_clip's `TextTransformer` (causal, QuickGELU, pooled at the first
  end-of-text token like rils_jax, `pool_type='eos'`), whose `text_projection` is RILS's;
- loss: `rils_loss` below, the arithmetic of `rils_jax.losses.rils_loss` with
  `release_gpus=0`, `local_gradients=False`, `chunk_size=0`;
- update: gradient norm, AdamW (SLIP's decay rule), skipped when the loss or the norm is not
  finite, logit scale clamped to [0, ln max_logit_scale].

Everything is float32. The learning rate is constant (rils_jax's schedule costs nothing either
way); inits follow rils_jax's where it is cheap (Xavier-uniform vision linears, N(0, 0.02)
tokens), so that the loss at init is in the same range, not equal.
"""

import functools
import math
from typing import Dict, NamedTuple, Tuple

import numpy as np
import open_clip.transformer as open_clip_transformer
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from rils_jax.models import rils as rils_lib
from rils_jax.models.vit import sincos_pos_embed_2d

LayerNorm6 = functools.partial(nn.LayerNorm, eps=1e-6)


class QVBiasAttention(Attention):
  """timm's `Attention` with BEiT-style bias: learned q and v biases, a zero k bias (the RILS
  release's `Attention`). Input / output (B, T, width) float32; attention by
  `F.scaled_dot_product_attention`, as timm's fused path."""

  def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, **kwargs):
    del qkv_bias  # Always q / v only.
    super().__init__(dim, num_heads=num_heads, qkv_bias=False, **kwargs)
    self.q_bias = nn.Parameter(torch.zeros(self.attn_dim))
    self.v_bias = nn.Parameter(torch.zeros(self.attn_dim))
    self.register_buffer('k_bias', torch.zeros(self.attn_dim), persistent=False)

  def forward(self, x, attn_mask=None, is_causal=False):
    batch, length, _ = x.shape
    bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
    qkv = F.linear(x, self.qkv.weight, bias).reshape(batch, length, 3, self.num_heads,
                                                     self.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    return self.proj(x.transpose(1, 2).reshape(batch, length, self.attn_dim))


class Masking(NamedTuple):
  """int64 indices of one per-sample random masking (as `rils_jax.models.vit.Masking`)."""
  ids_keep: torch.Tensor     # (B, K) visible patches.
  ids_masked: torch.Tensor   # (B, N - K) masked patches.
  ids_restore: torch.Tensor  # (B, N) inverse permutation of concat(ids_keep, ids_masked).


def random_masking(batch: int, num_patches: int, mask_ratio: float) -> Masking:
  """MAE's argsort-of-uniform-noise masking with int(N (1 - mask_ratio)) visible patches."""
  num_keep = int(num_patches * (1.0 - mask_ratio))
  ids_shuffle = torch.argsort(torch.rand(batch, num_patches), dim=1)
  ids_restore = torch.argsort(ids_shuffle, dim=1)
  return Masking(ids_shuffle[:, :num_keep], ids_shuffle[:, num_keep:], ids_restore)


def _gather_tokens(x, ids):
  """x (B, T, C) at token indices ids (B, K) -> (B, K, C)."""
  return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


class Decoder(nn.Module):
  """MAE-style decoder (rils_jax `vit.Decoder`): embed, fill masked positions with the mask
  token, sin-cos positions, `depth` blocks, norm and prediction of the requested patches."""

  def __init__(self, in_width: int, width: int, depth: int, heads: int, out_width: int,
               grid: Tuple[int, int], mlp_ratio: float = 4.0):
    super().__init__()
    self.decoder_embed = nn.Linear(in_width, width)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
    self.decoder_blocks = nn.ModuleList(
        Block(width, heads, mlp_ratio, norm_layer=LayerNorm6, attn_layer=QVBiasAttention)
        for _ in range(depth))
    self.decoder_norm = LayerNorm6(width)
    self.decoder_pred = nn.Linear(width, out_width)
    self.register_buffer('pos_embed', torch.from_numpy(sincos_pos_embed_2d(width, grid)),
                         persistent=False)

  def forward(self, x, ids_restore, ids_predict):
    """x (B, 1 + K, in_width) CLS first; ids_restore (B, N); ids_predict (B, M)
    -> (B, M, out_width)."""
    x = self.decoder_embed(x)
    batch, num_patches = ids_restore.shape
    mask_tokens = self.mask_token.expand(batch, num_patches + 1 - x.shape[1], -1)
    tokens = _gather_tokens(torch.cat([x[:, 1:], mask_tokens], dim=1), ids_restore)
    x = torch.cat([x[:, :1], tokens], dim=1) + self.pos_embed
    for block in self.decoder_blocks:
      x = block(x)
    x = _gather_tokens(x[:, 1:], ids_predict)
    return self.decoder_pred(self.decoder_norm(x))


class TorchRILS(nn.Module):
  """The RILS towers (rils_jax `models.rils.RILS`): `visual` (timm ViT), `decoder`, `text`
  (open_clip, holding `text_projection`), `image_projection`, `logit_scale`."""

  def __init__(self, *, image_size: int, patch_size: int, width: int, depth: int, heads: int,
               decoder_width: int, decoder_depth: int, decoder_heads: int, text_width: int,
               text_layers: int, text_heads: int, vocab_size: int, context_length: int,
               embed_dim: int, eot_id: int, mlp_ratio: float = 4.0):
    super().__init__()
    grid = (image_size // patch_size,) * 2
    self.visual = VisionTransformer(
        img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth,
        num_heads=heads, mlp_ratio=mlp_ratio, pos_embed='none', class_token=True,
        global_pool='', num_classes=0, norm_layer=LayerNorm6, attn_layer=QVBiasAttention)
    self.register_buffer('pos_embed', torch.from_numpy(sincos_pos_embed_2d(width, grid)),
                         persistent=False)
    self.decoder = Decoder(width, decoder_width, decoder_depth, decoder_heads, width, grid,
                           mlp_ratio)
    self.text = open_clip_transformer.TextTransformer(
        context_length=context_length, vocab_size=vocab_size, width=text_width,
        heads=text_heads, layers=text_layers, mlp_ratio=mlp_ratio, output_dim=embed_dim,
        pool_type='eos', eos_id=eot_id, act_layer=open_clip_transformer.QuickGELU)
    self.image_projection = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)
    self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    self._init_vision()

  def _init_vision(self):
    for module in list(self.visual.modules()) + list(self.decoder.modules()):
      if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
          nn.init.zeros_(module.bias)
    conv = self.visual.patch_embed.proj.weight
    nn.init.xavier_uniform_(conv.view(conv.shape[0], -1))
    nn.init.normal_(self.visual.cls_token, std=0.02)
    nn.init.normal_(self.decoder.mask_token, std=0.02)

  def encode_visual(self, images, ids_keep=None):
    """images (B, 3, H, W) -> (B, 1 + T, width) after the final LayerNorm, CLS first."""
    x = self.visual.patch_embed(images) + self.pos_embed[:, 1:]
    if ids_keep is not None:
      x = _gather_tokens(x, ids_keep)
    cls = (self.visual.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = self.visual.blocks(torch.cat([cls, x], dim=1))
    return self.visual.norm(x)

  def forward(self, images, tokens, masking: Masking) -> Dict[str, torch.Tensor]:
    """images float (B, 3, H, W), tokens int64 (B, L) -> the dict of rils_jax's
    `RILS.__call__` (float32 `image_embed`, `text_embed` (B, D), `logit_scale`, `student`,
    `teacher` (B, M, D), all L2-normalised but the scale)."""
    patch_tokens = self.encode_visual(images)[:, 1:]
    normalize = functools.partial(F.normalize, dim=-1, eps=1e-6)
    out = dict(image_embed=normalize(patch_tokens.mean(dim=1) @ self.image_projection),
               text_embed=normalize(self.text(tokens)), logit_scale=self.logit_scale)
    visible = self.encode_visual(images, masking.ids_keep)
    predicted = self.decoder(visible, masking.ids_restore, masking.ids_masked)
    teacher = _gather_tokens(patch_tokens, masking.ids_masked)
    out['student'] = normalize(predicted @ self.image_projection)
    out['teacher'] = normalize(teacher @ self.image_projection)
    return out


def build_model(config, eot_id: int) -> TorchRILS:
  """The `TorchRILS` of a rils_jax config (`config.model`, sizes as `rils.build_model`)."""
  m = config.model
  width, depth, heads, patch = rils_lib.vision_dims(m)
  return TorchRILS(
      image_size=m.image_size, patch_size=patch, width=width, depth=depth, heads=heads,
      decoder_width=m.decoder.width or width, decoder_depth=m.decoder.depth,
      decoder_heads=m.decoder.num_heads or heads, text_width=m.text.width,
      text_layers=m.text.num_layers, text_heads=m.text.num_heads,
      vocab_size=m.text.vocab_size, context_length=m.text.context_length,
      embed_dim=m.embed_dim, eot_id=eot_id)


def rils_loss(out: Dict[str, torch.Tensor], student_temperature: float,
              teacher_temperature: float, weight: float) -> Tuple[torch.Tensor, Dict]:
  """L = L_clip + weight * L_rec, as `rils_jax.losses.rils_loss` with the gate on and the
  prototypes (captions) stop-gradiented (the release, ../shared/docs/RILS_METHOD.md "Losses").

  Returns the scalar loss and float metrics `clip_loss`, `recon_loss`, `gate_fraction`.
  """
  image, text = out['image_embed'], out['text_embed']
  scale = out['logit_scale'].exp()
  logits = scale * image @ text.T
  labels = torch.arange(logits.shape[0])
  l_clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(scale * text @ image.T,
                                                                     labels))
  gate = (logits.detach().argmax(dim=1) == labels).float()
  prototypes = text.detach()
  log_q = F.log_softmax((out['teacher'] @ prototypes.T / teacher_temperature).detach(), dim=-1)
  log_p = F.log_softmax(out['student'] @ prototypes.T / student_temperature, dim=-1)
  kl = (log_q.exp() * (log_q - log_p)).sum(dim=-1)  # (B, M)
  weights = gate[:, None].expand_as(kl)
  l_rec = (weights * kl).sum() / (weights.sum() + 1e-6)
  loss = l_clip + weight * l_rec
  return loss, dict(clip_loss=l_clip.item(), recon_loss=l_rec.item(),
                    gate_fraction=gate.mean().item())


def make_optimizer(model: nn.Module, config, adamw: str = 'fused') -> torch.optim.Optimizer:
  """AdamW of `config.optim` (betas, eps, weight decay at lr `config.optim.lr`) with SLIP's
  decay rule: no decay for 1-D / 0-D parameters and biases. `adamw`: 'fused', 'foreach' or
  'loop' (PyTorch's three implementations)."""
  o = config.optim
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (no_decay if p.ndim < 2 or 'bias' in name else decay).append(p)
  kwargs = dict(fused=adamw == 'fused', foreach=adamw == 'foreach')
  return torch.optim.AdamW([dict(params=decay, weight_decay=o.weight_decay),
                            dict(params=no_decay, weight_decay=0.0)],
                           lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, **kwargs)


def make_train_step(model: TorchRILS, optimizer: torch.optim.Optimizer, config):
  """`step(images uint8 (B, H, W, 3), tokens int64 (B, L)) -> metrics`: one RILS update,
  normalisation (`config.input.mean` / `.std`) and masking (`config.model.mask_ratio`)
  included, as rils_jax's step."""
  mean = torch.tensor(config.input.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
  std = torch.tensor(config.input.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
  loss_config = config.loss
  max_log_scale = math.log(loss_config.max_logit_scale)
  params = [p for p in model.parameters() if p.requires_grad]
  num_patches = model.pos_embed.shape[1] - 1

  def step(images_u8, tokens):
    images = (images_u8.permute(0, 3, 1, 2).float() - mean) / std
    masking = random_masking(images.shape[0], num_patches, config.model.mask_ratio)
    optimizer.zero_grad(set_to_none=True)
    loss, metrics = rils_loss(model(images, tokens, masking),
                              loss_config.student_temperature,
                              loss_config.teacher_temperature, loss_config.weight)
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
    if finite:  # rils_jax keeps the previous state after a non-finite step.
      optimizer.step()
      with torch.no_grad():
        model.logit_scale.clamp_(0.0, max_log_scale)
    return dict(loss=loss.item(), grad_norm=grad_norm.item(), nonfinite=int(not finite),
                **metrics)

  return step


def parameter_counts(model: TorchRILS) -> Dict[str, int]:
  """Trainable parameters per tower, named as rils_jax's top-level parameter groups
  (`visual`, `decoder`, `text` without its projection, and the top-level rest)."""
  counts = dict(visual=0, decoder=0, text=0, top_level=0)
  for name, p in model.named_parameters():
    tower = name.split('.')[0]
    if name == 'text.text_projection' or tower not in counts:
      tower = 'top_level'
    counts[tower] += p.numel()
  counts['total'] = sum(counts.values())
  return counts


def as_torch_batch(batch: Dict[str, np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
  """rils_jax's host batch (uint8 `image` (B, H, W, 3), int32 `text` (B, L)) as torch
  tensors (uint8, int64)."""
  return torch.from_numpy(batch['image']), torch.from_numpy(batch['text'].astype(np.int64))
