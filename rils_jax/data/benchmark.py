r"""Measures the training input pipeline of a config: images/s per host and per core.

  python -m rils_jax.data.benchmark --config=configs/vit_b16.py:data=shared --workers=0,1,2

For each worker count the config's training stream (decode, RandomResizedCrop to
config.model.image_size, caption draw and tokenisation, batching; grain workers) runs on this
host alone for `--images` images after one untimed batch (which includes the workers' start-up),
and a plain loop (one process, no grain, Pillow full decoding, the same crop, resize and
tokenisation) runs over the same records for comparison. Prints one JSON line per setting and
a summary:
- `images_per_s`: this host's rate.
- `cpu_cores_busy`: CPU seconds of this process (all threads: grain reads with a thread pool
  even without workers) and its worker processes, per wall-clock second (Linux /proc).
- `images_per_s_per_core`: images per CPU second, i.e. the rate per fully busy core.
- `startup_s`: time to the first batch.
The stream is what training reads; the devices are not used. `--batch_size` (64, or the number
of training records when there are fewer) replaces the
config's global batch, which the small shared data cannot fill.
"""

import json
import os
import tempfile
import time

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from rils_jax import console
from rils_jax import tokenizer as tokenizer_lib
from rils_jax.data import pipeline
from rils_jax.data import records
from rils_jax.data import sources
from rils_jax.data import transforms

DEFAULT_BATCH = 64  # Images per batch when --batch_size is 0 and the records allow it.


def _define_flags():
  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_list('workers', ['0', '1', '2'], 'grain worker counts to measure.')
  flags.DEFINE_integer('images', 1024, 'Timed images per setting.')
  flags.DEFINE_integer('batch_size', 0, 'Batch (images per host); 0: 64, or the number of '
                       'training records when there are fewer.')
  flags.DEFINE_bool('draft', None, 'Reduced-size JPEG decoding (default: the config\'s).')
  flags.DEFINE_bool('baseline', True, 'Also time the plain Pillow loop.')
  flags.mark_flags_as_required(['config'])


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def cpu_seconds() -> dict:
  """User + system CPU seconds of this process (key 0) and of each live child process (grain
  workers; keyed by pid), from /proc on Linux."""
  out = {0: time.process_time()}
  me, tick = str(os.getpid()), os.sysconf('SC_CLK_TCK')
  for pid in os.listdir('/proc') if os.path.isdir('/proc') else ():
    if not pid.isdigit() or pid == me:
      continue
    try:
      with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
      continue  # Exited meanwhile.
    if fields[1] == me:  # ppid
      out[int(pid)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
  return out


def cpu_used(start: dict) -> float:
  """CPU seconds used since `start` (a `cpu_seconds()`) by this process and its children that
  are still alive."""
  end = cpu_seconds()
  return sum(v - start.get(pid, 0.0) for pid, v in end.items())


def _tokenizer(config, data, tmp: str) -> tokenizer_lib.Tokenizer:
  if config.tokenizer.model:
    return tokenizer_lib.Tokenizer(config.tokenizer.model)
  path = os.path.join(tmp, 'tokenizer.model')
  return tokenizer_lib.Tokenizer(tokenizer_lib.train_tokenizer(
      records.sample_captions(data), config.tokenizer.vocab_size, path))


def time_pipeline(parts, tokenizer, config, *, workers: int, images: int, batch_size: int,
                  draft: bool, weights=None) -> dict:
  """Runs the training stream with `workers` grain workers; returns its figures."""
  read_threads = config.input.read_threads
  start = time.perf_counter()
  it = iter(pipeline.make_train_dataset(
      parts, tokenizer, image_size=config.model.image_size,
      context_length=config.model.text.context_length, batch_size=batch_size,
      seed=config.seed, crop_scale=config.input.crop_scale, num_workers=workers,
      read_threads=read_threads, weights=weights,
      max_consecutive_skips=config.input.max_consecutive_skips, draft=draft))
  next(it)
  startup = time.perf_counter() - start
  batches = max(1, images // batch_size)
  skipped = 0
  start, cpu_start = time.perf_counter(), cpu_seconds()
  for _ in range(batches):
    skipped += int(next(it)['skipped'].sum())
  seconds, cpu = time.perf_counter() - start, cpu_used(cpu_start)
  del it  # Stops the workers.
  return dict(_figures(f'grain, {workers} workers', workers, draft, batches * batch_size,
                       seconds, cpu, startup, skipped), read_threads=read_threads)


def _figures(setting, workers, draft, images, seconds, cpu, startup, skipped) -> dict:
  return dict(setting=setting, workers=workers, draft=draft, images=images,
              seconds=round(seconds, 4), images_per_s=round(images / seconds, 1),
              cpu_cores_busy=round(cpu / seconds, 2),
              images_per_s_per_core=round(images / max(cpu, 1e-9), 1),
              startup_s=round(startup, 2), skipped=skipped)


def time_plain_loop(data: records.RecordSource, tokenizer, config, *, images: int,
                    batch_size: int) -> dict:
  """The same work without grain or draft decoding: a single-process loop over shuffled
  records that opens each image with Pillow, crops, resizes and tokenises."""
  rng = np.random.default_rng(config.seed)
  order = rng.permutation(len(data))
  size, length = config.model.image_size, config.model.text.context_length
  done = skipped = 0
  batch_images, batch_texts = [], []
  start, cpu_start = time.perf_counter(), cpu_seconds()
  for i in np.resize(order, images * 2):
    if done >= images:
      break
    record = data[int(i)]
    try:
      img = transforms.load_image(record.image)
    except transforms.BadImageError:
      skipped += 1
      continue
    batch_images.append(transforms.random_resized_crop(img, size, rng, config.input.crop_scale))
    caption = record.captions[rng.integers(len(record.captions))]
    batch_texts.append(tokenizer.encode([caption], length)[0])
    done += 1
    if len(batch_images) == batch_size:
      np.stack(batch_images), np.stack(batch_texts)
      batch_images, batch_texts = [], []
  seconds, cpu = time.perf_counter() - start, cpu_used(cpu_start)
  return _figures('plain Pillow loop', 0, False, done, seconds, cpu, 0.0, skipped)


def run(config, workers=(0, 1, 2), images: int = 1024, batch_size: int = 0,
        draft=None, baseline: bool = True) -> list:
  """All settings' figures (see the module docstring), in order: the plain loop, then grain.

  `batch_size` 0 takes 64, or the number of training records when there are fewer (a set of a
  few dozen images is read as it is, not refused).

  Raises:
    ValueError: for a batch larger than the training records, and `pipeline.training_data`'s
      errors (FileNotFoundError for missing files).
  """
  data = pipeline.training_data(config)  # Writes the generated default data when it asks for it.
  batch_size = batch_size or min(DEFAULT_BATCH, len(data))
  if batch_size > len(data):  # Before the pipeline's own check, which names the config's batch.
    raise ValueError(f'--batch_size={batch_size} is more than the {len(data)} training records '
                     f'of the config; give --batch_size={len(data)} or less')
  parts = data.parts
  draft = config.input.draft_decoding if draft is None else draft
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = _tokenizer(config, data, tmp)
    if baseline:
      results.append(time_plain_loop(data, tokenizer, config, images=images,
                                     batch_size=batch_size))
    for w in workers:
      results.append(time_pipeline(parts, tokenizer, config, workers=w, images=images,
                                   batch_size=batch_size, draft=draft,
                                   weights=sources.mixture_weights(config.input.sources)))
  for r in results:
    r.update(image_size=config.model.image_size, usable_cores=usable_cores(),
             records=len(data), sources=data.name)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    workers = [int(w) for w in f.workers]
  except ValueError as e:
    raise app.UsageError(f'--workers must be whole numbers, got {f.workers}') from e
  if not workers or any(w < 0 for w in workers) or f.images < 1 or f.batch_size < 0:
    raise app.UsageError('--workers (one or more counts) and --batch_size must be >= 0, '
                         '--images >= 1')
  # Missing or too little data: one line (console.run).
  results = run(f.config, workers, f.images, f.batch_size, f.draft, f.baseline)
  for r in results:
    print(json.dumps(r), flush=True)
  print(f'\n{"setting":<22} {"images/s":>9} {"cores busy":>10} {"per core":>9} '
        f'{"start-up s":>10}')
  for r in results:
    print(f'{r["setting"]:<22} {r["images_per_s"]:>9.1f} {r["cpu_cores_busy"]:>10.2f} '
          f'{r["images_per_s_per_core"]:>9.1f} {r["startup_s"]:>10.2f}')


if __name__ == '__main__':
  _define_flags()
  console.run(main)
