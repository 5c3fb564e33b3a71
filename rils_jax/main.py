r"""Pre-trains a RILS model.

  python -m rils_jax.main --config=configs/default.py --workdir=/tmp/rils_default
  python -m rils_jax.main --config=configs/vit_b16.py --workdir=DIR --config.input.batch_size=8

Writes to DIR: config.json, the tokenizer used (tokenizer.model for sentencepiece,
tokenizer_clip_bpe.txt.gz for CLIP's BPE), metrics.jsonl (one JSON
object per logged step, per periodic evaluation and for the final evaluation), TensorBoard
events under tensorboard/, and orbax checkpoints under checkpoints/ (rils_jax/checkpoints.py).
DIR is a local path or a URL (gs://bucket/run): checkpoints go straight to the bucket, and the
logs are uploaded whole every `config.log_upload_seconds`, at every checkpoint and at the end
(rils_jax/storage.py).
The evaluators of `config.evals` (rils_jax/evals/runner.py) run every `every` steps when set,
and all of them at the end.

Fault tolerance:
- Re-running with the same DIR resumes from the latest complete checkpoint exactly: parameters,
  optimizer state, step, RNG and the position of every process in the data stream, so the
  resumed run sees the examples and computes the parameters the uninterrupted one would have.
  `config.model.scan_layers` may change on resume: the checkpoint is converted (the same holds
  for `config.init_from`; rils_jax/models/layout.py).
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

import contextlib
import json
import os
import shutil
import time
from typing import Optional

import jax
import ml_collections
from absl import app
from absl import flags
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from rils_jax import allocator
from rils_jax import checkpoints as checkpoints_lib
from rils_jax import config_lib
from rils_jax import console
from rils_jax import distributed
from rils_jax import health as health_lib
from rils_jax import metric_writer
from rils_jax import optim
from rils_jax import preemption
from rils_jax import report
from rils_jax import storage
from rils_jax import tokenizer as tokenizer_lib
from rils_jax import train_step as train_step_lib
from rils_jax import wandb_run
from rils_jax.data import pipeline
from rils_jax.data import records
from rils_jax.evals import embed as embed_lib
from rils_jax.evals import runner as evals_lib
from rils_jax.evals import table


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


def validate_config(config: ml_collections.ConfigDict) -> train_step_lib.Setup:
  """Checks what would otherwise fail late or silently, before any data is read or compiled,
  and returns the run's `train_step.Setup` (mesh, model, optimizer, shardings), which training
  then uses. Each rule lives with the code it protects; this calls them in turn.

  Raises:
    ValueError: for an unknown config key (config_lib), another machine's platform preset, a
      mesh, batch, accumulation, model, masking or optimizer setting that cannot work
      (train_step.setup), a bad loss setting (losses), checkpoint setting (checkpoints),
      evaluator (evals.runner), input setting or source entry (data.pipeline), a non-positive
      `log_every` or `max_consecutive_nonfinite`, a non-positive `log_upload_seconds`, a bad
      `config.wandb` (or wandb missing for it), a negative seed, bad
      `debug.nan_loss_steps`, a bad `config.tokenizer` or a tokenizer path that cannot be read.
    FileNotFoundError: for an `init_from` path that holds no checkpoint, or CLIP's BPE
      vocabulary missing (`tokenizer.kind='clip_bpe'`).
  """
  config_lib.check_keys(config)
  train_step_lib.check_platform(config)
  setup = train_step_lib.setup(config)  # Also checks config.loss (against the batch).
  tokenizer_lib.check_config(config.tokenizer)
  if config.tokenizer.kind == 'clip_bpe':
    # Before the workdir exists: a missing vocabulary must not leave a half-made run behind.
    tokenizer_lib.find_clip_vocab(config.tokenizer.get('clip_vocab', ''))
  checkpoints_lib.check_config(config)
  for key in ('log_every', 'max_consecutive_nonfinite'):
    if config[key] < 1:
      raise ValueError(f'config.{key}={config[key]} must be >= 1')
  if not 0 < config.log_upload_seconds < float('inf'):
    raise ValueError(f'config.log_upload_seconds={config.log_upload_seconds} must be > 0 '
                     'and finite')
  try:
    bad_steps = [int(s) for s in config.debug.nan_loss_steps]
  except (TypeError, ValueError) as e:
    raise ValueError('config.debug.nan_loss_steps must be a tuple of step numbers, got '
                     f'{config.debug.nan_loss_steps!r}') from e
  if any(s < 1 for s in bad_steps):
    raise ValueError(f'config.debug.nan_loss_steps={bad_steps} must hold steps >= 1')
  if config.seed < 0:
    raise ValueError(f'config.seed={config.seed} must be >= 0')
  evals_lib.evaluator_specs(config.evals)
  evals_lib.check_model_kind(config.evals, config.loss.kind)
  if config.model.get('freeze') and not config.init_from:
    raise ValueError(f'config.model.freeze={config.model.freeze!r} locks a tower at the values '
                     'of config.init_from (LiT), which is empty: name the run or checkpoint '
                     'that trained the tower')
  wandb_run.check_config(config.wandb)
  if config.tokenizer.model and not (os.path.isfile(config.tokenizer.model) and
                                     os.access(config.tokenizer.model, os.R_OK)):
    raise ValueError(f'config.tokenizer.model={config.tokenizer.model!r} is not a readable file')
  pipeline.check_config(config)
  return setup


def prepare_tokenizer(config, data: records.RecordSource, workdir: str,
                      saved_model: Optional[bytes],
                      local: Optional[str] = None) -> tokenizer_lib.AnyTokenizer:
  """The run's tokenizer (`config.tokenizer.kind`), kept in the workdir as its one file:
  tokenizer.model (sentencepiece) or tokenizer_clip_bpe.txt.gz (CLIP's BPE vocabulary).

  `local` is the local folder where the tokenizer file is prepared and read (default:
  `workdir`); for a URL workdir each process keeps its own copy there and process 0 uploads it.

  A run that resumes uses `saved_model`, the file saved in the checkpoint (the one its text
  tower was trained with), and restores the workdir's copy from it. A fresh clip_bpe run copies
  CLIP's vocabulary (`config.tokenizer.clip_vocab`, or open_clip_torch's copy); a fresh
  sentencepiece run copies the config's model or, when the config names none, trains one on the
  training captions (all of them for csv/coco sources, those of 50,000 records spread over
  shard sources). With several processes each one prepares and checks the same tokenizer
  (training is deterministic), process 0 writes it, and all wait for that.

  Raises:
    ValueError: for a bad `config.tokenizer` (`tokenizer.check_config`), a vocabulary larger
      than `config.model.text.vocab_size`, or a resumed run whose config names another
      tokenizer kind or file than the checkpoint's.
    FileNotFoundError: when CLIP's vocabulary cannot be found.
  """
  tokenizer_lib.check_config(config.tokenizer)
  kind = config.tokenizer.kind
  local = local or workdir
  remote = storage.is_url(workdir)
  name = tokenizer_lib.FILE_NAMES[kind]
  path = os.path.join(local, name)
  # The tokenizer goes to a temporary name and replaces the workdir's copy only if it fits.
  tmp = f'{path}.tmp{jax.process_index()}'
  if saved_model is not None:
    saved_kind = tokenizer_lib.kind_of(saved_model)
    if saved_kind != kind:
      raise ValueError(f'{workdir} holds a checkpoint trained with the {saved_kind} tokenizer but '
                       f'config.tokenizer.kind={kind!r}; resume with --config.tokenizer.kind='
                       f'{saved_kind}, or use a new workdir to train with another tokenizer')
    key = 'model' if kind == 'sentencepiece' else 'clip_vocab'
    named = config.tokenizer[key]
    if named:
      with open(tokenizer_lib.find_clip_vocab(named) if key == 'clip_vocab' else named, 'rb') as f:
        if tokenizer_lib.fingerprint(f.read()) != tokenizer_lib.fingerprint(saved_model):
          raise ValueError(f'{workdir} holds a checkpoint trained with another tokenizer than '
                           f'config.tokenizer.{key}={named!r}; use a new workdir to train with '
                           'another tokenizer')
    with open(tmp, 'wb') as f:
      f.write(saved_model)
  elif kind == 'clip_bpe':
    shutil.copyfile(tokenizer_lib.find_clip_vocab(config.tokenizer.clip_vocab), tmp)
  elif config.tokenizer.model:
    shutil.copyfile(config.tokenizer.model, tmp)
  else:
    captions = records.sample_captions(data)
    logging.info('Training a sentencepiece tokenizer (<= %d pieces) on %d captions',
                 config.tokenizer.vocab_size, len(captions))
    start = time.time()
    tokenizer_lib.train_tokenizer(captions, config.tokenizer.vocab_size, tmp)
    logging.info('Tokenizer trained in %.1f s', time.time() - start)
  try:
    check_vocab(tokenizer_lib.load(tmp), config)
  except (ValueError, RuntimeError, OSError) as e:  # sentencepiece: RuntimeError or OSError.
    os.remove(tmp)
    if saved_model is None or isinstance(e, ValueError):
      raise
    raise ValueError(f'the tokenizer saved in the latest checkpoint of {workdir} cannot be '
                     f'loaded ({type(e).__name__}: {e}): it is damaged') from e
  if jax.process_index() == 0 or remote:
    os.replace(tmp, path)
  else:
    os.remove(tmp)
  if remote and jax.process_index() == 0:
    with open(path, 'rb') as f:
      storage.write_bytes(storage.join(workdir, name), f.read())
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('rils_jax tokenizer written')
  return tokenizer_lib.load(path)


def check_vocab(tokenizer: tokenizer_lib.AnyTokenizer, config) -> tokenizer_lib.AnyTokenizer:
  """Returns `tokenizer` if the text tower embeds all its ids.

  Raises:
    ValueError: if its vocabulary is larger than `config.model.text.vocab_size`.
  """
  if tokenizer.vocab_size > config.model.text.vocab_size:
    which = ("CLIP's BPE tokenizer (config.tokenizer.kind='clip_bpe')"
             if tokenizer.kind == 'clip_bpe' else f'tokenizer {tokenizer.model_path}')
    raise ValueError(f'{which} has {tokenizer.vocab_size} pieces but the text tower embeds only '
                     f'config.model.text.vocab_size={config.model.text.vocab_size}; set '
                     f'--config.model.text.vocab_size={tokenizer.vocab_size} or more')
  return tokenizer


def write_config(config: ml_collections.ConfigDict, workdir: str, resume_step) -> None:
  """config.json for a fresh run; a resumed run keeps it (it describes the checkpoints) and
  writes config.resume_<step>.json beside it."""
  name = 'config.json' if resume_step is None else f'config.resume_{resume_step}.json'
  storage.write_text(storage.join(workdir, name),
                     json.dumps(config.to_dict(), indent=2, default=str))


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


# Besides every `log_every` steps, the first steps after a start are logged (relative to it), so
# that the speed and the ETA show within seconds, not after `log_every` steps.
EARLY_LOG_STEPS = (1, 2, 5, 10)


def should_log(step: int, start_step: int, config) -> bool:
  """Whether `step` (1-based) of a run that started (or resumed) after `start_step` is logged:
  the early steps, every `config.log_every`, and the last."""
  return (step - start_step in EARLY_LOG_STEPS or step % config.log_every == 0 or
          step == config.total_steps)


def progress_line(step, total, metrics, images_per_s, start_time, first_step_time,
                  first_step) -> str:
  """'step S/T  loss ...  N img/s  elapsed H:MM:SS  ETA H:MM:SS'. The ETA's rate excludes the
  first step after a start (it compiles), so that step has none."""
  now = time.time()
  eta = 'ETA at the next step'
  if step > first_step:
    per_step = (now - first_step_time) / (step - first_step)
    eta = f'ETA {_clock(per_step * (total - step))}'
  return (f'step {step}/{total}  loss {metrics["loss"]:.4f}  clip {metrics["clip_loss"]:.4f}  '
          f'recon {metrics["recon_loss"]:.4f}  clip_acc {metrics["clip_acc"]:.3f}  '
          f'{images_per_s:.1f} img/s  elapsed {_clock(now - start_time)}  {eta}')


# The settings that define the learning rate at each step (optim.learning_rate_schedule).
SCHEDULE_KEYS = ('total_steps', 'optim.lr', 'optim.lr_start', 'optim.warmup_steps',
                 'optim.min_lr_ratio')


def warn_schedule_change(config, saved: dict, step: int) -> Optional[str]:
  """Says (and returns) how the learning rate continues when a run resumes at `step` with
  schedule settings other than those of its checkpoint's config `saved` (e.g. a longer
  `total_steps`): it follows the new config from step + 1 (the schedule is a function of the
  step and the config, as in big_vision and MaxText), which may jump. None when they agree."""
  changes = config_lib.differences(saved, config.to_dict(), SCHEDULE_KEYS)
  if not changes:
    return None
  old = ml_collections.ConfigDict(saved)
  before = float(optim.learning_rate_schedule(old)(step - 1))
  after = float(optim.learning_rate_schedule(config)(step))
  message = (f'Resuming at step {step} with another learning-rate schedule ({"; ".join(changes)}): '
             f'the learning rate follows the new config from step {step + 1} ({after:.3g}; it was '
             f'{before:.3g} at step {step}). To keep the old schedule, resume with the values of '
             f'the checkpoint\'s config instead.')
  console.say(message)
  return message


def warn_data_change(config, saved: dict, step: int) -> Optional[str]:
  """Says (and returns) that a run resumes at `step` on other training data than its
  checkpoint's config `saved` names (`input.sources`, e.g. another `data=` argument): training
  goes on, on the new data, from the saved position of the stream (an example index, whatever
  the data); the checkpoints and logs then mix both. None when the sources agree."""
  changes = config_lib.differences(saved, config.to_dict(), ('input.sources',), limit=2)
  if not changes:
    return None
  message = (f'Resuming at step {step} on other training data than the checkpoint\'s config '
             f'names ({"; ".join(changes)}): training goes on, on the new data, from the saved '
             'position of the stream. To train on new data from scratch, use a new --workdir.')
  console.say(message)
  return message


def start_state(config, setup: train_step_lib.Setup, checkpoints: checkpoints_lib.Checkpoints,
                resume_step: Optional[int], batches) -> train_step_lib.TrainState:
  """The train state to start from: the checkpoint at `resume_step` (restoring the position of
  the data iterator `batches` with it, unless `config.input.resume_position` is off), else a
  fresh state from `config.seed`, with the parameters of `config.init_from` when given.

  Raises:
    ValueError: when the checkpoint or `init_from` does not fit the config's model.
  """
  if resume_step is not None:
    restore_position = config.input.resume_position
    state = checkpoints.restore(resume_step, setup.abstract_state,
                                batches if restore_position else None, config)
    logging.info('Resumed from the checkpoint at step %d%s', resume_step,
                 '' if restore_position else ' (data stream restarted with a new seed)')
    return state
  state = train_step_lib.create_train_state(setup, config.seed)
  if config.init_from:
    params = checkpoints_lib.load_params(config.init_from, state.params, missing_ok=True)
    frozen = [k for k in optim.frozen_names(config.model.get('freeze', '')) if k in params]
    if any(params[k] is state.params[k] for k in frozen):
      raise ValueError(f'config.model.freeze={config.model.freeze!r} locks {list(frozen)} at the '
                       f'values of config.init_from={config.init_from!r}, which does not hold '
                       'them all: name a run that trained that tower')
    state = state.replace(params=params)
    logging.info('Parameters initialised from %s', config.init_from)
  return state


def periodic_evaluation(evaluations, params, embedder, names, step: int, writer) -> dict:
  """Runs the evaluators due at `step`, logs their metrics and returns them flat
  ('NAME/metric'). A failing evaluator is logged with its error and training goes on: the final
  evaluation runs it again and raises."""
  cache, out = {}, {}
  for name in names:
    try:
      results = evals_lib.flatten(evaluations.run(params, embedder, [name], cache))
    except evals_lib.EvaluationError as e:
      logging.exception('Evaluation at step %d failed; training continues', step)
      console.say(f'Evaluation at step {step} failed (training continues): {e}')
      continue
    writer.write(step, results)
    out.update(results)
    console.say(f'Evaluation at step {step}:\n{table.table(table.unflatten(results))}')
  return out


def keep_if_best(best: Optional[checkpoints_lib.BestCheckpoint], step: int, params, results,
                 config, tokenizer_path: str) -> None:
  """Offers the parameters of an evaluated step to WORKDIR/best (`config.keep_best`)."""
  if best is not None and best.offer(step, params, results, config, tokenizer_path):
    console.say(f'Best {config.keep_best} so far ({results[config.keep_best]:.4g}) at step '
                f'{step}: parameters kept in {best.directory}')


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, checkpoints and evaluates; returns the final evaluation metrics, or {} when a
  preemption notice stopped the run (after saving a checkpoint).

  Re-running with the same workdir resumes from its latest complete checkpoint: parameters,
  optimizer state, step, RNG and the exact position in the data stream.

  Raises:
    ValueError: for a bad config or unreadable input, before anything is compiled.
    health.NonFiniteError: after `config.max_consecutive_nonfinite` non-finite steps in a row.
    RuntimeError: when too many images cannot be read.
  """
  setup = validate_config(config)
  distributed.connect_collectives(setup.mesh)
  storage.check_path(workdir, 'the workdir')  # A malformed URL is refused before it is read.
  existed = storage.is_dir(workdir)
  before = set(storage.listdir(workdir))
  started = []  # Holds True once the first step is done: from then on, everything is kept.
  try:
    # Closed in reverse: the checkpoints first (waiting for a save in flight, so that an error
    # never loses it), then the logs (their last upload, also after an error), then the watcher.
    with contextlib.ExitStack() as closing:
      storage.prepare_workdir(workdir)
      # Installed first, so that a notice during the (long) set-up is not lost.
      watcher = preemption.Watcher()
      closing.callback(watcher.close)
      ids_file = f'example_ids/process_{jax.process_index()}.jsonl'
      logs = storage.Mirror(workdir, uploads=('metrics.jsonl', 'tensorboard', ids_file),
                            continues=(('metrics.jsonl',) if jax.process_index() == 0 else ()) +
                            (ids_file,), interval=config.log_upload_seconds)
      closing.callback(logs.close)
      checkpoints = checkpoints_lib.Checkpoints(workdir, config)
      closing.callback(checkpoints.close)
      results = _train(config, workdir, setup, watcher, checkpoints, logs, started)
      started.append(True)  # Also a run with nothing left to train ends normally.
  finally:
    if not started and jax.process_index() == 0:
      # A run refused or stopped before its first step (data smaller than a batch, unreadable
      # images, a checkpoint that does not fit, Ctrl-C) leaves the workdir as it found it.
      if existed:
        for name in set(storage.listdir(workdir)) - before:
          storage.remove(storage.join(workdir, name))
      else:
        storage.remove(workdir)
  if jax.process_index() == 0:
    try:  # A picture of the run; a failure here must not fail a finished run.
      out = report.write_report(workdir)
      console.say(f'Report: {out["html"]} and {out["png"]}')
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Could not write the report (python -m rils_jax.report --workdir=%s '
                      'retries): %s', workdir, e)
  return results


def _train(config, workdir, setup: train_step_lib.Setup, watcher: preemption.Watcher,
           checkpoints: checkpoints_lib.Checkpoints, logs: storage.Mirror, started: list) -> dict:
  is_main = jax.process_index() == 0
  resume_step = checkpoints.latest_step()
  if is_main:
    write_config(config, workdir, resume_step)
  data = pipeline.training_data(config)
  evaluations = evals_lib.Evaluations(config)  # Opens the datasets: fails now, not after.
  saved_tokenizer = None if resume_step is None else checkpoints.tokenizer_model(resume_step)
  tokenizer = prepare_tokenizer(config, data, workdir, saved_tokenizer, logs.local)
  setup = setup.with_eot_id(tokenizer.eot_id)
  batches = pipeline.training(config, data, tokenizer, setup.mesh, resume_step)

  start_step = resume_step or 0
  state = start_state(config, setup, checkpoints, resume_step, batches)
  if resume_step is not None:
    saved = checkpoints.read_json(resume_step, 'config')
    warn_schedule_change(config, saved, resume_step)
    warn_data_change(config, saved, resume_step)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model: %s, %.2fM parameters, mesh %s', config.model.variant, num_params / 1e6,
               dict(setup.mesh.shape))
  hint = allocator.advice(jax.default_backend()) if is_main else None
  if hint:
    logging.info(hint)
  train_step = train_step_lib.make_train_step(setup, config)
  unmasked_from = train_step_lib.unmasked_from(config)
  if unmasked_from <= config.total_steps:  # FLIP's unmasked tuning: whole images at the end.
    unmasked_step = train_step_lib.make_train_step(setup, config, unmasked=True)
  embedder = embed_lib.Embedder(setup.model, config, setup.mesh, tokenizer,
                                setup.shardings.params)

  tracker = wandb_run.open_run(config, workdir, resume_step) if is_main else None
  writer = metric_writer.MetricWriter(logs.local, enabled=is_main, tracker=tracker)
  writer.write(start_step, {**data.stats.metrics(data.counts_captions), 'num_params': num_params})
  if start_step >= config.total_steps:
    console.say(f'The checkpoint at step {start_step} has reached config.total_steps='
                f'{config.total_steps}: nothing to train (this workdir holds a finished run; '
                'give a new --workdir to train from scratch).')
  health = health_lib.Health(config, checkpoints)
  best = checkpoints_lib.BestCheckpoint(workdir, config) if config.keep_best else None
  example_ids = health_lib.ExampleIds(logs.local, config.input.log_example_ids)
  start_time = window_time = first_step_time = time.time()
  window_images = 0
  for step in range(start_step + 1, config.total_steps + 1):
    batch = next(batches)
    example_ids.write(step, batch.pop('example_id'))
    state, metrics = (train_step if step < unmasked_from else unmasked_step)(state, batch)
    if step == start_step + 1:
      started.append(True)
    health.observe(step, metrics)
    window_images += config.input.batch_size
    if should_log(step, start_step, config):
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.time()
      metrics['images_per_sec'] = window_images / (now - window_time)
      metrics['data/skipped_examples'] = metrics.pop('skipped_examples')
      window_time, window_images = now, 0
      writer.write(step, metrics)
      console.say(progress_line(step, config.total_steps, metrics, metrics['images_per_sec'],
                                start_time, first_step_time, start_step + 1))
    if step == start_step + 1:
      first_step_time = time.time()
    preempted = watcher.reached(step)
    if preempted or step == config.total_steps or checkpoints.should_save(step):
      checkpoints.save(step, state, batches, config, tokenizer.model_path)
      logs.flush()  # A resumed run finds the logs up to its checkpoint.
    due = evaluations.due(step) if step < config.total_steps and not preempted else []
    if due:
      eval_start = time.time()
      results = periodic_evaluation(evaluations, state.params, embedder, due, step, writer)
      keep_if_best(best, step, state.params, results, config, tokenizer.model_path)
      window_time += time.time() - eval_start  # Keeps images_per_sec a training rate.
    if preempted:
      checkpoints.wait()
      batches.close()
      console.say(f'Preempted ({watcher.signal_name}) at step {step}: saved the checkpoint '
                  f'{storage.join(checkpoints.directory, str(step))}; run the same command '
                  'again to resume from it.')
      example_ids.close()
      writer.close()
      if best is not None:
        best.close()
      return {}
  health.finish()
  example_ids.close()
  checkpoints.wait()
  # Stops the prefetch thread and the grain workers now (after the last save read the stream's
  # position), rather than at interpreter exit while the evaluation runs.
  batches.close()
  if start_step < config.total_steps:
    console.say(f'Training done: {config.total_steps - start_step} steps in '
                f'{time.time() - start_time:.1f} s')

  results = table.exact_metrics(evals_lib.flatten(evaluations.run(state.params, embedder)))
  keep_if_best(best, int(state.step), state.params, results, config, tokenizer.model_path)
  if best is not None:
    best.close()
  if results:
    writer.write(int(state.step), results)
    writer.summary(results)
    console.say(f'Final evaluation (step {int(state.step)}; exact values in '
                f'{storage.join(workdir, "metrics.jsonl")}):\n'
                f'{table.table(table.unflatten(results))}')
  else:
    console.say('No final evaluation: config.evals names no evaluator (see '
                'rils_jax/evals/runner.py).')
  writer.close()
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.quiet_libraries()
  f = flags.FLAGS
  # A user's mistake (config, data, workdir) or a diverged run raises an error whose message
  # says what to do: console.run prints it as one line.
  distributed.initialize(f.distributed, f.coordinator_address, f.num_processes, f.process_id)
  train(f.config, f.workdir)


if __name__ == '__main__':
  _define_flags()
  console.run(main)
