"""Losses against NumPy references on hand-built cases, the gradient switches, the logit
scale's gradient at the cap, the release's loss on N GPUs (a per-GPU simulation of SLIP's DDP
loop with the release's `RILSLoss`) and chunked reconstruction logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rils_jax import losses
from rils_jax.models import rils as rils_lib
from rils_jax.models import vit
from tests import tiny


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_clip_loss(img, txt, scale):
  logits = scale * img @ txt.T
  n = len(img)
  i2t = -np.mean([_log_softmax(logits)[i, i] for i in range(n)])
  t2i = -np.mean([_log_softmax(logits.T)[i, i] for i in range(n)])
  return 0.5 * (i2t + t2i)


def _np_recon(student, teacher, protos, weights, ts, tt):
  total, norm = 0.0, 0.0
  for b in range(student.shape[0]):
    for i in range(student.shape[1]):
      q = np.exp(_log_softmax(teacher[b, i] @ protos.T / tt))
      log_p = _log_softmax(student[b, i] @ protos.T / ts)
      total += weights[b, i] * np.sum(q * (np.log(q) - log_p))
      norm += weights[b, i]
  return total / (norm + 1e-6)


@pytest.fixture
def embeddings():
  rng = np.random.default_rng(0)
  b, m, d = 4, 5, 8
  img = _normalize(rng.normal(size=(b, d)))
  txt = _normalize(img + 0.9 * rng.normal(size=(b, d)))
  student = _normalize(rng.normal(size=(b, m, d)))
  teacher = _normalize(rng.normal(size=(b, m, d)))
  return img, txt, student, teacher


def test_clip_loss_matches_numpy(embeddings):
  img, txt, _, _ = embeddings
  loss, logits = losses.clip_loss(jnp.asarray(img), jnp.asarray(txt), 10.0)
  np.testing.assert_allclose(loss, _np_clip_loss(img, txt, 10.0), rtol=1e-5)
  np.testing.assert_allclose(logits, 10.0 * img @ txt.T, rtol=1e-5)


def test_clip_loss_of_perfect_alignment_is_small():
  eye = np.eye(4, dtype=np.float32)
  loss, _ = losses.clip_loss(eye, eye, 100.0)
  assert float(loss) < 1e-6


def test_reconstruction_loss_matches_numpy_masked_only(embeddings):
  _, txt, student, teacher = embeddings
  weights = np.zeros(student.shape[:2])
  weights[0, :3] = 1.0   # Only some patches of some samples count.
  weights[2, 1] = 1.0
  got = losses.rils_reconstruction_loss(student, teacher, txt, weights,
                                        student_temperature=0.1, teacher_temperature=0.04)
  want = _np_recon(student, teacher, txt, weights, 0.1, 0.04)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Patches with weight 0 do not matter: changing them leaves the loss unchanged.
  student2 = student.copy()
  student2[1] = _normalize(np.ones_like(student[1]))
  got2 = losses.rils_reconstruction_loss(student2, teacher, txt, weights,
                                         student_temperature=0.1, teacher_temperature=0.04)
  np.testing.assert_allclose(got2, got, rtol=1e-6)


def test_reconstruction_loss_is_zero_when_student_equals_teacher_at_same_temperature(embeddings):
  _, txt, student, _ = embeddings
  got = losses.rils_reconstruction_loss(student, student, txt, np.ones(student.shape[:2]),
                                        student_temperature=0.05, teacher_temperature=0.05)
  assert abs(float(got)) < 1e-6


def test_gate_and_total_match_numpy(embeddings):
  img, txt, student, teacher = embeddings
  cfg = tiny.tiny_config().loss
  outputs = dict(image_embed=img, text_embed=txt, logit_scale=jnp.log(20.0),
                 student=student, teacher=teacher)
  loss, metrics = losses.rils_loss(outputs, cfg)
  logits = 20.0 * img @ txt.T
  gate = (logits.argmax(1) == np.arange(4)).astype(float)
  assert 0 < gate.sum() < 4, 'fixture must have both gated and ungated samples'
  weights = np.repeat(gate[:, None], student.shape[1], axis=1)
  want_rec = _np_recon(student, teacher, txt, weights, 0.1, 0.04)
  want = _np_clip_loss(img, txt, 20.0) + 0.5 * want_rec
  np.testing.assert_allclose(metrics['recon_loss'], want_rec, rtol=1e-5)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics['gate_fraction'], gate.mean())
  np.testing.assert_allclose(metrics['clip_acc'], gate.mean())
  # With the gate off every sample counts.
  cfg.gate = False
  _, metrics = losses.rils_loss(outputs, cfg)
  np.testing.assert_allclose(
      metrics['recon_loss'],
      _np_recon(student, teacher, txt, np.ones(student.shape[:2]), 0.1, 0.04), rtol=1e-5)
  assert float(metrics['gate_fraction']) == 1.0


def _np_clip_scale_grad(img, txt, scale):
  """dL_clip / d ln(s) in float64: s * dL/ds, with dCE_b/ds = sum_j (p_bj - [j = b]) z_bj."""
  z = img @ txt.T
  n = len(img)
  grad = 0.0
  for sims in (z, z.T):
    p = np.exp(_log_softmax(scale * sims))
    grad += 0.5 * np.mean(np.sum((p - np.eye(n)) * sims, axis=1))
  return scale * grad


@pytest.mark.parametrize('offset', [-0.01, 0.0, 0.01])
def test_logit_scale_gradient_flows_below_at_and_above_the_cap(embeddings, offset):
  # The forward uses exp(logit_scale) unclamped (CLIP, SLIP); the step clamps the parameter.
  # A clipped forward (min(exp, 100)) had a zero gradient at float32(ln 100), whose exp is
  # 100.0000076, so a scale at the cap could never come down.
  img, txt, _, _ = embeddings
  cfg = tiny.tiny_config(**{'loss.kind': 'clip'}).loss
  log_scale = np.float32(np.log(100.0)) + np.float32(offset)

  def loss(log_scale):
    return losses.rils_loss(dict(image_embed=jnp.asarray(img, jnp.float32),
                                 text_embed=jnp.asarray(txt, jnp.float32),
                                 logit_scale=log_scale), cfg)

  (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.float32(log_scale))
  scale = float(np.exp(np.float64(log_scale)))
  np.testing.assert_allclose(metrics['logit_scale'], scale, rtol=1e-6)
  np.testing.assert_allclose(value, _np_clip_loss(img, txt, scale), rtol=1e-5)
  want = _np_clip_scale_grad(img, txt, scale)
  assert abs(want) > 1e-3
  np.testing.assert_allclose(grad, want, rtol=1e-4)


def test_unknown_kind_raises(embeddings):
  img, txt, _, _ = embeddings
  cfg = tiny.tiny_config(**{'loss.kind': 'simclr'}).loss
  with pytest.raises(ValueError, match='rils'):
    losses.rils_loss(dict(image_embed=img, text_embed=txt, logit_scale=0.0), cfg)


def _recon_grad_wrt_text(stop_gradient: bool):
  config = tiny.tiny_config(**{'loss.stop_gradient_prototypes': stop_gradient,
                               'loss.gate': False})
  model = rils_lib.build_model(config, eot_id=2)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  tokens = rng.integers(3, 64, size=(4, 8)).astype(np.int32)
  tokens[:, 5] = 2
  masking = vit.random_masking(jax.random.PRNGKey(0), 4, 16, 0.75)
  # Jitted: op-by-op dispatch of the init and the backward pass costs tens of seconds here.
  params = jax.jit(model.init)(jax.random.PRNGKey(1), images, tokens, masking)['params']

  def recon(params):
    out = model.apply({'params': params}, images, tokens, masking)
    return losses.rils_loss(out, config.loss)[1]['recon_loss']

  return jax.device_get(jax.jit(jax.grad(recon))(params))


def test_stop_gradient_switch_on_prototypes():
  on = _recon_grad_wrt_text(stop_gradient=True)
  off = _recon_grad_wrt_text(stop_gradient=False)
  norm = lambda tree: float(sum(np.abs(x).sum() for x in jax.tree.leaves(tree)))
  assert norm(on['text']) == 0.0 and norm(on['text_projection']) == 0.0
  assert norm(off['text']) > 0.0 and norm(off['text_projection']) > 0.0
  # The image tower learns from L_rec in both cases; the teacher path never carries gradient
  # to the logit scale.
  assert norm(on['decoder']) > 0.0 and norm(on['visual']) > 0.0
  assert norm(on['logit_scale']) == 0.0


def test_prototype_gradient_comes_from_the_student_side_only():
  # The release detaches the teacher logits t P^T as a whole (`.detach()` in `RILSLoss`), so
  # with gradients into the prototypes (stop_gradient_prototypes=false) only the student side
  # p = softmax(s P^T / tau_s) reaches P: dL/dP_j = sum_i w_i (p_ij - q_ij) s_i / (tau_s W),
  # W = sum_i w_i + 1e-6. Stated in float64 NumPy.
  rng = np.random.default_rng(3)
  b, m, d, tau_s, tau_t = 3, 4, 6, 0.1, 0.04
  student = _normalize(rng.normal(size=(b, m, d)))
  teacher = _normalize(rng.normal(size=(b, m, d)))
  protos = _normalize(rng.normal(size=(b, d)))
  weights = rng.integers(0, 2, size=(b, m)).astype(np.float64)
  weights[0, 0] = 1.0

  def loss(s, t, p):
    return losses.rils_reconstruction_loss(s, t, p, jnp.asarray(weights, jnp.float32),
                                           student_temperature=tau_s,
                                           teacher_temperature=tau_t)

  args = [jnp.asarray(x, jnp.float32) for x in (student, teacher, protos)]
  value, (g_student, g_teacher, g_protos) = jax.value_and_grad(loss, argnums=(0, 1, 2))(*args)
  np.testing.assert_allclose(value, _np_recon(student, teacher, protos, weights, tau_s, tau_t),
                             rtol=1e-5)
  q = np.exp(_log_softmax(teacher @ protos.T / tau_t))
  p = np.exp(_log_softmax(student @ protos.T / tau_s))
  total = weights.sum() + 1e-6
  want_protos = np.einsum('bm,bmc,bmd->cd', weights, p - q, student) / (tau_s * total)
  want_student = np.einsum('bm,bmc,cd->bmd', weights, p - q, protos) / (tau_s * total)
  np.testing.assert_allclose(g_protos, want_protos, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_student, want_student, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(g_teacher).max()) == 0.0


def _release_loss_on_gpus(outputs, gpus, weight=0.5, tau_s=0.1, tau_t=0.04):
  """The release's `RILSLoss` as `gpus` ranks of SLIP's DDP loop compute it, averaged as DDP
  averages their gradients. Rank r holds rows [r B / gpus, (r + 1) B / gpus);
  `all_gather_batch` returns the tensors themselves on one GPU and gathers without gradient on
  more."""
  image, text, student, teacher = (outputs[k] for k in ('image_embed', 'text_embed', 'student',
                                                        'teacher'))
  scale = jnp.exp(outputs['logit_scale'])
  gather = (lambda x: x) if gpus == 1 else jax.lax.stop_gradient
  image_all, text_all = gather(image), gather(text)
  total = 0.0
  for rows in np.split(np.arange(len(image)), gpus):
    logits_per_image = scale * image[rows] @ text_all.T
    logits_per_text = scale * text[rows] @ image_all.T
    clip = 0.5 * (-jax.nn.log_softmax(logits_per_image)[np.arange(len(rows)), rows].mean()
                  - jax.nn.log_softmax(logits_per_text)[np.arange(len(rows)), rows].mean())
    pred = jnp.argmax(logits_per_image, axis=-1)
    student_logits = student[rows] @ text_all.T / tau_s
    teacher_logits = jax.lax.stop_gradient(teacher[rows] @ text_all.T / tau_t)
    q = jax.nn.softmax(teacher_logits)
    kl = jnp.sum(-q * jax.nn.log_softmax(student_logits) + q * jax.nn.log_softmax(teacher_logits),
                 axis=-1)
    mask = jnp.ones(kl.shape) * (pred == rows)[:, None]
    total += clip + weight * jnp.sum(kl * mask) / (jnp.sum(mask) + 1e-6)
  return total / gpus


def test_release_gpus_reproduces_the_release_on_n_gpus():
  rng = np.random.default_rng(4)
  b, m, d = 8, 3, 6
  text = _normalize(rng.normal(size=(b, d)))
  image = text + 0.3 * rng.normal(size=(b, d))
  image[4:] = text[:4]  # Rows 4-7 retrieve another row's caption: gated counts (4, 0) on 2 GPUs.
  outputs = dict(image_embed=_normalize(image), text_embed=text,
                 student=_normalize(rng.normal(size=(b, m, d))),
                 teacher=_normalize(rng.normal(size=(b, m, d))), logit_scale=np.log(10.0))
  outputs = {k: jnp.asarray(v, jnp.float32) for k, v in outputs.items()}
  names = ('image_embed', 'text_embed', 'student', 'logit_scale')

  def grads(fn):
    def of(*args):
      return fn({**outputs, **dict(zip(names, args))})
    return jax.value_and_grad(of, argnums=tuple(range(len(names))))(
        *(outputs[k] for k in names))

  for gpus in (1, 2, 4):
    cfg = tiny.tiny_config(**{'loss.release_gpus': gpus}).loss
    got_value, got = grads(lambda o: losses.rils_loss(o, cfg)[0])
    want_value, want = grads(lambda o: _release_loss_on_gpus(o, gpus))
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
    for name, g, w in zip(names, got, want):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=f'{gpus} GPUs: {name}')
  # The global form (default) is the release on one GPU only with no prototype gradient;
  # on 2 GPUs with gated counts (4, 0) its L_rec differs from the release's.
  default = tiny.tiny_config().loss
  two = tiny.tiny_config(**{'loss.release_gpus': 2}).loss
  rec = lambda c: float(losses.rils_loss(outputs, c)[1]['recon_loss'])
  assert abs(rec(default) - 2 * rec(two)) < 1e-4 * rec(default)  # Half the ranks gated.
  with pytest.raises(ValueError, match='release_gpus=3 must divide the global batch 8'):
    losses.rils_loss(outputs, tiny.tiny_config(**{'loss.release_gpus': 3}).loss)


def _embeddings(batch, dim, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, batch, dim))
  return [jnp.asarray(v / np.linalg.norm(v, axis=1, keepdims=True), jnp.float32) for v in x]


def test_local_gradients_reproduce_the_release_per_device_loss():
  images, texts = _embeddings(8, 6, 0)
  scale, world = 10.0, 4

  def release(images, texts):
    # SLIP's CLIPLoss on `world` GPUs: local rows against all_gather'ed (gradient-free)
    # columns, labels offset by the rank; DDP averages the ranks' gradients.
    all_i, all_t = jax.lax.stop_gradient(images), jax.lax.stop_gradient(texts)
    total = 0.0
    for rank, rows in enumerate(np.split(np.arange(8), world)):
      labels = rows
      li = jax.nn.log_softmax(scale * images[rows] @ all_t.T, axis=1)
      lt = jax.nn.log_softmax(scale * texts[rows] @ all_i.T, axis=1)
      total += 0.5 * (-li[np.arange(len(rows)), labels].mean()
                      - lt[np.arange(len(rows)), labels].mean())
    return total / world

  def ours(local):
    return lambda i, t: losses.clip_loss(i, t, scale, local_gradients=local)[0]

  np.testing.assert_allclose(ours(True)(images, texts), release(images, texts), rtol=1e-6)
  np.testing.assert_allclose(ours(False)(images, texts), release(images, texts), rtol=1e-6)
  want = jax.grad(release, argnums=(0, 1))(images, texts)
  got = jax.grad(ours(True), argnums=(0, 1))(images, texts)
  exact = jax.grad(ours(False), argnums=(0, 1))(images, texts)
  for g, w, e in zip(got, want, exact):
    np.testing.assert_allclose(g, w, atol=1e-6)
    assert np.abs(np.asarray(e) - np.asarray(w)).max() > 1e-3  # The switch matters.


def test_chunked_reconstruction_loss_equals_unchunked():
  rng = np.random.default_rng(1)

  def unit(*shape):
    x = rng.normal(size=shape)
    return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), jnp.float32)

  student, teacher, protos = unit(4, 12, 8), unit(4, 12, 8), unit(4, 8)
  weights = jnp.asarray(rng.integers(0, 2, size=(4, 12)), jnp.float32)

  def loss(s, p, chunk):
    return losses.rils_reconstruction_loss(s, teacher, p, weights, student_temperature=0.1,
                                           teacher_temperature=0.04, chunk_size=chunk)

  base, base_grads = jax.value_and_grad(loss, argnums=(0, 1))(student, protos, 0)
  for chunk in (5, 4, 1):  # 5 pads 12 patches to 15.
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(student, protos, chunk)
    np.testing.assert_allclose(value, base, rtol=1e-6)
    for g, b in zip(grads, base_grads):
      # Chunks sum the KL terms in another order: float32 rounding, relative to the size.
      np.testing.assert_allclose(g, b, rtol=1e-5, atol=1e-6)
