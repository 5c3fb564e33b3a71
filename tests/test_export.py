"""Export to PyTorch: the real timm and open_clip models, loaded from the export, give the same
image and text embeddings as rils_jax (float32, within 1e-4) for a ViT-Ti with a small text tower
with random weights, for the FSDP-sharded checkpoint of a short run on ../shared/data
exported by the command on a single CPU device, and for a clip_bpe run tokenised by open_clip's
own tokenizer.

Needs torch, timm and open_clip (tests/requirements.txt); skipped without them.
"""

import csv
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from configs import common
from rils_jax import export
from rils_jax import main as main_lib
from rils_jax import tokenizer as tokenizer_lib
from rils_jax.data import transforms
from rils_jax.evals import restore as restore_lib
from rils_jax.models import rils as rils_lib
from tests import test_tokenizer
from tests import tiny

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
open_clip = pytest.importorskip('open_clip')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = common.SHARED_DATA
ATOL = 1e-4


def _random_params(model, config, seed=1):
  """Initial parameters plus noise on every leaf, so that zero-initialised biases, unit
  LayerNorm scales and the like are mapped (and checked) as distinct values."""
  params = jax.jit(lambda rng: rils_lib.init_params(model, rng))(jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: (np.asarray(x) + 0.05 * rng.standard_normal(x.shape)).astype(np.float32),
      jax.device_get(params))


def _jax_embeddings(model, params, pixels, tokens):
  """(image embedding, GAP feature, text embedding) of rils_jax, float32 NumPy."""
  embed, patch_tokens = model.apply({'params': params}, pixels, method=rils_lib.RILS.encode_image)
  text = model.apply({'params': params}, tokens, method=rils_lib.RILS.encode_text)
  return np.asarray(embed), np.asarray(patch_tokens).mean(axis=1), np.asarray(text)


def _nchw(pixels):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(pixels).transpose(0, 3, 1, 2)))


def _timm_model(path):
  with open(path[:-len('.safetensors')] + '.json') as f:
    spec = json.load(f)
  return timm.create_model(spec['model_name'], checkpoint_path=path,
                           pretrained_cfg_overlay=spec['pretrained_cfg_overlay'],
                           **spec['model_kwargs']).eval()


def _check_open_clip(folder, pixels, tokens, image_embed, text_embed, logit_scale):
  model = open_clip.create_model('local-dir:' + folder).eval()
  with torch.no_grad():
    image = model.encode_image(_nchw(pixels), normalize=True).numpy()
    text = model.encode_text(torch.from_numpy(np.asarray(tokens, np.int64)),
                             normalize=True).numpy()
  np.testing.assert_allclose(image, image_embed, atol=ATOL)
  np.testing.assert_allclose(text, text_embed, atol=ATOL)
  np.testing.assert_allclose(model.logit_scale.item(), logit_scale, rtol=1e-6)
  return model


def test_vit_ti_and_small_text_tower_with_random_weights(tmp_path, monkeypatch):
  config = tiny.tiny_config(**{
      'model.variant': 'Ti/16', 'model.vision': dict(width=0, depth=0, num_heads=0),
      'model.image_size': 224, 'model.embed_dim': 48,
      'model.text': dict(width=64, num_layers=2, num_heads=2, context_length=16,
                         vocab_size=100)})
  model = rils_lib.build_model(config, eot_id=2)
  params = _random_params(model, config)
  rng = np.random.default_rng(0)
  pixels = np.asarray(transforms.normalize(
      rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8), config.input))
  tokens = rng.integers(3, 100, (3, 16)).astype(np.int32)
  for row, eot in enumerate((4, 10, 15)):  # Different lengths; padding 0 after end-of-text.
    tokens[row, eot], tokens[row, eot + 1:] = 2, 0
  image_embed, gap, text_embed = _jax_embeddings(model, params, pixels, tokens)

  # timm: the GAP feature without head, the joint-space projection with --head=projection.
  assert export.timm_model_name(config) == 'vit_tiny_patch16_224'
  for head in ('none', 'projection'):
    path = str(tmp_path / f'vit_{head}.safetensors')
    export.export_timm(params, config, path, head=head)
    vit = _timm_model(path)
    with torch.no_grad():
      out = vit(_nchw(pixels)).numpy()
    if head == 'none':
      np.testing.assert_allclose(out, gap, atol=ATOL)
    else:
      np.testing.assert_allclose(out / np.linalg.norm(out, axis=-1, keepdims=True), image_embed,
                                 atol=ATOL)
  assert vit.norm.eps == 1e-6 and vit.blocks[0].norm1.eps == 1e-6
  assert isinstance(vit.blocks[0].mlp.act, torch.nn.GELU)
  assert not vit.blocks[0].attn.qkv.bias[192:384].any()  # RILS has no k bias.
  data = timm.data.resolve_data_config({}, model=vit)
  assert tuple(data['mean']) == tuple(config.input.mean)
  assert tuple(data['std']) == tuple(config.input.std)
  assert tuple(data['input_size']) == (3, 224, 224)
  assert data['interpolation'] == 'bicubic' and data['crop_pct'] == 1.0
  # Every shape `timm_model_name` may return is registered in the installed timm.
  assert all(timm.is_model(name) for name in export.TIMM_REGISTERED)

  # open_clip: a registered trunk name, so the folder holds no timm config.json.
  tokenizer = str(tmp_path / 'tok.model')
  tokenizer_lib.train_tokenizer(['a red circle', 'two dogs on the grass'] * 10, 100, tokenizer)
  folder = str(tmp_path / 'open_clip')
  export.export_open_clip(params, config, folder, tokenizer, eot_id=2, pad_id=0)
  assert sorted(os.listdir(folder)) == ['open_clip_config.json', 'open_clip_model.safetensors',
                                        'tokenizer.model']
  _check_open_clip(folder, pixels, tokens, image_embed, text_embed, float(params['logit_scale']))

  # Nothing is overwritten, and a wrong --out is refused before anything is written.
  before = os.path.getmtime(str(tmp_path / 'vit_none.safetensors'))
  with pytest.raises(FileExistsError, match='never overwrites'):
    export.export_timm(params, config, str(tmp_path / 'vit_none.safetensors'))
  with pytest.raises(FileExistsError, match='never overwrites'):
    export.export_open_clip(params, config, folder, tokenizer, eot_id=2, pad_id=0)
  with pytest.raises(ValueError, match='must end in .safetensors'):
    export.export_timm(params, config, str(tmp_path / 'vit.pt'))
  assert os.path.getmtime(str(tmp_path / 'vit_none.safetensors')) == before
  with pytest.raises(ValueError, match='inside a checkpoints folder'):
    export.export_timm(params, config, str(tmp_path / 'checkpoints' / '9.safetensors'))
  # A file that appears while the export runs (another export, say) is kept, and no half of
  # the export is left behind.
  raced = tmp_path / 'raced.safetensors'
  real_state_dict = export.timm_state_dict

  def state_dict_then_race(*args, **kwargs):
    raced.write_bytes(b'theirs')
    return real_state_dict(*args, **kwargs)

  monkeypatch.setattr(export, 'timm_state_dict', state_dict_then_race)
  with pytest.raises(FileExistsError, match='appeared while exporting'):
    export.export_timm(params, config, str(raced))
  assert raced.read_bytes() == b'theirs' and not (tmp_path / 'raced.json').exists()
  assert not any(name.startswith('.export-') for name in os.listdir(tmp_path))


@pytest.fixture(scope='module')
def real_run(tmp_path_factory):
  """A 4-step run of configs/flickr8k_coco.py (2 blocks per tower) on ../shared/data, its
  parameters sharded over a (data 2, fsdp 4) mesh of the 8 CPU devices."""
  if not os.path.isdir(os.path.join(SHARED, 'flickr8k_1k')):
    pytest.skip('../shared/data is not present')
  spec = importlib.util.spec_from_file_location(
      'flickr8k_coco', os.path.join(REPO, 'configs', 'flickr8k_coco.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config = tiny.apply_overrides(config, **{
      'total_steps': 4, 'checkpoint_every': 4, 'log_every': 2, 'input.batch_size': 16,
      'input.num_workers': 0, 'mesh.data': 2, 'mesh.fsdp': 4, 'tokenizer.vocab_size': 500,
      'model.vision.depth': 2, 'model.text.num_layers': 2})
  common.remove_evals(config)
  workdir = str(tmp_path_factory.mktemp('real') / 'run')
  main_lib.train(config, workdir)
  return workdir


def _run_export(*args):
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')  # One CPU device.
  return subprocess.run([sys.executable, '-m', 'rils_jax.export', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_short_real_run_fsdp_checkpoint_exported_on_one_device(real_run, tmp_path):
  vit_path, folder = str(tmp_path / 'vit.safetensors'), str(tmp_path / 'open_clip')
  out = _run_export(f'--checkpoint={real_run}', '--format=timm', f'--out={vit_path}',
                    '--head=projection')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'decoder (' in out.stdout and 'text tower' in out.stdout, out.stdout
  namespace = {}  # The printed loading lines run as printed.
  exec(textwrap.dedent(out.stdout.split('Load with:\n')[1].split('\nmodel_kwargs:')[0]),
       namespace)  # pylint: disable=exec-used
  assert namespace['model'].head.out_features == 128  # flickr8k_coco's embed_dim.
  out = _run_export(f'--checkpoint={real_run}', '--format=open_clip', f'--out={folder}')
  assert out.returncode == 0, out.stderr[-3000:]
  # The lines the command prints to load its output run as printed.
  printed = out.stdout.split('\n(tokenize uses')[0].split('PYTHONPATH):\n')[1]
  namespace = {}
  exec(textwrap.dedent(printed), namespace)  # pylint: disable=exec-used
  assert isinstance(namespace['model'], open_clip.CLIP)
  assert namespace['tokens'].shape == (1, 32) and namespace['tokens'][0, 0] != 0

  # Real photos (held-out Flickr8k images) and their captions.
  restored = restore_lib.restore(real_run)
  flickr = os.path.join(SHARED, 'flickr8k_1k')
  with open(os.path.join(flickr, 'captions.csv'), newline='') as f:
    rows = list(csv.DictReader(f))[-20::5]
  size = restored.config.model.image_size
  images = []
  for row in rows:
    with Image.open(os.path.join(flickr, 'images', row['image'])) as img:
      images.append(transforms.resize_center_crop(img.convert('RGB'), size))
  pixels = np.asarray(transforms.normalize(np.stack(images), restored.config.input))
  captions = [row['caption'] for row in rows] + ['', 'word ' * 100]  # Empty and cut captions.
  context = restored.config.model.text.context_length
  tokens = export.tokenize(captions, os.path.join(folder, export.TOKENIZER), context)
  np.testing.assert_array_equal(tokens, restored.tokenizer.encode(captions, context))
  params = jax.device_get(restored.params)
  image_embed, _, text_embed = _jax_embeddings(restored.model, params, pixels, tokens)

  vit = _timm_model(vit_path)
  with torch.no_grad():
    projected = vit(_nchw(pixels)).numpy()
  np.testing.assert_allclose(projected / np.linalg.norm(projected, axis=-1, keepdims=True),
                             image_embed, atol=ATOL)
  # A shape timm does not register: the open_clip trunk is the folder's own timm config.
  with open(os.path.join(folder, export.OPEN_CLIP_CONFIG)) as f:
    assert json.load(f)['model_cfg']['vision_cfg']['timm_model_name'] == 'local-dir:' + folder
  model = _check_open_clip(folder, pixels, tokens, image_embed, text_embed,
                           float(params['logit_scale']))
  # The captions are told apart as in rils_jax: the same image -> caption ranking.
  with torch.no_grad():
    logits = model(_nchw(pixels), torch.from_numpy(tokens))
  ranking = (logits[0] @ logits[1].T).numpy().argsort(axis=1)
  np.testing.assert_array_equal(ranking, (image_embed @ text_embed.T).argsort(axis=1))

  # A second export to the same place fails and leaves the first one as it was.
  before = open(vit_path, 'rb').read()
  out = _run_export(f'--checkpoint={real_run}', '--format=timm', f'--out={vit_path}')
  assert out.returncode != 0 and 'never overwrites' in out.stderr
  assert open(vit_path, 'rb').read() == before


def test_clip_bpe_run_export_uses_open_clips_own_tokenizer(tmp_path_factory, tmp_path):
  workdir, _, _ = test_tokenizer.clip_bpe_run(tmp_path_factory)
  folder = str(tmp_path / 'open_clip')
  printed = export._export('open_clip', workdir, None, folder, 'none')
  assert sorted(os.listdir(folder)) == sorted([
      export.CLIP_VOCAB, export.TIMM_CONFIG, export.OPEN_CLIP_CONFIG, export.OPEN_CLIP_WEIGHTS])
  with open(os.path.join(folder, export.OPEN_CLIP_CONFIG)) as f:
    text_cfg = json.load(f)['model_cfg']['text_cfg']
  # open_clip's plain text config: argmax pooling (end-of-text 49407 is CLIP's largest id).
  assert not {'pool_type', 'eos_id', 'pad_id'} & set(text_cfg) and text_cfg['vocab_size'] == 49408
  assert 'wrong ids' not in printed
  namespace = {}  # The printed loading lines run as printed.
  exec(textwrap.dedent(printed.split('Load with:\n')[1].split("\n(CLIP's BPE")[0]),
       namespace)  # pylint: disable=exec-used

  restored = restore_lib.restore(workdir)
  context = restored.config.model.text.context_length
  assert namespace['tokens'].tolist() == restored.tokenizer.encode(['a photo of a dog'],
                                                                   context).tolist()
  # Non-ASCII, empty, truncated, and a spelled end-of-text (both pool at the first one).
  captions = ['a red circle', 'Crème brûlée 🐶 &amp; 東京', '', 'word ' * 100, 'x <end_of_text> y']
  tokens = namespace['tokenizer'](captions).numpy()
  np.testing.assert_array_equal(tokens, restored.tokenizer.encode(captions, context))
  np.testing.assert_array_equal(
      export.tokenize(captions, os.path.join(folder, export.CLIP_VOCAB), context), tokens)
  assert (tokens[-1] == 49407).sum() == 2
  params = jax.device_get(restored.params)
  rng = np.random.default_rng(0)
  size = restored.config.model.image_size
  pixels = np.asarray(transforms.normalize(
      rng.integers(0, 256, (len(captions), size, size, 3), dtype=np.uint8), restored.config.input))
  image_embed, _, text_embed = _jax_embeddings(restored.model, params, pixels, tokens)
  _check_open_clip(folder, pixels, tokens, image_embed, text_embed, float(params['logit_scale']))


def test_mae_encoder_exports_to_timm(tmp_path):
  # An MAE run's parameters: the encoder, its own decoder, no text tower or projections.
  config = tiny.tiny_config(**{
      'loss.kind': 'mae', 'model.variant': 'Ti/16',
      'model.vision': dict(width=0, depth=0, num_heads=0), 'model.image_size': 224})
  model = rils_lib.build_model(config, eot_id=2)
  params = _random_params(model, config)
  assert 'text' not in params and 'image_projection' not in params
  pixels = np.asarray(transforms.normalize(
      np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8), config.input))
  _, patch_tokens = model.apply({'params': params}, pixels, method=rils_lib.RILS.encode_image)
  path = str(tmp_path / 'mae.safetensors')
  export.export_timm(params, config, path)
  with torch.no_grad():
    out = _timm_model(path)(_nchw(pixels)).numpy()
  np.testing.assert_allclose(out, np.asarray(patch_tokens).mean(axis=1), atol=ATOL)
  with pytest.raises(ValueError, match='image_projection'):
    export.export_timm(params, config, str(tmp_path / 'head.safetensors'), head='projection')
