"""Analytic model FLOPs of one RILS train step, from the config alone.

Counted: every matrix multiply (2 * m * n * k FLOPs), including attention's QK^T and AV, the
patch embedding, projections and the loss logits. Not counted: element-wise ops, softmax,
LayerNorm, the optimizer (all O(params) or O(activations), small next to the matmuls) — the
convention of PaLM's MFU (Chowdhery et al. 2022, App. B) and big_vision.

A train step costs 3x the forward FLOPs of what receives gradients (forward + backward w.r.t.
activations and weights) and 1x for what is stop-gradiented (the teacher's projection and its
patch-to-caption logits).
"""

from typing import Dict

import ml_collections

from rils_jax.models import rils as rils_lib
from rils_jax.models import vit


def transformer_forward_flops(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> int:
  """Forward FLOPs of `depth` pre-norm blocks on one sequence of `tokens` tokens.

  Per block: qkv 6 T W^2, out-projection 2 T W^2, MLP 4 r T W^2, attention 4 T^2 W.
  """
  per_block = (6 + 2 + 4 * mlp_ratio) * tokens * width ** 2 + 4 * tokens ** 2 * width
  return int(depth * per_block)


def train_step_flops(config: ml_collections.ConfigDict) -> Dict[str, int]:
  """FLOPs of one train step at the global batch `config.input.batch_size`, per component.

  Returns:
    dict of component -> FLOPs (already multiplied by 3 or 1, see the module docstring) with
    `total`.
  """
  m = config.model
  width, depth, _, patch = rils_lib.vision_dims(m)
  rows, cols = vit.grid_size(m.image_size, patch)
  n = rows * cols
  keep = int(round(n * (1 - m.mask_ratio)))
  masked = n - keep
  dec_width = m.decoder.width or width
  text, d, batch = m.text, m.embed_dim, config.input.batch_size
  patch_embed = 2 * n * patch * patch * 3 * width

  fwd = {  # Per sample, forward, with gradient.
      'encoder_full': patch_embed + transformer_forward_flops(n + 1, width, depth),
      'text': transformer_forward_flops(text.context_length, text.width, text.num_layers),
      'projections': 2 * width * d + 2 * text.width * d,
  }
  per_batch_fwd = {'clip_logits': 2 * batch * batch * d}
  no_grad = {}
  if config.loss.kind == 'rils':
    fwd['encoder_masked'] = patch_embed + transformer_forward_flops(keep + 1, width, depth)
    fwd['decoder'] = (2 * (keep + 1) * width * dec_width
                      + transformer_forward_flops(n + 1, dec_width, m.decoder.depth)
                      + 2 * masked * dec_width * width)
    fwd['projections'] += 2 * masked * width * d           # Student.
    no_grad['teacher_projection'] = 2 * masked * width * d * batch
    per_batch_fwd['student_logits'] = 2 * batch * masked * batch * d
    no_grad['teacher_logits'] = 2 * batch * masked * batch * d
  out = {k: 3 * v * batch for k, v in fwd.items()}
  out.update({k: 3 * v for k, v in per_batch_fwd.items()})
  out.update(no_grad)
  out['total'] = sum(out.values())
  return out


def matmul_flops(n: int) -> int:
  """FLOPs of an (n, n) x (n, n) matrix product."""
  return 2 * n ** 3


