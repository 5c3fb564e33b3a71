r"""Pre-trains a RILS model.

  python -m rils_jax.main --config=configs/default.py --workdir=/tmp/rils_default
  python -m rils_jax.main --config=configs/vit_b16.py --workdir=DIR --config.input.batch_size=8

Writes to DIR: config.json, tokenizer.model (the tokenizer used), metrics.jsonl (one JSON
object per logged step, per periodic evaluation and for the final evaluation), TensorBoard
events under tensorboard/, and orbax checkpoints under checkpoints/ (rils_jax/checkpoints.py).
The evaluators of `config.evals` (rils_jax/evals/runner.py) run every `every` steps when set,
and all of them at the end.

Fault tolerance:
- Re-running with the same DIR resumes from the latest complete checkpoint exactly: parameters,
  optimizer state, step, RNG and the position of every process in the data stream, so the
  resumed run sees the examples and computes the parameters the uninterrupted one would have.
- SIGTERM (or a TPU maintenance notice on multi-host runs) saves a checkpoint at the end of
  the current step and exits 0 (rils_jax/preemption.py).
- A NaN or Inf loss or gradient skips that step's update; `config.max_consecutive_nonfinite`
  of them in a row stop the run with an error naming the last good checkpoint.
- Unreadable images are skipped and counted (`data/skipped_examples`); the run stops when they
  pass `config.input.max_skip_fraction`.
- Config errors (unknown keys, sizes that do not divide, unreadable paths) stop the run before
  anything is compiled.

Multi-host (see rils_jax/distributed.py and launch/): every host runs the same command with a
DIR that all hosts see (a gs:// bucket, a shared filesystem). Only process 0 writes logs and
metrics; all processes write their shards of each checkpoint together through orbax.
"""

import functools
import json
import math
import os
import shutil
import time
from typing import Optional

import grain
import jax
import ml_collections
from absl import app
from absl import flags
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from rils_jax import checkpoints as checkpoints_lib
from rils_jax import config_lib
from rils_jax import distributed
from rils_jax import metric_writer
from rils_jax import optim
from rils_jax import preemption
from rils_jax import sharding
from rils_jax import tokenizer as tokenizer_lib
from rils_jax import train_step as train_step_lib
from rils_jax.data import pipeline
from rils_jax.data import sources
from rils_jax.data import synthetic
from rils_jax.evals import embed as embed_lib
from rils_jax.evals import runner as evals_lib
from rils_jax.models import rils as rils_lib
from rils_jax.models import vit


def _define_flags():
  # Defined only when run as a command, so that importing this module (tests, other tools)
  # registers no flags.
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Output folder (logs, checkpoints, tokenizer); on '
                      'several hosts, storage that all of them see.')
  flags.DEFINE_enum('distributed', 'auto', distributed.MODES,
                    'Multi-host start-up (rils_jax/distributed.py): auto, on (Cloud TPU pods, '
                    'SLURM), off.')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (manual multi-host).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (manual multi-host).')
  flags.DEFINE_integer('process_id', None, 'Index of this process (manual multi-host).')
  flags.mark_flags_as_required(['config', 'workdir'])


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks what would otherwise fail late or silently, before any data is read or compiled.

  Raises:
    ValueError: for an unknown config key, a batch not divisible by the devices, processes and
      micro-batches, a mesh that does not fit the devices, non-positive step counts or
      intervals, an image size not divisible by the patch size, a bad model size, dtype, remat
      policy, mask ratio, loss kind or optimizer setting, no training source, or a tokenizer or
      tokenizer path that cannot be read.
    FileNotFoundError: for an `init_from` path that holds no checkpoint.
  """
  config_lib.check_keys(config)
  batch, devices, processes = config.input.batch_size, jax.device_count(), jax.process_count()
  if batch < 1 or batch % devices or batch % processes:
    raise ValueError(f'config.input.batch_size={batch} must be a positive multiple of the '
                     f'{devices} devices and {processes} processes')
  platform = config.get('platform')
  if platform and platform.num_devices != devices:
    raise ValueError(f'platform preset {platform.name} is for {platform.num_devices} devices '
                     f'({platform.accelerator}); this job has {devices}. Use the preset of this '
                     'machine, or none (then set config.mesh and config.optim.accum_steps)')
  mesh = sharding.make_mesh(config)  # Raises for a mesh that does not fit the devices.
  sharding.rules_of(config)  # Raises for a malformed rule or an unknown mesh axis.
  accum = train_step_lib.check_accumulation(config, mesh)
  if platform and batch // accum // devices != platform.per_device_batch:
    logging.warning('config.input.batch_size=%d with accum_steps=%d puts %d images on each '
                    'device; preset %s is sized for %d', batch, accum, batch // accum // devices,
                    platform.name, platform.per_device_batch)
  if config.loss.chunk_size < 0:
    raise ValueError(f'config.loss.chunk_size={config.loss.chunk_size} must be >= 0')
  positive = {'total_steps': config.total_steps, 'log_every': config.log_every,
              'checkpoint_every': config.checkpoint_every,
              'keep_checkpoints': config.keep_checkpoints,
              'max_consecutive_nonfinite': config.max_consecutive_nonfinite,
              'evals.batch_size': config.evals.batch_size,
              'input.max_consecutive_skips': config.input.max_consecutive_skips}
  for key, value in positive.items():
    if value < 1:
      raise ValueError(f'config.{key}={value} must be >= 1')
  for key, value in {'keep_every': config.keep_every,
                     'checkpoint_minutes': config.checkpoint_minutes}.items():
    if value < 0:
      raise ValueError(f'config.{key}={value} must be >= 0 (0 turns it off)')
  if not 0 <= config.input.max_skip_fraction <= 1:
    raise ValueError(f'config.input.max_skip_fraction={config.input.max_skip_fraction} must be '
                     'in [0, 1]')
  try:
    bad_steps = [int(s) for s in config.debug.nan_loss_steps]
  except (TypeError, ValueError) as e:
    raise ValueError('config.debug.nan_loss_steps must be a tuple of step numbers, got '
                     f'{config.debug.nan_loss_steps!r}') from e
  if any(s < 1 for s in bad_steps):
    raise ValueError(f'config.debug.nan_loss_steps={bad_steps} must hold steps >= 1')
  evals_lib.evaluator_specs(config.evals)
  if config.tokenizer.model and not (os.path.isfile(config.tokenizer.model) and
                                     os.access(config.tokenizer.model, os.R_OK)):
    raise ValueError(f'config.tokenizer.model={config.tokenizer.model!r} is not a readable file')
  if config.init_from:
    checkpoints_lib.checkpoint_path(config.init_from)  # Raises when it holds no checkpoint.
  if config.seed < 0:
    raise ValueError(f'config.seed={config.seed} must be >= 0')
  if config.loss.kind not in ('rils', 'clip'):
    raise ValueError(f"config.loss.kind must be 'rils' or 'clip', got {config.loss.kind!r}")
  if not config.input.sources:
    raise ValueError('config.input.sources is empty: name at least one source (kinds: '
                     f'{", ".join(sources.SOURCE_KINDS)})')
  if config.input.sharding not in ('global_batch', 'records'):
    raise ValueError("config.input.sharding must be 'global_batch' or 'records', got "
                     f'{config.input.sharding!r}')
  if config.input.prefetch_to_device < 0 or config.input.num_workers < 0:
    raise ValueError('config.input.prefetch_to_device and config.input.num_workers must be >= 0')
  model = rils_lib.build_model(config, eot_id=0)  # Raises for a bad variant, size or dtype.
  num_patches = math.prod(model.grid_shape())  # Raises for an image size the patches miss.
  if config.loss.kind == 'rils':
    vit.random_masking(jax.random.PRNGKey(0), 1, num_patches, config.model.mask_ratio)
  optim.make_optimizer(config)  # Raises for a bad schedule or moment dtype.
  for spec in config.input.sources:
    sources.check_spec(spec)  # Files are opened later; a malformed entry fails now.
  sources.mixture_weights(config.input.sources)


def prepare_tokenizer(config, data: sources.RecordSource, workdir: str,
                      saved_model: Optional[bytes]) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, kept as workdir/tokenizer.model.

  A run that resumes uses `saved_model`, the one saved in the checkpoint (the one its text tower
  was trained with), and restores the workdir's copy from it. A fresh run copies the config's
  model there or, when the config names none, trains one on the training captions (all of them
  for csv/coco sources, those of 50,000 records spread over shard sources). With several
  processes each one prepares and checks the same tokenizer (training is deterministic),
  process 0 writes it, and all wait for that.

  Raises:
    ValueError: if the model's vocabulary is larger than `config.model.text.vocab_size`, or a
      resumed run's config names a tokenizer other than the checkpoint's.
  """
  path = os.path.join(workdir, 'tokenizer.model')
  # The tokenizer goes to a temporary name and replaces the workdir's copy only if it fits.
  tmp = f'{path}.tmp{jax.process_index()}'
  if saved_model is not None:
    if config.tokenizer.model:
      with open(config.tokenizer.model, 'rb') as f:
        if f.read() != saved_model:
          raise ValueError(f'{workdir} holds a checkpoint trained with another tokenizer than '
                           f'config.tokenizer.model={config.tokenizer.model!r}; use a new '
                           'workdir to train with another tokenizer')
    with open(tmp, 'wb') as f:
      f.write(saved_model)
  elif config.tokenizer.model:
    shutil.copyfile(config.tokenizer.model, tmp)
  else:
    captions = sources.sample_captions(data)
    logging.info('Training a sentencepiece tokenizer (<= %d pieces) on %d captions',
                 config.tokenizer.vocab_size, len(captions))
    tokenizer_lib.train_tokenizer(captions, config.tokenizer.vocab_size, tmp)
  try:
    check_vocab(tokenizer_lib.Tokenizer(tmp), config)
  except ValueError:
    os.remove(tmp)
    raise
  if jax.process_index() == 0:
    os.replace(tmp, path)
  else:
    os.remove(tmp)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('rils_jax tokenizer written')
  return tokenizer_lib.Tokenizer(path)


def check_vocab(tokenizer: tokenizer_lib.Tokenizer, config) -> tokenizer_lib.Tokenizer:
  """Returns `tokenizer` if the text tower embeds all its ids.

  Raises:
    ValueError: if its vocabulary is larger than `config.model.text.vocab_size`.
  """
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise ValueError(f'tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} pieces but '
                     'the text tower embeds only config.model.text.vocab_size='
                     f'{config.model.text.vocab_size}')
  return tokenizer


def write_config(config: ml_collections.ConfigDict, workdir: str, resume_step) -> None:
  """config.json for a fresh run; a resumed run keeps it (it describes the checkpoints) and
  writes config.resume_<step>.json beside it."""
  name = 'config.json' if resume_step is None else f'config.resume_{resume_step}.json'
  with open(os.path.join(workdir, name), 'w') as f:
    json.dump(config.to_dict(), f, indent=2, default=str)


def progress_line(step, total, metrics, images_per_s, first_step_time, first_step) -> str:
  # The rate excludes the first step, which includes compilation.
  eta = 'ETA n/a'
  if step > first_step:
    per_step = (time.time() - first_step_time) / (step - first_step)
    eta = f'ETA {per_step * (total - step) / 60:.1f} min'
  return (f'step {step}/{total}  loss {metrics["loss"]:.4f}  clip {metrics["clip_loss"]:.4f}  '
          f'recon {metrics["recon_loss"]:.4f}  clip_acc {metrics["clip_acc"]:.3f}  '
          f'{images_per_s:.1f} img/s  {eta}')


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a NaN or Inf loss or gradient."""


class Health:
  """Checks the counters of each step (non-finite updates, unreadable images) one step late,
  so that reading them never makes the devices wait for the host.

  Raises (from `observe` and `finish`):
    NonFiniteError: after `config.max_consecutive_nonfinite` skipped updates in a row.
    RuntimeError: when the unreadable images pass `config.input.max_skip_fraction`.
  """

  def __init__(self, config: ml_collections.ConfigDict, checkpoints: checkpoints_lib.Checkpoints):
    self._max_nonfinite = config.max_consecutive_nonfinite
    self._max_skip_fraction = config.input.max_skip_fraction
    self._batch_size = config.input.batch_size
    self._checkpoints = checkpoints
    self._pending = None

  def observe(self, step: int, metrics) -> None:
    """Takes step `step`'s device metrics and checks the previous step's."""
    keys = ('loss', 'grad_norm', 'nonfinite', 'consecutive_nonfinite', 'skipped_examples')
    previous, self._pending = self._pending, (step, {k: metrics[k] for k in keys})
    if previous:
      self._check(*previous)

  def finish(self) -> None:
    if self._pending:
      self._check(*self._pending)
      self._pending = None

  def _check(self, step: int, values) -> None:
    values = jax.device_get(values)
    if values['nonfinite']:
      in_a_row = int(values['consecutive_nonfinite'])
      logging.warning('step %d: loss %s, gradient norm %s: update skipped (%d in a row)', step,
                      values['loss'], values['grad_norm'], in_a_row)
      if in_a_row >= self._max_nonfinite:
        first = step - in_a_row + 1
        self._checkpoints.wait()
        good = [s for s in self._checkpoints.all_steps() if s < first]
        where = (f'the last good checkpoint is step {max(good)} in {self._checkpoints.directory}'
                 if good else 'no checkpoint was saved before them')
        raise NonFiniteError(
            f'stopping at step {step}: steps {first}-{step} ({in_a_row} in a row, '
            f'config.max_consecutive_nonfinite={self._max_nonfinite}) had a NaN or Inf loss or '
            f'gradient, so their updates were skipped and the parameters are those after step '
            f'{first - 1}; {where}. Re-running the same command resumes from the latest '
            'checkpoint; lower optim.lr or raise optim.warmup_steps first, or check the data')
    check_skips(int(values['skipped_examples']), step * self._batch_size,
                self._max_skip_fraction)


def check_skips(skipped: int, delivered: int, max_fraction: float) -> None:
  """Stops a run that would silently train on a small part of its data.

  Raises:
    RuntimeError: when more than `max_fraction` of the examples read so far were skipped (after
      at least 100 skips, so that a few bad files early on do not stop a run).
  """
  if skipped >= 100 and skipped > max_fraction * (skipped + delivered):
    raise RuntimeError(
        f'{skipped} of {skipped + delivered} examples were skipped as unreadable images, more '
        f'than config.input.max_skip_fraction={max_fraction}; check the image folders of '
        'config.input.sources (the log names each skipped file)')


class ExampleIds:
  """With `config.input.log_example_ids`, appends `{"step": s, "example_ids": [...]}` per step
  to WORKDIR/example_ids/process_<i>.jsonl (this process's rows; after a resume the steps since
  the checkpoint appear again, and the last line of a step is the one that counts)."""

  def __init__(self, workdir: str, enabled: bool):
    self._file = None
    if enabled:
      os.makedirs(os.path.join(workdir, 'example_ids'), exist_ok=True)
      self._file = open(os.path.join(workdir, 'example_ids',
                                     f'process_{jax.process_index()}.jsonl'), 'a')

  def write(self, step: int, example_ids) -> None:
    if self._file:
      self._file.write(json.dumps({'step': step, 'example_ids': example_ids.tolist()}) + '\n')
      self._file.flush()

  def close(self) -> None:
    if self._file:
      self._file.close()


def periodic_evaluation(evaluations, params, embedder, names, step: int, writer,
                        is_main: bool) -> None:
  """Runs the evaluators due at `step` and logs their metrics. A failing evaluator is logged
  with its error and training goes on: the final evaluation runs it again and raises."""
  cache = {}
  for name in names:
    try:
      results = evals_lib.flatten(evaluations.run(params, embedder, [name], cache))
    except evals_lib.EvaluationError as e:
      logging.exception('Evaluation at step %d failed; training continues', step)
      if is_main:
        print(f'Evaluation at step {step} failed (training continues): {e}', flush=True)
      continue
    writer.write(step, results)
    if is_main:
      print(f'Evaluation at step {step}:', json.dumps(results, sort_keys=True), flush=True)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, checkpoints and evaluates; returns the final evaluation metrics, or {} when a
  preemption notice stopped the run (after saving a checkpoint).

  Re-running with the same workdir resumes from its latest complete checkpoint: parameters,
  optimizer state, step, RNG and the exact position in the data stream.

  Raises:
    ValueError: for a bad config or unreadable input, before anything is compiled.
    NonFiniteError: after `config.max_consecutive_nonfinite` non-finite steps in a row.
    RuntimeError: when too many images cannot be read.
  """
  validate_config(config)
  if '://' in workdir:
    raise ValueError(f'--workdir={workdir} is a URL; rils_jax writes its workdir (logs, '
                     'tokenizer, checkpoints) as a filesystem path. Use a path that every host '
                     'sees and that outlives them: a shared filesystem (NFS, Filestore)')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f'cannot create the workdir {workdir}: {e}') from e
  if not os.access(workdir, os.W_OK):
    raise ValueError(f'the workdir {workdir} is not writable')
  # Installed first, so that a notice during the (long) set-up is not lost.
  watcher = preemption.Watcher()
  checkpoints = checkpoints_lib.Checkpoints(workdir, config)
  try:
    return _train(config, workdir, watcher, checkpoints)
  finally:
    checkpoints.close()  # Waits for a save in flight: an error never loses it.
    watcher.close()


def _train(config, workdir, watcher: preemption.Watcher,
           checkpoints: checkpoints_lib.Checkpoints) -> dict:
  is_main = jax.process_index() == 0
  resume_step = checkpoints.latest_step()
  if is_main:
    write_config(config, workdir, resume_step)

  if config.get('synthetic'):
    s = config.synthetic
    synthetic.generate(s.root, image_size=s.image_size, num_train=s.num_train, seed=s.seed,
                       num_heldout=s.num_heldout, zeroshot_per_class=s.zeroshot_per_class)
  parts = [sources.open_source(spec) for spec in config.input.sources]
  data = sources.ConcatSource(parts)
  stats = data.stats
  logging.info('Training data: %s: %s%s', ' + '.join(repr(p) for p in parts), stats,
               '' if data.counts_captions else ' (captions not counted in shard formats)')
  if not len(data):
    raise ValueError(f'config.input.sources hold no image with a non-empty caption ({stats})')
  evaluations = evals_lib.Evaluations(config)  # Opens the datasets: fails now, not after.
  saved_tokenizer = None if resume_step is None else checkpoints.tokenizer_model(resume_step)
  tokenizer = prepare_tokenizer(config, data, workdir, saved_tokenizer)
  start_step = resume_step or 0
  restore_position = resume_step is not None and config.input.resume_position
  mesh = sharding.make_mesh(config)
  by_records = config.input.sharding == 'records'
  dataset = pipeline.make_train_dataset(
      parts, tokenizer, image_size=config.model.image_size,
      context_length=config.model.text.context_length, batch_size=config.input.batch_size,
      # Without the saved position, a resumed run draws a new stream rather than repeat the
      # examples of the first steps.
      seed=config.seed if restore_position or not start_step else config.seed + start_step,
      crop_scale=config.input.crop_scale, num_workers=config.input.num_workers,
      rows=None if by_records else train_step_lib.process_rows(mesh, config.input.batch_size),
      shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True) if by_records else None,
      weights=sources.mixture_weights(config.input.sources),
      max_consecutive_skips=config.input.max_consecutive_skips,
      draft=config.input.draft_decoding)
  put = functools.partial(train_step_lib.put_batch, mesh=mesh)
  batches = iter(pipeline.prefetch_to_device(dataset, put, config.input.prefetch_to_device))

  model = rils_lib.build_model(config, tokenizer.eot_id)
  optimizer = optim.make_optimizer(config)
  state = train_step_lib.create_train_state(model, optimizer, config, mesh)
  if resume_step is not None:
    state = checkpoints.restore(resume_step, state, batches if restore_position else None)
    logging.info('Resumed from the checkpoint at step %d%s', resume_step,
                 '' if restore_position else ' (data stream restarted with a new seed)')
  elif config.init_from:
    state = state.replace(params=checkpoints_lib.load_params(config.init_from, state.params))
    logging.info('Parameters initialised from %s', config.init_from)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model: %s, %.2fM parameters, mesh %s', config.model.variant, num_params / 1e6,
               dict(mesh.shape))
  train_step = train_step_lib.make_train_step(model, optimizer, config, mesh)
  embedder = embed_lib.Embedder(model, config, mesh, tokenizer,
                                jax.tree.map(lambda x: x.sharding, state.params))

  writer = metric_writer.MetricWriter(workdir, enabled=is_main)
  data_counts = {'data/images': stats.images, 'data/captions': stats.captions,
                'data/empty_captions_skipped': stats.empty_captions,
                'data/duplicate_captions_skipped': stats.duplicate_captions,
                'data/images_without_caption': stats.images_without_caption,
                'data/captions_without_image': stats.captions_without_image,
                'data/duplicate_image_ids_skipped': stats.duplicate_image_ids,
                'data/non_utf8_lines': stats.non_utf8_lines,
                'data/damaged_shards': stats.damaged_shards,
                'num_params': num_params}
  if not data.counts_captions:  # Shard formats: counting would read every record.
    del data_counts['data/captions']
  writer.write(start_step, data_counts)
  if start_step >= config.total_steps and is_main:
    print(f'The checkpoint at step {start_step} has reached config.total_steps='
          f'{config.total_steps}: nothing to train (this workdir holds a finished run; '
          'give a new --workdir to train from scratch).', flush=True)
  health = Health(config, checkpoints)
  example_ids = ExampleIds(workdir, config.input.log_example_ids)
  start_time = window_time = first_step_time = time.time()
  window_images = 0
  for step in range(start_step + 1, config.total_steps + 1):
    batch = next(batches)
    example_ids.write(step, batch.pop('example_id'))
    state, metrics = train_step(state, batch)
    health.observe(step, metrics)
    window_images += config.input.batch_size
    if step % config.log_every == 0 or step == config.total_steps or step == start_step + 1:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.time()
      metrics['images_per_sec'] = window_images / (now - window_time)
      metrics['data/skipped_examples'] = metrics.pop('skipped_examples')
      window_time, window_images = now, 0
      writer.write(step, metrics)
      if is_main:
        print(progress_line(step, config.total_steps, metrics, metrics['images_per_sec'],
                            first_step_time, start_step + 1), flush=True)
    if step == start_step + 1:
      first_step_time = time.time()
    preempted = watcher.reached(step)
    if preempted or step == config.total_steps or checkpoints.should_save(step):
      checkpoints.save(step, state, batches, config, tokenizer.model_path)
    due = evaluations.due(step) if step < config.total_steps and not preempted else []
    if due:
      eval_start = time.time()
      periodic_evaluation(evaluations, state.params, embedder, due, step, writer, is_main)
      window_time += time.time() - eval_start  # Keeps images_per_sec a training rate.
    if preempted:
      checkpoints.wait()
      batches.close()
      if is_main:
        print(f'Preempted ({watcher.signal_name}) at step {step}: saved the checkpoint '
              f'{os.path.join(checkpoints.directory, str(step))}; run the same command again '
              'to resume from it.', flush=True)
      example_ids.close()
      writer.close()
      return {}
  health.finish()
  example_ids.close()
  checkpoints.wait()
  # Stops the prefetch thread and the grain workers now (after the last save read the stream's
  # position), rather than at interpreter exit while the evaluation runs.
  batches.close()
  if is_main and start_step < config.total_steps:
    print(f'Training done: {config.total_steps - start_step} steps in '
          f'{time.time() - start_time:.1f} s', flush=True)

  results = evals_lib.flatten(evaluations.run(state.params, embedder))
  if results:
    writer.write(int(state.step), results)
    if is_main:
      print('Final evaluation:', json.dumps(results, sort_keys=True), flush=True)
  elif is_main:
    print('No final evaluation: config.evals names no evaluator (see '
          'rils_jax/evals/runner.py).', flush=True)
  writer.close()
  return results


class QuietLibraries:
  """Drops INFO lines from orbax, grain and jax internals (dozens per checkpoint, and jax's
  "Unable to initialize backend 'tpu'" on every start) from the log, and
  orbax's warning that a checkpoint item has no metadata file of its own (reading the `state`
  item of a multi-item checkpoint, whose metadata sits one folder up: expected)."""

  def filter(self, record) -> bool:
    if record.getMessage().startswith('Metadata file does not exist'):
      return False
    return record.levelno > logging.converter.STANDARD_INFO or not any(
        f'{os.sep}{lib}{os.sep}' in record.pathname for lib in ('orbax', 'grain', 'jax'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(QuietLibraries())
  f = flags.FLAGS
  distributed.initialize(f.distributed, f.coordinator_address, f.num_processes, f.process_id)
  train(f.config, f.workdir)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
