"""A run's orbax checkpoints: what they hold, when they are written and kept, how they are read.

WORKDIR/checkpoints/<step>/ holds four orbax items, written together and atomically (orbax
writes to a temporary folder and renames it, or writes a commit file on object stores, only when
every item and every process is done; a save killed half-way leaves the previous checkpoints as
they were, and the next start ignores and removes the unfinished folder):

  state      the `train_step.TrainState`: step, parameters, optimizer state, masking RNG and
             the skip / non-finite counters (sharded arrays, each process writes its shards).
  data       the grain iterator state of every process (`process_<i>-of-<n>.json`, grain's own
             orbax handler), so that a resumed run reads exactly the examples the interrupted
             one would have read next.
  config     the run's config as JSON.
  tokenizer  the file of the tokenizer the text tower was trained with, base64 in JSON:
             {"kind": "sentencepiece", "sentencepiece_model": ...} or {"kind": "clip_bpe",
             "clip_bpe_vocab": CLIP's bpe_simple_vocab_16e6.txt.gz}, with "sha256" (of the
             model, or of the vocabulary's text): the checkpoint rebuilds its tokenizer on any
             machine. Checkpoints from before `config.tokenizer.kind` have no "kind" and are
             sentencepiece.

Saves are asynchronous: the arrays are copied off the devices, then written by a background
thread while training goes on. `Checkpoints.should_save` decides from `config.checkpoint_every`
(steps) and `config.checkpoint_minutes` (time since the last save, decided on process 0 and
shared with all processes); `config.keep_checkpoints` (the last K) and `config.keep_every`
(steps that are multiples of M) say which ones stay.

`read_state` and `load_params` read a checkpoint written under any mesh or number of hosts,
because orbax stores each array's global value. The workdir may be a local path or a URL
(gs://...): orbax writes each array through tensorstore's driver for it (every process its own
shards, together) and the rest through `etils.epath` (rils_jax/storage.py).

`Checkpoints.restore` and `load_params` read either layout of the transformer layers
(`config.model.scan_layers`, models/layout.py): a checkpoint of the other layout is read as it
was saved and converted on the devices, values unchanged. `read_state` returns the saved layout.
"""

import base64
import functools
import json
import re
from typing import Any, Dict, List, Optional, Tuple

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from rils_jax import config_lib
from rils_jax import storage
from rils_jax import tokenizer as tokenizer_lib
from rils_jax.models import layout

ITEMS = ('state', 'data', 'config', 'tokenizer')
# The tokenizer item's key for the file, by tokenizer kind.
_TOKENIZER_KEYS = {'sentencepiece': 'sentencepiece_model', 'clip_bpe': 'clip_bpe_vocab'}

# Orbax splits the write of an array replicated over devices between its replicas. On one host
# that gains nothing, and the slicing costs a compiled program per array and shard (7 s at the
# first save of the tests' tiny model on 8 CPU devices); only arrays big enough for the split
# to pay off across hosts are split.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 16 << 20
_STATE_TYPES = ocp.type_handlers.create_type_handler_registry(
    (jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL)),
    (np.ndarray, ocp.type_handlers.NumpyHandler()),
    (int, ocp.type_handlers.ScalarHandler()),
    (float, ocp.type_handlers.ScalarHandler()),
    (np.number, ocp.type_handlers.ScalarHandler()))


def saved_layout(saved_tree, like) -> Optional[bool]:
  """Whether the layers of a checkpoint's tree (`saved_tree`, e.g. its metadata) are stacked
  (True) or unrolled (False) when that differs from the layout of `like`; None when they agree
  or either holds no layers (see `layout.is_stacked`)."""
  saved, want = layout.is_stacked(saved_tree), layout.is_stacked(like)
  return saved if None not in (saved, want) and saved != want else None


def _shapes(tree) -> Dict[str, Tuple[int, ...]]:
  """'PATH' -> shape of every leaf (arrays, ShapeDtypeStructs or orbax metadata)."""
  return {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _run_items(config: ml_collections.ConfigDict, tokenizer_path: str) -> Dict[str, Any]:
  """The `config` and `tokenizer` items that every checkpoint of a run carries."""
  with open(tokenizer_path, 'rb') as f:
    tokenizer = tokenizer_item(f.read())
  return dict(config=ocp.args.JsonSave(json.loads(json.dumps(config.to_dict(), default=str))),
              tokenizer=ocp.args.JsonSave(tokenizer))


def innermost_error(error: BaseException, limit: int = 500) -> str:
  """'Type: message' of the innermost cause of `error`, cut at `limit` characters: for a damaged
  file, tensorstore's error names the array and why (e.g. a truncated file), where orbax's
  wrapper prints a whole TensorStore spec."""
  cause = error
  while cause.__cause__ is not None or cause.__context__ is not None:
    cause = cause.__cause__ or cause.__context__
  return f'{type(cause).__name__}: {str(cause)[:limit]}'


def params_mismatch(saved_tree, like, limit: int = 4) -> List[str]:
  """What differs between the `params` of a checkpoint's tree (`saved_tree`, its metadata) and
  of `like` (in the saved layer layout): 'PATH: SHAPE in the checkpoint, SHAPE here' for each
  parameter missing on either side or of another shape, at most `limit` lines and a count of
  the rest; empty when they agree or the saved tree cannot be read."""
  params = like.get('params') if isinstance(like, dict) else getattr(like, 'params', None)
  try:
    saved = _shapes(saved_tree['params'])
  except (KeyError, TypeError, AttributeError):
    return []
  if params is None:  # A state without parameters (not a train state): orbax says the rest.
    return []
  want = _shapes(params)
  out = [f'{k}: {saved.get(k, "absent")} in the checkpoint, {want.get(k, "absent")} here'
         for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
  return out[:limit] + ([f'and {len(out) - limit} more'] if len(out) > limit else [])


def relayout(tree, like):
  """`tree` (arrays) in the layer layout of `like` (ShapeDtypeStructs or arrays), placed
  with the shardings of `like` when all its leaves have one. Values are moved, not changed."""
  leaves, treedef = jax.tree.flatten(like)
  shardings = [getattr(x, 'sharding', None) for x in leaves]
  placed = dict(out_shardings=jax.tree.unflatten(treedef, shardings)) if (
      leaves and None not in shardings) else {}
  return jax.jit(functools.partial(layout.to_layout, stacked=bool(layout.is_stacked(like))),
                 **placed)(tree)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks the checkpoint settings of `config` (intervals, keep policies, `init_from`).

  Raises:
    ValueError: for a non-positive `checkpoint_every` or `keep_checkpoints`, a negative
      `keep_every` or `checkpoint_minutes`, or a `keep_best` that names no periodic evaluator.
    FileNotFoundError: for an `init_from` that holds no checkpoint.
  """
  for key in ('checkpoint_every', 'keep_checkpoints'):
    if config[key] < 1:
      raise ValueError(f'config.{key}={config[key]} must be >= 1')
  for key in ('keep_every', 'checkpoint_minutes'):
    if config[key] < 0:
      raise ValueError(f'config.{key}={config[key]} must be >= 0 (0 turns it off)')
  if config.init_from:
    checkpoint_path(config.init_from)
  if config.get('keep_best_mode', 'max') not in ('max', 'min'):
    raise ValueError(f"config.keep_best_mode={config.keep_best_mode!r} must be 'max' or 'min'")
  if config.get('keep_best'):  # Pre-training only (fine-tuning configs have no evaluators).
    name, _, metric = config.keep_best.partition('/')
    periodic = sorted(k for k, v in config.evals.items()
                      if isinstance(v, ml_collections.ConfigDict) and v.get('every'))
    if name not in periodic or not metric:
      raise ValueError(f'config.keep_best={config.keep_best!r} must be NAME/METRIC of an '
                       'evaluator that runs during training (config.evals.NAME.every > 0); '
                       f'those are {periodic}, e.g. {(periodic or ["zeroshot"])[0]}/top1')
    kind = config.evals[name].kind
    pattern = KEEP_BEST_METRICS.get(kind)
    if pattern is None or not re.fullmatch(pattern, metric):
      raise ValueError(f'config.keep_best={config.keep_best!r}: {metric!r} is not a score of a '
                       f'{kind} evaluator ({KEEP_BEST_HELP.get(kind, "none")})')


class Checkpoints:
  """The orbax `CheckpointManager` of WORKDIR/checkpoints with the policies of `config`."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.directory = storage.join(storage.absolute(workdir), 'checkpoints')
    save = [policies.FixedIntervalPolicy(config.checkpoint_every)]
    if config.checkpoint_minutes > 0:
      save.append(policies.ContinuousCheckpointingPolicy(
          minimum_interval_secs=int(config.checkpoint_minutes * 60)))
    keep = [policies.LatestN(config.keep_checkpoints)]
    if config.keep_every > 0:
      keep.append(policies.EveryNSteps(config.keep_every))
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=ITEMS,
        item_handlers={
            'state': ocp.PyTreeCheckpointHandler(type_handler_registry=_STATE_TYPES),
            'data': grain.checkpoint.CheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(save),
            preservation_policy=policies.AnyPreservationPolicy(keep),
            cleanup_tmp_directories=True, create=True, enable_async_checkpointing=True))

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether `step` is due by the step interval or the time interval (the same answer on all
    processes)."""
    return self._manager.should_save(step)

  def save(self, step: int, state, data_iterator, config: ml_collections.ConfigDict,
           tokenizer_path: str) -> bool:
    """Starts an asynchronous save of `step` (all processes call it together); returns False if
    that step is already saved. The data state is captured now, before this returns."""
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        **_run_items(config, tokenizer_path))
    return self._manager.save(step, args=args, force=True)

  def restore(self, step: int, initial_state, data_iterator=None, config=None):
    """Restores `step` into the shapes and shardings of `initial_state`, and the data iterator's
    position in place when one is given. Returns the restored state. A checkpoint saved in the
    other layer layout (`config.model.scan_layers`) is read as saved and converted.

    `config` (this run's) names, in those errors, the settings where the checkpoint's own config
    differs.

    Raises:
      ValueError: when the checkpoint does not fit this config's model or optimizer, holds no
        data position for this number of processes, or a position that does not fit this
        config's input pipeline.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, initial_state)
    try:
      saved_tree = self._manager.item_metadata(step)['state']
    except (KeyError, TypeError, ValueError, FileNotFoundError):
      saved_tree = None  # Restoring below says what is wrong.
    stacked = saved_layout(saved_tree, abstract)
    source = abstract if stacked is None else layout.to_layout(abstract, stacked)
    items = dict(state=ocp.args.PyTreeRestore(
        item=source, restore_args=ocp.checkpoint_utils.construct_restore_args(source)))

    def changed(sections):
      if config is None:
        return ''
      try:
        saved = self.read_json(step, 'config')
      except (KeyError, ValueError, FileNotFoundError):
        return ''
      lines = config_lib.differences(saved, config.to_dict(), sections)
      return f' It differs from the checkpoint\'s config in: {"; ".join(lines)}.' if lines else ''

    if data_iterator is not None:
      count = jax.process_count()
      name = f'process_{jax.process_index()}-of-{count}.json'
      data_folder = storage.join(self.directory, str(step), 'data')
      if not storage.is_dir(data_folder):
        raise ValueError(
            f'the checkpoint at step {step} in {self.directory} has no input position (no '
            f'{data_folder}): it is damaged. Move {storage.join(self.directory, str(step))} '
            'aside to resume from the checkpoint before it, or pass '
            '--config.input.resume_position=false to restore the model and optimizer and '
            'restart the data stream from a new seed')
      if not storage.is_file(storage.join(data_folder, name)):
        raise ValueError(
            f'the checkpoint at step {step} in {self.directory} holds no input position for '
            f'{count} process(es) ({name}): it was written by another number of processes. '
            'Resume with that number, or pass --config.input.resume_position=false to restore '
            'the model and optimizer and restart the data stream from a new seed')
    model_changes = changed(('model', 'loss', 'optim', 'mae', 'flip'))
    refusal = (f'the checkpoint at step {step} in {self.directory} does not fit the model or '
               f'optimizer of this config.{model_changes}')
    advice = (' Resume with the config the run started with (config.json beside checkpoints/), '
              'or give a new --workdir.')
    # Checked before orbax reads anything: a failed read leaves orbax's threads failing at exit.
    mismatch = params_mismatch(saved_tree, source)
    if mismatch:
      raise ValueError(f'{refusal} Parameters: {"; ".join(mismatch)}.{advice}')
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax wraps tensorstore's read errors in a bare Exception.
      said = f' Orbax said: {innermost_error(e, 300)}'
      if not model_changes:
        # Same config, same parameter shapes: the files themselves are at fault.
        raise ValueError(
            f'the checkpoint at step {step} in {self.directory} cannot be read, although its '
            'config and parameter shapes match this run\'s: it is damaged or incomplete. Move '
            f'{storage.join(self.directory, str(step))} aside to resume from the checkpoint '
            f'before it.{said}') from e
      raise ValueError(f'{refusal}{advice}{said}') from e
    if data_iterator is not None:  # After the state: a model mismatch is named first.
      try:
        self._manager.restore(step, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
      except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(
            f'the checkpoint at step {step} in {self.directory} holds a data position that '
            'does not fit the input pipeline of this config.' +
            changed(('input', 'seed', 'mesh')) + ' Resume with the same input settings, or pass '
            '--config.input.resume_position=false to keep the model and optimizer and restart '
            'the data stream from a new seed.') from e
    return restored['state'] if stacked is None else relayout(restored['state'], abstract)

  def read_json(self, step: int, item: str) -> Dict[str, Any]:
    """The `config` or `tokenizer` item of `step`.

    Raises:
      ValueError: when the item is missing, cannot be read or is not what it should be (a
        damaged or emptied checkpoint folder), naming the folder to move aside.
    """
    folder = storage.join(self.directory, str(step))
    try:
      value = self._manager.restore(step, args=ocp.args.Composite(
          **{item: ocp.args.JsonRestore()}))[item]
    except (KeyError, ValueError, OSError) as e:  # KeyError: an item not in the folder.
      raise ValueError(f'the {item!r} item of the checkpoint at step {step} in {self.directory} '
                       f'cannot be read ({type(e).__name__}: {e}). Move {folder} aside to '
                       'resume from the checkpoint before it.') from e
    return checked_item(item, value, folder)

  def tokenizer_model(self, step: int) -> bytes:
    """The tokenizer file saved with `step` (a sentencepiece model, or CLIP's gzipped
    vocabulary; `tokenizer.kind_of` tells which)."""
    return tokenizer_file(self.read_json(step, 'tokenizer'))

  def wait(self) -> None:
    """Blocks until the save in flight, if any, is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight, then releases the manager."""
    self._manager.close()


# The scores `keep_best` can rank by, per evaluator kind (rils_jax/evals/*.py), and as said.
KEEP_BEST_METRICS = {'zeroshot': r'top[15]', 'retrieval': r'(i2t|t2i)_r\d+',
                     'linear_probe': r'(val_)?top[15]', 'knn': r'top[15]',
                     'fewshot': r'\d+shot_top1', 'lowshot': r'[\d.]+pct_top1'}
KEEP_BEST_HELP = {'zeroshot': 'top1, top5', 'retrieval': 'i2t_rK, t2i_rK, e.g. i2t_r5',
                  'linear_probe': 'top1, top5, val_top1', 'knn': 'top1, top5',
                  'fewshot': 'Kshot_top1, e.g. 5shot_top1', 'lowshot': 'Ppct_top1, e.g. 1pct_top1'}


class BestCheckpoint:
  """WORKDIR/best: the parameters (with the run's config and tokenizer) of the evaluation step
  with the best `config.keep_best`, through orbax's best-checkpoint policy (`best_fn`,
  `best_mode`, one kept). `rils_jax.evaluate`, `export` and `init_from` read it as any
  checkpoint: --checkpoint=WORKDIR/best. It holds no optimizer state or data position: runs
  resume from WORKDIR/checkpoints."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.metric, self.mode = config.keep_best, config.keep_best_mode
    self.directory = storage.join(storage.absolute(workdir), 'best')
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=('state', 'config', 'tokenizer'),
        item_handlers={'state': ocp.PyTreeCheckpointHandler(type_handler_registry=_STATE_TYPES)},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics[self.metric], best_mode=self.mode,
            keep_checkpoints_without_metrics=False, cleanup_tmp_directories=True, create=True,
            enable_async_checkpointing=False))

  def offer(self, step: int, params, metrics: Dict[str, float], config: ml_collections.ConfigDict,
            tokenizer_path: str) -> bool:
    """Saves `params` of `step` with its `metrics[keep_best]` (all processes call it together);
    orbax then keeps whichever of it and the kept one is better. Returns whether `step` is now
    the best."""
    if self.metric not in metrics:
      return False
    self._manager.save(step, metrics={self.metric: float(metrics[self.metric])}, force=True,
                       args=ocp.args.Composite(state=ocp.args.PyTreeSave({'params': params}),
                                               **_run_items(config, tokenizer_path)))
    self._manager.wait_until_finished()
    return self._manager.best_step() == step

  def close(self) -> None:
    self._manager.close()


def tokenizer_item(data: bytes) -> Dict[str, str]:
  """The `tokenizer` item of a tokenizer file's bytes (see the module docstring)."""
  kind = tokenizer_lib.kind_of(data)
  return {'kind': kind, _TOKENIZER_KEYS[kind]: base64.b64encode(data).decode(),
          'sha256': tokenizer_lib.fingerprint(data)}


# Keys that every saved config has had: one without them is not a run's config.
_CONFIG_KEYS = ('model', 'optim', 'input')


def checked_item(item: str, value: Any, where: str) -> Dict[str, Any]:
  """`value`, a JSON item read from the checkpoint at `where`, if it has the item's form.

  Raises:
    ValueError: for an item that is no JSON object, or a `config` without its sections.
  """
  if not isinstance(value, dict):
    raise ValueError(f'the {item!r} item of the checkpoint {where} holds a JSON '
                     f'{type(value).__name__}, not an object: it is damaged')
  missing = [k for k in _CONFIG_KEYS if k not in value] if item == 'config' else []
  if missing:
    raise ValueError(f'the {item!r} item of the checkpoint {where} lacks {", ".join(missing)}: '
                     'it is damaged')
  return value


def tokenizer_file(item: Dict[str, Any]) -> bytes:
  """The tokenizer file's bytes from a `tokenizer` item (also of checkpoints written before
  `config.tokenizer.kind`: sentencepiece only, without "kind").

  Raises:
    ValueError: for an item of an unknown kind or without its file.
  """
  kind = item.get('kind', 'sentencepiece')
  key = _TOKENIZER_KEYS.get(kind)
  if key not in item:
    raise ValueError(f'the checkpoint\'s tokenizer item (kind {kind!r}, keys {sorted(item)}) '
                     f'holds no tokenizer file this rils_jax reads (kinds {tokenizer_lib.KINDS})')
  try:
    return base64.b64decode(item[key], validate=True)
  except (ValueError, TypeError) as e:  # binascii.Error is a ValueError.
    raise ValueError(f'the checkpoint\'s tokenizer item holds no readable {kind} file '
                     f'({type(e).__name__}: {e}): it is damaged') from e


def checkpoint_path(path: str, step: Optional[int] = None) -> str:
  """The `state` item folder of a checkpoint.

  `path` is a run's workdir (then `step`, default the latest, under WORKDIR/checkpoints), its
  checkpoints folder, or one checkpoint's folder (WORKDIR/checkpoints/<step>); a local path or
  a URL (gs://...).

  Raises:
    FileNotFoundError: when there is no (such) checkpoint there.
  """
  path = storage.absolute(storage.check_path(path, 'the checkpoint path')).rstrip('/')
  if storage.basename(path) == 'state' and storage.is_dir(path):
    path = storage.dirname(path)  # The state item's own folder was given.
  if not storage.is_dir(path):
    raise FileNotFoundError(f'{path} does not exist (or is not a folder): give a run\'s workdir '
                            'or one of its WORKDIR/checkpoints/<step> folders')
  if storage.is_dir(storage.join(path, 'state')):
    if step is not None and storage.basename(path) != str(step):
      raise FileNotFoundError(f'no checkpoint {step} at {path}, which is one checkpoint (step '
                              f'{storage.basename(path)}); give the run\'s workdir with a step')
    return storage.join(path, 'state')
  root = storage.join(path, 'checkpoints') if storage.is_dir(
      storage.join(path, 'checkpoints')) else path
  steps = ocp.utils.checkpoint_steps(root) if storage.is_dir(root) else []
  # A step folder without its state item (emptied, or cut short by hand) is not a checkpoint.
  steps = [s for s in steps if storage.is_dir(storage.join(root, str(s), 'state'))]
  if not steps or (step is not None and step not in steps):
    which = 'no checkpoint' if step is None else f'no checkpoint {step}'
    raise FileNotFoundError(f'{which} under {root} (steps there: {sorted(steps)}); give a '
                            'run\'s workdir or one of its WORKDIR/checkpoints/<step> folders')
  return storage.join(root, str(max(steps) if step is None else step), 'state')


def read_json(path: str, item: str, step: Optional[int] = None) -> Dict[str, Any]:
  """The `config` or `tokenizer` JSON item of a checkpoint (`path` as for `checkpoint_path`).

  Raises:
    FileNotFoundError: when there is no such checkpoint or item.
    ValueError: when the item cannot be read (damaged).
  """
  folder = storage.join(storage.dirname(checkpoint_path(path, step)), item)
  if not storage.is_dir(folder):
    raise FileNotFoundError(f'the checkpoint {storage.dirname(folder)} holds no {item!r} item')
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
      value = checkpointer.restore(folder, args=ocp.args.JsonRestore())
  except (ValueError, OSError) as e:  # json.JSONDecodeError is a ValueError.
    raise ValueError(f'the {item!r} item of the checkpoint {storage.dirname(folder)} cannot be '
                     f'read: {type(e).__name__}: {e}') from e
  return checked_item(item, value, storage.dirname(folder))


def read_state(path: str, step: Optional[int] = None) -> Any:
  """The saved train state as a nested dict of numpy arrays (keys step, params, opt_state, rng,
  skipped_examples, nonfinite_steps, consecutive_nonfinite), restored whole on one device.

  `path`: as for `checkpoint_path`.
  """
  path = checkpoint_path(path, step)
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        metadata)
  return jax.tree.map(np.asarray, checkpointer.restore(path, target))


def load_params(path: str, like, missing_ok: bool = False) -> Any:
  """Parameters only from another run's checkpoint (warm start, `config.init_from`; evaluation),
  laid out like `like` (arrays with shardings, or ShapeDtypeStructs with shardings), in the
  layer layout of `like` whichever the checkpoint's (`config.model.scan_layers`).

  Matching is by top-level entry (`visual`, `decoder`, `text`, `image_projection`, ...): entries
  the checkpoint has and `like` lacks are not read (a RILS run's decoder into a CLIP model, a
  LiT tower from any run); with `missing_ok`, entries `like` has and the checkpoint lacks keep
  `like`'s values (`like` must then hold arrays: an MAE run's image tower into an image-text
  model). Within a shared entry names and shapes must match exactly. What was left out is
  logged.

  Raises:
    FileNotFoundError: when `path` holds no checkpoint (see `checkpoint_path`).
    ValueError: when its parameters do not have the names and shapes of `like` (a missing
      top-level entry counts unless `missing_ok`), or the checkpoint is incomplete or damaged.
  """
  path = checkpoint_path(path)
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata
  if metadata is None:
    raise ValueError(f'{path} holds no readable checkpoint metadata: the checkpoint is '
                     'incomplete or damaged; use another step')
  saved = metadata.tree.get('params')
  if saved is None:
    raise ValueError(f'{path} holds no "params"')
  unread = sorted(set(saved) - set(like))
  # Without `missing_ok` an absent entry stays in `like`: reported below as missing names.
  absent = sorted(set(like) - set(saved)) if missing_ok else []
  if unread or absent:
    logging.info('Parameters from %s: not read %s; not in the checkpoint (kept) %s', path,
                 unread, absent)
  saved = {k: v for k, v in saved.items() if k not in unread}
  kept = {k: like[k] for k in absent}
  like = {k: v for k, v in like.items() if k not in absent}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  stacked = saved_layout(saved, abstract)
  source = abstract if stacked is None else layout.to_layout(abstract, stacked)
  want, have = _shapes(source), _shapes(saved)
  if want != have:
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shapes = sorted(f'{k}: {have[k]} saved, {want[k]} here' for k in set(want) & set(have)
                    if want[k] != have[k])
    raise ValueError(f'the parameters in {path} do not fit this model: missing {missing[:5]}, '
                     f'unexpected {extra[:5]}, other shapes {shapes[:5]} (first 5 of each)')
  try:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item={'params': source},
        restore_args={'params': ocp.checkpoint_utils.construct_restore_args(source)},
        partial_restore=True))
  except Exception as e:  # tensorstore / orbax errors on damaged files.
    raise ValueError(f'the parameters in {path} cannot be read (damaged checkpoint?): '
                     f'{innermost_error(e)}') from e
  params = restored['params'] if stacked is None else relayout(restored['params'], abstract)
  return {**params, **kept}
