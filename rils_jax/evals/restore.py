"""A trained model back from a checkpoint, for evaluation and patch-text maps on one host.

The model is rebuilt from the config saved in the checkpoint and the text tower's tokenizer from
the file saved with it (a sentencepiece model, or CLIP's BPE vocabulary for clip_bpe runs, so
open_clip need not be installed here); the parameters are read whole (orbax stores each array's
global value), so a checkpoint written under any mesh or number of hosts restores here, and in
either layer layout (`config.model.scan_layers`: `checkpoints.load_params` converts). Only
the parameters are read, not the optimizer state.
"""

import atexit
import dataclasses
import os
import tempfile
from typing import Any, Optional

import jax
import ml_collections

from rils_jax import checkpoints as checkpoints_lib
from rils_jax import sharding
from rils_jax import storage
from rils_jax import tokenizer as tokenizer_lib
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


def restore(checkpoint: str, step: Optional[int] = None) -> Restored:
  """Restores the model of a run's workdir (latest or `step`) or of one checkpoint folder.

  Raises:
    FileNotFoundError: when there is no checkpoint, or it lacks its config or tokenizer.
    ValueError: when the saved parameters do not fit the saved config's model, or the
      tokenizer item is of an unknown kind.
  """
  state_dir = checkpoints_lib.checkpoint_path(checkpoint, step)
  folder = storage.dirname(state_dir)
  config = ml_collections.ConfigDict(checkpoints_lib.read_json(folder, 'config'))
  tokenizer_bytes = checkpoints_lib.tokenizer_file(checkpoints_lib.read_json(folder, 'tokenizer'))
  # A file, since tokenizers pickle (to grain's workers) as their file's path.
  name = tokenizer_lib.FILE_NAMES[tokenizer_lib.kind_of(tokenizer_bytes)]
  handle, path = tempfile.mkstemp(prefix='rils_jax_', suffix='_' + name)
  with os.fdopen(handle, 'wb') as f:
    f.write(tokenizer_bytes)
  atexit.register(lambda: os.path.exists(path) and os.remove(path))
  tokenizer = tokenizer_lib.load(path)
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
