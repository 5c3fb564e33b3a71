r"""Checkpoint save and restore times on a gs:// bucket (the local GCS server of the tests)
beside local disk, in one process; prints one JSON line per storage and a ratio line.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      .venv/bin/python -m tests.gcs_benchmark --config=configs/default.py --repeats=3

Each repeat saves the config's fresh train state with `checkpoints.Checkpoints` (all four items,
asynchronously, timed until committed) and restores it into the config's abstract state. The
local GCS server keeps objects in memory on this machine, so the bucket figures measure the
client side (tensorstore's and gcsfs's requests, orbax's commit protocol for object stores),
not a network.
"""

import json
import statistics
import tempfile
import time

import grain
import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from rils_jax import checkpoints as checkpoints_lib
from rils_jax import console
from rils_jax import train_step as train_step_lib
from tests import gcs_server

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Training config.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Saves and restores per storage.')


def _measure(workdir, config, setup, state, tokenizer_path):
  checkpoints = checkpoints_lib.Checkpoints(workdir, config)
  data = iter(grain.MapDataset.range(16).to_iter_dataset())
  save, restore = [], []
  for step in range(1, _REPEATS.value + 1):
    start = time.perf_counter()
    checkpoints.save(step, state, data, config, tokenizer_path)
    checkpoints.wait()
    save.append(time.perf_counter() - start)
    start = time.perf_counter()
    restored = checkpoints.restore(step, setup.abstract_state)
    jax.block_until_ready(restored)
    restore.append(time.perf_counter() - start)
  checkpoints.close()
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(restored)),
                                                   jax.tree.leaves(jax.device_get(state))))
  return dict(save_s=round(statistics.median(save), 3),
              restore_s=round(statistics.median(restore), 3), restored_equal=same)


def main(argv):
  del argv
  console.quiet_libraries()
  config = _CONFIG.value
  setup = train_step_lib.setup(config)
  state = train_step_lib.create_train_state(setup, config.seed)
  num_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  server = gcs_server.GcsServer()
  server.apply()
  try:
    bucket = server.create_bucket('rils-benchmark')
    with tempfile.TemporaryDirectory() as tmp:
      tokenizer_path = f'{tmp}/tokenizer.model'
      with open(tokenizer_path, 'wb') as f:
        f.write(b'\0' * 1024)  # The tokenizer item's size barely matters.
      results = {}
      for name, workdir in (('local disk', f'{tmp}/run'), ('gs:// (local server)',
                                                             f'{bucket}/run')):
        results[name] = _measure(workdir, config, setup, state, tokenizer_path)
        print(json.dumps(dict(storage=name, state_mb=round(num_bytes / 2**20, 1),
                              arrays=len(jax.tree.leaves(state)), repeats=_REPEATS.value,
                              **results[name])), flush=True)
  finally:
    server.stop()
  local, remote = results['local disk'], results['gs:// (local server)']
  print(json.dumps(dict(save_ratio=round(remote['save_s'] / local['save_s'], 2),
                        restore_ratio=round(remote['restore_s'] / local['restore_s'], 2))))


if __name__ == '__main__':
  app.run(main)
