"""What a user sees when something is wrong (rils_jax/console.py): every command prints a
mistake as one or two `error:` lines and exits 1 without a traceback (RILS_JAX_TRACEBACK=1 shows
it), and a refused training run leaves its workdir as it found it. Also how a resumed run with a
longer schedule continues, and the results table."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from rils_jax import main as main_lib
from rils_jax import optim
from rils_jax.data import sources
from rils_jax.evals import restore as restore_lib
from rils_jax.evals import table
from tests import tiny

TYPO = '--config.total_step=10'  # total_steps.
DID_YOU_MEAN = "no config key 'total_step'. Did you mean \"total_steps\""


def _user_lines(stderr: str):
  # absl's own log lines (I/W + date) are the log, not the message.
  return [line for line in stderr.splitlines()
          if line.strip() and not (line[:1] in 'IWE' and line[1:5].isdigit())]


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
  root = tmp_path_factory.mktemp('shapes')
  tiny.generate_data(str(root / 'data'), str(root / 'tokenizer.model'))
  return root


def test_every_command_prints_a_mistake_as_one_line(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config(arg=None):\n  raise ValueError("my config is wrong")\n')
  t = tmp_path / 'out'
  t.mkdir()
  cases = [  # (module, arguments, what the first line says)
      ('rils_jax.main', ['--config=configs/default.py', f'--workdir={t}/w', TYPO], DID_YOU_MEAN),
      ('rils_jax.evaluate', ['--config=configs/default.py', f'--checkpoint={t}/none', TYPO],
       DID_YOU_MEAN),
      ('rils_jax.finetune', ['--config=configs/finetune_cifar10.py', f'--workdir={t}/w', TYPO],
       DID_YOU_MEAN),
      ('rils_jax.dry_run', ['--config=configs/vit_b16.py', TYPO], DID_YOU_MEAN),
      ('rils_jax.benchmark', ['--config=configs/default.py', TYPO], DID_YOU_MEAN),
      ('rils_jax.data.benchmark', ['--config=configs/default.py', TYPO], DID_YOU_MEAN),
      ('rils_jax.data.benchmark', ['--config=configs/default.py', '--workers='],
       '--workers (one or more counts) and --batch_size must be >= 0'),
      ('rils_jax.main', ['--config=configs/nope.py', f'--workdir={t}/w'],
       'cannot load the config file: [Errno 2] No such file or directory'),
      ('rils_jax.main', [f'--config={bad}', f'--workdir={t}/w'],
       'the config file raised ValueError: my config is wrong'),
      ('rils_jax.export', [f'--checkpoint={t}/none', '--format=timm', f'--out={t}/v.safetensors'],
       'none does not exist (or is not a folder)'),
      ('rils_jax.evals.patch_text', [f'--checkpoint={t}/none', '--images=a.png', '--phrases=a',
                                     f'--out={t}/m.png'], 'none does not exist'),
      ('rils_jax.tokenizer', ['train', f'--captions={t}/none.csv', f'--out={t}/t.model'],
       'caption file not found'),
      ('rils_jax.tokenizer', [f'--captions={t}/none.csv'], 'usage: python -m rils_jax.tokenizer'),
      ('rils_jax.data.convert', ['--kind=csv', f'--captions={t}/none.csv', f'--images={t}',
                                 f'--output={t}/o'], 'none.csv'),
      ('rils_jax.report', [f'--workdir={t}/none'], 'metrics.jsonl does not exist'),
      ('rils_jax.main', ['--config=configs/default.py', f'--workdir={t}/w',
                         '--config.input.sources=[]'],
       'config.input.sources is a list, which --config.KEY=VALUE cannot set'),
      ('rils_jax.main', ['--config=configs/default.py', f'--workdir={t}/w',
                         '--config.input.text_trim=-16'],
       r'text_trim must be >= 0, got 2, 0, 0 and -16'),
  ]
  # All at once: each is mostly Python and JAX starting up.
  running = [subprocess.Popen([sys.executable, '-m', module, *args], cwd=tiny.REPO_ROOT,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for module, args, _ in cases]
  for (module, args, pattern), process in zip(cases, running):
    _, stderr = process.communicate(timeout=600)
    lines = _user_lines(stderr)
    assert process.returncode == 1, (module, args, stderr[-3000:])
    assert 'Traceback' not in stderr, (module, args, stderr[-3000:])
    assert len(lines) <= 2 and lines[0].startswith('error: ') and pattern in lines[0], (
        module, args, lines)
  assert not os.listdir(t)  # Nothing written by any of them.
  shown = subprocess.run([sys.executable, '-m', 'rils_jax.main', f'--config={bad}',
                          f'--workdir={t}/w'], cwd=tiny.REPO_ROOT, text=True, capture_output=True,
                         env={**os.environ, 'RILS_JAX_TRACEBACK': '1'}, timeout=600)
  assert shown.returncode == 1 and 'Traceback' in shown.stderr


# The damaged checkpoint's restore abandons orbax's other reads, whose echo (the test below)
# pytest reports as warnings when it comes during this test.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_refused_runs_leave_the_workdir_as_they_found_it(shapes, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('mine')
  config = tiny.get_config(f'root={shapes / "data"},steps=2,evals=false')
  config.input.batch_size = 128  # 64 training records: fewer than one batch.
  with pytest.raises(ValueError, match='fewer than one batch of 128; set '
                     '--config.input.batch_size to 64 or less'):
    main_lib.train(config, str(workdir))
  assert os.listdir(workdir) == ['notes.txt']
  # A finished run, then the same workdir with a model that does not fit its checkpoint: the
  # refusal names the setting and the parameters, and the workdir keeps only what it had.
  config.input.batch_size = 8
  main_lib.train(config, str(workdir))
  before = sorted(os.listdir(workdir))

  # A damaged checkpoint (a truncated array file) is named, with tensorstore's reason, in one
  # message; orbax's wrapper (a bare Exception holding a whole TensorStore spec) is not shown.
  damaged = tmp_path / 'damaged'
  shutil.copytree(workdir, damaged)
  state = damaged / 'checkpoints' / '2' / 'state'
  largest = max((p for p in state.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  os.truncate(largest, largest.stat().st_size // 2)
  listing = sorted(str(p.relative_to(damaged)) for p in damaged.rglob('*'))
  with pytest.raises(ValueError) as e:
    main_lib.train(tiny.get_config(f'root={shapes / "data"},steps=4,evals=false'), str(damaged))
  message = str(e.value)
  assert 'cannot be read, although its config and parameter shapes match' in message, message
  assert f'Move {damaged / "checkpoints" / "2"} aside' in message, message
  assert 'Orbax said: ValueError: OUT_OF_RANGE' in message and 'TensorStore({' not in message
  assert sorted(str(p.relative_to(damaged)) for p in damaged.rglob('*')) == listing
  wider = tiny.get_config(f'root={shapes / "data"},steps=4,evals=false')
  wider.model.vision.width = 48
  with pytest.raises(ValueError) as e:
    main_lib.train(wider, str(workdir))
  assert 'model.vision.width: 32 -> 48' in str(e.value)
  assert "['image_projection']: (32, 16) in the checkpoint, (48, 16) here" in str(e.value)
  assert sorted(os.listdir(workdir)) == before  # No config.resume_2.json left behind.

  # A longer run on resume continues with the new schedule, and says so.
  longer = tiny.get_config(f'root={shapes / "data"},steps=4,evals=false')
  saved = json.loads((workdir / 'config.json').read_text())
  message = main_lib.warn_schedule_change(longer, saved, 2)
  assert message.startswith('Resuming at step 2 with another learning-rate schedule '
                            '(total_steps: 2 -> 4): the learning rate follows the new config')
  assert main_lib.warn_schedule_change(config, saved, 2) is None
  assert main_lib.warn_data_change(longer, saved, 2) is None
  other = tiny.get_config(f'root={shapes / "data"},steps=4,evals=false')
  other.input.sources[0]['select'] = ':10'
  message = main_lib.warn_data_change(other, saved, 2)
  assert message.startswith("Resuming at step 2 on other training data than the checkpoint's "
                            'config names (input.sources: [{'), message
  assert '"select": ":10"' in message and message.endswith('use a new --workdir.'), message
  main_lib.train(longer, str(workdir))
  logged = tiny.logged_metrics(str(workdir))
  np.testing.assert_allclose(logged[3]['learning_rate'],
                             float(optim.learning_rate_schedule(longer)(2)), rtol=1e-6)


# A failed restore as orbax ends one (a damaged checkpoint): tensorstore finishes a read after the
# event loop that awaited it was closed, a coroutine still reading is closed, then the error.
_ABANDONED_READS = """
import asyncio, gc, sys
import tensorstore as ts
from rils_jax import console

class Other:
  def __del__(self):
    raise KeyError('an unraisable error of another kind')

async def read(future):
  try:
    await future
  except BaseException as e:
    raise Exception('Encountered error while reading array index') from e

def main(argv):
  promise, future = ts.Promise.new()
  loop = asyncio.new_event_loop()
  task = loop.create_task(read(future))
  loop.run_until_complete(asyncio.sleep(0))
  loop.close()
  promise.set_result(1)  # Calls back into the closed loop.
  reading = read(asyncio.Future(loop=asyncio.new_event_loop()))
  reading.send(None)
  del reading  # Closed while awaiting.
  Other()
  gc.collect()
  raise ValueError('the checkpoint cannot be read')

console.run(main)
"""


def test_a_failed_restore_shows_its_error_without_the_echo_of_abandoned_reads():
  shown = subprocess.run([sys.executable, '-c', _ABANDONED_READS], cwd=tiny.REPO_ROOT,
                         text=True, capture_output=True, timeout=300)
  assert shown.returncode == 1, shown.stderr
  assert 'Event loop is closed' not in shown.stderr, shown.stderr
  assert 'Encountered error while reading' not in shown.stderr, shown.stderr
  assert 'an unraisable error of another kind' in shown.stderr  # Others are still shown.
  assert _user_lines(shown.stderr)[-2:] == [
      'error: the checkpoint cannot be read', '(set RILS_JAX_TRACEBACK=1 for the traceback)']
  # With the traceback asked for, nothing is hidden.
  traced = subprocess.run([sys.executable, '-c', _ABANDONED_READS], cwd=tiny.REPO_ROOT,
                          text=True, capture_output=True, timeout=300,
                          env={**os.environ, 'RILS_JAX_TRACEBACK': '1'})
  assert traced.returncode == 1
  assert 'Event loop is closed' in traced.stderr, traced.stderr
  assert 'Encountered error while reading' in traced.stderr, traced.stderr


def test_damaged_checkpoint_items_are_named_in_one_message(shapes, tmp_path, monkeypatch):
  # Found by a helper trying to break the commands: each of these was an AttributeError or
  # KeyError traceback, or an error that blamed a cache file.
  monkeypatch.setenv('RILS_JAX_CACHE', str(tmp_path / 'cache'))
  config = tiny.get_config(f'root={shapes / "data"},steps=2,evals=false')
  run = tmp_path / 'run'
  main_lib.train(config, str(run))
  longer = tiny.get_config(f'root={shapes / "data"},steps=4,evals=false')

  def damaged(name, damage):
    copy = tmp_path / name
    shutil.copytree(run, copy)
    damage(copy / 'checkpoints' / '2')
    return copy

  def write(item, text):
    return lambda step: (step / item / 'metadata').write_text(text)

  for item, text, said in (
      ('config', '{}', 'lacks model, optim, input: it is damaged'),
      ('tokenizer', '[]', 'holds a JSON list, not an object')):
    copy = damaged(f'odd_{item}', write(item, text))
    for call in (restore_lib.restore, lambda path: main_lib.train(longer, path)):
      with pytest.raises(ValueError, match=rf"'{item}' item of the checkpoint .*2 {said}"):
        call(str(copy))
  emptied = damaged('emptied', lambda step: [shutil.rmtree(p) for p in step.iterdir()
                                             if p.is_dir()])
  with pytest.raises(ValueError, match=r"'tokenizer' item of the checkpoint at step 2 in .* "
                     r'cannot be read \(KeyError.*\)\. Move .*emptied/checkpoints/2 aside'):
    main_lib.train(longer, str(emptied))
  cut = damaged('cut_tokenizer', lambda step: (step / 'tokenizer' / 'metadata').write_text(
      json.dumps({'kind': 'sentencepiece', 'sentencepiece_model': base64.b64encode(
          tiny_model_bytes(step)[:700]).decode()})))
  with pytest.raises(ValueError, match=r'the tokenizer saved in the checkpoint .*2 cannot be '
                     'loaded .*: it is damaged'):
    restore_lib.restore(str(cut))
  assert os.listdir(tmp_path / 'cache' / 'tokenizers') == []  # Not kept in the cache.
  before = sorted(os.listdir(cut))
  with pytest.raises(ValueError, match=r'the tokenizer saved in the latest checkpoint of .*cut_'
                     'tokenizer cannot be loaded .*: it is damaged'):
    main_lib.train(longer, str(cut))
  assert sorted(os.listdir(cut)) == before  # No staged tokenizer left in the workdir.
  garbled = damaged('garbled', lambda step: (step / 'tokenizer' / 'metadata').write_text(
      json.dumps({'kind': 'sentencepiece', 'sentencepiece_model': '@@@@'})))
  with pytest.raises(ValueError, match='holds no readable sentencepiece file'):
    restore_lib.restore(str(garbled))
  no_data = damaged('no_data', lambda step: shutil.rmtree(step / 'data'))
  with pytest.raises(ValueError, match=r'at step 2 in .* has no input position .*: it is '
                     'damaged. Move .*no_data/checkpoints/2 aside'):
    main_lib.train(longer, str(no_data))
  assert restore_lib.restore(str(run)).step == 2  # The undamaged run restores.


def tiny_model_bytes(step):
  return base64.b64decode(json.loads((step / 'tokenizer' / 'metadata').read_text())[
      'sentencepiece_model'])


def test_the_results_table_is_in_percent_beside_the_chance_levels():
  results = {
      'zeroshot': dict(top1=0.375, top5=0.8125, chance_top1=0.05, chance_top5=0.25, images=400,
                       skipped_images=0),
      'fewshot': {'5shot_top1': 0.33660000000000007, '5shot_top1_std': 0.01, 'chance_top1': 0.1},
      'retrieval': dict(i2t_r5=0.545, chance_i2t_r5=np.float32(0.024833334), step=300),
  }
  assert table.table(results).splitlines() == [
      'evaluator  metric           result   chance',
      'zeroshot   top1            37.50 %   5.00 %',
      'zeroshot   top5            81.25 %  25.00 %',
      'zeroshot   images              400',
      'zeroshot   skipped_images        0',
      'fewshot    5shot_top1      33.66 %  10.00 %',
      'fewshot    5shot_top1_std   1.00 %',
      'retrieval  i2t_r5          54.50 %   2.48 %',
  ]
  assert table.exact(0.33660000000000007) == 0.3366
  assert table.exact(np.float32(0.7)) == 0.7 and table.exact(np.int64(3)) == 3
  assert table.unflatten({'a/top1': 1, 'b/top1': 2, 'a/top5': 3}) == {
      'a': {'top1': 1, 'top5': 3}, 'b': {'top1': 2}}


def test_keep_best_keeps_the_best_evaluated_step_for_evaluate_and_export(shapes, tmp_path):
  from rils_jax import evaluate as evaluate_lib
  from rils_jax import export
  config = tiny.get_config(f'root={shapes / "data"},steps=4')
  del config.evals['retrieval']
  config.evals.zeroshot.every = 1
  config.keep_best = 'zeroshot/top1'
  workdir = tmp_path / 'run'
  main_lib.train(config, str(workdir))
  scores = {m['step']: m['zeroshot/top1'] for m in map(
      json.loads, (workdir / 'metrics.jsonl').read_text().splitlines()) if 'zeroshot/top1' in m}
  assert sorted(scores) == [1, 2, 3, 4]
  best = max(scores.values())
  best_step = max(s for s, v in scores.items() if v == best)  # The later step on a tie.
  assert os.listdir(workdir / 'best') == [str(best_step)]
  evaluated = evaluate_lib.evaluate(config, str(workdir / 'best'))
  assert evaluated['zeroshot']['step'] == best_step and evaluated['zeroshot']['top1'] == best
  printed = export._export('timm', str(workdir / 'best'), None, str(tmp_path / 'v.safetensors'),
                           'none')
  assert f'step {best_step} of {workdir}/best/{best_step}' in printed
  # Only a score of an evaluator that runs during training can pick the best.
  config.keep_best = 'zeroshot/top7'
  with pytest.raises(ValueError, match="'top7' is not a score of a zeroshot evaluator "
                     r'\(top1, top5\)'):
    main_lib.validate_config(config)
  config.keep_best = 'zeroshot/top1'
  config.evals.zeroshot.every = 0
  with pytest.raises(ValueError, match='keep_best=.zeroshot/top1. must be NAME/METRIC of an '
                     'evaluator that runs during training'):
    main_lib.validate_config(config)


def _chromium():
  import shutil
  found = shutil.which('chromium') or shutil.which('chromium-browser')
  if not found and os.environ.get('RILS_REQUIRE_CHROMIUM') == '1':  # CI (.ci/run) installs it.
    raise AssertionError('chromium is not installed')
  return found


def test_the_report_draws_a_finished_and_a_running_run(shapes, tmp_path):
  from PIL import Image
  from rils_jax import report
  config = tiny.get_config(f'root={shapes / "data"},steps=3')
  config.evals.zeroshot.every = 2
  workdir = tmp_path / 'run'
  main_lib.train(config, str(workdir))  # Writes the report at the end.
  with Image.open(workdir / 'report.png') as png:
    png.load()
    assert png.size[0] >= 800 and len(png.getcolors(1 << 16) or range(1 << 16)) > 50
  out = report.write_report(str(workdir))
  assert out['panels'][:3] == ['loss', 'contrastive term', 'reconstruction term']
  assert out['panels'][-2:] == ['retrieval (%)', 'zeroshot (%)']
  page = (workdir / 'report.html').read_text()
  assert 'data:image/png;base64,' in page and 'zeroshot   top1' in page
  # A run still going: its last line, half written, is left out.
  lines = (workdir / 'metrics.jsonl').read_text()
  (workdir / 'metrics.jsonl').write_text(lines + '{"step": 4, "loss": 1.')
  assert len(report.read_metrics(str(workdir))) == len(lines.splitlines())
  with pytest.raises(FileNotFoundError, match='metrics.jsonl does not exist'):
    report.write_report(str(tmp_path / 'nothing'))

  browser = _chromium()
  if not browser:
    pytest.skip('chromium is not installed (apt-get install chromium): the page was not loaded')
  shot = tmp_path / 'shot.png'
  result = subprocess.run(
      [browser, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
       '--disable-background-networking', '--disable-component-update', '--disable-sync',
       f'--user-data-dir={tmp_path / "profile"}', '--enable-logging=stderr', '--v=0',
       '--window-size=1280,1200', f'--screenshot={shot}', f'file://{workdir / "report.html"}'],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'CONSOLE' not in result.stderr and 'Failed to load' not in result.stderr
  with Image.open(shot) as screen:  # The page drew the figure: many colours, not a blank page.
    assert len(screen.convert('RGB').getcolors(1 << 20) or range(1 << 20)) > 100


def test_data_benchmark_reads_a_set_smaller_than_its_default_batch(shapes):
  """README's first own-data command, on a set of fewer images than its batch of 64."""
  from rils_jax.data import benchmark as data_benchmark
  from tests import test_configs
  train = shapes / 'data' / 'train'
  config = test_configs._load('default', f'data=csv:{train / "captions.csv"}:{train / "images"},'
                              'heldout=44')
  (figures,) = data_benchmark.run(config, workers=(0,), images=40, baseline=False)
  assert (figures['records'], figures['images']) == (20, 40)  # Two batches of all 20 images.


def test_own_data_as_a_config_argument(shapes, tmp_path):
  from tests import test_configs
  train = shapes / 'data' / 'train'
  csv_spec = f'csv:{train / "captions.csv"}:{train / "images"}'
  c = test_configs._load('default', f'data={csv_spec},epochs=2')
  (source,) = c.input.sources
  assert (source['kind'], source['select']) == ('csv', ':-6')  # 64 images: a tenth held out.
  assert list(c.evals.keys()) == ['batch_size', 'retrieval']
  assert c.evals.retrieval.sources[0]['select'] == '-6:'
  assert c.total_steps == 1  # ceil(2 epochs x 58 images / 128)...
  c.input.batch_size = 16  # ...and after --config.input.batch_size=16:
  assert c.total_steps == 8  # ceil(116 / 16).
  # The same images as COCO JSON and as a folder of images with .txt captions.
  rows = [line.split(',', 1) for line in (train / 'captions.csv').read_text().splitlines()[1:]]
  names = list(dict.fromkeys(name for name, _ in rows))
  coco = tmp_path / 'captions.json'
  coco.write_text(json.dumps(dict(
      images=[dict(id=i, file_name=n) for i, n in enumerate(names)],
      annotations=[dict(image_id=names.index(n), caption=t) for n, t in rows])))
  folder = tmp_path / 'txt'
  folder.mkdir()
  for name in names:
    os.symlink(train / 'images' / name, folder / name)
    (folder / (os.path.splitext(name)[0] + '.txt')).write_text(
        '\n'.join(t for n, t in rows if n == name) + '\n')
  opened = []
  for spec in (csv_spec, f'coco:{coco}:{train / "images"}', f'txt:{folder}'):
    c = test_configs._load('flickr8k_coco', f'data={spec},heldout=4')
    records, stats = sources.read_image_captions(c.input.sources[0])
    opened.append(([r.captions for r in records], stats.images, stats.captions))
  assert opened[0] == opened[1] and opened[0][1:] == (60, 180)
  assert sorted(map(sorted, opened[2][0])) == sorted(map(sorted, opened[0][0]))
  # Vit-B/16's recipe takes it too, and the errors are one line each.
  assert test_configs._load('vit_b16', f'data=txt:{folder}').input.sources[0]['kind'] == 'txt'
  with pytest.raises(ValueError, match='own data is csv:CAPTIONS.csv:IMAGES'):
    test_configs._load('default', f'data=csv:{train / "captions.csv"}')
  with pytest.raises(FileNotFoundError, match='captions CSV not found'):
    test_configs._load('default', f'data=csv:{tmp_path / "none.csv"}:{train}')
  with pytest.raises(ValueError, match='nothing left to train on'):
    test_configs._load('default', f'data={csv_spec},heldout=64')
  assert re.split(r':(?!//)', 'gs://b/c.csv:gs://b/images') == ['gs://b/c.csv', 'gs://b/images']


def test_progress_lines_start_early_and_count_long_work():
  from rils_jax import progress
  config = tiny.tiny_config(total_steps=300, log_every=25)
  assert [s for s in range(1, 301) if main_lib.should_log(s, 0, config)] == [
      1, 2, 5, 10] + list(range(25, 301, 25))
  # Resumed at step 100: the first steps after the restart again.
  assert [s for s in range(101, 151) if main_lib.should_log(s, 100, config)] == [
      101, 102, 105, 110, 125, 150]
  line = main_lib.progress_line(10, 300, dict(loss=1.5, clip_loss=1.0, recon_loss=0.5,
                                              clip_acc=0.25), 100.0, 0.0, 0.0, 1)
  assert line.startswith('step 10/300  loss 1.5000  clip 1.0000  recon 0.5000  clip_acc 0.250  '
                         '100.0 img/s  elapsed ')
  assert ' ETA ' in line
  p = progress.Progress('Indexing the shards', 4, interval=0)
  p.start, p.done = 100.0, 1
  assert p.line(110.0) == 'Indexing the shards: 1 / 4 (25%) in 10 s, ETA 30 s'
  p.done = 4
  assert p.line(140.0) == 'Indexing the shards: 4 / 4 (100%) in 40 s'


def test_bad_values_found_by_trying_to_break_it(shapes, tmp_path):
  from rils_jax import compare
  from rils_jax import report
  from tests import test_configs
  with pytest.raises(ValueError, match="config argument evals='ture' must be true or false"):
    tiny.get_config('evals=ture')
  with pytest.raises(ValueError, match="config argument steps='abc' must be an int"):
    tiny.get_config('steps=abc')
  with pytest.raises(ValueError, match='config.optim.lr=-1.0 must be > 0'):
    optim.learning_rate_schedule(tiny.tiny_config(**{'optim.lr': -1.0}))
  from rils_jax.data import benchmark as data_benchmark
  with pytest.raises(ValueError, match='--batch_size=100 is more than the 64 training records '
                     'of the config; give --batch_size=64 or less'):
    data_benchmark.run(tiny.get_config(f'root={shapes / "data"}'), workers=(0,), batch_size=100)
  train = shapes / 'data' / 'train'
  with pytest.raises(ValueError, match='heldout=-5 must be >= 0'):
    test_configs._load('default', f'data=csv:{train / "captions.csv"}:{train},heldout=-5')
  for epochs in ('-1', 'nan', 'inf'):  # Not silently the config's own total_steps.
    with pytest.raises(ValueError, match=f'epochs={float(epochs)} must be a number >= 0'):
      test_configs._load('default', f'data=csv:{train / "captions.csv"}:{train},epochs={epochs}')
  c = test_configs._load('default', f'data=csv:{train / "captions.csv"}:{train / "images"},'
                         'epochs=2')
  c.input.batch_size = 0  # total_steps is ceil(epochs x images / batch): no ZeroDivisionError.
  with pytest.raises(ValueError, match=r'config.input.batch_size=0 must be a positive multiple'):
    main_lib.validate_config(c)
  (tmp_path / 'empty.csv').write_text('')
  with pytest.raises(ValueError, match='empty.csv is empty'):
    sources.read_csv_captions(str(tmp_path / 'empty.csv'), str(tmp_path))
  # A header with spaces around its names is read; a file given as the image folder is named so.
  (tmp_path / 'spaced.csv').write_text(' image , caption \n000000.png,a shape\n')
  records, _ = sources.read_csv_captions(str(tmp_path / 'spaced.csv'), str(train / 'images'))
  assert [r.captions for r in records] == [('a shape',)]
  with pytest.raises(FileNotFoundError, match='image folder is a file, not a folder: .*spaced.csv'):
    sources.read_csv_captions(str(tmp_path / 'spaced.csv'), str(tmp_path / 'spaced.csv'))
  with pytest.raises(FileNotFoundError, match='captions CSV is a folder, not a file'):
    sources.read_csv_captions(str(tmp_path), str(train / 'images'))
  (tmp_path / 'cased.csv').write_text('Image,Caption\n000000.png,a shape\n')
  assert len(sources.read_csv_captions(str(tmp_path / 'cased.csv'), str(train / 'images'))[0]) == 1
  with pytest.raises(ValueError, match='captions CSV gs://b/c.csv: CSV, COCO and txt sources read '
                     'local files'):
    test_configs._load('default', 'data=csv:gs://b/c.csv:gs://b/images')
  with pytest.raises(ValueError, match='--variants names no variant'):
    compare.compare(tiny.tiny_config(), tiny.tiny_config(), str(tmp_path / 'c'), [], 1)
  # A line cut or edited in the middle of metrics.jsonl is left out of the report, not fatal.
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'metrics.jsonl').write_text(
      '{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
  assert [m['step'] for m in report.read_metrics(str(tmp_path / 'run'))] == [1, 3]
  # A refused run into a workdir that did not exist leaves no folder either.
  config = tiny.get_config(f'root={shapes / "data"},steps=2,evals=false')
  config.input.batch_size = 128
  with pytest.raises(ValueError, match='fewer than one batch'):
    main_lib.train(config, str(tmp_path / 'new'))
  assert not (tmp_path / 'new').exists()
