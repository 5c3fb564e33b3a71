"""Analytic model FLOPs of one RILS train step, from the config alone.

Counted: every matrix multiply (2 * m * n * k FLOPs), including attention's QK^T and AV, the
patch embedding, projections and the loss logits. Not counted: element-wise ops, softmax,
LayerNorm, the optimizer (all O(params) or O(activations), small next to the matmuls) — the
convention of PaLM's MFU (Chowdhery et al. 2022, App. B) and big_vision.

A train step costs 3x the forward FLOPs of what receives gradients (forward + backward w.r.t.
activations and weights) and 1x for what is stop-gradiented (the teacher's projection and its
patch-to-caption logits, a tower locked by `config.model.freeze`). These are *model* FLOPs, the
numerator of MFU. Every `config.loss.kind` runs its own parts: 'clip' the full image and the
text, 'flip' the visible patches and the text, 'rils' both image branches, the decoder and the
text, 'mae' the visible patches and the pixel decoder.

`hardware_flops` adds what the step executes on top of them (PaLM's "hardware FLOPs"):
GradCache's second forward pass of the per-example part when accumulating (Gao et al. 2021,
Sec. 3.2), and the recomputation of the rematerialisation policy in the backward pass.
"""

from typing import Dict, Tuple

import ml_collections

from rils_jax.models import rils as rils_lib
from rils_jax.models import vit


def transformer_forward_flops(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> int:
  """Forward FLOPs of `depth` pre-norm blocks on one sequence of `tokens` tokens.

  Per block: qkv 6 T W^2, out-projection 2 T W^2, MLP 4 r T W^2, attention 4 T^2 W.
  """
  per_block = (6 + 2 + 4 * mlp_ratio) * tokens * width ** 2 + 4 * tokens ** 2 * width
  return int(depth * per_block)


def attention_forward_flops(tokens: int, width: int, depth: int) -> int:
  """Forward FLOPs of the attention matmuls alone (QK^T and AV, 4 T^2 W per block): what the
  'block' and 'offload' remat policies recompute, since they keep only weight matmuls."""
  return int(depth * 4 * tokens ** 2 * width)


def _sizes(config: ml_collections.ConfigDict) -> Tuple[int, int, int]:
  """(patches N, visible K, masked N - K) of the config's kind, K as `vit.random_masking`'s
  (K = N for 'clip')."""
  m = config.model
  _, _, _, patch = rils_lib.vision_dims(m)
  rows, cols = vit.grid_size(m.image_size, patch)
  n = rows * cols
  kept = n * (1.0 - rils_lib.mask_ratio(config))
  keep = int(round(kept)) if m.get('keep_rounding', 'floor') == 'round' else int(kept)
  return n, keep, n - keep


def _blocks(config: ml_collections.ConfigDict) -> Dict[str, Tuple[int, int, int]]:
  """(tokens, width, depth) per sample of each transformer the step runs, by component name."""
  m, kind = config.model, config.loss.kind
  width, depth, _, _ = rils_lib.vision_dims(m)
  n, keep, _ = _sizes(config)
  out = {}
  if kind in ('clip', 'rils'):
    out['encoder_full'] = (n + 1, width, depth)
  if kind in ('flip', 'rils', 'mae'):
    out['encoder_masked'] = (keep + 1, width, depth)
  if kind in ('rils', 'mae'):
    decoder = rils_lib.decoder_config(config)
    out['decoder'] = (n + 1, decoder.width or width, decoder.depth)
  if kind != 'mae':
    out['text'] = (m.text.context_length, m.text.width, m.text.num_layers)
  return out


def hardware_flops(config: ml_collections.ConfigDict) -> Dict[str, int]:
  """FLOPs one train step executes beyond `train_step_flops` (its module docstring says why).

  Returns:
    dict with `grad_cache` (accumulation: one more forward pass of every per-example part, the
    no-gradient teacher projection included; 0 when `config.optim.accum_steps` is 1), `remat`
    (forward recomputation in the backward pass: the whole transformer blocks for 'full', their
    attention matmuls for 'block' and 'offload', 0 for 'none'), `model` (`train_step_flops`'s
    total) and `total` (the sum).
  """
  model = train_step_flops(config)
  batch = config.input.batch_size
  out = {'grad_cache': 0, 'remat': 0}
  if config.optim.get('accum_steps', 1) > 1:
    # Everything but the batch-coupled logits: the gradient parts (3x) once more at 1x, and the
    # stop-gradient teacher projection, which the re-run forward pass recomputes.
    per_example = [k for k in model if k not in ('total', 'clip_logits', 'student_logits',
                                                  'teacher_logits')]
    frozen = _TOWER_PARTS.get(config.model.get('freeze', ''), ())
    out['grad_cache'] = sum(model[k] // (1 if k == 'teacher_projection' or k in frozen else 3)
                            for k in per_example)
  remat = config.model.get('remat', 'none')
  # A locked tower has no backward pass, so nothing of it is recomputed.
  frozen = _TOWER_PARTS.get(config.model.get('freeze', ''), ())
  trained = [b for name, b in _blocks(config).items() if name not in frozen]
  if remat == 'full':
    out['remat'] = batch * sum(transformer_forward_flops(*b) for b in trained)
  elif remat in ('block', 'offload'):
    out['remat'] = batch * sum(attention_forward_flops(*b) for b in trained)
  out['model'] = model['total']
  out['total'] = out['model'] + out['grad_cache'] + out['remat']
  return out


# Components of each LiT-lockable tower (`config.model.freeze`).
_TOWER_PARTS = {'image': ('encoder_full', 'encoder_masked', 'decoder', 'image_projection'),
                'text': ('text', 'text_projection')}


def train_step_flops(config: ml_collections.ConfigDict) -> Dict[str, int]:
  """Model FLOPs of one train step at the global batch `config.input.batch_size`, per
  component.

  Returns:
    dict of component -> FLOPs (already multiplied by 3 or 1, see the module docstring) with
    `total`.
  """
  m, kind = config.model, config.loss.kind
  width, _, _, patch = rils_lib.vision_dims(m)
  n, keep, masked = _sizes(config)
  text, d, batch = m.text, m.embed_dim, config.input.batch_size
  patch_embed = 2 * n * patch * patch * 3 * width
  blocks = _blocks(config)

  fwd = {}  # Per sample, forward, with gradient.
  for name in ('encoder_full', 'encoder_masked'):
    if name in blocks:
      fwd[name] = patch_embed + transformer_forward_flops(*blocks[name])
  if 'decoder' in blocks:
    dec_width = blocks['decoder'][1]
    out_width = patch * patch * 3 if kind == 'mae' else width
    fwd['decoder'] = (2 * (keep + 1) * width * dec_width
                      + transformer_forward_flops(*blocks['decoder'])
                      + 2 * masked * dec_width * out_width)
  per_batch_fwd, no_grad = {}, {}
  if kind != 'mae':
    fwd['text'] = transformer_forward_flops(*blocks['text'])
    fwd['image_projection'] = 2 * width * d
    fwd['text_projection'] = 2 * text.width * d
    per_batch_fwd['clip_logits'] = 2 * batch * batch * d
  if kind == 'rils':
    fwd['image_projection'] += 2 * masked * width * d           # Student.
    no_grad['teacher_projection'] = 2 * masked * width * d * batch
    per_batch_fwd['student_logits'] = 2 * batch * masked * batch * d
    no_grad['teacher_logits'] = 2 * batch * masked * batch * d
  frozen = _TOWER_PARTS.get(config.model.get('freeze', ''), ())
  out = {k: (1 if k in frozen else 3) * v * batch for k, v in fwd.items()}
  out.update({k: 3 * v for k, v in per_batch_fwd.items()})
  out.update(no_grad)
  out['total'] = sum(out.values())
  return out


def matmul_flops(n: int) -> int:
  """FLOPs of an (n, n) x (n, n) matrix product."""
  return 2 * n ** 3


