"""grain input pipelines: the training stream of (image, caption) batches, and evaluation batches.

Training (`make_train_dataset`):
  records -> id -> this process's shard (`ShardByJaxProcess`) -> global shuffle, reshuffled every
  epoch -> repeat -> decode + RandomResizedCrop + one random caption, tokenised -> drop and count
  bad examples -> fixed-size batches -> optional multiprocessing workers.
Each batch is a dict of numpy arrays: `image` uint8 (b, S, S, 3), `text` int32 (b, L),
`example_id` int64 (b,) (index of the record in the concatenated sources) and `skipped` int64
(b,): how many undecodable or missing images were dropped just before each example. b is the
per-process batch.

All map functions are module-level classes so that grain's spawned workers can import them.
"""

from typing import Iterator, List, Optional, Sequence

import grain
import numpy as np
from absl import logging

from rils_jax import tokenizer as tokenizer_lib
from rils_jax.data import sources
from rils_jax.data import transforms


class Skipped:
  """Stands for an example that a transform could not produce (grain drops plain None before a
  filter could count it)."""

  def __init__(self, reason: str):
    self.reason = reason


class TrainTransform(grain.transforms.RandomMap):
  """(example_id, ImageCaptions) -> dict(image, text, example_id), or `Skipped`."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, image_size: int, context_length: int,
               crop_scale: Sequence[float]):
    self.tokenizer = tokenizer
    self.image_size = image_size
    self.context_length = context_length
    self.crop_scale = tuple(crop_scale)

  def random_map(self, element, rng: np.random.Generator):
    example_id, record = element
    try:
      img = transforms.load_image(record.image)
    except transforms.BadImageError as e:
      logging.warning('Skipping example %d: %s', example_id, e)
      return Skipped(str(e))
    image = transforms.random_resized_crop(img, self.image_size, rng, self.crop_scale)
    caption = record.captions[rng.integers(len(record.captions))]
    return dict(image=image, text=self.tokenizer.encode([caption], self.context_length)[0],
                example_id=np.int64(example_id))


class CountSkipped(grain.transforms.Filter):
  """Drops the `Skipped` left by a failed transform; stamps each kept example with the number of
  examples dropped since the previous kept one (`skipped`), so that the sum over all batches is
  the exact skip count of this worker, whatever the worker interleaving.

  Raises:
    RuntimeError: after `max_consecutive` skips in a row (a wrong image folder would otherwise
      make the stream spin forever without yielding a batch).
  """

  def __init__(self, max_consecutive: int = 1000):
    self._since_last = 0
    self.max_consecutive = max_consecutive

  def filter(self, element) -> bool:
    if isinstance(element, Skipped):
      self._since_last += 1
      if self._since_last >= self.max_consecutive:
        raise RuntimeError(
            f'{self._since_last} examples in a row had no readable image (last: '
            f'{element.reason}); check the image folders of config.input.sources')
      return False
    element['skipped'] = np.int64(self._since_last)
    self._since_last = 0
    return True


def make_train_dataset(records: List[sources.ImageCaptions], tokenizer: tokenizer_lib.Tokenizer,
                       *, image_size: int, context_length: int, batch_size: int, seed: int,
                       crop_scale: Sequence[float] = (0.5, 1.0), num_workers: int = 0,
                       shard_options: Optional[grain.sharding.ShardOptions] = None,
                       max_consecutive_skips: int = 1000) -> grain.IterDataset:
  """Infinite stream of per-process training batches (see the module docstring).

  Args:
    records: all image-caption records (every process passes the same list).
    tokenizer: sentencepiece tokenizer.
    image_size: output side in pixels.
    context_length: token row length L.
    batch_size: per-process batch b.
    seed: shuffling and augmentation seed; the same seed gives the same stream.
    crop_scale: RandomResizedCrop area range.
    num_workers: grain worker processes (0: decode in this process).
    shard_options: defaults to `ShardByJaxProcess(drop_remainder=True)`.
    max_consecutive_skips: see `CountSkipped`.

  Raises:
    ValueError: if this process's shard has fewer records than one batch.
  """
  shard = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
  # Ids are attached to the records themselves: the index grain passes to `map_with_index`
  # keeps counting across epochs.
  ds = grain.MapDataset.source(list(enumerate(records)))
  ds = ds[shard.shard_index::shard.shard_count]
  if len(ds) < batch_size:
    raise ValueError(f'{len(ds)} records in this process shard, fewer than one batch of '
                     f'{batch_size}')
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.random_map(TrainTransform(tokenizer, image_size, context_length, crop_scale), seed=seed)
  it = ds.to_iter_dataset().filter(CountSkipped(max_consecutive_skips))
  it = it.batch(batch_size, drop_remainder=True)
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


class EvalTransform(grain.transforms.Map):
  """(index, image path) -> dict(image uint8 (S, S, 3), index), or None for a bad image."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, element):
    index, path = element
    try:
      img = transforms.load_image(path)
    except transforms.BadImageError as e:
      logging.warning('Skipping evaluation image: %s', e)
      return None
    return dict(image=transforms.resize_center_crop(img, self.image_size), index=np.int64(index))


def eval_batches(paths: Sequence[str], image_size: int, batch_size: int, num_workers: int = 0
                 ) -> Iterator[dict]:
  """Batches of resized, centre-cropped images; only the last batch may be smaller.

  Each batch has `image` uint8 (b, S, S, 3) and `index` int64 (b,) into `paths`; bad images are
  left out (the indices say which were kept). With workers the order is interleaved.
  """
  ds = grain.MapDataset.source(list(enumerate(paths)))
  it = ds.map(EvalTransform(image_size)).to_iter_dataset().filter(_is_not_none)
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  # Batched after the workers: batches made inside each worker would be fragments of a batch
  # (its slice of the set), each padded to a whole batch by the caller.
  return iter(it.batch(batch_size, drop_remainder=False))


def _is_not_none(x) -> bool:
  return x is not None
