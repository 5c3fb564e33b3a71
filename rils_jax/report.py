r"""A picture of a run: its training curves and evaluations as a PNG and a self-contained HTML page.

  python -m rils_jax.report --workdir=/tmp/rils_default

reads WORKDIR/metrics.jsonl (a local path or a URL such as gs://bucket/run; a run still going
is drawn up to its last complete line) and writes WORKDIR/report.png and WORKDIR/report.html
(the PNG inlined, the latest evaluation as a table in percent beside the chance levels, and the
run's config): one panel per training curve the run logged (loss, the CLIP and reconstruction
terms, the gate fraction, the logit scale, the learning rate, images/s) and one per evaluator
(each of its accuracies or recalls over steps, in percent, with the chance level dashed).
`rils_jax.main` writes it at the end of every run. Plotting is matplotlib's (Agg, no display).
"""

import base64
import html
import io
import json
import math
from typing import Dict, List, Sequence, Tuple

from absl import flags
from absl import logging

from rils_jax import console
from rils_jax import storage
from rils_jax.evals import table

# Training curves, in panel order: (metric, panel title).
TRAINING_PANELS = (
    ('loss', 'loss'), ('clip_loss', 'contrastive term'), ('recon_loss', 'reconstruction term'),
    ('gate_fraction', 'gate fraction (reconstructed)'), ('logit_scale', 'logit scale'),
    ('learning_rate', 'learning rate'), ('images_per_sec', 'images / s'))
PNG = 'report.png'
HTML = 'report.html'


def read_metrics(workdir: str) -> List[dict]:
  """The lines of WORKDIR/metrics.jsonl, in order; a line being written (no newline yet) is
  left out.

  Raises:
    FileNotFoundError: when the workdir has no metrics.jsonl (no run there yet).
  """
  path = storage.join(workdir, 'metrics.jsonl')
  if not storage.is_file(path):
    raise FileNotFoundError(f'{path} does not exist: give the workdir of a run (it appears '
                            'with the first logged step)')
  text = storage.read_bytes(path).decode('utf-8', errors='replace')
  lines, bad = [], []
  for number, line in enumerate(text[:text.rfind('\n') + 1].splitlines(), 1):
    if not line.strip():
      continue
    try:
      lines.append(json.loads(line))
    except json.JSONDecodeError:
      bad.append(number)
  if bad:  # A line cut by a crash mid-write, or edited by hand: drawn without it.
    logging.warning('%s: left out %d line(s) that are not JSON: %s', path, len(bad), bad[:10])
  return [line for line in lines if isinstance(line, dict) and 'step' in line]


def series(lines: Sequence[dict]) -> Dict[str, Tuple[List[int], List[float]]]:
  """metric -> (steps, values); a step logged again after a restart keeps its last value."""
  by_metric: Dict[str, Dict[int, float]] = {}
  for line in lines:
    for key, value in line.items():
      if key != 'step' and isinstance(value, (int, float)) and math.isfinite(value):
        by_metric.setdefault(key, {})[line['step']] = value
  return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_metric.items()}


def panels(curves: Dict[str, Tuple[List[int], List[float]]]) -> List[Tuple[str, List[str]]]:
  """(title, [metrics]) of each panel to draw: the training curves present (a curve that stays
  0 throughout, e.g. the reconstruction term of a CLIP run, is left out), then one panel per
  evaluator with its fraction metrics (top-k, recall at K)."""
  out = [(title, [key]) for key, title in TRAINING_PANELS
         if key in curves and any(curves[key][1])]
  evaluators: Dict[str, List[str]] = {}
  for key in curves:
    name, _, metric = key.partition('/')
    if metric and name != 'data' and not metric.startswith('chance_') and table.is_fraction(
        metric):
      evaluators.setdefault(name, []).append(key)
  out += [(f'{name} (%)', sorted(keys)) for name, keys in sorted(evaluators.items())]
  return out


def plot(curves, layout: List[Tuple[str, List[str]]]) -> bytes:
  """The PNG of `layout`'s panels, three per row."""
  import matplotlib  # pylint: disable=g-import-not-at-top  # Only the report needs it.
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  last_step = max((max(steps) for steps, _ in curves.values() if steps), default=1)
  cols = min(3, max(1, len(layout)))
  rows = max(1, math.ceil(len(layout) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
  for ax, (title, keys) in zip(axes.flat, layout):
    percent = title.endswith('(%)')
    for key in keys:
      steps, values = curves[key]
      scale = 100.0 if percent else 1.0
      name, _, metric = key.partition('/')
      line, = ax.plot(steps, [v * scale for v in values], marker='o' if len(steps) < 30 else None,
                      markersize=3, label=metric or key)
      if percent:
        latest = {k.partition('/')[2]: v[1][-1] for k, v in curves.items()
                  if k.startswith(name + '/')}
        chance = table.chance_of(latest, metric)
        if chance is not None:
          ax.axhline(chance * 100, color=line.get_color(), linestyle='--', linewidth=0.8)
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.set_xlim(0, last_step * 1.03)  # Evaluations, however few, on the training's axis.
    ax.grid(alpha=0.3)
    if len(keys) > 1:
      ax.legend(fontsize=7)
    if keys[0] == 'learning_rate':
      ax.ticklabel_format(axis='y', style='sci', scilimits=(-2, 2))
  for ax in list(axes.flat)[len(layout):]:
    ax.axis('off')
  fig.tight_layout()
  out = io.BytesIO()
  fig.savefig(out, format='png', dpi=80)
  plt.close(fig)
  return out.getvalue()


def page(workdir: str, png: bytes, lines: Sequence[dict], layout) -> str:
  """The self-contained HTML page: the PNG inlined, the latest evaluation's table, the config."""
  last_eval = {}
  for line in lines:
    if any('/' in k and not k.startswith('data/') for k in line):
      last_eval = line
  evaluation = {k: v for k, v in last_eval.items() if '/' in k and not k.startswith('data/')}
  steps = [line['step'] for line in lines if 'loss' in line]
  config = ''
  config_path = storage.join(workdir, 'config.json')
  if storage.is_file(config_path):
    config = storage.read_bytes(config_path).decode('utf-8')
  title = html.escape(f'rils_jax run {workdir}')
  summary = (f'{len(steps)} logged training steps, the last {steps[-1]}' if steps else
             'no training step logged yet')
  results = (f'<h2>Evaluation at step {last_eval.get("step")}</h2>\n<pre>'
             f'{html.escape(table.table(table.unflatten(evaluation)))}</pre>' if evaluation
             else '<p>No evaluation yet.</p>')
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}img{{max-width:100%}}pre{{background:#f4f4f4;
padding:1em;overflow:auto}}</style></head>
<body>
<h1>{title}</h1>
<p>{html.escape(summary)}; panels: {html.escape(', '.join(t for t, _ in layout))}.</p>
<img id="curves" alt="training curves and evaluations" src="data:image/png;base64,{base64.b64encode(png).decode()}">
{results}
<details><summary>config.json</summary><pre>{html.escape(config)}</pre></details>
</body></html>
"""


def write_report(workdir: str) -> Dict[str, object]:
  """Writes WORKDIR/report.png and WORKDIR/report.html from WORKDIR/metrics.jsonl.

  Returns:
    dict with `png` and `html` (their paths), `panels` (the panel titles, in order) and `bytes`
    (the HTML page's size).

  Raises:
    FileNotFoundError: when the workdir has no metrics.jsonl.
  """
  lines = read_metrics(workdir)
  curves = series(lines)
  layout = panels(curves)
  png = plot(curves, layout)
  text = page(workdir, png, lines, layout)
  png_path, html_path = storage.join(workdir, PNG), storage.join(workdir, HTML)
  storage.write_bytes(png_path, png)
  storage.write_text(html_path, text)
  return dict(png=png_path, html=html_path, panels=[t for t, _ in layout],
              bytes=len(text.encode('utf-8')))


def _define_flags():
  flags.DEFINE_string('workdir', None, 'The run to draw (a local path or a URL).')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {argv[1:]}')
  console.quiet_libraries()
  out = write_report(flags.FLAGS.workdir)
  print(f'Wrote {out["png"]} and {out["html"]} ({out["bytes"]:,} bytes): '
        f'{", ".join(out["panels"])}')


if __name__ == '__main__':
  _define_flags()
  console.run(main)
