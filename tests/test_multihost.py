"""Two processes x 4 CPU devices train exactly like one process x 8 devices (same data, seed).

The processes talk through JAX's distributed runtime on localhost (gloo collectives on CPU);
each reads only its rows of every global batch, both write the orbax checkpoint together and
only process 0 writes logs.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from rils_jax import checkpoints
from rils_jax import config_lib
from rils_jax import main as main_lib
from rils_jax import tokenizer as tokenizer_lib
from rils_jax.data import sources
from rils_jax.data import synthetic
from tests import tiny

STEPS = 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  root = str(tmp_path / 'shapes')
  config = tiny.get_config(f'root={root},steps={STEPS}')
  s = config.synthetic
  synthetic.generate(root, image_size=s.image_size, num_train=s.num_train, seed=s.seed,
                     num_heldout=s.num_heldout, zeroshot_per_class=s.zeroshot_per_class)
  records, _ = sources.read_sources(config.input.sources)
  tok = str(tmp_path / 'tok.model')
  tokenizer_lib.train_tokenizer((c for r in records for c in r.captions), 64, tok)
  config.tokenizer.model = tok

  # Reference: this process, 8 devices.
  single = str(tmp_path / 'single')
  single_results = main_lib.train(config, single)

  multi = str(tmp_path / 'multi')
  port = _free_port()
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
         'JAX_PLATFORMS': 'cpu'}
  repo = config_lib.REPO_ROOT
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'rils_jax.main', f'--config=tests/tiny.py:root={root},steps={STEPS}',
       f'--config.tokenizer.model={tok}', f'--workdir={multi}',
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {i} failed:\n{out[-4000:]}'

  # Only process 0 prints progress and the evaluation; it matches the single-process run.
  assert f'step {STEPS}/{STEPS}' in outputs[0] and 'step ' not in outputs[1]
  final = json.loads(outputs[0].split('Final evaluation: ')[1].splitlines()[0])
  for key, value in single_results.items():
    np.testing.assert_allclose(final[key], value, atol=1e-6, err_msg=key)
  with open(os.path.join(multi, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  with open(os.path.join(single, 'metrics.jsonl')) as f:
    reference = [json.loads(line) for line in f]
  assert len(logged) == len(reference)  # Written by process 0 only.
  for a, b in zip(logged, reference):
    if 'loss' in b:
      np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5)

  params_multi = checkpoints.read_state(multi, STEPS)['params']
  params_single = checkpoints.read_state(single, STEPS)['params']
  flat = jax.tree_util.tree_leaves_with_path(params_single)
  for (path, a), b in zip(flat, jax.tree.leaves(params_multi)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
