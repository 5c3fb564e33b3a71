"""End-of-training evaluations: zero-shot classification and image<->text retrieval.

- Zero-shot (CLIP, Radford et al. 2021, Sec. 3.1.4): each class's text embedding is the
  normalised mean of its prompt-template embeddings; an image is assigned the class of highest
  cosine similarity. Reports top-1 / top-5 and the chance level 1 / classes.
- Retrieval (Karpathy & Fei-Fei COCO / Flickr30k protocol): image->text R@K counts an image as
  correct when any of its captions ranks in the top K; text->image R@K counts a caption as
  correct when its image ranks in the top K. Chance levels are computed exactly.

Embedding runs through jitted functions whose batch is sharded over the mesh's data-parallel
axes and whose parameters keep the training shardings; batches are padded to one size per
evaluated set (the evaluation batch, or the set's size rounded up to the device count when
smaller), so each set compiles once. Every process reads the whole evaluation set and passes the
same batches (multi-host runs agree on the results).
"""

import dataclasses
import math
from typing import Dict, List, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from rils_jax import sharding
from rils_jax import tokenizer as tokenizer_lib
from rils_jax.data import pipeline
from rils_jax.data import sources
from rils_jax.data import transforms
from rils_jax.models import rils as rils_lib


class Embedder:
  """Jitted image and text embedding with a fixed, device-divisible batch size.

  `param_shardings` (a tree like the parameters) defaults to replicated parameters.
  """

  def __init__(self, model: rils_lib.RILS, config: ml_collections.ConfigDict, mesh,
               tokenizer: tokenizer_lib.Tokenizer, param_shardings=None):
    self.config = config
    self.mesh = mesh
    self.tokenizer = tokenizer
    self.batch_size = math.ceil(config.evals.batch_size / mesh.size) * mesh.size
    self._data = sharding.batch_sharding(mesh)
    params = sharding.replicated(mesh) if param_shardings is None else param_shardings
    rep = sharding.replicated(mesh)
    self._images = jax.jit(
        lambda p, x: model.apply({'params': p}, transforms.normalize(x, config.input),
                                 method=rils_lib.RILS.encode_image)[0],
        in_shardings=(params, self._data), out_shardings=rep)
    self._texts = jax.jit(
        lambda p, t: model.apply({'params': p}, t, method=rils_lib.RILS.encode_text),
        in_shardings=(params, self._data), out_shardings=rep)

  def _run(self, fn, params, rows: np.ndarray, batch_size: int) -> np.ndarray:
    n = rows.shape[0]
    padded = np.zeros((batch_size, *rows.shape[1:]), rows.dtype)
    padded[:n] = rows
    # Every process holds the whole batch; each device takes its rows from it.
    batch = jax.make_array_from_callback(padded.shape, self._data, lambda index: padded[index])
    return np.asarray(fn(params, batch).addressable_data(0))[:n]

  def _fixed_size(self, n: int) -> int:
    # A small set is padded to a device multiple, not to a whole evaluation batch.
    return min(self.batch_size, math.ceil(n / self.mesh.size) * self.mesh.size)

  def images(self, params, paths: Sequence[str]):
    """(embeddings float32 (n_kept, D), kept indices into `paths`); bad images are skipped."""
    embeds, kept = [], []
    size = self._fixed_size(len(paths))
    for batch in pipeline.eval_batches(paths, self.config.model.image_size, size,
                                       self.config.input.num_workers):
      embeds.append(self._run(self._images, params, batch['image'], size))
      kept.append(batch['index'])
    if not embeds:
      raise ValueError('no evaluation image could be decoded')
    return np.concatenate(embeds), np.concatenate(kept)

  def texts(self, params, texts: Sequence[str]) -> np.ndarray:
    """float32 (len(texts), D) L2-normalised text embeddings."""
    tokens = self.tokenizer.encode(texts, self.config.model.text.context_length)
    size = self._fixed_size(len(texts))
    return np.concatenate([self._run(self._texts, params, tokens[i:i + size], size)
                           for i in range(0, len(texts), size)])


def zeroshot_accuracy(image_embeds: np.ndarray, labels: np.ndarray,
                      class_embeds: np.ndarray) -> Dict[str, float]:
  """Top-1 / top-5 accuracy of nearest-class assignment by cosine similarity.

  Args:
    image_embeds: (n, D) L2-normalised.
    labels: int (n,) true class indices.
    class_embeds: (C, D) L2-normalised class embeddings.
  """
  ranks = np.argsort(-(image_embeds @ class_embeds.T), axis=1)
  labels = np.asarray(labels)
  k = min(5, class_embeds.shape[0])
  return dict(top1=float(np.mean(ranks[:, 0] == labels)),
              top5=float(np.mean(np.any(ranks[:, :k] == labels[:, None], axis=1))),
              chance_top1=1.0 / class_embeds.shape[0])


def class_embeddings(embedder: Embedder, params, class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
  """(C, D): normalised mean over templates of each class's prompt embeddings (CLIP)."""
  prompts = [t.format(name) for name in class_names for t in templates]
  embeds = embedder.texts(params, prompts).reshape(len(class_names), len(templates), -1).mean(1)
  return embeds / np.linalg.norm(embeds, axis=1, keepdims=True)


def retrieval_recall(image_embeds: np.ndarray, text_embeds: np.ndarray,
                     text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
                     ) -> Dict[str, float]:
  """Image<->text recall at K with several captions per image.

  Args:
    image_embeds: (n_images, D) L2-normalised.
    text_embeds: (n_texts, D) L2-normalised.
    text_to_image: int (n_texts,) index of each caption's image.
    ks: the K values.

  Returns:
    dict with `i2t_r{K}`, `t2i_r{K}` in [0, 1] and their exact chance levels `chance_i2t_r{K}`
    (uniformly random ranking) and `chance_t2i_r{K}`.
  """
  sim = image_embeds @ text_embeds.T
  text_to_image = np.asarray(text_to_image)
  n_images, n_texts = sim.shape
  out = {}
  # Rank of the best caption of each image, and of each caption's image.
  order_i2t = np.argsort(-sim, axis=1)
  owner = text_to_image[order_i2t]
  first_hit = np.argmax(owner == np.arange(n_images)[:, None], axis=1)
  order_t2i = np.argsort(-sim.T, axis=1)
  rank_t2i = np.argmax(order_t2i == text_to_image[:, None], axis=1)
  captions_per_image = np.bincount(text_to_image, minlength=n_images)
  for k in ks:
    out[f'i2t_r{k}'] = float(np.mean(first_hit < k))
    out[f't2i_r{k}'] = float(np.mean(rank_t2i < k))
    # P(no own caption in K random draws without replacement), averaged over images.
    miss = [math.comb(n_texts - c, k) / math.comb(n_texts, k) if k <= n_texts else 0.0
            for c in captions_per_image]
    out[f'chance_i2t_r{k}'] = round(float(1.0 - np.mean(miss)), 9)
    out[f'chance_t2i_r{k}'] = min(1.0, k / n_images)
  return out


@dataclasses.dataclass
class EvalData:
  """What the evaluations read, loaded before training so that a bad path fails early."""
  zeroshot_paths: List[str]
  zeroshot_labels: List[int]
  zeroshot_classes: List[str]
  templates: Sequence[str]
  retrieval_records: List[sources.ImageCaptions]


def load_eval_data(config: ml_collections.ConfigDict) -> EvalData:
  """Reads the file lists of the evaluations that `config.evals` names.

  Raises:
    FileNotFoundError / ValueError: from the readers, for a missing or empty dataset.
  """
  zs = config.evals.zeroshot
  paths, labels, classes = [], [], []
  if zs.root:
    paths, labels, classes = sources.read_image_folder(zs.root, zs.max_per_class or None)
  records = []
  if config.evals.retrieval.sources:
    records, _ = sources.read_sources(config.evals.retrieval.sources)
    if not records:
      raise ValueError('config.evals.retrieval.sources hold no image with a caption')
  return EvalData(paths, labels, [c.replace('_', ' ') for c in classes], tuple(zs.templates),
                  records)


def run_evals(data: EvalData, params, embedder: Embedder) -> Dict[str, float]:
  """Runs the loaded evaluations; returns flat `zeroshot/*` and `retrieval/*` metrics."""
  results = {}
  if data.zeroshot_paths:
    image_embeds, kept = embedder.images(params, data.zeroshot_paths)
    class_embeds = class_embeddings(embedder, params, data.zeroshot_classes, data.templates)
    acc = zeroshot_accuracy(image_embeds, np.asarray(data.zeroshot_labels)[kept], class_embeds)
    results.update({f'zeroshot/{k}': v for k, v in acc.items()})
    results['zeroshot/skipped_images'] = len(data.zeroshot_paths) - len(kept)
    logging.info('Zero-shot: %d images, %d classes: %s', len(kept),
                 len(data.zeroshot_classes), acc)
  if data.retrieval_records:
    records = data.retrieval_records
    image_embeds, kept = embedder.images(params, [r.image for r in records])
    texts = [c for i in kept for c in records[i].captions]
    text_to_image = np.repeat(np.arange(len(kept)), [len(records[i].captions) for i in kept])
    recall = retrieval_recall(image_embeds, embedder.texts(params, texts), text_to_image)
    results.update({f'retrieval/{k}': v for k, v in recall.items()})
    results['retrieval/skipped_images'] = len(records) - len(kept)
    logging.info('Retrieval on %d images / %d captions: %s', len(kept), len(texts), recall)
  return results
