"""Reading a run's orbax checkpoints on one host, whatever mesh or hosts wrote them.

`rils_jax.main` writes the train state (`step`, `params`, `opt_state`) with
`ocp.CheckpointManager` under WORKDIR/checkpoints/<step>/default. A checkpoint written by an
FSDP-sharded or multi-host run holds each array's global value (orbax stitches the shards), so
this module restores every array whole onto one local device.
"""

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


def checkpoint_path(workdir: str, step: Optional[int] = None) -> str:
  """The item folder of `step` (default: the latest) under WORKDIR/checkpoints.

  Raises:
    FileNotFoundError: when the workdir has no (such) checkpoint.
  """
  root = os.path.join(os.path.abspath(workdir), 'checkpoints')
  steps = ocp.utils.checkpoint_steps(root) if os.path.isdir(root) else []
  if not steps or (step is not None and step not in steps):
    raise FileNotFoundError(f'no checkpoint {"" if step is None else step} under {root} '
                            f'(steps there: {sorted(steps)})')
  return os.path.join(root, str(max(steps) if step is None else step), 'default')


def read_state(workdir: str, step: Optional[int] = None) -> Any:
  """The saved train state as a nested dict of numpy arrays (keys step, params, opt_state)."""
  path = checkpoint_path(workdir, step)
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        metadata)
  return jax.tree.map(np.asarray, checkpointer.restore(path, target))
