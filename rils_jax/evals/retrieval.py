"""Image<->text retrieval recall (Karpathy & Fei-Fei COCO / Flickr30k protocol), and the
`retrieval` evaluator kind (setting: `sources`, caption sources as in `config.input.sources`).

Image->text R@K counts an image as correct when any of its captions ranks in the top K; text->
image R@K counts a caption as correct when its image ranks in the top K. Every caption of the
evaluated images is a candidate (5 per image in COCO and Flickr). Chance levels are exact.
"""

import math
from typing import Dict, Sequence

import numpy as np

from rils_jax.evals import settings


def retrieval_recall(image_embeds: np.ndarray, text_embeds: np.ndarray,
                     text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
                     ) -> Dict[str, float]:
  """Image<->text recall at K with several captions per image.

  Args:
    image_embeds: float (n_images, D) L2-normalised.
    text_embeds: float (n_texts, D) L2-normalised.
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
    out[f'chance_i2t_r{k}'] = float(1.0 - np.mean(miss))
    out[f'chance_t2i_r{k}'] = min(1.0, k / n_images)
  return out


# The `retrieval` evaluator kind (rils_jax/evals/runner.py).
DEFAULTS = dict(sources=())
DATASETS = {'sources': 'captions'}


def check_settings(name: str, spec: settings.Spec) -> None:
  """Raises ValueError unless `sources` is a non-empty list."""
  settings.check(isinstance(spec['sources'], (list, tuple)) and len(spec['sources']) > 0, name,
                 'sources', 'a non-empty list of caption sources', spec['sources'])


def run(ev, spec: settings.Spec, params, embedder, cache) -> Dict[str, float]:
  """Recalls both ways (see `retrieval_recall`), images, captions and skipped_images."""
  del cache  # Caption sets are embedded once per evaluator.
  records = ev.data(spec['sources'])
  data = embedder.images(params, [r.image for r in records])
  kept = data['index']
  texts = [c for i in kept for c in records[i].captions]
  text_to_image = np.repeat(np.arange(len(kept)), [len(records[i].captions) for i in kept])
  out = retrieval_recall(data['embed'], embedder.texts(params, texts), text_to_image)
  return dict(out, skipped_images=len(records) - len(kept), images=len(kept),
              captions=len(texts))
