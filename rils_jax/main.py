r"""Pre-trains a RILS model.

  python -m rils_jax.main --config=configs/default.py --workdir=/tmp/rils_default
  python -m rils_jax.main --config=configs/vit_b16.py --workdir=DIR --config.input.batch_size=8

Writes to DIR: config.json, tokenizer.model (the tokenizer used), metrics.jsonl (one JSON
object per logged step and one for the final evaluation), TensorBoard events under
tensorboard/, and orbax checkpoints under checkpoints/. Re-running with the same DIR resumes
parameters and optimizer state from the latest checkpoint.
"""

import json
import os
import shutil
import time

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rils_jax import evaluation
from rils_jax import metric_writer
from rils_jax import optim
from rils_jax import tokenizer as tokenizer_lib
from rils_jax import train_step as train_step_lib
from rils_jax.data import pipeline
from rils_jax.data import sources
from rils_jax.data import synthetic
from rils_jax.models import rils as rils_lib

config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Output folder (logs, checkpoints, tokenizer).')
flags.mark_flags_as_required(['config', 'workdir'])


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks what would otherwise fail late or silently, before any compilation.

  Raises:
    ValueError: for a batch not divisible by the devices or processes, a bad image or patch
      size, an unknown loss kind, or no training source.
  """
  batch, devices, processes = config.input.batch_size, jax.device_count(), jax.process_count()
  if batch < 1 or batch % devices or batch % processes:
    raise ValueError(f'config.input.batch_size={batch} must be a positive multiple of the '
                     f'{devices} devices and {processes} processes')
  if config.loss.kind not in ('rils', 'clip'):
    raise ValueError(f"config.loss.kind must be 'rils' or 'clip', got {config.loss.kind!r}")
  if not config.input.sources:
    raise ValueError('config.input.sources is empty: name at least one csv or coco source')
  rils_lib.vision_size(config.model.variant)


def prepare_tokenizer(config, records, workdir: str) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, kept as workdir/tokenizer.model.

  A resumed run reuses the copy in the workdir; otherwise the config's model is copied there,
  or, when the config names none, one is trained on the training captions.

  Raises:
    ValueError: if the model's vocabulary is larger than `config.model.text.vocab_size`.
  """
  path = os.path.join(workdir, 'tokenizer.model')
  if not os.path.isfile(path):
    if config.tokenizer.model:
      shutil.copyfile(config.tokenizer.model, path + '.tmp')
      os.replace(path + '.tmp', path)
    else:
      logging.info('Training a sentencepiece tokenizer (<= %d pieces) on %d images\' captions',
                   config.tokenizer.vocab_size, len(records))
      tokenizer_lib.train_tokenizer((c for r in records for c in r.captions),
                                    config.tokenizer.vocab_size, path)
  tokenizer = tokenizer_lib.Tokenizer(path)
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise ValueError(f'tokenizer {path} has {tokenizer.vocab_size} pieces but the text tower '
                     f'embeds only config.model.text.vocab_size={config.model.text.vocab_size}')
  return tokenizer


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
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config.to_dict(), f, indent=2, default=str)
  if config.get('synthetic'):
    s = config.synthetic
    synthetic.generate(s.root, image_size=s.image_size, num_train=s.num_train, seed=s.seed,
                       num_heldout=s.num_heldout, zeroshot_per_class=s.zeroshot_per_class)
  records, stats = sources.read_sources(config.input.sources)
  logging.info('Training data: %s', stats)
  tokenizer = prepare_tokenizer(config, records, workdir)

  model = rils_lib.build_model(config, tokenizer.eot_id)
  mesh = train_step_lib.make_mesh(config)
  optimizer = optim.make_optimizer(config)
  initial_state = train_step_lib.create_train_state(model, optimizer, config, mesh)
  checkpoints = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
  state = initial_state
  if checkpoints.latest_step() is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, initial_state)
    state = checkpoints.restore(checkpoints.latest_step(),
                                args=ocp.args.StandardRestore(abstract))
    logging.info('Resumed from checkpoint at step %d', int(state.step))
  start_step = int(state.step)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model: %s, %.2fM parameters, mesh %s', config.model.variant, num_params / 1e6,
               dict(mesh.shape))

  train_step = train_step_lib.make_train_step(model, optimizer, config, mesh)
  batches = iter(pipeline.make_train_dataset(
      records, tokenizer, image_size=config.model.image_size,
      context_length=config.model.text.context_length,
      batch_size=config.input.batch_size // jax.process_count(),
      seed=config.seed + start_step, crop_scale=config.input.crop_scale,
      num_workers=config.input.num_workers))

  writer = metric_writer.MetricWriter(workdir, enabled=is_main)
  writer.write(start_step, {'data/images': stats.images, 'data/captions': stats.captions,
                            'data/empty_captions_skipped': stats.empty_captions,
                            'data/images_without_caption': stats.images_without_caption,
                            'num_params': num_params})
  skipped = 0
  start_time = window_time = first_step_time = time.time()
  window_images = 0
  for step in range(start_step + 1, config.total_steps + 1):
    batch = next(batches)
    skipped += int(batch['skipped'].sum())
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
  if is_main:
    print(f'Training done: {config.total_steps - start_step} steps in '
          f'{time.time() - start_time:.1f} s', flush=True)

  embedder = evaluation.Embedder(model, config, mesh, tokenizer)
  results = evaluation.run_evals(config, state.params, embedder)
  if results:
    writer.write(int(state.step), results)
    if is_main:
      print('Final evaluation:', json.dumps(results, sort_keys=True), flush=True)
  writer.close()
  checkpoints.close()
  return results


class _QuietLibraries:
  """Drops INFO lines from orbax and grain internals (dozens per checkpoint) from the log."""

  def filter(self, record) -> bool:
    return record.levelno > logging.converter.STANDARD_INFO or not any(
        f'{os.sep}{lib}{os.sep}' in record.pathname for lib in ('orbax', 'grain'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
