r"""RILS against its baselines on the same data, steps and seed: trains each variant, evaluates
each with one evaluation config, times each train step in this process, writes one table.

  python -m rils_jax.compare --config=configs/flickr8k_coco.py --workdir=/tmp/compare \
      --evals_config=configs/evals_shared.py

Variants (`--variants`, `VARIANTS`): rils, clip, flip (CLIP on half the patches), siglip (clip
with the sigmoid loss), rils_sigmoid (RILS with the sigmoid loss) and mae (pixels, no text).
Each trains in WORKDIR/VARIANT with `--config` plus the variant's `config.loss` settings (the
config's own evaluators are dropped: every variant is evaluated with `--evals_config` by
`rils_jax.evaluate`, MAE without the evaluators that embed text). A variant whose workdir
already holds the finished run is not trained again (`rils_jax.main` resumes), so an
interrupted comparison continues where it stopped.

Speed: after training, `--speed_steps` steps of each variant's train step are timed in this
process (`rils_jax.benchmark.run`, the reference matmul measured once), so the images/s of the
variants are measured side by side on the same machine state; the model FLOPs per step come
from `rils_jax.flops`.

Writes WORKDIR/comparison.json (every figure) and WORKDIR/comparison.md (one Markdown table:
one column per variant, percentages for the evaluation metrics), and prints the table.
"""

import json
import os
from typing import Dict, List

import jax
import ml_collections
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rils_jax import benchmark
from rils_jax import console
from rils_jax import evaluate as evaluate_lib
from rils_jax import main as main_lib
from rils_jax import storage
from rils_jax.evals import runner

# Variant -> config.loss settings.
VARIANTS: Dict[str, Dict[str, str]] = {
    'rils': {'kind': 'rils', 'contrastive': 'softmax'},
    'clip': {'kind': 'clip', 'contrastive': 'softmax'},
    'flip': {'kind': 'flip', 'contrastive': 'softmax'},
    'siglip': {'kind': 'clip', 'contrastive': 'sigmoid'},
    'rils_sigmoid': {'kind': 'rils', 'contrastive': 'sigmoid'},
    'mae': {'kind': 'mae', 'contrastive': 'softmax'},
}


def _define_flags():
  config_flags.DEFINE_config_file('config', None, 'Training config of every variant.',
                                  lock_config=True)
  config_flags.DEFINE_config_file('evals_config', 'configs/evals_shared.py',
                                  'Config whose `evals` evaluate every variant.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Output folder: one workdir per variant, the tables.')
  flags.DEFINE_list('variants', list(VARIANTS), f'Variants to compare, of {list(VARIANTS)}.')
  flags.DEFINE_integer('speed_steps', 3, 'Timed train steps of each variant (after 1 untimed).')
  flags.mark_flags_as_required(['config', 'workdir'])


def variant_config(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """`config` with `variant`'s loss settings and no evaluators of its own.

  Raises:
    ValueError: for an unknown variant.
  """
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r}; expected some of {list(VARIANTS)}')
  c = ml_collections.ConfigDict(config.to_dict())
  for key, value in VARIANTS[variant].items():
    c.loss[key] = value
  for name in [k for k in c.evals.keys() if k != 'batch_size']:
    del c.evals[name]
  return c


def evals_for(evals_config: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
  """`evals_config` without the evaluators that a `kind` model cannot run (text, for MAE)."""
  c = ml_collections.ConfigDict(evals_config.to_dict())
  if kind == 'mae':
    for name in [k for k, v in c.evals.items() if isinstance(v, ml_collections.ConfigDict)
                 and v.get('kind') in runner.TEXT_KINDS]:
      del c.evals[name]
  return c


def _cell(key: str, value) -> str:
  if value is None:
    return 'n/a'
  if isinstance(value, float) and '/' in key and not key.endswith(('skipped_images', 'step')):
    return f'{100 * value:.1f}'
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def table(results: Dict[str, Dict[str, object]], variants: List[str]) -> str:
  """Markdown table: one row per figure (in the order first seen), one column per variant."""
  rows: List[str] = []
  for variant in variants:
    rows += [k for k in results[variant] if k not in rows]
  lines = ['| figure | ' + ' | '.join(variants) + ' |', '|---' * (len(variants) + 1) + '|']
  for row in rows:
    lines.append(f'| {row} | ' + ' | '.join(_cell(row, results[v].get(row)) for v in variants)
                 + ' |')
  return '\n'.join(lines)


def compare(config, evals_config, workdir: str, variants: List[str], speed_steps: int) -> dict:
  """Trains, evaluates and times every variant; returns {variant: {figure: value}}.

  Raises:
    ValueError / FileNotFoundError: for a bad config, variant or evaluator (before training
      the first variant whose config is bad).
  """
  if not variants:
    raise ValueError(f'--variants names no variant; pick from {list(VARIANTS)}')
  configs = {v: variant_config(config, v) for v in variants}
  for c in configs.values():
    main_lib.validate_config(c)
  results: Dict[str, Dict[str, object]] = {v: {} for v in variants}
  for variant in variants:
    console.say(f'== {variant}: training in {storage.join(workdir, variant)}')
    main_lib.train(configs[variant], storage.join(workdir, variant))
    lines = storage.read_bytes(storage.join(workdir, variant, 'metrics.jsonl')).decode()
    logged = [json.loads(line) for line in lines.splitlines() if line.strip()]
    rates = [m['images_per_sec'] for m in logged if 'images_per_sec' in m][1:]  # After compile.
    losses = [m['loss'] for m in logged if 'loss' in m]
    results[variant].update({'final loss': losses[-1] if losses else None,
                             'training images per s (logged)':
                                 sum(rates) / len(rates) if rates else None})
    evals = evals_for(evals_config, configs[variant].loss.kind)
    for name, metrics in evaluate_lib.evaluate(evals, storage.join(workdir, variant)).items():
      for key, value in metrics.items():
        if key not in ('step', 'checkpoint'):
          results[variant][f'{name}/{key}'] = value
  reference = 0.0
  for variant in variants:
    console.say(f'== {variant}: timing {speed_steps} train steps')
    speed = benchmark.run(configs[variant], speed_steps, 1, reference_tflops=reference)
    reference = speed['matmul_tflops_per_s'] / jax.device_count()
    results[variant].update({'step images per s (same process)': speed['images_per_s'],
                             'model GFLOP per step': speed['model_flops_per_step'] / 1e9,
                             'model FLOP rate over matmul rate': speed['fraction_of_matmul']})
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.quiet_libraries()
  f = flags.FLAGS
  results = compare(f.config, f.evals_config, f.workdir, f.variants, f.speed_steps)
  markdown = table(results, f.variants)
  storage.write_text(storage.join(f.workdir, 'comparison.json'),
                     json.dumps(results, indent=1, sort_keys=True))
  storage.write_text(storage.join(f.workdir, 'comparison.md'), markdown + '\n')
  logging.info('Wrote %s', os.path.join(f.workdir, 'comparison.md'))
  print(markdown, flush=True)


if __name__ == '__main__':
  _define_flags()
  console.run(main)
