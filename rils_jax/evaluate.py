r"""Evaluates a checkpoint with the evaluators of a config; prints one JSON line per evaluator.

  python -m rils_jax.evaluate --config=configs/evals_shared.py --checkpoint=/tmp/rils_real

`--checkpoint` is a run's workdir (its latest checkpoint, or `--step`) or one checkpoint folder
(WORKDIR/checkpoints/<step>). The model, its input normalisation and its tokenizer come from the
checkpoint; `--config` supplies `config.evals` (the evaluators, see rils_jax/evals/runner.py)
and `config.input.num_workers`, so a training config evaluates its own evaluators and an
evaluation-only config such as configs/evals_shared.py runs a transfer suite. Each line is
{"evaluator": NAME, "kind": KIND, "step": STEP, "checkpoint": PATH, METRIC: VALUE, ...};
`--output=FILE` also appends the lines to FILE.
"""

import json
from typing import Dict, Optional

import ml_collections
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rils_jax.evals import embed as embed_lib
from rils_jax.evals import restore as restore_lib
from rils_jax.evals import runner


def _define_flags():
  config_flags.DEFINE_config_file('config', None, 'Config file whose `evals` to run.',
                                  lock_config=True)
  flags.DEFINE_string('checkpoint', None, "A run's workdir or one checkpoint folder.")
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_string('output', '', 'Also append the JSON lines to this file.')
  flags.mark_flags_as_required(['config', 'checkpoint'])


def evaluate(config: ml_collections.ConfigDict, checkpoint: str, step: Optional[int] = None
             ) -> Dict[str, Dict[str, float]]:
  """Runs the evaluators of `config.evals` on a checkpoint's model.

  Returns:
    evaluator name -> {metric: value}, and '_step' / '_checkpoint' under each as `step` and
    `checkpoint`.

  Raises:
    ValueError / FileNotFoundError: for a bad evaluator, dataset or checkpoint (before anything
      is embedded).
  """
  evaluations = runner.Evaluations(config)
  if not evaluations:
    raise ValueError('the config names no evaluator in config.evals (see '
                     'rils_jax/evals/runner.py)')
  restored = restore_lib.restore(checkpoint, step)
  run_config = ml_collections.ConfigDict(restored.config.to_dict())
  run_config.evals = ml_collections.ConfigDict({'batch_size': config.evals.batch_size})
  run_config.input.num_workers = config.input.num_workers
  embedder = embed_lib.Embedder(restored.model, run_config, restored.mesh, restored.tokenizer)
  logging.info('Evaluating %s (step %d)', restored.path, restored.step)
  results = evaluations.run(restored.params, embedder)
  return {name: dict(metrics, step=restored.step, checkpoint=restored.path)
          for name, metrics in results.items()}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  results = evaluate(f.config, f.checkpoint, f.step)
  lines = [json.dumps(dict(evaluator=name, kind=f.config.evals[name].kind, **metrics))
           for name, metrics in results.items()]
  for line in lines:
    print(line, flush=True)
  if f.output:
    with open(f.output, 'a') as out:
      out.write(''.join(line + '\n' for line in lines))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
