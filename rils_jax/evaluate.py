r"""Evaluates a checkpoint with the evaluators of a config; prints a table of the results.

  python -m rils_jax.evaluate --config=configs/evals_shared.py --checkpoint=/tmp/rils_real

`--checkpoint` is a run's workdir (its latest checkpoint, or `--step`) or one checkpoint folder
(WORKDIR/checkpoints/<step>). The model, its input normalisation and its tokenizer come from the
checkpoint; `--config` supplies `config.evals` (the evaluators, see rils_jax/evals/runner.py)
and `config.input.num_workers`, so a training config evaluates its own evaluators and an
evaluation-only config such as configs/evals_shared.py runs a transfer suite.

The table (accuracies and recalls in percent beside their chance levels, counts as counts;
rils_jax/evals/table.py) is printed once all evaluators are done. The exact values are JSON
lines, one per evaluator, {"evaluator": NAME, "kind": KIND, METRIC: VALUE, ..., "step": STEP,
"checkpoint": PATH}: `--output=FILE` appends them to FILE (a local path or a URL such as
gs://bucket/run/evals.jsonl; `--checkpoint` may be one too), and `--print=json` prints them
instead of the table, each as soon as its evaluator is done. An evaluator that fails gives
{"evaluator": NAME, "kind": KIND, "error": MESSAGE} (and a line under the table), the others
still run, and the command exits 1.
"""

import json
from typing import Any, Callable, Dict, Optional

import ml_collections
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rils_jax import console
from rils_jax import storage
from rils_jax.evals import embed as embed_lib
from rils_jax.evals import restore as restore_lib
from rils_jax.evals import runner
from rils_jax.evals import table


def _define_flags():
  config_flags.DEFINE_config_file('config', None, 'Config file whose `evals` to run.',
                                  lock_config=True)
  flags.DEFINE_string('checkpoint', None, "A run's workdir or one checkpoint folder.")
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_string('output', '', 'Append the exact results as JSON lines to this file.')
  flags.DEFINE_enum('print', 'table', ['table', 'json'], 'What to print: one table at the end, '
                    'or a JSON line per evaluator as it finishes.')
  flags.mark_flags_as_required(['config', 'checkpoint'])


def evaluate(config: ml_collections.ConfigDict, checkpoint: str, step: Optional[int] = None,
             on_result: Optional[Callable[[str, Dict[str, Any]], None]] = None,
             on_error: Optional[Callable[[str, Exception], None]] = None
             ) -> Dict[str, Dict[str, Any]]:
  """Runs the evaluators of `config.evals` on a checkpoint's model.

  Args:
    config: supplies `evals` and `input.num_workers`.
    checkpoint: a run's workdir or one checkpoint folder.
    step: the checkpoint step (default: the latest).
    on_result: called with (name, metrics) as soon as each evaluator is done.
    on_error: when given, called with (name, error) for an evaluator that fails, and the
      others still run; when None, the first failure raises.

  Returns:
    evaluator name -> {metric: value, 'step': checkpoint step, 'checkpoint': its folder}, for
    the evaluators that succeeded.

  Raises:
    ValueError / FileNotFoundError: for a bad evaluator, dataset or checkpoint (before anything
      is embedded).
    runner.EvaluationError: for a failing evaluator when `on_error` is None.
  """
  evaluations = runner.Evaluations(config)
  if not evaluations:
    raise ValueError('the config names no evaluator in config.evals (see '
                     'rils_jax/evals/runner.py)')
  restored = restore_lib.restore(checkpoint, step)
  runner.check_model_kind(config.evals, restored.config.loss.kind)
  run_config = ml_collections.ConfigDict(restored.config.to_dict())
  run_config.evals = ml_collections.ConfigDict({'batch_size': config.evals.batch_size})
  run_config.input.num_workers = config.input.num_workers
  embedder = embed_lib.Embedder(restored.model, run_config, restored.mesh, restored.tokenizer)
  logging.info('Evaluating %s (step %d)', restored.path, restored.step)
  results, cache = {}, {}
  for name in evaluations.specs:
    try:
      metrics = evaluations.run(restored.params, embedder, [name], cache)[name]
    except runner.EvaluationError as e:
      if on_error is None:
        raise
      on_error(name, e)
      continue
    results[name] = dict(table.exact_metrics(metrics), step=restored.step,
                         checkpoint=restored.path)
    if on_result:
      on_result(name, results[name])
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.quiet_libraries()
  f = flags.FLAGS
  try:
    out = storage.LineFile(f.output) if f.output else None  # Fails now, not after.
  except (OSError, ValueError) as e:
    raise SystemExit(f'error: cannot write --output={f.output}: {e}') from e
  failed = []

  def emit(line: str) -> None:
    if f.print == 'json':
      print(line, flush=True)
    if out:
      out.write_line(line)

  def on_result(name, metrics):
    emit(json.dumps(dict(evaluator=name, kind=f.config.evals[name].kind, **metrics)))

  def on_error(name, error):
    failed.append(f'{name}: {error}')
    emit(json.dumps(dict(evaluator=name, kind=f.config.evals[name].kind, error=str(error))))

  try:
    results = evaluate(f.config, f.checkpoint, f.step, on_result, on_error)
  finally:
    if out:
      out.close()
  if f.print == 'table' and results:
    first = next(iter(results.values()))
    print(f'Step {first["step"]} of {first["checkpoint"]}:\n{table.table(results)}', flush=True)
  if failed:
    raise SystemExit(f'error: {len(failed)} evaluator(s) failed (the others completed):\n  ' +
                     '\n  '.join(failed))


if __name__ == '__main__':
  _define_flags()
  console.run(main)
