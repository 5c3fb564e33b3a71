"""`config.tokenizer.kind='clip_bpe'`: CLIP's BPE gives open_clip's token ids, long captions are
cut without changing them, and a tiny clip_bpe run trains, checkpoints its tokenizer, restores,
evaluates and refuses a resume with another tokenizer kind.

The id comparisons need open_clip (tests/requirements.txt) and skip without it; the rest needs
only CLIP's vocabulary file, which an installed open_clip_torch holds
(`pip install --no-deps open_clip_torch==3.3.0`).
"""

import gzip
import importlib.util
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from configs import common
from rils_jax import checkpoints as checkpoints_lib
from rils_jax import clip_bpe
from rils_jax import evaluate as evaluate_lib
from rils_jax import main as main_lib
from rils_jax import tokenizer as tokenizer_lib
from rils_jax.evals import embed as embed_lib
from rils_jax.evals import restore as restore_lib
from tests import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CAPTIONS = [
    'A photo of a DOG.', 'Crème brûlée at the café: naïve façade, Ångström', '東京タワーの夜景',
    '한국어 캡션 입니다', 'emoji 🐶🐱 family 👩\u200d👩\u200d👧 party 🎉',
    'fish &amp; chips &lt;b&gt;bold&lt;/b&gt; &amp;amp;amp; &#39;quoted&#39; &eacute;t&eacute;',
    'mojibake: cafÃ© â€œquotedâ€\x9d', 'ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ, ﬁne ligature', 'ΟΔΟΣ Σ',
    '', '   ', '\t\n \r\n\x0b', '!!!', '...?!', '-- ## @@ ~~', "it's the dog's ball, they're HERE",
    "'ſ and '<ſtart_of_text>", 'x <end_of_text> y (<end_of_text> <start_of_text>z', 'ab1234cd 3.14',
    'ypogegrammeni a\u0345b', 'colour\x1b[31m red\x1b[0m text\x00\x7f',
    ' '.join(f'word{i}' for i in range(3000)),  # Thousands of words: cut and truncated.
    'très long, ' * 2000,  # One long non-ASCII line (not cut before cleaning).
    '\n'.join(['a line with é &amp; <b>'] * 2000),  # Many lines (cut at a line break).
    'b' * 1000,  # One long word: no place to cut.
]


@pytest.fixture(scope='module')
def clip():
  try:
    return tokenizer_lib.load(tokenizer_lib.find_clip_vocab())
  except FileNotFoundError as e:
    pytest.skip(str(e))


def _fragments_caption(rng: random.Random) -> str:
  fragments = ['a', 'Photo', "'s", "'T", 'café', 'Σ', '東京', '🐶', '&amp;', '&lt;', '<', '&',
               'Ã©', '\x1b[31m', '\r\n', '\n', '\t', 'ﬁ', '½', '²', '7', '42', ' ', '...', '“',
               '’', '<end_of_text>', '_of_text>', '\u0345', '\u00a0', 'e\u0301', 'ß', '$5']
  sep = rng.choice(['', ' ', rng.choice(fragments)])
  return sep.join(rng.choice(fragments) for _ in range(rng.choice([0, 2, 10, 60, 300])))


def test_ids_equal_open_clip(clip):
  open_clip = pytest.importorskip('open_clip')
  rows = clip.encode(CAPTIONS, 77)
  assert rows.dtype == np.int32 and rows.shape == (len(CAPTIONS), 77)
  expected = open_clip.get_tokenizer('ViT-B-16')(CAPTIONS).numpy()
  for caption, row, want in zip(CAPTIONS, rows, expected):
    np.testing.assert_array_equal(row, want, err_msg=repr(caption[:80]))
  assert rows[CAPTIONS.index('')].tolist()[:3] == [49406, 49407, 0]
  assert (rows[-4:, -1] == 49407).all()  # The long ones are truncated, ending in end-of-text.
  # Other context lengths (the tiny test config's 8, and the degenerate ones), and captions of
  # random fragments, most of them long enough to be cut at these lengths.
  simple = open_clip.tokenizer.SimpleTokenizer()
  rng = random.Random(0)
  mixed = [_fragments_caption(rng) for _ in range(150)]
  for context in (1, 2, 8):
    np.testing.assert_array_equal(clip.encode(CAPTIONS + mixed, context),
                                  simple(CAPTIONS + mixed, context).numpy())


def test_long_captions_are_cut_before_encoding(clip):
  captions = ['a small red circle beside 2 squares ' * 100_000,  # 3.6 MB, one ASCII line.
              'un petit cercle rouge, très joli\n' * 100_000]  # 3.3 MB of lines.
  start = time.perf_counter()
  rows = clip.encode(captions, 77)
  elapsed = time.perf_counter() - start
  assert elapsed < 0.5, elapsed  # Several seconds uncut.
  # The same rows as from the first few kilobytes.
  np.testing.assert_array_equal(rows, clip.encode([c[:3000] for c in captions], 77))
  assert rows[0, :9].tolist() == [49406, 320, 2442, 736, 7117, 13519, 273, 26972, 320]
  assert rows[:, -1].tolist() == [49407, 49407]


def test_pickles_as_its_path_and_finds_the_vocabulary_without_open_clip(clip, monkeypatch):
  data = pickle.dumps(clip)
  assert len(data) < 500  # Not the 1.3 MB vocabulary: grain sends it to every worker.
  np.testing.assert_array_equal(pickle.loads(data).encode(CAPTIONS[:5], 16),
                                clip.encode(CAPTIONS[:5], 16))
  assert (clip.vocab_size, clip.eot_id, clip.pad_id, clip.kind) == (49408, 49407, 0, 'clip_bpe')
  # Found and used without importing open_clip (which imports torch).
  code = ('import sys; from rils_jax import tokenizer as t; '
          'tok = t.load(t.find_clip_vocab()); print(tok.encode(["a dog"], 4).tolist()); '
          'print(sorted({"open_clip", "torch"} & set(sys.modules)))')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split('\n')
  assert out[:2] == ['[[49406, 320, 1929, 49407]]', '[]']

  # No installed copy: one line saying how to get one.
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(FileNotFoundError,
                     match=r'pip install --no-deps open_clip_torch==3\.3\.0 .*clip_vocab'):
    tokenizer_lib.find_clip_vocab()


def test_bad_vocabulary_files_and_config_are_one_line_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="clip_vocab='/none.txt.gz' is not a file"):
    tokenizer_lib.find_clip_vocab('/none.txt.gz')
  (tmp_path / 'plain.txt').write_text('#version\na b\n')
  with pytest.raises(ValueError, match='not CLIP.s bpe_simple_vocab_16e6.txt.gz'):
    clip_bpe.ClipBpeTokenizer(str(tmp_path / 'plain.txt'))
  with gzip.open(tmp_path / 'short.txt.gz', 'wt') as f:
    f.write('#version\na b\n')
  with pytest.raises(ValueError, match='expected 48894 merges'):
    clip_bpe.ClipBpeTokenizer(str(tmp_path / 'short.txt.gz'))

  config = tiny.tiny_config(**{'tokenizer.kind': 'bpe'})
  with pytest.raises(ValueError, match=r"kind='bpe' must be one of \('sentencepiece', 'clip_bpe'"):
    tokenizer_lib.check_config(config.tokenizer)
  config = tiny.tiny_config(**{'tokenizer.kind': 'clip_bpe', 'tokenizer.model': 'a.model'})
  with pytest.raises(ValueError, match="is a sentencepiece model, but .*kind='clip_bpe'"):
    tokenizer_lib.check_config(config.tokenizer)
  config = tiny.tiny_config(**{'tokenizer.clip_vocab': 'v.txt.gz'})
  with pytest.raises(ValueError, match="applies to config.tokenizer.kind='clip_bpe'"):
    tokenizer_lib.check_config(config.tokenizer)


def test_prepare_tokenizer_resumes_only_with_the_same_kind_and_file(clip, tmp_path):
  with open(clip.model_path, 'rb') as f:
    vocab = f.read()
  config = tiny.tiny_config(**{'tokenizer.kind': 'clip_bpe'})
  (tmp_path / 'a').mkdir()
  with pytest.raises(ValueError, match="CLIP's BPE tokenizer .* has 49408 pieces but the text "
                     r'tower embeds only config.model.text.vocab_size=64; set '
                     r'--config.model.text.vocab_size=49408'):
    main_lib.prepare_tokenizer(config, None, str(tmp_path / 'a'), None)
  assert os.listdir(tmp_path / 'a') == []  # Never kept when unusable.
  config.model.text.vocab_size = 49408
  # A resumed run rebuilds the checkpoint's tokenizer (no vocabulary lookup).
  tok = main_lib.prepare_tokenizer(config, None, str(tmp_path), vocab)
  assert tok.kind == 'clip_bpe' and tok.model_path == str(tmp_path / 'tokenizer_clip_bpe.txt.gz')
  assert sorted(os.listdir(tmp_path)) == ['a', 'tokenizer_clip_bpe.txt.gz']
  sentencepiece = tiny.tiny_config()
  with pytest.raises(ValueError, match="the clip_bpe tokenizer but config.tokenizer.kind="
                     "'sentencepiece'; resume with --config.tokenizer.kind=clip_bpe"):
    main_lib.prepare_tokenizer(sentencepiece, None, str(tmp_path), vocab)
  model = tokenizer_lib.train_tokenizer(['a red circle', 'a blue square'] * 5, 64,
                                        str(tmp_path / 'sp.model'))
  with open(model, 'rb') as f:
    with pytest.raises(ValueError, match="the sentencepiece tokenizer but config.tokenizer.kind="
                       "'clip_bpe'"):
      main_lib.prepare_tokenizer(config, None, str(tmp_path), f.read())
  # Another vocabulary than the checkpoint's (the same text in another gzip is the same one).
  lines = gzip.decompress(vocab).split(b'\n')
  (tmp_path / 'same.txt.gz').write_bytes(gzip.compress(b'\n'.join(lines), mtime=1))
  lines[1] = b'n i'  # The first merge, 'i n', swapped.
  (tmp_path / 'other.txt.gz').write_bytes(gzip.compress(b'\n'.join(lines)))
  config.tokenizer.clip_vocab = str(tmp_path / 'same.txt.gz')
  main_lib.prepare_tokenizer(config, None, str(tmp_path), vocab)
  config.tokenizer.clip_vocab = str(tmp_path / 'other.txt.gz')
  with pytest.raises(ValueError, match='another tokenizer than config.tokenizer.clip_vocab='):
    main_lib.prepare_tokenizer(config, None, str(tmp_path), vocab)


def test_checkpoint_tokenizer_items_of_both_kinds_and_old_checkpoints(clip, tmp_path):
  with open(clip.model_path, 'rb') as f:
    vocab = f.read()
  item = checkpoints_lib.tokenizer_item(vocab)
  assert sorted(item) == ['clip_bpe_vocab', 'kind', 'sha256'] and item['kind'] == 'clip_bpe'
  assert checkpoints_lib.tokenizer_file(item) == vocab
  model = b'\n\x0fsentencepiece bytes'
  item = checkpoints_lib.tokenizer_item(model)
  assert item['kind'] == 'sentencepiece' and checkpoints_lib.tokenizer_file(item) == model
  del item['kind']  # As written before config.tokenizer.kind.
  assert checkpoints_lib.tokenizer_file(item) == model
  with pytest.raises(ValueError, match="kind 'wordpiece'"):
    checkpoints_lib.tokenizer_file({'kind': 'wordpiece', 'model': ''})


def clip_bpe_run(tmp_path_factory):
  """A 1-step run of the tiny config (tests/tiny.py) with CLIP's BPE and a zero-shot evaluation,
  kept in the session's temporary folder so that tests/test_export.py reuses it.

  Returns:
    (workdir, config, final evaluation results).
  """
  try:
    tokenizer_lib.find_clip_vocab()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  base = tmp_path_factory.getbasetemp() / 'clip_bpe_run'
  config = tiny.get_config(f'root={base / "data"},steps=1')
  del config.evals.retrieval
  config.tokenizer.kind = 'clip_bpe'
  config.model.text.vocab_size = 49408
  workdir, done = str(base / 'run'), base / 'results.json'
  if not done.exists():
    results = main_lib.train(config, workdir)
    done.write_text(json.dumps(results))
  return workdir, config, json.loads(done.read_text())


def test_clip_bpe_run_restores_evaluates_and_refuses_another_kind(tmp_path_factory, clip):
  workdir, config, results = clip_bpe_run(tmp_path_factory)
  assert 0.0 <= results['zeroshot/top1'] <= 1.0  # The prompts were embedded with CLIP's BPE.
  names = os.listdir(workdir)
  assert 'tokenizer_clip_bpe.txt.gz' in names and 'tokenizer.model' not in names
  item = checkpoints_lib.read_json(workdir, 'tokenizer')
  with open(clip.model_path, 'rb') as f:
    assert item['sha256'] == tokenizer_lib.fingerprint(f.read())
  assert item['kind'] == 'clip_bpe' and '/' not in item['kind'] + item['sha256']
  assert sorted(item) == ['clip_bpe_vocab', 'kind', 'sha256']  # No path of this machine.

  restored = restore_lib.restore(workdir)
  assert (restored.tokenizer.kind, restored.tokenizer.eot_id, restored.model.eot_id) == (
      'clip_bpe', 49407, 49407)
  embedder = embed_lib.Embedder(restored.model, restored.config, restored.mesh,
                                restored.tokenizer)
  texts = embedder.texts(restored.params, ['a red circle', 'a red circle!', ''])
  np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
  assert np.abs(texts[0] - texts[1]).max() > 1e-4  # The extra token reached the pooled feature.
  evaluated = evaluate_lib.evaluate(config, workdir)
  assert evaluated['zeroshot']['top1'] == results['zeroshot/top1']

  other = tiny.apply_overrides(tiny.get_config(f'root={config.synthetic.root},steps=2'), **{
      'model.text.vocab_size': 49408, 'tokenizer.vocab_size': 64})
  common.remove_evals(other)
  with pytest.raises(ValueError, match="trained with the clip_bpe tokenizer but "
                     "config.tokenizer.kind='sentencepiece'"):
    main_lib.train(other, workdir)


def test_a_restored_tokenizer_is_one_file_named_by_its_content(tmp_path, monkeypatch):
  # A temporary file removed at exit stayed in /tmp whenever a fine-tune was SIGKILLed: now every
  # restore of one tokenizer shares one file in the cache, and a killed process leaves no copy.
  monkeypatch.setenv('RILS_JAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
  os.makedirs(tmp_path / 'tmp')
  first, second = b'\x0a\x01sentencepiece one', b'\x0a\x01sentencepiece two'
  path = restore_lib.tokenizer_path(first)
  assert path == restore_lib.tokenizer_path(first)
  assert os.path.dirname(path) == str(tmp_path / 'cache' / 'tokenizers')
  assert path.endswith('_tokenizer.model') and open(path, 'rb').read() == first
  other = restore_lib.tokenizer_path(second)
  assert other != path and open(other, 'rb').read() == second
  assert sorted(os.listdir(tmp_path / 'cache' / 'tokenizers')) == sorted(
      [os.path.basename(path), os.path.basename(other)])  # No staged file left.
  assert restore_lib.tokenizer_path(gzip.compress(b'bpe')).endswith('_tokenizer_clip_bpe.txt.gz')
  os.truncate(path, 3)  # Damaged in the cache: written again.
  assert restore_lib.tokenizer_path(first) == path and open(path, 'rb').read() == first
  with open(path, 'r+b') as f:  # Changed, at the same size: written again.
    f.write(b'\xff')
  assert restore_lib.tokenizer_path(first) == path and open(path, 'rb').read() == first
  assert os.stat(path).st_mode & 0o777 == 0o644  # Readable by others in a shared folder.
  # A cache that cannot be written (here a file where the folder should be): the temporary folder.
  monkeypatch.setenv('RILS_JAX_CACHE', str(tmp_path / 'a_file'))
  (tmp_path / 'a_file').write_bytes(b'')
  fallback = restore_lib.tokenizer_path(first)
  assert os.path.dirname(fallback) == str(tmp_path / 'tmp' / 'rils_jax_tokenizers')
  assert open(fallback, 'rb').read() == first and os.listdir(tmp_path / 'tmp') == [
      'rils_jax_tokenizers']
