"""A trained model back from a checkpoint, for evaluation and patch-text maps on one host.

The model is rebuilt from the config saved in the checkpoint and the text tower's tokenizer from
the file saved with it (a sentencepiece model, or CLIP's BPE vocabulary for clip_bpe runs, so
open_clip need not be installed here); the parameters are read whole (orbax stores each array's
global value), so a checkpoint written under any mesh or number of hosts restores here, and in
either layer layout (`config.model.scan_layers`: `checkpoints.load_params` converts). Only
the parameters are read, not the optimizer state.
"""

import contextlib
import dataclasses
import hashlib
import os
import tempfile
from typing import Any, Optional

import jax
import ml_collections

from rils_jax import checkpoints as checkpoints_lib
from rils_jax import sharding
from rils_jax import storage
from rils_jax import tokenizer as tokenizer_lib
from rils_jax.data import synthetic
from rils_jax.models import rils as rils_lib


@dataclasses.dataclass
class Restored:
  """A model and what it needs: `config` is the training run's config, `step` the checkpoint's
  step, `path` its folder."""
  model: rils_lib.RILS
  params: Any
  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.AnyTokenizer
  mesh: Any
  step: int
  path: str


def data_parallel_mesh():
  """A mesh of every device on one data-parallel axis (evaluation keeps parameters
  replicated)."""
  return sharding.make_mesh(ml_collections.ConfigDict(
      {'mesh': {'slice': 1, 'data': -1, 'fsdp': 1, 'tensor': 1}}))


def _holds(path: str, data: bytes) -> bool:
  try:
    with open(path, 'rb') as f:
      return f.read() == data
  except OSError:
    return False


def tokenizer_path(tokenizer_bytes: bytes) -> str:
  """The path of a file holding `tokenizer_bytes`: `<cache>/tokenizers/<sha256>_<name>`.

  A file, since tokenizers pickle (to grain's workers) as their file's path. Named by its
  content, so every restore of one tokenizer shares one file and a killed process leaves no
  copy behind (a temporary file removed at exit stayed in /tmp after a SIGKILL). `<cache>` is
  `synthetic.cache_dir()` ($RILS_JAX_CACHE, else ~/.cache/rils_jax), or the system's temporary
  folder where that cannot be written. Written whole or not at all (a rename), so concurrent
  restores are safe.

  Raises:
    OSError: when neither folder can be written.
  """
  name = tokenizer_lib.FILE_NAMES[tokenizer_lib.kind_of(tokenizer_bytes)]
  file_name = hashlib.sha256(tokenizer_bytes).hexdigest()[:32] + '_' + name
  for folder in (os.path.join(synthetic.cache_dir(), 'tokenizers'),
                 os.path.join(tempfile.gettempdir(), 'rils_jax_tokenizers')):
    path = os.path.join(folder, file_name)
    if _holds(path, tokenizer_bytes):
      return path  # (A file changed or cut short by hand is written again.)
    try:
      os.makedirs(folder, exist_ok=True)
      handle, staged = tempfile.mkstemp(dir=folder, prefix='.' + file_name)
    except OSError:
      continue
    try:
      with os.fdopen(handle, 'wb') as f:
        f.write(tokenizer_bytes)
      os.chmod(staged, 0o644)  # Readable by the other users of a shared temporary folder.
      os.replace(staged, path)
    finally:
      if os.path.exists(staged):
        os.remove(staged)
    return path
  raise OSError(f'cannot write the tokenizer under {synthetic.cache_dir()} or '
                f'{tempfile.gettempdir()}')


def restore(checkpoint: str, step: Optional[int] = None) -> Restored:
  """Restores the model of a run's workdir (latest or `step`) or of one checkpoint folder.

  Raises:
    FileNotFoundError: when there is no checkpoint, or it lacks its config or tokenizer.
    ValueError: when the saved parameters do not fit the saved config's model, or the
      config or tokenizer item is damaged or of an unknown kind.
  """
  state_dir = checkpoints_lib.checkpoint_path(checkpoint, step)
  folder = storage.dirname(state_dir)
  config = ml_collections.ConfigDict(checkpoints_lib.read_json(folder, 'config'))
  tokenizer_bytes = checkpoints_lib.tokenizer_file(checkpoints_lib.read_json(folder, 'tokenizer'))
  path = tokenizer_path(tokenizer_bytes)
  try:
    tokenizer = tokenizer_lib.load(path)
  except (ValueError, RuntimeError, OSError) as e:  # sentencepiece: RuntimeError or OSError.
    with contextlib.suppress(OSError):  # Not kept: the checkpoint is at fault, not the cache.
      os.remove(path)
    raise ValueError(f'the tokenizer saved in the checkpoint {folder} cannot be loaded '
                     f'({type(e).__name__}: {e}): it is damaged') from e
  # The attention kernel suits the training machine ('cudnn' cannot run on a CPU host): this
  # machine's own choice, 'auto', computes the same function.
  here = ml_collections.ConfigDict(config.to_dict())
  here.model.attention = 'auto'
  model = rils_lib.build_model(here, tokenizer.eot_id)
  mesh = data_parallel_mesh()
  replicated = sharding.replicated(mesh)
  like = jax.eval_shape(lambda: rils_lib.init_params(model, jax.random.PRNGKey(0)))
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                      like)
  params = checkpoints_lib.load_params(folder, like)
  return Restored(model, params, config, tokenizer, mesh, int(storage.basename(folder)), folder)
