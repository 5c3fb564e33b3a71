"""Jitted, mesh-sharded image and text embedding for the evaluations.

Each batch is padded to one size per evaluated set (the evaluation batch, or the set's size
rounded up to the device count when smaller), so each set compiles once; the batch is split over
the mesh's data-parallel axes and the parameters keep their training shardings. Every process
reads the whole set and passes the same batches, so multi-host runs agree on the results.
"""

import math
from typing import Dict, Sequence

import jax
import ml_collections
import numpy as np

from rils_jax import progress
from rils_jax import sharding
from rils_jax import tokenizer as tokenizer_lib
from rils_jax.data import pipeline
from rils_jax.data import transforms
from rils_jax.models import rils as rils_lib


class Embedder:
  """Image embeddings, frozen image features and text embeddings of a `RILS` model.

  - `embed`: (n, embed_dim) float32, L2-normalised joint-space image embedding (RILS forward
    pass step 4: mean of the patch tokens times `image_projection`).
  - `features`: (n, vision_width) float32, the GAP-pooled encoder output (mean of the N patch
    tokens after the final LayerNorm, before the projection): what linear probes, few-shot and
    k-NN read (MAE / BEiT "average pooling" features).
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

    def images(p, x):
      embed, tokens = model.apply({'params': p}, transforms.normalize(x, config.input),
                                  method=rils_lib.RILS.encode_image)
      return dict(embed=embed, features=tokens.mean(axis=1).astype(np.float32))

    self._images = jax.jit(images, in_shardings=(params, self._data), out_shardings=rep)
    self._texts = jax.jit(
        lambda p, t: model.apply({'params': p}, t, method=rils_lib.RILS.encode_text),
        in_shardings=(params, self._data), out_shardings=rep)

  def _run(self, fn, params, rows: np.ndarray, batch_size: int):
    n = rows.shape[0]
    padded = np.zeros((batch_size, *rows.shape[1:]), rows.dtype)
    padded[:n] = rows
    # Every process holds the whole batch; each device takes its rows from it.
    batch = jax.make_array_from_callback(padded.shape, self._data, lambda index: padded[index])
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[:n], fn(params, batch))

  def _fixed_size(self, n: int) -> int:
    # A small set is padded to a device multiple, not to a whole evaluation batch.
    return min(self.batch_size, math.ceil(n / self.mesh.size) * self.mesh.size)

  def images(self, params, images: Sequence) -> Dict[str, np.ndarray]:
    """Embeds a set of images.

    Args:
      params: the model parameters.
      images: a random-access sequence of images (path, bytes, uint8 array) or of
        `(image, label)` pairs (see `pipeline.eval_batches`).

    Returns:
      dict with `embed` float32 (n_kept, embed_dim), `features` float32 (n_kept, vision_width),
      `index` int64 (n_kept,) positions in `images` (bad images are skipped and logged), and
      `label` int64 (n_kept,) for labelled items.

    Raises:
      ValueError: when no image could be decoded.
    """
    out = {}
    size = self._fixed_size(len(images))
    batches = pipeline.eval_batches(images, self.config.model.image_size, size,
                                    self.config.input.num_workers)
    # A large set (ImageNet's 50,000 pictures) takes minutes: a line every 10 s says how far.
    counter = progress.Progress('Embedding images', len(images), end_line=False)
    try:
      for batch in batches:
        counter.update(len(batch['image']))  # Kept images: bad ones count nowhere.
        parts = self._run(self._images, params, batch.pop('image'), size)
        for key, value in {**parts, **batch}.items():
          out.setdefault(key, []).append(value)
    finally:
      if hasattr(batches, 'close'):  # Stops grain's workers now, not at interpreter exit.
        batches.close()
    if not out:
      raise ValueError('no evaluation image could be decoded')
    return {k: np.concatenate(v) for k, v in out.items()}

  def texts(self, params, texts: Sequence[str]) -> np.ndarray:
    """float32 (len(texts), embed_dim) L2-normalised text embeddings."""
    tokens = self.tokenizer.encode(texts, self.config.model.text.context_length)
    size = self._fixed_size(len(texts))
    counter = progress.Progress('Embedding texts', len(texts), end_line=False)
    out = []
    for i in range(0, len(texts), size):
      out.append(self._run(self._texts, params, tokens[i:i + size], size))
      counter.update(len(out[-1]))
    return np.concatenate(out)
