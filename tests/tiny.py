"""A tiny config and model shared by the tests, a few steps of training it, its generated data,
and helpers for the tests that run `rils_jax.main` in subprocesses."""

import json
import os
import queue
import re
import subprocess
import threading
import time

import jax
import ml_collections
import numpy as np

from configs import common
from rils_jax import config_lib
from rils_jax import sharding
from rils_jax import storage
from rils_jax import tokenizer as tokenizer_lib
from rils_jax import train_step as train_step_lib
from rils_jax.data import sources
from rils_jax.data import synthetic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.total_steps = 20
  c.model.variant = 'Ti/8'
  c.model.vision = dict(width=32, depth=2, num_heads=2)
  c.model.image_size = 32
  c.model.decoder = dict(width=32, depth=1, num_heads=2)
  c.mae.decoder = dict(width=24, depth=1, num_heads=2)
  c.model.text = dict(width=32, num_layers=2, num_heads=2, context_length=8, vocab_size=64)
  c.model.embed_dim = 16
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 2
  c.input.batch_size = 8
  return apply_overrides(c, **overrides)


def random_batch(batch_size: int = 8, seed: int = 0):
  """Random uint8 32 px images and token rows of the tiny config (end-of-text id 2 at 6)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(batch_size, 32, 32, 3), dtype=np.uint8)
  text = rng.integers(3, 64, size=(batch_size, 8)).astype(np.int32)
  text[:, 6] = 2
  text[:, 7] = 0
  return dict(image=images, text=text)


def train(config, devices, steps, batches):
  """`steps` train steps on a mesh of `devices`, cycling through `batches`.

  Returns:
    (final TrainState, list of per-step metric dicts).
  """
  setup = train_step_lib.setup(config, devices)
  state = train_step_lib.create_train_state(setup, config.seed)
  step = train_step_lib.make_train_step(setup, config)
  history = []
  for i in range(steps):
    state, metrics = step(state, sharding.put_batch(batches[i % len(batches)], setup.mesh))
    history.append(jax.device_get(metrics))
  return state, history


def assert_same_run(run_a, run_b, atol=1e-5):
  """Two `train` results have the same losses (1e-5) and final parameters (`atol`)."""
  (state_a, hist_a), (state_b, hist_b) = run_a, run_b
  for ha, hb in zip(hist_a, hist_b):
    np.testing.assert_allclose(hb['loss'], ha['loss'], rtol=1e-5, atol=1e-5)
  flat_a = jax.tree_util.tree_leaves_with_path(state_a.params)
  for (path, a), b in zip(flat_a, jax.tree.leaves(state_b.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def apply_overrides(c: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """Sets dotted keys, e.g. apply_overrides(c, **{'loss.kind': 'clip'})."""
  for key, value in overrides.items():
    target = c
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return c


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The tiny model on a small generated dataset, as a config file for `rils_jax.main`:

    python -m rils_jax.main --config=tests/tiny.py:root=/tmp/shapes,steps=4 --workdir=DIR

  `every`: checkpoint interval (default: `steps`); `evals=false` drops the final evaluations.
  """
  arg = config_lib.parse_arg(arg, root='', steps=4, every=0, evals=True)
  c = tiny_config(total_steps=arg.steps)
  c.optim.eps = 1e-3  # See test_train_step.test_eight_devices_match_one_device.
  c.checkpoint_every = arg.every or arg.steps
  c.log_every = 1
  c.tokenizer.vocab_size = 64
  common.synthetic_data(c, image_size=32, num_train=64, num_heldout=16, zeroshot_per_class=2,
                        root=arg.root)
  if not arg.evals:
    common.remove_evals(c)
  return c


def generate_data(root: str, tokenizer_path: str) -> None:
  """Writes `get_config`'s dataset under `root` and trains its 64-piece tokenizer to
  `tokenizer_path`, so that several runs (and processes) share them."""
  s = get_config(f'root={root}').synthetic
  synthetic.generate(root, image_size=s.image_size, num_train=s.num_train, seed=s.seed,
                     num_heldout=s.num_heldout, zeroshot_per_class=s.zeroshot_per_class)
  records, _ = sources.read_sources(get_config(f'root={root}').input.sources)
  tokenizer_lib.train_tokenizer((c for r in records for c in r.captions), 64, tokenizer_path)


def example_ids(workdir: str, process: int = 0) -> dict:
  """Step -> example ids from `input.log_example_ids`; after a restart the last line of a step
  (the one trained on) counts."""
  ids = {}
  text = storage.read_bytes(storage.join(workdir, 'example_ids', f'process_{process}.jsonl'))
  for line in text.decode().splitlines():
    record = json.loads(line)
    ids[record['step']] = record['example_ids']
  return ids


def logged_metrics(workdir: str) -> dict:
  """Step -> the training metrics logged in WORKDIR/metrics.jsonl; after a restart the last
  line of a step counts."""
  text = storage.read_bytes(storage.join(workdir, 'metrics.jsonl')).decode()
  return {m['step']: m for m in map(json.loads, text.splitlines()) if 'loss' in m}


class Output:
  """The merged stdout / stderr of a subprocess, drained by a thread (so that the process never
  blocks on a full pipe) and searchable while it runs."""

  def __init__(self, process: subprocess.Popen):
    self.process = process
    self.seen = []
    self._lines = queue.Queue()
    threading.Thread(target=lambda: [self._lines.put(x) for x in process.stdout],
                     daemon=True).start()

  def wait_for(self, pattern: str, timeout: float = 300) -> str:
    """The first line matching `pattern`; AssertionError after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      try:
        line = self._lines.get(timeout=1)
      except queue.Empty:
        continue
      self.seen.append(line)
      if re.search(pattern, line):
        return line
    raise AssertionError(f'no line matching {pattern!r} in:\n{self.text()[-4000:]}')

  def text(self) -> str:
    """Everything read so far (all of it once the process has exited)."""
    if self.process.poll() is not None:
      time.sleep(0.5)  # The reader thread catches up with the closed pipe.
    while not self._lines.empty():
      self.seen.append(self._lines.get())
    return ''.join(self.seen)
