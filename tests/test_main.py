"""The entry point end to end on a tiny generated dataset: logs, checkpoints, resume, evals."""

import glob
import io
import json
import os
import subprocess
import sys
import tarfile
from unittest import mock

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import common
from rils_jax import evaluate as evaluate_lib
from rils_jax import finetune as finetune_lib
from rils_jax import main as main_lib
from rils_jax import progress
from rils_jax import tokenizer as tokenizer_lib
from rils_jax.data import convert
from rils_jax.data import sources
from rils_jax.data import synthetic
from rils_jax.data import transforms
from rils_jax.evals import embed as embed_lib
from rils_jax.evals import patch_text
from rils_jax.evals import restore as restore_lib
from rils_jax.models import rils as rils_lib
from tests import tiny


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('shapes') / 'data')


def _config(data_root, **overrides):
  c = tiny.tiny_config(**{'tokenizer.vocab_size': 64, 'log_every': 2, 'checkpoint_every': 3,
                          'evals.batch_size': 16})
  common.synthetic_data(c, image_size=32, num_train=64, num_heldout=16, zeroshot_per_class=2,
                        root=data_root)
  return tiny.apply_overrides(c, **overrides)


def _read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_train_writes_logs_checkpoints_and_evals_then_resumes(tmp_path, data_root):
  workdir = str(tmp_path / 'run')
  config = _config(data_root, total_steps=6, **{'evals.zeroshot.every': 4})
  results = main_lib.train(config, workdir)
  assert 0.0 <= results['zeroshot/top1'] <= 1.0 and results['zeroshot/chance_top1'] == 0.05
  assert {'retrieval/i2t_r5', 'retrieval/t2i_r5', 'retrieval/chance_t2i_r5'} <= set(results)
  lines = _read_metrics(workdir)
  assert lines[0]['step'] == 0 and lines[0]['data/images'] == 64
  train_lines = [m for m in lines if 'loss' in m]
  assert [m['step'] for m in train_lines] == [1, 2, 4, 5, 6]  # 1, 2, 5: the early steps.
  # The periodic zero-shot evaluation at step 4, then every evaluator at the end (step 6).
  assert [(m['step'], 'retrieval/i2t_r1' in m) for m in lines if 'zeroshot/top1' in m] == [
      (4, False), (6, True)]
  # The checkpoint evaluated on its own reproduces the final evaluation exactly.
  evaluated = evaluate_lib.evaluate(config, workdir)
  assert evaluated['zeroshot']['step'] == 6
  for name in ('zeroshot', 'retrieval'):
    for key, value in evaluated[name].items():
      if key not in ('step', 'checkpoint'):
        assert value == results[f'{name}/{key}'], (name, key)
  _check_patch_text_map(tmp_path, workdir, data_root)
  _check_embedding_progress(workdir, data_root)
  _check_finetune(tmp_path, workdir, data_root)
  for m in train_lines:
    assert {'loss', 'clip_loss', 'recon_loss', 'clip_acc', 'gate_fraction', 'logit_scale',
            'learning_rate', 'grad_norm', 'images_per_sec', 'data/skipped_examples'} <= set(m)
  assert lines[-1]['zeroshot/top1'] == results['zeroshot/top1']
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']
  assert any(f.startswith('events.out.tfevents')
             for f in os.listdir(os.path.join(workdir, 'tensorboard')))
  assert tokenizer_lib.Tokenizer(os.path.join(workdir, 'tokenizer.model')).eot_id == 2
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['total_steps'] == 6

  # Same workdir, more steps: resumes at step 6 instead of starting over.
  main_lib.train(_config(data_root, total_steps=8), workdir)
  steps = [m['step'] for m in _read_metrics(workdir) if 'loss' in m]
  assert steps == [1, 2, 4, 5, 6, 7, 8]


def _check_embedding_progress(workdir, data_root):
  """An evaluation's embedding logs how far it is every 10 s, and nothing when it is shorter."""
  restored = restore_lib.restore(workdir)
  embedder = embed_lib.Embedder(restored.model, restored.config, restored.mesh,
                                restored.tokenizer)
  images = sorted(glob.glob(os.path.join(data_root, 'zeroshot', '*', '*.png')))  # 40 pictures.
  with mock.patch.object(progress.logging, 'info') as info:
    embedder.images(restored.params, images)
    embedder.texts(restored.params, ['a red circle'] * 20)
  assert info.call_count == 0  # Shorter than 10 s: silent.
  real = progress.Progress
  every_batch = lambda what, total, end_line: real(what, total, 0, end_line)  # Interval 0 s.
  with mock.patch.object(progress.logging, 'info') as info, \
      mock.patch.object(embed_lib.progress, 'Progress', every_batch):
    embedder.images(restored.params, images)
    embedder.texts(restored.params, ['a red circle'] * 20)
  lines = [call.args[1] for call in info.call_args_list]
  assert [line.split(' in ')[0] for line in lines] == [  # Batches of evals.batch_size=16.
      'Embedding images: 16 / 40 (40%)', 'Embedding images: 32 / 40 (80%)',
      'Embedding images: 40 / 40 (100%)', 'Embedding texts: 16 / 20 (80%)',
      'Embedding texts: 20 / 20 (100%)']


def _check_patch_text_map(tmp_path, workdir, data_root):
  images = sorted(glob.glob(os.path.join(data_root, 'zeroshot', '*', '*.png')))[:2]
  phrases = ['a red circle', 'a blue square', 'green']
  out = str(tmp_path / 'maps.png')
  probs = patch_text.patch_text_map(workdir, images, phrases, out)
  assert probs.shape == (2, 4, 4, 3)  # 32 px, patch 8.
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  # Reference: the final-LayerNorm patch tokens times image_projection, normalised, softmax
  # over the normalised phrase embeddings at the teacher temperature 0.04.
  restored = restore_lib.restore(workdir)
  pixels = np.stack([transforms.decode_crop(p, 32) for p in images])
  _, tokens = restored.model.apply(
      {'params': restored.params}, transforms.normalize(pixels, restored.config.input),
      method=rils_lib.RILS.encode_image)
  patches = np.asarray(tokens) @ np.asarray(restored.params['image_projection'])
  patches /= np.linalg.norm(patches, axis=-1, keepdims=True)
  text = np.asarray(restored.model.apply(
      {'params': restored.params}, restored.tokenizer.encode(phrases, 8),
      method=rils_lib.RILS.encode_text))
  logits = patches @ text.T / 0.04
  reference = np.exp(logits - logits.max(-1, keepdims=True))
  reference /= reference.sum(-1, keepdims=True)
  np.testing.assert_allclose(probs.reshape(2, 16, 3), reference, atol=1e-4)
  with Image.open(out) as png:
    assert png.size == (5 * patch_text.PANEL, 2 * (patch_text.PANEL + patch_text.TITLE)
                        + patch_text.TITLE)
  with pytest.raises(ValueError, match='non-empty phrase'):
    patch_text.patch_text_map(workdir, images, ['a', ' '], out)


def _check_finetune(tmp_path, workdir, data_root):
  folder = os.path.join(data_root, 'zeroshot')  # 20 classes x 2 pictures.
  config = ml_collections.ConfigDict(dict(
      init_from=workdir, seed=0, total_steps=3, batch_size=8, eval_batch_size=16, log_every=1,
      eval_every=0, label_smoothing=0.1,
      optim=dict(lr=1e-3, warmup_steps=1, min_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.05, grad_clip=0.0, layer_decay=0.65),
      input=dict(crop_scale=(0.08, 1.0), num_workers=0),
      data=dict(train=dict(kind='folder', root=folder, per_class=':1'),
                test=dict(kind='folder', root=folder, per_class='1:'))))
  ft_dir = str(tmp_path / 'finetune')
  results = finetune_lib.finetune(config, ft_dir)
  assert results['test/images'] == 20 and 0.0 <= results['test/top1'] <= results['test/top5']
  assert [m['step'] for m in _read_metrics(ft_dir) if 'loss' in m] == [1, 2, 3]
  # The fine-tuned encoder started from the pre-trained one and moved away from it.
  pretrained = restore_lib.restore(workdir).params['visual']
  tuned = ocp.StandardCheckpointer().restore(os.path.join(ft_dir, 'params'))
  assert set(tuned) == {'visual', 'head'}
  deltas = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), tuned['visual'],
                        pretrained)
  assert 0 < max(jax.tree.leaves(deltas)) < 0.05
  with pytest.raises(ValueError, match='is not empty'):
    finetune_lib.finetune(config, ft_dir)


def test_clip_baseline_and_named_tokenizer(tmp_path, data_root):
  tok = tokenizer_lib.train_tokenizer(['a red circle', 'a blue square'] * 10, 40,
                                      str(tmp_path / 'named.model'))
  config = _config(data_root, total_steps=2, **{'loss.kind': 'clip'})
  config.tokenizer.model = tok
  del config.evals.retrieval
  workdir = str(tmp_path / 'clip')
  results = main_lib.train(config, workdir)
  assert set(results) == {'zeroshot/top1', 'zeroshot/top5', 'zeroshot/chance_top1',
                          'zeroshot/chance_top5', 'zeroshot/images', 'zeroshot/skipped_images'}
  assert results['zeroshot/images'] == 40  # 20 classes x 2 pictures.
  with open(tok, 'rb') as a, open(os.path.join(workdir, 'tokenizer.model'), 'rb') as b:
    assert a.read() == b.read()
  assert all(m['recon_loss'] == 0.0 for m in _read_metrics(workdir) if 'loss' in m)


def test_config_errors_come_before_compilation(tmp_path, data_root):
  with pytest.raises(ValueError, match='multiple of the 8 devices'):
    main_lib.train(_config(data_root, **{'input.batch_size': 12}), str(tmp_path / 'a'))
  for key in ('keep_checkpoints', 'log_every', 'checkpoint_every', 'total_steps'):
    with pytest.raises(ValueError, match=f'config.{key}=0 must be >= 1'):
      main_lib.train(_config(data_root, **{key: 0}), str(tmp_path / 'e'))
  with pytest.raises(ValueError, match='mask_ratio'):
    main_lib.train(_config(data_root, **{'model.mask_ratio': 1.0}), str(tmp_path / 'f'))
  with pytest.raises(FileNotFoundError, match='image folder dataset not found'):
    main_lib.train(_config(data_root, **{'evals.zeroshot.data.root': str(tmp_path / 'nope')}),
                   str(tmp_path / 'g'))
  with pytest.raises(ValueError, match="'rils', 'clip', 'flip', 'mae'"):
    main_lib.train(_config(data_root, **{'loss.kind': 'simclr'}), str(tmp_path / 'b'))
  config = _config(data_root)
  config.model.text.vocab_size = 8
  with pytest.raises(ValueError, match='vocab_size=8'):
    main_lib.train(config, str(tmp_path / 'c'))
  assert not os.path.exists(tmp_path / 'c' / 'tokenizer.model')  # Never kept when unusable.
  config = _config(data_root)
  config.input.sources = [dict(kind='csv', captions=str(tmp_path / 'none.csv'),
                               images=str(tmp_path), select='')]
  config.synthetic = None
  with pytest.raises(FileNotFoundError, match='none.csv'):
    main_lib.train(config, str(tmp_path / 'd'))

  # Found by validate_config, before the workdir is even created.
  config = _config(data_root)
  config.optim.learning_rate = 1e-3
  config.model.mask_ration = 0.5
  errors = {r'unknown config keys: model.mask_ration \(did you mean model.mask_ratio\?\); '
            r'optim.learning_rate\. ': config,
            r'image size \(30, 30\) is not divisible by patch size 8':
                _config(data_root, **{'model.image_size': 30}),
            "config.tokenizer.model='/nonexistent.model' is not a readable file":
                _config(data_root, **{'tokenizer.model': '/nonexistent.model'}),
            'config.max_consecutive_nonfinite=0 must be >= 1':
                _config(data_root, max_consecutive_nonfinite=0),
            'config.keep_every=-1 must be >= 0': _config(data_root, keep_every=-1),
            r'nan_loss_steps=\[0\] must hold steps >= 1':
                _config(data_root, **{'debug.nan_loss_steps': (0,)}),
            'config.input.sharding must be': _config(data_root, **{'input.sharding': 'hosts'}),
            'read_threads and text_trim must be >= 0, got 2, 0, -1 and 16':
                _config(data_root, **{'input.read_threads': -1}),
            'kind must be one of': _config(data_root, **{'input.sources': [dict(kind='lmdb')]}),
            'either every source has a weight': _config(data_root, **{'input.sources': [
                dict(kind='arrayrecord', files='a-*', weight=2.0),
                dict(kind='webdataset', files='b-{0..9}.tar')]})}
  for message, config in errors.items():
    with pytest.raises(ValueError, match=message):
      main_lib.train(config, str(tmp_path / 'never'))
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    main_lib.train(_config(data_root, init_from=str(tmp_path)), str(tmp_path / 'never'))
  missing_vocab = _config(data_root, **{'tokenizer.kind': 'clip_bpe',
                                        'tokenizer.clip_vocab': str(tmp_path / 'none.txt.gz'),
                                        'model.text.vocab_size': 49408})
  with pytest.raises(FileNotFoundError, match='none.txt.gz.* is not a file'):
    main_lib.train(missing_vocab, str(tmp_path / 'never'))
  assert not os.path.exists(tmp_path / 'never')
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(ValueError, match='cannot create the workdir'):
    main_lib.train(_config(data_root), str(tmp_path / 'a_file' / 'run'))


def test_validate_config_names_mesh_accumulation_optimizer_and_loss_errors():
  # The tiny config has no sources: each error below is found before the input is checked.
  config = lambda **o: tiny.tiny_config(**{'optim.eps': 1e-3, **o})
  with pytest.raises(ValueError, match='needs 3 devices, 8 are available'):
    main_lib.validate_config(config(**{'mesh.data': 3}))
  with pytest.raises(ValueError, match='accum_steps=2 micro-batches'):
    main_lib.validate_config(config(**{'optim.accum_steps': 2}))  # 8 / 2 over 8 devices.
  with pytest.raises(ValueError, match='mu_dtype'):
    main_lib.validate_config(config(**{'optim.mu_dtype': 'float16', 'input.sources': [{}]}))
  with pytest.raises(ValueError, match='chunk_size=-5 must be >= 0'):
    main_lib.validate_config(tiny.tiny_config(**{'loss.chunk_size': -5}))
  with pytest.raises(ValueError, match='config.input.sources is empty'):
    main_lib.validate_config(tiny.tiny_config())
  # What validate_config returns is what training uses.
  c = tiny.get_config('root=/nonexistent')
  setup = main_lib.validate_config(c)
  assert setup.accum_steps == 1 and dict(setup.mesh.shape)['data'] == 8
  assert setup.abstract_state.params['visual']['patch_embed']['kernel'].shape == (8, 8, 3, 32)


def test_train_on_a_mixture_of_shard_sources(tmp_path, data_root):
  config = _config(data_root, total_steps=6)
  s = config.synthetic
  synthetic.generate(s.root, image_size=s.image_size, num_train=s.num_train, seed=s.seed,
                     num_heldout=s.num_heldout, zeroshot_per_class=s.zeroshot_per_class)
  # The 64 training pictures as ArrayRecord shards, and the first 32 as a WebDataset shard.
  csv_source = sources.open_source(config.input.sources[0])
  converted = convert.convert(csv_source, str(tmp_path / 'ar' / 'train'), num_shards=2,
                              num_workers=1)
  with tarfile.open(tmp_path / 'train-0000.tar', 'w') as tar:
    for i in range(32):
      record = csv_source[i]
      tar.add(record.image, arcname=f'{i:06d}.png')
      caption = record.captions[0].encode()
      info = tarfile.TarInfo(f'{i:06d}.txt')
      info.size = len(caption)
      tar.addfile(info, io.BytesIO(caption))
  config.input.sources = [dict(kind='arrayrecord', files=converted['files'], weight=3.0),
                          dict(kind='webdataset', files=str(tmp_path / 'train-{0000..0000}.tar'),
                               weight=1.0)]
  config.input.sharding = 'records'  # grain's ShardByJaxProcess (here: one process).
  config.input.log_example_ids = True
  workdir = str(tmp_path / 'run')
  results = main_lib.train(config, workdir)
  assert 0.0 <= results['zeroshot/top1'] <= 1.0
  assert _read_metrics(workdir)[0]['data/images'] == 64 + 32
  assert 'data/captions' not in _read_metrics(workdir)[0]  # Not counted in ArrayRecord.
  ids = np.concatenate(list(tiny.example_ids(workdir).values()))
  assert len(ids) == 6 * 8 and ids.max() < 96
  assert (ids < 64).sum() == 36  # 3:1, the mixture's exact pattern.


def test_command_line_overrides(tmp_path):
  """`python -m rils_jax.main` parses the config file and the documented overrides."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='',
             RILS_JAX_CACHE=str(tmp_path / 'cache'))
  result = subprocess.run(
      [sys.executable, '-m', 'rils_jax.main', '--config=configs/default.py:num_train=200',
       f'--workdir={tmp_path}', '--config.input.batch_size=7', '--config.total_steps=1',
       '--config.seed=3', '--config.loss.kind=clip'],
      capture_output=True, text=True, env=env,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(tmp_path, 'config.json')) as f:
    saved = json.load(f)
  assert (saved['input']['batch_size'], saved['total_steps'], saved['seed'],
          saved['loss']['kind']) == (7, 1, 3, 'clip')


def test_resume_keeps_config_and_tokenizer_of_the_checkpoint(tmp_path, data_root):
  workdir = str(tmp_path / 'run')
  main_lib.train(_config(data_root, total_steps=3), workdir)
  other = tokenizer_lib.train_tokenizer(['some other words'] * 10, 30, str(tmp_path / 'o.model'))
  config = _config(data_root, total_steps=4)
  config.tokenizer.model = other
  with pytest.raises(ValueError, match='another tokenizer'):
    main_lib.train(config, workdir)
  config = _config(data_root, total_steps=4, **{'model.embed_dim': 32})
  with pytest.raises(ValueError, match='does not fit the model'):
    main_lib.train(config, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['embed_dim'] == 16  # The checkpoint's config is kept.
  # Refused before a step: nothing new is left (no config.resume_3.json).
  assert not os.path.exists(os.path.join(workdir, 'config.resume_3.json'))


def test_a_workdir_without_checkpoint_takes_the_new_tokenizer(tmp_path, data_root):
  workdir = str(tmp_path / 'run')
  first = tokenizer_lib.train_tokenizer(['a red circle'] * 10, 30, str(tmp_path / 'a.model'))
  second = tokenizer_lib.train_tokenizer(['a blue square'] * 10, 30, str(tmp_path / 'b.model'))
  config = _config(data_root, **{'input.batch_size': 1024})  # Fails: more than the data.
  config.tokenizer.model = first
  with pytest.raises(ValueError, match='fewer than one batch'):
    main_lib.train(config, workdir)
  config = _config(data_root, total_steps=1)
  config.tokenizer.model = second
  common.remove_evals(config)
  main_lib.train(config, workdir)
  with open(second, 'rb') as a, open(os.path.join(workdir, 'tokenizer.model'), 'rb') as b:
    assert a.read() == b.read()


def test_a_run_on_cut_captions_trains_as_on_the_whole_context(tmp_path, data_root, caplog):
  # The training batches' text is cut in the prefetch thread (config.input.text_trim): the
  # same losses and evaluations as a run that keeps the whole context of 64.
  runs = {}
  for multiple in (8, 0):
    config = _config(data_root, total_steps=3, **{'model.text.context_length': 64,
                                                  'input.text_trim': multiple})
    with caplog.at_level('INFO'):
      results = main_lib.train(config, str(tmp_path / f'cut{multiple}'))
    runs[multiple] = results, [m['loss'] for m in _read_metrics(str(tmp_path / f'cut{multiple}'))
                               if 'loss' in m]
  cut = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Captions cut')]
  assert cut and all(' of 64 tokens' in m and ': 64 of' not in m for m in cut), cut
  np.testing.assert_allclose(runs[8][1], runs[0][1], rtol=1e-5)
  assert len(runs[8][1]) == 3  # Steps 1, 2 (log_every) and 3 (the last).
  for key, value in runs[0][0].items():
    np.testing.assert_allclose(runs[8][0][key], value, atol=1 / 16 + 1e-6, err_msg=key)
