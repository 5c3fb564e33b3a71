"""grain input pipelines: the training stream of (image, caption) batches, and evaluation batches.

From a config (big_vision's `input_pipeline.training` and `start_global` in one call):
`check_config` checks `config.input` before anything is read, `training_data` opens its
sources (generating the default data first when the config asks for it), and `training` turns
them into an iterator of global device batches for the train step.

Training (`make_train_dataset`):
  random-access sources (rils_jax/data/sources.py) -> id -> shuffle, reshuffled every epoch ->
  repeat (a weighted mixture: each source on its own, then `MapDataset.mix`) -> decode +
  RandomResizedCrop + one random caption, tokenised (random state from the seed and the global
  position) -> this process's rows of each global batch (`ProcessRows`) -> drop and count bad
  examples -> fixed-size batches -> optional multiprocessing workers; `prefetch_to_device`
  then keeps batches transferred ahead of the step.
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

import functools
import signal
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from rils_jax import sharding
from rils_jax import tokenizer as tokenizer_lib
from rils_jax.data import records
from rils_jax.data import sources
from rils_jax.data import synthetic
from rils_jax.data import transforms

SHARDINGS = ('global_batch', 'records')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks `config.input` and the keys of every source (files are opened later).

  Raises:
    ValueError: for no source, a malformed source entry or mixture weights, an unknown
      `input.sharding`, negative worker, read-thread, prefetch or text-trim counts, or skip
      limits out of range.
  """
  i = config.input
  if not i.sources:
    raise ValueError('config.input.sources is empty: name at least one source (kinds: '
                     f'{", ".join(sources.SOURCE_KINDS)})')
  if i.sharding not in SHARDINGS:
    raise ValueError(f"config.input.sharding must be 'global_batch' or 'records', got "
                     f'{i.sharding!r}')
  counts = (i.prefetch_to_device, i.num_workers, i.read_threads, i.get('text_trim', 0))
  if min(counts) < 0:
    raise ValueError('config.input.prefetch_to_device, num_workers, read_threads and text_trim '
                     'must be >= 0, got {}, {}, {} and {}'.format(*counts))
  if i.max_consecutive_skips < 1:
    raise ValueError(f'config.input.max_consecutive_skips={i.max_consecutive_skips} must be '
                     '>= 1')
  if not 0 <= i.max_skip_fraction <= 1:
    raise ValueError(f'config.input.max_skip_fraction={i.max_skip_fraction} must be in [0, 1]')
  for spec in i.sources:
    sources.check_spec(spec)
  sources.mixture_weights(i.sources)


def training_data(config: ml_collections.ConfigDict) -> records.ConcatSource:
  """The training sources of `config.input.sources`, opened (their `parts` in order); the
  generated default data is written first when `config.synthetic` asks for it.

  Raises:
    ValueError: when the sources hold no image with a non-empty caption; each reader's errors
      otherwise (FileNotFoundError for missing files).
  """
  if config.get('synthetic'):
    s = config.synthetic
    synthetic.generate(s.root, image_size=s.image_size, num_train=s.num_train, seed=s.seed,
                       num_heldout=s.num_heldout, zeroshot_per_class=s.zeroshot_per_class)
  data = sources.open_sources(config.input.sources)
  logging.info('Training data: %s: %s%s', ' + '.join(repr(p) for p in data.parts), data.stats,
               '' if data.counts_captions else ' (captions not counted in shard formats)')
  if not len(data):
    raise ValueError(f'config.input.sources hold no image with a non-empty caption '
                     f'({data.stats})')
  return data


def training(config: ml_collections.ConfigDict, data: records.ConcatSource,
             tokenizer: tokenizer_lib.Tokenizer, mesh: Mesh,
             resume_step: Optional[int] = None) -> grain.DatasetIterator:
  """Global device batches for the train step, from `config.input` and the model's input size.

  Each element is a dict of `image` uint8 (B, S, S, 3), `text` int32 (B, L) and `skipped`
  int32 (B,) as global arrays sharded over the data-parallel axes of `mesh`, and `example_id`
  int64 (b,), this process's rows, on the host. The iterator is grain's: its position is what
  a checkpoint saves (`get_state` / `set_state`).

  Args:
    config: reads `seed`, `model.image_size`, `model.text.context_length` and `config.input`
      (batch_size, sharding, crop_scale, num_workers, read_threads, sources' weights,
      max_consecutive_skips, draft_decoding, prefetch_to_device, resume_position).
    data: `training_data(config)`.
    tokenizer: the run's tokenizer.
    mesh: the device mesh (this process's rows of each global batch follow from it).
    resume_step: the checkpoint's step when resuming. With `input.resume_position` the
      checkpoint then restores the position into this iterator; without it the stream is drawn
      from seed + resume_step, so that the resumed run does not repeat the first examples.

  Raises:
    ValueError: see `make_train_dataset`.
  """
  i = config.input
  by_records = i.sharding == 'records'
  reseed = resume_step is not None and not i.resume_position
  dataset = make_train_dataset(
      data.parts, tokenizer, image_size=config.model.image_size,
      context_length=config.model.text.context_length, batch_size=i.batch_size,
      seed=config.seed + resume_step if reseed else config.seed,
      crop_scale=i.crop_scale, num_workers=i.num_workers, read_threads=i.read_threads,
      rows=None if by_records else sharding.process_rows(mesh, i.batch_size),
      shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True) if by_records else None,
      weights=sources.mixture_weights(i.sources),
      max_consecutive_skips=i.max_consecutive_skips, draft=i.draft_decoding)
  put = functools.partial(sharding.put_batch, mesh=mesh)
  multiple = text_trim_multiple(config)
  if multiple:
    put = TrimmedPut(put, tokenizer.eot_id, multiple)
  return iter(prefetch_to_device(dataset, put, i.prefetch_to_device))


def text_trim_multiple(config: ml_collections.ConfigDict) -> int:
  """`config.input.text_trim` where it applies (see `trim_text`), else 0: a multi-process run
  keeps the whole context, because every process must hand the same global shape to the step
  and each sees only its own rows; a multiple of at least the context would never cut, and
  MAE's step reads no text (a cut would only compile it again)."""
  # .get: the configs saved by earlier versions have no such key.
  multiple = config.input.get('text_trim', 0)
  if (jax.process_count() > 1 or multiple >= config.model.text.context_length
      or config.loss.kind == 'mae'):  # Nothing could be cut; MAE reads no text.
    return 0
  return multiple


def trim_text(text: np.ndarray, eot_id: int, multiple: int) -> np.ndarray:
  """The batch's token rows cut after its last end-of-text token, the length rounded up to a
  multiple of `multiple` (at most the full width).

  Exact up to float rounding (another compiled program): the text tower is causal and pools
  each row's first end-of-text position, so the tokens after the batch's last one change
  neither a caption embedding nor any gradient (theirs are zero); cutting them removes their
  work. The step compiles once per length that occurs (at most L / multiple + 1, and as many
  again for FLIP's unmasked step).

  Args:
    text: int (B, L) token ids, each row with its end-of-text token (`tokenizer.encode`).
    eot_id: the end-of-text id.
    multiple: the lengths' granularity; 0 returns `text` as it is.

  Returns:
    int (B, L') with L' <= L: `text[:, :L']`.
  """
  if not multiple:
    return text
  last = int(np.max(np.argmax(text == eot_id, axis=1))) + 1
  return text[:, :min(text.shape[1], -(-last // multiple) * multiple)]


class TrimmedPut:
  """`put` of batches whose text `trim_text` has cut; logs each new length once, since the
  step compiles again for it (a step that takes longer than its neighbours)."""

  def __init__(self, put: Callable[[dict], dict], eot_id: int, multiple: int):
    self.put, self.eot_id, self.multiple = put, eot_id, multiple
    self.lengths = set()

  def __call__(self, batch: dict) -> dict:
    text = trim_text(batch['text'], self.eot_id, self.multiple)
    if text.shape[1] not in self.lengths:
      self.lengths.add(text.shape[1])
      logging.info('Captions cut after the last end-of-text token: %d of %d tokens '
                   '(config.input.text_trim); the train step compiles once for each such length.',
                   text.shape[1], batch['text'].shape[1])
    return self.put({**batch, 'text': text})


class Skipped:
  """Stands for an example that a transform could not produce (grain drops plain None before a
  filter could count it)."""

  def __init__(self, reason: str):
    self.reason = reason


class TrainTransform(grain.transforms.RandomMap):
  """(example_id, ImageCaptions) -> dict(image, text, example_id), or `Skipped`."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, image_size: int, context_length: int,
               crop_scale: Sequence[float], draft: bool = True):
    self.tokenizer = tokenizer
    self.image_size = image_size
    self.context_length = context_length
    self.crop_scale = tuple(crop_scale)
    self.draft = draft
    self.warn_skip = transforms.SkipWarnings()

  def random_map(self, element, rng: np.random.Generator):
    example_id, record = element
    if isinstance(record, records.BadRecord):
      self.warn_skip(f'example {example_id}', record.reason)
      return Skipped(record.reason)
    captions = records.clean_captions(record.captions)
    if not captions:  # Only shard formats get here: the csv/coco readers drop such images.
      return Skipped(f'{record.name}: no non-empty caption')
    try:
      image = transforms.decode_crop(record.image, self.image_size, rng, self.crop_scale,
                                     name=record.name, draft=self.draft)
    except transforms.BadImageError as e:
      self.warn_skip(f'example {example_id}', e)
      return Skipped(str(e))
    caption = captions[rng.integers(len(captions))]
    return dict(image=image, text=self.tokenizer.encode([caption], self.context_length)[0],
                example_id=np.int64(example_id))


class AttachId(grain.transforms.MapWithIndex):
  """record -> (offset + index, record): the example id is the record's position in the
  concatenation of all sources, whatever shuffling, sharding or mixing follows."""

  def __init__(self, offset: int, length: int):
    self.offset, self.length = offset, length

  def map_with_index(self, index: int, element):
    # grain passes epoch * length + position once the dataset is repeated.
    return self.offset + index % self.length, element


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
            f'{self._since_last} examples in a row had no readable image or caption (last: '
            f'{element.reason}); check config.input.sources')
      return False
    element['skipped'] = np.int64(self._since_last)
    self._since_last = 0
    return True


def as_sources(data) -> List[records.RecordSource]:
  """A source, a list of sources, or a list of `ImageCaptions` -> a list of sources."""
  if isinstance(data, records.RecordSource):
    return [data]
  data = list(data)
  if all(isinstance(d, records.ImageCaptions) for d in data):
    return [records.ListSource(data)]
  return data


def make_train_dataset(data, tokenizer: tokenizer_lib.Tokenizer, *, image_size: int,
                       context_length: int, batch_size: int, seed: int,
                       crop_scale: Sequence[float] = (0.5, 1.0), num_workers: int = 0,
                       read_threads: int = 16, rows: Optional[Tuple[int, int]] = None,
                       shard_options: Optional[grain.sharding.ShardOptions] = None,
                       weights: Optional[Sequence[float]] = None,
                       max_consecutive_skips: int = 1000, draft: bool = True
                       ) -> grain.IterDataset:
  """Infinite stream of this process's part of the training batches (see the module docstring).

  Args:
    data: the training sources (`records.RecordSource`s, or one list of `ImageCaptions`); every
      process passes the same ones. Without `weights` they are concatenated into one epoch.
    tokenizer: sentencepiece tokenizer.
    image_size: output side in pixels.
    context_length: token row length L.
    batch_size: global batch B, a multiple of the process count (a config's batch is checked by
      `train_step.check_batch`).
    seed: shuffling and augmentation seed; the same seed gives the same global stream.
    crop_scale: RandomResizedCrop area range.
    num_workers: grain worker processes (0: decode in this process).
    read_threads: grain's read threads (`grain.ReadOptions.num_threads`) in each worker, or in
      this process without workers; 0 reads and decodes in the iterating thread.
    rows: this process's rows [start, stop) of each global batch (see
      `sharding.process_rows`); default all of them (one process).
    shard_options: instead of `rows`, grain's per-record sharding
      (`grain.sharding.ShardByJaxProcess()`): process p of P reads records p, p + P, ... of
      each source, shuffled with the same seed, in batches of B / P. Disjoint and complete
      like `rows`, but the batches then depend on the process count.
    weights: mixture weights, one per source: each source is shuffled (seed + its index) and
      repeated on its own, and `grain.MapDataset.mix` interleaves them in these proportions
      (exactly, by a fixed pattern). Ids stay positions in the concatenation.
    max_consecutive_skips: see `CountSkipped`.
    draft: reduced-size JPEG decoding where equivalent (see `transforms.decode_crop`).

  Raises:
    ValueError: if the sources hold fewer records than one batch, a source fewer than one per
      process, `rows` are out of range, `rows` and `shard_options` are both given, or the
      weights do not fit the sources.
  """
  parts = as_sources(data)
  if rows is not None and shard_options is not None:
    raise ValueError('give rows or shard_options, not both')
  shard_index, shard_count = ((shard_options.shard_index, shard_options.shard_count)
                              if shard_options else (0, 1))
  start, stop = rows or (0, batch_size // shard_count)
  if weights is not None:
    if len(weights) != len(parts):
      raise ValueError(f'{len(weights)} mixture weights for {len(parts)} sources: give one per '
                       'source')
    weights = sources.check_weights(weights)
  for part in parts:
    # Checked on every process alike: a process left with an empty shard must not be the only
    # one to stop.
    _check_size(len(part), shard_count, part.name, 'one per process:')
  offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()

  def prepare(part: records.RecordSource, offset: int) -> grain.MapDataset:
    ds = grain.MapDataset.source(part).map_with_index(AttachId(offset, len(part)))
    return ds[shard_index::shard_count] if shard_count > 1 else ds

  if weights is None:
    concat = records.ConcatSource(parts)
    _check_size(len(concat), batch_size, 'the sources', advice=(
        f'; set --config.input.batch_size to {len(concat)} or less (README, "Your own data")'))
    ds = prepare(concat, 0).shuffle(seed=seed).repeat(None)
  else:
    ds = grain.MapDataset.mix([prepare(part, offset).shuffle(seed=seed + i).repeat(None)
                               for i, (part, offset) in enumerate(zip(parts, offsets))],
                              weights)
  ds = ds.random_map(TrainTransform(tokenizer, image_size, context_length, crop_scale, draft),
                     seed=seed)
  if shard_count == 1:
    ds = ProcessRows(ds, global_batch=batch_size, start=start, local_batch=stop - start)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads))
  it = it.filter(CountSkipped(max_consecutive_skips))
  it = it.batch(stop - start, drop_remainder=True)
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                        worker_init_fn=ignore_sigterm)
  return it


def _check_size(size: int, needed: int, what: str, unit: str = 'one batch of',
                advice: str = '') -> None:
  if size < needed:
    raise ValueError(f'{size} training records in {what}, fewer than {unit} {needed}{advice}')


class PutOnDevice(grain.transforms.Map):
  """Host batch -> `put(batch)` (global device arrays), with `example_id` kept on the host."""

  def __init__(self, put: Callable[[dict], dict]):
    self.put = put

  def map(self, batch: dict) -> dict:
    out = dict(self.put(batch))
    out['example_id'] = batch['example_id']
    return out


def prefetch_to_device(ds: grain.IterDataset, put: Callable[[dict], dict], size: int,
                       host_buffer: int = 2) -> grain.IterDataset:
  """Batches already on the devices: a thread keeps `host_buffer` host batches ready and another
  keeps `size` of them transferred by `put` (e.g. `sharding.put_batch`), so that decoding and
  the host-to-device copy overlap the training step (as grain.experimental.device_put, which
  cannot assemble multi-process global arrays). grain's thread prefetch checkpoints the position
  of the batches handed out, not of those in flight. `size=0`: `put` runs on demand, no thread.
  """
  if size == 0:
    return ds.map(PutOnDevice(put))
  ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=host_buffer)
  ds = ds.map(PutOnDevice(put))
  return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=size)


def ignore_sigterm(worker_index: int, worker_count: int) -> None:
  """grain worker start-up: schedulers such as SLURM send SIGTERM to every process of a job; the
  workers must keep feeding the main process while it saves its checkpoint (it stops them)."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


class EvalTransform(grain.transforms.MapWithIndex):
  """(index, image or (image, label)) -> dict(image uint8 (S, S, 3), index[, label]), or None
  for a bad image."""

  def __init__(self, image_size: int):
    self.image_size = image_size
    self.warn_skip = transforms.SkipWarnings()

  def map_with_index(self, index, element):
    image, label = element if isinstance(element, tuple) else (element, None)
    try:
      out = dict(image=transforms.decode_crop(image, self.image_size), index=np.int64(index))
    except transforms.BadImageError as e:
      self.warn_skip('evaluation image', e)
      return None
    if label is not None:
      out['label'] = np.int64(label)
    return out


def eval_batches(images: Sequence, image_size: int, batch_size: int, num_workers: int = 0
                 ) -> Iterator[dict]:
  """Batches of resized, centre-cropped images; only the last batch may be smaller.

  Args:
    images: a random-access sequence (a list, or a lazy source with `__len__` and
      `__getitem__`) of images (path, encoded bytes or uint8 array) or of `(image, label)`.
    image_size: the output side S in pixels.
    batch_size: images per batch.
    num_workers: grain worker processes (0: decode in this process's threads).

  Returns:
    An iterator of dicts with `image` uint8 (b, S, S, 3), `index` int64 (b,) into `images` and,
    for labelled items, `label` int64 (b,). Bad images are left out (the indices say which were
    kept). With workers the order is interleaved.
  """
  ds = grain.MapDataset.source(images)
  it = ds.map_with_index(EvalTransform(image_size)).to_iter_dataset().filter(_is_not_none)
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  # Batched after the workers: batches made inside each worker would be fragments of a batch
  # (its slice of the set), each padded to a whole batch by the caller.
  return iter(it.batch(batch_size, drop_remainder=False))


def _is_not_none(x) -> bool:
  return x is not None
