"""RILS losses and its baselines' as pure functions of model outputs
(../shared/docs/RILS_METHOD.md "Losses").

- `clip_loss`: symmetric InfoNCE over the batch (Radford et al. 2021, CLIP).
- `sigmoid_loss`: pairwise sigmoid loss with a learnable bias (Zhai et al. 2023, SigLIP, eq. 1).
- `mae_loss`: mean squared error of predicted pixels of the masked patches, against per-patch
  normalised targets (He et al. 2022, MAE, Sec. 3 "Reconstruction target").
- `retrieval_gate`: 1 for samples whose top-1 image->text retrieval in the batch is their own
  caption (RILS official release: the reconstruction loss applies to correctly retrieved samples).
- `rils_reconstruction_loss`: KL(teacher || student) between patch-to-caption distributions,
  averaged over the weighted (masked and gated) patches (RILS paper Sec. 3, official release).
- `rils_loss`: L_clip + lambda * L_rec with the switches of `config.loss`, including
  `release_gpus`: the release's loss as N GPUs compute it (SLIP's DDP loop); and the loss of
  every other `config.loss.kind` (`KINDS`), with L_clip softmax or sigmoid
  (`config.loss.contrastive`).
- `check_config`: the rules of `config.loss`, checked before a run reads or compiles anything.

All inputs are expected L2-normalised; all arithmetic is float32.
"""

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

Metrics = Dict[str, jax.Array]

# 'rils': L_contrastive + lambda L_rec (RILS). Baselines: 'clip' L_contrastive on the full
# images; 'flip' L_contrastive on the visible patches only (Li et al. 2023, FLIP); 'mae' pixel
# reconstruction, no text (He et al. 2022).
KINDS = ('rils', 'clip', 'flip', 'mae')
CONTRASTIVE = ('softmax', 'sigmoid')  # CLIP's InfoNCE or SigLIP's pairwise sigmoid.


def check_config(loss_config: ml_collections.ConfigDict, batch_size: Optional[int] = None
                 ) -> None:
  """Checks `config.loss`: `kind` is one of `KINDS`, `contrastive` one of `CONTRASTIVE`,
  `chunk_size` and `contrastive_chunk_size` >= 0, `release_gpus` >= 0, 0 with 'sigmoid' (the
  release has no sigmoid loss) and, when `batch_size` is given, a divisor of it.

  Raises:
    ValueError: naming the setting.
  """
  if loss_config.kind not in KINDS:
    raise ValueError(f'config.loss.kind must be one of {", ".join(map(repr, KINDS))}, got '
                     f'{loss_config.kind!r}')
  contrastive = loss_config.get('contrastive', 'softmax')
  if contrastive not in CONTRASTIVE:
    raise ValueError(f"config.loss.contrastive must be 'softmax' or 'sigmoid', got "
                     f'{contrastive!r}')
  _check_chunk_size(loss_config.get('chunk_size', 0))
  _check_chunk_size(loss_config.get('contrastive_chunk_size', 0), 'contrastive_chunk_size')
  gpus = loss_config.get('release_gpus', 0)
  if gpus < 0:
    raise ValueError(f'config.loss.release_gpus={gpus} must be >= 0 (0: exact global losses)')
  if gpus and (contrastive == 'sigmoid' or loss_config.kind in ('flip', 'mae')):
    raise ValueError(f'config.loss.release_gpus={gpus} reproduces the RILS release\'s softmax '
                     f'losses; it has no {contrastive} / {loss_config.kind} form: set it to 0')
  if gpus and batch_size is not None and batch_size % gpus:
    raise ValueError(f'config.loss.release_gpus={gpus} must divide the global batch '
                     f'{batch_size}: each simulated GPU holds batch / release_gpus rows')


def _check_chunk_size(chunk_size: int, name: str = 'chunk_size') -> None:
  if chunk_size < 0:
    raise ValueError(f'config.loss.{name}={chunk_size} must be >= 0 (0: no chunks)')


def clip_loss(image_embed, text_embed, logit_scale,
              local_gradients: bool = False) -> Tuple[jax.Array, jax.Array]:
  """Symmetric contrastive loss L = 1/2 [CE(s I T^T, diag) + CE(s T I^T, diag)] (CLIP).

  The logits span the global batch (every device's rows), with exact gradients through both
  factors. `local_gradients=True` reproduces the official release on more than one GPU (SLIP's
  `CLIPLoss` with `all_gather_batch`, a gather without gradient): each device's loss is its
  own rows against the gathered columns, so the gradient of an embedding comes only from the
  rows it appears in, never from the columns. Here that is the same loss value with the
  columns stop-gradiented, independent of the device count.

  Args:
    image_embed: (B, D) L2-normalised image embeddings.
    text_embed: (B, D) L2-normalised text embeddings; row b is the caption of image b.
    logit_scale: scalar s = exp(logit_scale param), already exponentiated.
    local_gradients: see above.

  Returns:
    (loss, logits): scalar float32 loss and the (B, B) image->text logits s * I T^T.
  """
  image_embed = image_embed.astype(jnp.float32)
  text_embed = text_embed.astype(jnp.float32)
  columns = jax.lax.stop_gradient if local_gradients else (lambda x: x)
  logits = logit_scale * image_embed @ columns(text_embed).T
  logits_t2i = logit_scale * text_embed @ columns(image_embed).T
  labels = jnp.arange(logits.shape[0])[:, None]
  loss_i2t = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels, 1).mean()
  loss_t2i = -jnp.take_along_axis(jax.nn.log_softmax(logits_t2i, axis=1), labels, 1).mean()
  return 0.5 * (loss_i2t + loss_t2i), logits


def sigmoid_loss(image_embed, text_embed, logit_scale, logit_bias, chunk_size: int = 0
                 ) -> Tuple[jax.Array, jax.Array]:
  """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023, eq. 1):

  L = -(1/B) sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)),  z_ij = 1 if i == j else -1,

  every image-text pair an independent binary classification, over the global batch with exact
  gradients (the mesh shards the rows; no per-device approximation).

  Args:
    image_embed: (B, D) L2-normalised image embeddings x_i.
    text_embed: (B, D) L2-normalised text embeddings y_j; row b is the caption of image b.
    logit_scale: scalar t = exp(t'), already exponentiated (SigLIP init t' = ln 10).
    logit_bias: scalar b (SigLIP init -10).
    chunk_size: 0 forms the (B, B) logits at once; n > 0 forms them n image rows at a time
      (`lax.scan` with `jax.checkpoint`), so that forward and backward hold (n, B) at a time
      (the batch is zero-padded to whole chunks, padded rows masked out). Same value and
      gradients.

  Returns:
    (loss, logits): scalar float32 loss and the (B, B) image->text logits t x_i . y_j + b
    (formed whole for the metrics and the retrieval gate, without gradient when chunked).

  Raises:
    ValueError: for a negative `chunk_size`.
  """
  _check_chunk_size(chunk_size, 'contrastive_chunk_size')
  image_embed = image_embed.astype(jnp.float32)
  text_embed = text_embed.astype(jnp.float32)
  logit_scale = jnp.asarray(logit_scale, jnp.float32)
  logit_bias = jnp.asarray(logit_bias, jnp.float32)
  batch = image_embed.shape[0]

  def rows_loss(x, row_ids):  # (n, D), (n,) -> summed -log sigmoid over the n rows' pairs.
    logits = logit_scale * x @ text_embed.T + logit_bias
    signs = jnp.where(row_ids[:, None] == jnp.arange(batch)[None, :], 1.0, -1.0)
    valid = (row_ids < batch).astype(jnp.float32)[:, None]
    return -jnp.sum(valid * jax.nn.log_sigmoid(signs * logits))

  ids = jnp.arange(batch)
  if not chunk_size or chunk_size >= batch:
    total = rows_loss(image_embed, ids)
    logits = logit_scale * image_embed @ text_embed.T + logit_bias
  else:
    pad = -batch % chunk_size
    x = jnp.pad(image_embed, ((0, pad), (0, 0))).reshape(-1, chunk_size, image_embed.shape[1])
    row_ids = jnp.arange(batch + pad).reshape(-1, chunk_size)
    body = jax.checkpoint(rows_loss)
    total, _ = jax.lax.scan(lambda acc, xs: (acc + body(*xs), None), jnp.zeros(()),
                            (x, row_ids))
    logits = jax.lax.stop_gradient(logit_scale * image_embed @ text_embed.T + logit_bias)
  return total / batch, logits


def mae_loss(pred, target, norm_pix_loss: bool = True) -> jax.Array:
  """MAE's reconstruction loss on the masked patches (He et al. 2022, Sec. 3; official MAE
  `forward_loss`): with `norm_pix_loss` each target patch is normalised by its own mean and
  variance (torch's unbiased `var`, + 1e-6), then

  L = mean over masked patches of mean over the patch's values of (pred - target)^2.

  Args:
    pred: (B, M, P) predicted pixels of the M masked patches.
    target: (B, M, P) the same patches of the (normalised) input images (`vit.patchify`).
    norm_pix_loss: per-patch normalised targets (MAE's better setting, Table 1d).

  Returns:
    Scalar float32 loss.
  """
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return jnp.mean((pred - target) ** 2)


def retrieval_gate(logits) -> jax.Array:
  """g_b = 1 if argmax_j logits[b, j] == b else 0 (RILS release's correct-retrieval gate).

  Args:
    logits: (B, B) image->text similarities, caption b belongs to image b.

  Returns:
    float32 (B,) of 0/1.
  """
  return (jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0])).astype(jnp.float32)


def rils_reconstruction_loss(student, teacher, prototypes, weights, *, student_temperature: float,
                             teacher_temperature: float, chunk_size: int = 0,
                             groups: int = 1) -> jax.Array:
  """Masked reconstruction in language semantic space (RILS paper Sec. 3.2, official release).

  q_i = softmax(t_i P^T / teacher_temperature)  (stop-gradient as a whole, release)
  p_i = softmax(s_i P^T / student_temperature)
  L = sum_i w_i KL(q_i || p_i) / (sum_i w_i + 1e-6)

  With `groups` = G > 1 the B samples are split into G consecutive groups of B / G and
  L = mean_g [sum_{i in g} w_i KL_i / (sum_{i in g} w_i + 1e-6)]: the release on G GPUs, where
  each GPU normalises by its own weight count (a GPU with no weighted patch contributes 0) and
  DDP averages the GPUs' losses and gradients.

  Args:
    student: (B, M, D) L2-normalised student patch features (decoder output).
    teacher: (B, M, D) L2-normalised teacher patch features (full branch, same patches).
    prototypes: (C, D) L2-normalised caption embeddings (all captions of the global batch).
    weights: (B, M) per-patch weights w_i = m_i * g(b): 1 for masked patches of gated samples.
    student_temperature: tau_s (release: 0.1).
    teacher_temperature: tau_t (release: 0.04).
    chunk_size: 0 forms the (B, M, C) logits at once; n > 0 forms them n patches at a time
      (`lax.scan` with `jax.checkpoint`), so that forward and backward hold (B, n, C) at a
      time. The value and gradients are the same.
    groups: G >= 1 dividing B (see above); 1 is the global form.

  Returns:
    Scalar float32 loss. The teacher logits t_i P^T carry no gradient (neither into the
    teacher nor into the prototypes), as the release's `.detach()`; whether the student side
    sends gradient into the prototypes is the caller's choice (see `rils_loss`).

  Raises:
    ValueError: for a negative `chunk_size`, or `groups` that is not a divisor of B.
  """
  _check_chunk_size(chunk_size)
  batch = student.shape[0]
  if groups < 1 or batch % groups:
    raise ValueError(f'groups={groups} must be a positive divisor of the batch {batch}')
  prototypes = prototypes.astype(jnp.float32)
  teacher = teacher.astype(jnp.float32)
  student = student.astype(jnp.float32)
  weights = weights.astype(jnp.float32)

  def weighted_kl_per_sample(s, t, w):  # (B, m, D), (B, m, D), (B, m) -> (B,)
    log_q = jax.nn.log_softmax(jax.lax.stop_gradient(t @ prototypes.T / teacher_temperature),
                               axis=-1)
    log_p = jax.nn.log_softmax(s @ prototypes.T / student_temperature, axis=-1)
    return jnp.sum(w * jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1), axis=-1)

  num_patches = student.shape[1]
  if not chunk_size or chunk_size >= num_patches:
    per_sample = weighted_kl_per_sample(student, teacher, weights)
  else:
    # Zero-weight padding to whole chunks; chunks go first for the scan.
    pad = -num_patches % chunk_size

    def chunks(x):
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
      return jnp.swapaxes(x.reshape(x.shape[0], -1, chunk_size, *x.shape[2:]), 0, 1)

    body = jax.checkpoint(weighted_kl_per_sample)
    per_sample, _ = jax.lax.scan(lambda acc, xs: (acc + body(*xs), None),
                                 jnp.zeros((batch,), jnp.float32),
                                 (chunks(student), chunks(teacher), chunks(weights)))
  sums = per_sample.reshape(groups, -1).sum(axis=1)
  counts = weights.reshape(groups, -1).sum(axis=1)
  return jnp.mean(sums / (counts + 1e-6))


def rils_loss(outputs: Dict[str, jax.Array], loss_config: ml_collections.ConfigDict
              ) -> Tuple[jax.Array, Metrics]:
  """The loss of `loss_config.kind` and its metrics:

  - 'rils': L = L_con + weight * L_rec (RILS paper Sec. 3, official release);
  - 'clip' and 'flip': L = L_con (the model's image embedding is the full image's for 'clip',
    the visible patches' for 'flip');
  - 'mae': L = `mae_loss` of the predicted pixels (`norm_pix_loss`).

  L_con is `clip_loss` (`contrastive='softmax'`) or `sigmoid_loss` ('sigmoid', with the model's
  `logit_bias`).

  Args:
    outputs: the dict of `RILS.__call__` (`image_embed`, `text_embed`, `logit_scale`, with
      'sigmoid' `logit_bias`, for kind 'rils' `student`, `teacher` at the masked patches; for
      'mae' `pred` and `target`).
    loss_config: `config.loss` with `kind`, `contrastive`, `weight` (lambda),
      `student_temperature`, `teacher_temperature`, `gate` (bool: apply the retrieval gate),
      `stop_gradient_prototypes` (bool: captions as prototypes get no gradient from L_rec),
      `local_gradients` (bool, see `clip_loss`), `chunk_size` (see
      `rils_reconstruction_loss`), `contrastive_chunk_size` (see `sigmoid_loss`),
      `norm_pix_loss` (see `mae_loss`) and `release_gpus` (see below).

  The logit scale is s = exp(logit_scale), unclamped (CLIP, SLIP): the train step clamps the
  parameter to [0, ln max_logit_scale] after each update, so its gradient never vanishes.

  `release_gpus` = N > 0 computes the release's loss as SLIP's DDP loop does on N GPUs, each
  holding B / N consecutive rows: on one GPU SLIP's `all_gather_batch` returns the embeddings
  themselves (gradient through the logits' columns and into the prototypes); on N > 1 it
  gathers without gradient (as `local_gradients` and `stop_gradient_prototypes`, which it
  overrides), and each GPU normalises L_rec by its own weight count (`groups` of
  `rils_reconstruction_loss`). The value and every gradient equal the average of the N GPUs'
  losses, which is what DDP's gradient average optimises.

  The retrieval gate takes the image->text arg-max of the logits of either L_con (for the
  sigmoid, of t x.y + b: the same ranking as the cosine).

  Returns:
    (loss, metrics) with float32 scalars `loss`, `clip_loss` (L_con, softmax or sigmoid),
    `recon_loss` (L_rec, or MAE's pixel loss), `clip_acc` (image->text top-1 in batch),
    `gate_fraction` (fraction of samples whose reconstruction weight is non-zero) and
    `logit_scale` (s); terms a kind does not have are 0.

  Raises:
    ValueError: for a `loss_config` that `check_config` refuses.
  """
  check_config(loss_config)
  batch = outputs['pred' if loss_config.kind == 'mae' else 'image_embed'].shape[0]
  check_config(loss_config, batch)
  zero = jnp.zeros((), jnp.float32)
  if loss_config.kind == 'mae':
    l_rec = mae_loss(outputs['pred'], outputs['target'], loss_config.get('norm_pix_loss', True))
    return l_rec, dict(loss=l_rec, clip_loss=zero, recon_loss=l_rec, clip_acc=zero,
                       gate_fraction=zero, logit_scale=zero)
  gpus = loss_config.get('release_gpus', 0)
  if gpus:
    local_gradients = stop_gradient_prototypes = gpus > 1
  else:
    local_gradients = loss_config.get('local_gradients', False)
    stop_gradient_prototypes = loss_config.stop_gradient_prototypes
  scale = jnp.exp(jnp.asarray(outputs['logit_scale'], jnp.float32))
  if loss_config.get('contrastive', 'softmax') == 'sigmoid':
    l_clip, logits = sigmoid_loss(outputs['image_embed'], outputs['text_embed'], scale,
                                  outputs['logit_bias'],
                                  loss_config.get('contrastive_chunk_size', 0))
  else:
    l_clip, logits = clip_loss(outputs['image_embed'], outputs['text_embed'], scale,
                               local_gradients)
  correct = retrieval_gate(jax.lax.stop_gradient(logits))
  metrics = dict(clip_loss=l_clip, clip_acc=correct.mean(), logit_scale=scale)
  if loss_config.kind in ('clip', 'flip'):
    metrics.update(loss=l_clip, recon_loss=zero, gate_fraction=zero)
    return l_clip, metrics
  gate = correct if loss_config.gate else jnp.ones_like(correct)
  prototypes = outputs['text_embed']
  if stop_gradient_prototypes:
    prototypes = jax.lax.stop_gradient(prototypes)
  student = outputs['student']
  # Student/teacher hold only the masked patches, so m_i = 1 for every entry.
  weights = jnp.broadcast_to(gate[:, None], student.shape[:2])
  l_rec = rils_reconstruction_loss(
      student, outputs['teacher'], prototypes, weights,
      student_temperature=loss_config.student_temperature,
      teacher_temperature=loss_config.teacher_temperature,
      chunk_size=loss_config.get('chunk_size', 0), groups=max(gpus, 1))
  loss = l_clip + loss_config.weight * l_rec
  metrics.update(loss=loss, recon_loss=l_rec, gate_fraction=gate.mean())
  return loss, metrics
