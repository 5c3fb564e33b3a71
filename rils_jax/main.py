r"""Pre-trains a RILS model.

  python -m rils_jax.main --config=configs/default.py --workdir=/tmp/rils_default
  python -m rils_jax.main --config=configs/vit_b16.py --workdir=DIR --config.input.batch_size=8

Writes to DIR: config.json, tokenizer.model (the tokenizer used), metrics.jsonl (one JSON
object per logged step and one for the final evaluation), TensorBoard events under
tensorboard/, and orbax checkpoints under checkpoints/. Re-running with the same DIR resumes
parameters and optimizer state from the latest checkpoint.

Multi-host (see rils_jax/distributed.py and launch/): every host runs the same command with a
DIR that all hosts see (a gs:// bucket, a shared filesystem). Only process 0 writes logs and
metrics; all processes write their shards of each checkpoint together through orbax.
"""

import filecmp
import json
import math
import os
import shutil
import time

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import app
from absl import flags
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from rils_jax import distributed
from rils_jax import evaluation
from rils_jax import metric_writer
from rils_jax import optim
from rils_jax import sharding
from rils_jax import tokenizer as tokenizer_lib
from rils_jax import train_step as train_step_lib
from rils_jax.data import pipeline
from rils_jax.data import sources
from rils_jax.data import synthetic
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
    ValueError: for a batch not divisible by the devices, processes and micro-batches, a mesh
      that does not fit the devices, non-positive step counts or intervals, a bad model size,
      dtype, remat policy, mask ratio, loss kind or optimizer setting, or no training source.
  """
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
              'evals.batch_size': config.evals.batch_size,
              'input.max_consecutive_skips': config.input.max_consecutive_skips}
  for key, value in positive.items():
    if value < 1:
      raise ValueError(f'config.{key}={value} must be >= 1')
  if config.seed < 0:
    raise ValueError(f'config.seed={config.seed} must be >= 0')
  if config.loss.kind not in ('rils', 'clip'):
    raise ValueError(f"config.loss.kind must be 'rils' or 'clip', got {config.loss.kind!r}")
  if not config.input.sources:
    raise ValueError('config.input.sources is empty: name at least one csv or coco source')
  model = rils_lib.build_model(config, eot_id=0)  # Raises for a bad variant, size or dtype.
  if config.loss.kind == 'rils':
    num_patches = math.prod(model.grid_shape())
    vit.random_masking(jax.random.PRNGKey(0), 1, num_patches, config.model.mask_ratio)
  optim.make_optimizer(config)  # Raises for a bad schedule or moment dtype.


def prepare_tokenizer(config, records, workdir: str, resuming: bool) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, kept as workdir/tokenizer.model.

  A run that resumes from a checkpoint uses the workdir's copy, the one the checkpoint was
  trained with. A fresh run copies the config's model there or, when the config names none,
  trains one on the training captions. With several processes each one prepares and checks the
  same tokenizer (training is deterministic), process 0 writes it, and all wait for that.

  Raises:
    ValueError: if the model's vocabulary is larger than `config.model.text.vocab_size`, or a
      resumed run's config names a tokenizer other than the checkpoint's.
  """
  path = os.path.join(workdir, 'tokenizer.model')
  if resuming and os.path.isfile(path):
    if config.tokenizer.model and not filecmp.cmp(config.tokenizer.model, path, shallow=False):
      raise ValueError(f'{workdir} holds a checkpoint trained with {path}, but '
                       f'config.tokenizer.model={config.tokenizer.model!r} differs from it; '
                       'use a new workdir to train with another tokenizer')
    return check_vocab(tokenizer_lib.Tokenizer(path), config)
  # A new tokenizer goes to a temporary name and replaces the workdir's copy only if it fits.
  tmp = f'{path}.tmp{jax.process_index()}'
  if config.tokenizer.model:
    shutil.copyfile(config.tokenizer.model, tmp)
  else:
    logging.info("Training a sentencepiece tokenizer (<= %d pieces) on %d images' captions",
                 config.tokenizer.vocab_size, len(records))
    tokenizer_lib.train_tokenizer((c for r in records for c in r.captions),
                                  config.tokenizer.vocab_size, tmp)
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


def restore(checkpoints: ocp.CheckpointManager, initial_state, workdir: str):
  """Restores the latest checkpoint into the shapes and shardings of `initial_state`.

  Raises:
    ValueError: when the checkpoint does not fit the state of this config.
  """
  step = checkpoints.latest_step()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, initial_state)
  try:
    return checkpoints.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f'the checkpoint at step {step} in {workdir} does not fit the model or optimizer of '
        f'this config (its own config is {os.path.join(workdir, "config.json")}); use a new '
        f'workdir or the same config. Orbax said: {e}') from e


def progress_line(step, total, metrics, images_per_s, first_step_time, first_step) -> str:
  # The rate excludes the first step, which includes compilation.
  eta = 'ETA n/a'
  if step > first_step:
    per_step = (time.time() - first_step_time) / (step - first_step)
    eta = f'ETA {per_step * (total - step) / 60:.1f} min'
  return (f'step {step}/{total}  loss {metrics["loss"]:.4f}  clip {metrics["clip_loss"]:.4f}  '
          f'recon {metrics["recon_loss"]:.4f}  clip_acc {metrics["clip_acc"]:.3f}  '
          f'{images_per_s:.1f} img/s  {eta}')


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, checkpoints and evaluates; returns the final evaluation metrics."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  checkpoints = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
  resume_step = checkpoints.latest_step()
  if is_main:
    write_config(config, workdir, resume_step)

  if config.get('synthetic'):
    s = config.synthetic
    synthetic.generate(s.root, image_size=s.image_size, num_train=s.num_train, seed=s.seed,
                       num_heldout=s.num_heldout, zeroshot_per_class=s.zeroshot_per_class)
  records, stats = sources.read_sources(config.input.sources)
  logging.info('Training data: %s', stats)
  if not records:
    raise ValueError(f'config.input.sources hold no image with a non-empty caption ({stats})')
  eval_data = evaluation.load_eval_data(config)  # Fails now, not after training.
  tokenizer = prepare_tokenizer(config, records, workdir, resuming=resume_step is not None)
  start_step = resume_step or 0
  mesh = sharding.make_mesh(config)
  batches = iter(pipeline.make_train_dataset(
      records, tokenizer, image_size=config.model.image_size,
      context_length=config.model.text.context_length, batch_size=config.input.batch_size,
      seed=config.seed + start_step, crop_scale=config.input.crop_scale,
      num_workers=config.input.num_workers,
      rows=train_step_lib.process_rows(mesh, config.input.batch_size),
      max_consecutive_skips=config.input.max_consecutive_skips))

  model = rils_lib.build_model(config, tokenizer.eot_id)
  optimizer = optim.make_optimizer(config)
  state = train_step_lib.create_train_state(model, optimizer, config, mesh)
  if resume_step is not None:
    state = restore(checkpoints, state, workdir)
    logging.info('Resumed from the checkpoint at step %d', resume_step)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model: %s, %.2fM parameters, mesh %s', config.model.variant, num_params / 1e6,
               dict(mesh.shape))
  train_step = train_step_lib.make_train_step(model, optimizer, config, mesh)

  writer = metric_writer.MetricWriter(workdir, enabled=is_main)
  writer.write(start_step, {'data/images': stats.images, 'data/captions': stats.captions,
                            'data/empty_captions_skipped': stats.empty_captions,
                            'data/images_without_caption': stats.images_without_caption,
                            'data/captions_without_image': stats.captions_without_image,
                            'num_params': num_params})
  if start_step >= config.total_steps and is_main:
    print(f'The checkpoint at step {start_step} has reached config.total_steps='
          f'{config.total_steps}: nothing to train.', flush=True)
  skipped = delivered = 0
  start_time = window_time = first_step_time = time.time()
  window_images = 0
  for step in range(start_step + 1, config.total_steps + 1):
    batch = next(batches)
    skipped += int(batch['skipped'].sum())
    delivered += len(batch['skipped'])
    check_skips(skipped, delivered, config.input.max_skip_fraction)
    state, metrics = train_step(state, train_step_lib.put_batch(batch, mesh))
    window_images += config.input.batch_size
    if step % config.log_every == 0 or step == config.total_steps or step == start_step + 1:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.time()
      metrics['images_per_sec'] = window_images / (now - window_time)
      metrics['data/skipped_examples'] = skipped
      window_time, window_images = now, 0
      writer.write(step, metrics)
      if is_main:
        print(progress_line(step, config.total_steps, metrics, metrics['images_per_sec'],
                            first_step_time, start_step + 1), flush=True)
    if step == start_step + 1:
      first_step_time = time.time()
    if step % config.checkpoint_every == 0 or step == config.total_steps:
      checkpoints.save(step, args=ocp.args.StandardSave(state))
  checkpoints.wait_until_finished()
  if is_main and start_step < config.total_steps:
    print(f'Training done: {config.total_steps - start_step} steps in '
          f'{time.time() - start_time:.1f} s', flush=True)

  embedder = evaluation.Embedder(model, config, mesh, tokenizer,
                                 jax.tree.map(lambda x: x.sharding, state.params))
  results = evaluation.run_evals(eval_data, state.params, embedder)
  if results:
    writer.write(int(state.step), results)
    if is_main:
      print('Final evaluation:', json.dumps(results, sort_keys=True), flush=True)
  writer.close()
  checkpoints.close()
  return results


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


class _QuietLibraries:
  """Drops INFO lines from orbax and grain internals (dozens per checkpoint) from the log."""

  def filter(self, record) -> bool:
    return record.levelno > logging.converter.STANDARD_INFO or not any(
        f'{os.sep}{lib}{os.sep}' in record.pathname for lib in ('orbax', 'grain'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  f = flags.FLAGS
  distributed.initialize(f.distributed, f.coordinator_address, f.num_processes, f.process_id)
  train(f.config, f.workdir)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
