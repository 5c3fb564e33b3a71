"""grain input pipelines: the training stream of (image, caption) batches, and evaluation batches.

Training (`make_train_dataset`):
  records -> id -> shuffle, reshuffled every epoch -> repeat -> decode + RandomResizedCrop +
  one random caption, tokenised (random state from the seed and the global position) -> this
  process's rows of each global batch (`ProcessRows`) -> drop and count bad examples ->
  fixed-size batches -> optional multiprocessing workers.
The global stream depends only on the seed: global batch k holds stream positions
[k * B, (k + 1) * B) and process p reads its block of rows of every global batch, so 1 process
x 8 devices and 2 processes x 4 devices train on the same batches, and the processes read
disjoint examples that together make up each epoch.
Each batch is a dict of numpy arrays: `image` uint8 (b, S, S, 3), `text` int32 (b, L),
`example_id` int64 (b,) (index of the record in the concatenated sources) and `skipped` int64
(b,): how many undecodable or missing images were dropped just before each example. b is the
per-process batch.

All map functions are module-level classes so that grain's spawned workers can import them.
"""

import signal
from typing import Iterator, List, Optional, Sequence, Tuple

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


class ProcessRows(grain.MapDataset):
  """The rows [start, start + local_batch) of every global batch of `parent`.

  Element j of this dataset is element (j // local_batch) * global_batch + start +
  j % local_batch of `parent` (an infinite, repeated stream).
  """

  def __init__(self, parent: grain.MapDataset, *, global_batch: int, start: int,
               local_batch: int):
    super().__init__(parent)
    if not 0 <= start <= global_batch - local_batch:
      raise ValueError(f'rows [{start}, {start + local_batch}) are outside a global batch of '
                       f'{global_batch}')
    self._global_batch, self._start, self._local_batch = global_batch, start, local_batch
    self._length = len(parent) // global_batch * local_batch

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, index: int) -> int:
    batch, row = divmod(index, self._local_batch)
    return batch * self._global_batch + self._start + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def __str__(self) -> str:
    return (f'ProcessRows(global_batch={self._global_batch}, start={self._start}, '
            f'local_batch={self._local_batch})')


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
                       rows: Optional[Tuple[int, int]] = None,
                       max_consecutive_skips: int = 1000) -> grain.IterDataset:
  """Infinite stream of this process's part of the training batches (see the module docstring).

  Args:
    records: all image-caption records (every process passes the same list).
    tokenizer: sentencepiece tokenizer.
    image_size: output side in pixels.
    context_length: token row length L.
    batch_size: global batch B.
    seed: shuffling and augmentation seed; the same seed gives the same global stream.
    crop_scale: RandomResizedCrop area range.
    num_workers: grain worker processes (0: decode in this process).
    rows: this process's rows [start, stop) of each global batch (see
      `train_step.process_rows`); default all of them (one process).
    max_consecutive_skips: see `CountSkipped`.

  Raises:
    ValueError: if there are fewer records than one global batch, or `rows` are out of range.
  """
  start, stop = rows or (0, batch_size)
  if len(records) < batch_size:
    raise ValueError(f'{len(records)} training records, fewer than one batch of {batch_size}')
  # Ids are attached to the records themselves: the index grain passes to `map_with_index`
  # keeps counting across epochs.
  ds = grain.MapDataset.source(list(enumerate(records)))
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.random_map(TrainTransform(tokenizer, image_size, context_length, crop_scale), seed=seed)
  ds = ProcessRows(ds, global_batch=batch_size, start=start, local_batch=stop - start)
  it = ds.to_iter_dataset().filter(CountSkipped(max_consecutive_skips))
  it = it.batch(stop - start, drop_remainder=True)
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                        worker_init_fn=ignore_sigterm)
  return it


def ignore_sigterm(worker_index: int, worker_count: int) -> None:
  """grain worker start-up: schedulers such as SLURM send SIGTERM to every process of a job; the
  workers must keep feeding the main process while it saves its checkpoint (it stops them)."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
