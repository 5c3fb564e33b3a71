r"""Exports a RILS checkpoint to PyTorch: the vision encoder for timm, or the two towers for
open_clip.

  python -m rils_jax.export --checkpoint=/tmp/rils_default --format=timm --out=/tmp/vit.safetensors
  python -m rils_jax.export --checkpoint=/tmp/rils_default --format=open_clip --out=/tmp/rils_oc

`--checkpoint` is a run's workdir (its latest checkpoint, or `--step`) or one checkpoint folder;
the checkpoint may have been written under any mesh and any number of hosts (orbax stores each
array's global value), and is read whole on this host's devices. Exporting needs no PyTorch:
the tensors are written with safetensors' NumPy API, in float32.

`--format=timm` writes FILE.safetensors, a state dict of timm's `VisionTransformer`, and
FILE.json: {"model_name", "model_kwargs", "pretrained_cfg_overlay"} for

  model = timm.create_model(spec['model_name'], checkpoint_path='FILE.safetensors',
                            pretrained_cfg_overlay=spec['pretrained_cfg_overlay'],
                            **spec['model_kwargs'])

`model(x)` on NCHW float32 pixels normalised with the run's `config.input.mean` / `.std` is the
average of the final-LayerNorm patch tokens (CLS excluded): the GAP feature the evaluators use
(`--head=projection`: times `image_projection`, the joint-space image embedding before its L2
normalisation). `model.forward_features(x)` gives every token.

`--format=open_clip` writes a folder for `open_clip.create_model('local-dir:FOLDER')`:
open_clip_config.json (model and preprocessing config), open_clip_model.safetensors (the CLIP
state dict), the run's tokenizer file (tokenizer.model, or bpe_simple_vocab_16e6.txt.gz for a
clip_bpe run) and, for a vision tower that is not one of timm's registered ViTs, config.json
(the timm config of the vision trunk, named by the folder's absolute path in
open_clip_config.json). `encode_image` / `encode_text` then equal `RILS.encode_image` /
`RILS.encode_text` (tests/test_export.py). Tokenising: a clip_bpe run (`config.tokenizer.kind`)
uses CLIP's own BPE, so `open_clip.get_tokenizer('local-dir:FOLDER')` gives the right ids (the
text config is open_clip's default: pooling at the argmax id, end-of-text 49407). A sentencepiece
run's text must be tokenised with its sentencepiece model, not `open_clip.get_tokenizer` (which
would return CLIP's BPE tokenizer): see `tokenize` and README.md "Export to PyTorch".

Mapping (RILS release architecture, ../shared/docs/RILS_METHOD.md "Architectures"):
- vision: flax `Conv` kernel (p, p, 3, D) -> `patch_embed.proj.weight` (D, 3, p, p); the fixed
  2-D sin-cos position embedding (zero CLS row) -> `pos_embed` (1, 1 + N, D); the qkv kernel
  (D, 3, heads, head_dim) -> `qkv.weight` (3D, D), with `qkv.bias` = [q_bias, 0, v_bias] (RILS
  has no k bias; a k bias adds the same q.b to every logit of a query, so softmax ignores it and
  its gradient is zero); LayerNorm eps 1e-6 and exact GELU are timm's defaults;
  `global_pool='avg'` with `fc_norm=False` is RILS's pooling (final norm on every token, then
  the mean of the patch tokens).
- text: open_clip's `TextTransformer` with QuickGELU (`quick_gelu=true`; timm trunks keep exact
  GELU), LayerNorm eps 1e-5, causal mask, pooled at the run's end-of-text id: `pool_type='eos'`
  for sentencepiece, open_clip's default `'argmax'` for clip_bpe (end-of-text 49407 is CLIP's
  largest id, and torch.argmax takes the first, as RILS takes the first end-of-text).
- open_clip's vision tower is the timm trunk above plus `head.proj` = `image_projection`^T
  (open_clip's own ViT has no patch-embedding bias and one activation for both towers).

Not exported: the MAE-style decoder (`decoder`: decoder_embed, mask_token, decoder blocks,
decoder_norm, decoder_pred), which only serves the pre-training loss and has no place in timm's
or open_clip's models; the optimizer state, step and data position (resume training with
`rils_jax.main`); with `--format=timm`, the text tower, `text_projection` and `logit_scale`
(use `--format=open_clip`). The command lists what it left out. The position embedding becomes
a parameter in PyTorch: freeze it (`model.pos_embed.requires_grad_(False)`) to keep RILS's
fixed one when fine-tuning.
"""

import json
import os
import shutil
import signal
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
import safetensors
from safetensors import numpy as safetensors_numpy

from rils_jax import clip_bpe
from rils_jax import console
from rils_jax import storage
from rils_jax import tokenizer as tokenizer_lib
from rils_jax.evals import restore as restore_lib
from rils_jax.models import layout
from rils_jax.models import rils as rils_lib
from rils_jax.models import vit

FORMATS = ('timm', 'open_clip')
HEADS = ('none', 'projection')
# timm's registered ViTs (timm 1.0.x `vision_transformer.py`) by (width, depth, heads, patch,
# image size): an open_clip vision trunk of one of these shapes is named by it, so the exported
# folder can move; any other shape is named by the folder's timm config.json.
_TIMM_SIZES = {(192, 12, 3): 'tiny', (384, 12, 6): 'small', (768, 12, 12): 'base',
               (1024, 24, 16): 'large'}
TIMM_REGISTERED = frozenset({
    'vit_tiny_patch16_224', 'vit_tiny_patch16_384', 'vit_small_patch16_224',
    'vit_small_patch16_384', 'vit_small_patch32_224', 'vit_small_patch32_384',
    'vit_small_patch8_224', 'vit_base_patch16_224', 'vit_base_patch16_384',
    'vit_base_patch32_224', 'vit_base_patch32_384', 'vit_base_patch8_224',
    'vit_large_patch16_224', 'vit_large_patch16_384', 'vit_large_patch32_384',
})
OPEN_CLIP_WEIGHTS = 'open_clip_model.safetensors'
OPEN_CLIP_CONFIG = 'open_clip_config.json'
TIMM_CONFIG = 'config.json'
TOKENIZER = 'tokenizer.model'
# A clip_bpe run's tokenizer file, under CLIP's name (open_clip itself reads its own copy).
CLIP_VOCAB = clip_bpe.VOCAB_FILE


def _image_size(config: ml_collections.ConfigDict) -> Tuple[int, int]:
  size = config.model.image_size
  return (size, size) if isinstance(size, int) else tuple(size)


def timm_model_name(config: ml_collections.ConfigDict) -> Optional[str]:
  """timm's registered name for the run's encoder shape (e.g. 'vit_base_patch16_224' for B/16 at
  224 px), or None when timm registers no ViT of that shape."""
  width, depth, heads, patch = rils_lib.vision_dims(config.model)
  h, w = _image_size(config)
  size = _TIMM_SIZES.get((width, depth, heads))
  name = f'vit_{size}_patch{patch}_{h}'
  return name if size and h == w and name in TIMM_REGISTERED else None


def pretrained_cfg(config: ml_collections.ConfigDict, num_classes: int) -> Dict[str, Any]:
  """timm's preprocessing config of the run: its input size, `config.input.mean` / `.std`
  (RGB, [0, 1] scale) and the evaluators' bicubic shorter-side resize + centre crop
  (`rils_jax.data.transforms.resize_center_crop`)."""
  h, w = _image_size(config)
  return dict(input_size=[3, h, w], mean=list(config.input.mean), std=list(config.input.std),
              interpolation='bicubic', crop_pct=1.0, crop_mode='center',
              num_classes=num_classes)


def timm_model_spec(config: ml_collections.ConfigDict, head: str = 'none') -> Dict[str, Any]:
  """The `timm.create_model` arguments of the run's vision encoder.

  Args:
    config: the training run's config (`config.model`, `config.input`).
    head: 'none' (num_classes 0: the GAP feature) or 'projection' (num_classes embed_dim, the
      head holding `image_projection`).

  Returns:
    dict(model_name, model_kwargs, pretrained_cfg_overlay), JSON-serialisable. `model_name`
    only selects timm's `VisionTransformer`; `model_kwargs` give the whole architecture.

  Raises:
    ValueError: for an unknown `head`.
  """
  if head not in HEADS:
    raise ValueError(f'head must be one of {HEADS}, got {head!r}')
  width, depth, heads, patch = rils_lib.vision_dims(config.model)
  h, w = _image_size(config)
  num_classes = config.model.embed_dim if head == 'projection' else 0
  kwargs = dict(
      img_size=[h, w], patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
      mlp_ratio=4.0, qkv_bias=True, class_token=True, no_embed_class=False, pre_norm=False,
      global_pool='avg', fc_norm=False, num_classes=num_classes)
  spec = dict(model_name=timm_model_name(config), model_kwargs=kwargs,
              pretrained_cfg_overlay=pretrained_cfg(config, num_classes))
  if spec['model_name'] is None:
    spec['model_name'] = 'vit_base_patch16_224'
    spec['note'] = ('timm registers no ViT of this shape: model_name only selects timm\'s '
                    'VisionTransformer, model_kwargs set the whole architecture')
  return spec


def _np(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, np.float32))


def timm_state_dict(params: Dict[str, Any], config: ml_collections.ConfigDict,
                    head: str = 'none') -> Dict[str, np.ndarray]:
  """timm `VisionTransformer` state dict of the vision encoder.

  Args:
    params: the RILS parameter tree (`visual`, `image_projection`, ...), arrays on the host,
      blocks in either layout (`config.model.scan_layers`, models/layout.py).
    config: the run's config (for the patch grid of the position embedding).
    head: 'none' or 'projection' (`head.weight` = image_projection^T, `head.bias` = 0).

  Returns:
    name -> float32 array in PyTorch layout (Linear weights (out, in), Conv2d (out, in, kh, kw)).

  Raises:
    ValueError: for an unknown `head`, a tree without the vision encoder, or
      head='projection' without `image_projection` (MAE).
  """
  if head not in HEADS:
    raise ValueError(f'head must be one of {HEADS}, got {head!r}')
  if 'visual' not in params:
    raise ValueError(f'no vision encoder (`visual`) among the parameters {sorted(params)}')
  if head == 'projection' and 'image_projection' not in params:
    raise ValueError("--head=projection needs image_projection, which a config.loss.kind='mae' "
                     'run does not have: export with --head=none')
  v = layout.unstack_layers(params['visual'])
  width, depth, heads, patch = rils_lib.vision_dims(config.model)
  grid = vit.grid_size(_image_size(config), patch)
  out = {
      'cls_token': _np(v['cls_token']),
      'pos_embed': vit.sincos_pos_embed_2d(width, grid),  # Fixed in RILS: not in the params.
      'patch_embed.proj.weight': _np(v['patch_embed']['kernel']).transpose(3, 2, 0, 1),
      'patch_embed.proj.bias': _np(v['patch_embed']['bias']),
      'norm.weight': _np(v['norm']['scale']),
      'norm.bias': _np(v['norm']['bias']),
  }
  for i in range(depth):
    b, p = v[f'blocks_{i}'], f'blocks.{i}.'
    attn = b['attn']
    qkv = _np(attn['qkv']['kernel']).reshape(width, 3 * width)
    out.update({
        p + 'norm1.weight': _np(b['norm1']['scale']), p + 'norm1.bias': _np(b['norm1']['bias']),
        p + 'attn.qkv.weight': qkv.T,
        p + 'attn.qkv.bias': np.concatenate([
            _np(attn['q_bias']).reshape(-1), np.zeros(width, np.float32),
            _np(attn['v_bias']).reshape(-1)]),
        p + 'attn.proj.weight': _np(attn['proj']['kernel']).reshape(width, width).T,
        p + 'attn.proj.bias': _np(attn['proj']['bias']),
        p + 'norm2.weight': _np(b['norm2']['scale']), p + 'norm2.bias': _np(b['norm2']['bias']),
        p + 'mlp.fc1.weight': _np(b['mlp']['fc1']['kernel']).T,
        p + 'mlp.fc1.bias': _np(b['mlp']['fc1']['bias']),
        p + 'mlp.fc2.weight': _np(b['mlp']['fc2']['kernel']).T,
        p + 'mlp.fc2.bias': _np(b['mlp']['fc2']['bias']),
    })
  if head == 'projection':
    projection = _np(params['image_projection'])
    out['head.weight'] = projection.T
    out['head.bias'] = np.zeros(projection.shape[1], np.float32)
  return {k: np.ascontiguousarray(a) for k, a in out.items()}


def open_clip_text_state_dict(params: Dict[str, Any]) -> Dict[str, np.ndarray]:
  """open_clip `CLIP` state-dict entries of the text tower, `text_projection` and `logit_scale`.

  `in_proj_weight` (3W, W) is the qkv kernel (W, 3, heads, head_dim) flattened and transposed
  (nn.MultiheadAttention's q, k, v row blocks); `text_projection` (W, E) is used as
  `x @ text_projection` in both; `logit_scale` is the log of the inverse temperature in both.
  The blocks may be in either layout (models/layout.py).

  Raises:
    ValueError: for a tree without the text tower.
  """
  if 'text' not in params:
    raise ValueError(f'no text tower (`text`) among the parameters {sorted(params)}')
  t = layout.unstack_layers(params['text'])
  width = _np(t['positional_embedding']).shape[1]
  out = {
      'token_embedding.weight': _np(t['token_embedding']['embedding']),
      'positional_embedding': _np(t['positional_embedding']),
      'ln_final.weight': _np(t['ln_final']['scale']),
      'ln_final.bias': _np(t['ln_final']['bias']),
      'text_projection': _np(params['text_projection']),
      'logit_scale': _np(params['logit_scale']),
  }
  i = 0
  while f'blocks_{i}' in t:
    b, p = t[f'blocks_{i}'], f'transformer.resblocks.{i}.'
    out.update({
        p + 'ln_1.weight': _np(b['ln_1']['scale']), p + 'ln_1.bias': _np(b['ln_1']['bias']),
        p + 'attn.in_proj_weight': _np(b['qkv']['kernel']).reshape(width, 3 * width).T,
        p + 'attn.in_proj_bias': _np(b['qkv']['bias']).reshape(-1),
        p + 'attn.out_proj.weight': _np(b['proj']['kernel']).reshape(width, width).T,
        p + 'attn.out_proj.bias': _np(b['proj']['bias']),
        p + 'ln_2.weight': _np(b['ln_2']['scale']), p + 'ln_2.bias': _np(b['ln_2']['bias']),
        p + 'mlp.c_fc.weight': _np(b['fc1']['kernel']).T,
        p + 'mlp.c_fc.bias': _np(b['fc1']['bias']),
        p + 'mlp.c_proj.weight': _np(b['fc2']['kernel']).T,
        p + 'mlp.c_proj.bias': _np(b['fc2']['bias']),
    })
    i += 1
  return {k: np.ascontiguousarray(a) for k, a in out.items()}


def open_clip_state_dict(params: Dict[str, Any],
                         config: ml_collections.ConfigDict) -> Dict[str, np.ndarray]:
  """The whole open_clip `CLIP` state dict: `visual.trunk.*` (the timm encoder, no head),
  `visual.head.proj.weight` (image_projection^T) and the text entries
  (`open_clip_text_state_dict`)."""
  out = {'visual.trunk.' + k: a for k, a in timm_state_dict(params, config).items()}
  out['visual.head.proj.weight'] = np.ascontiguousarray(_np(params['image_projection']).T)
  out.update(open_clip_text_state_dict(params))
  return out


def open_clip_model_config(config: ml_collections.ConfigDict, eot_id: int, pad_id: int,
                           trunk: str, kind: str = 'sentencepiece') -> Dict[str, Any]:
  """open_clip_config.json of the run: `model_cfg`, `preprocess_cfg`, and `rils_jax` (how to
  tokenise; open_clip ignores it).

  Args:
    config: the run's config.
    eot_id, pad_id: the tokenizer's end-of-text and padding ids.
    trunk: the timm model name of the vision trunk (`timm_model_name`, or 'local-dir:FOLDER').
    kind: the tokenizer kind. 'clip_bpe' gives open_clip's plain text config (argmax pooling,
      padding 0), for which `open_clip.get_tokenizer` returns the run's tokenizer.

  Raises:
    ValueError: for a clip_bpe `eot_id` or `pad_id` other than CLIP's.
  """
  m = config.model
  h, w = _image_size(config)
  text_cfg = {'context_length': m.text.context_length, 'vocab_size': m.text.vocab_size,
              'width': m.text.width, 'heads': m.text.num_heads, 'layers': m.text.num_layers,
              'mlp_ratio': 4.0}
  if kind == 'clip_bpe':
    if (eot_id, pad_id) != (clip_bpe.EOT_ID, clip_bpe.PAD_ID):
      raise ValueError(f'a clip_bpe tokenizer has end-of-text {clip_bpe.EOT_ID} and padding '
                       f'{clip_bpe.PAD_ID}, got {eot_id} and {pad_id}')
    how = {'tokenizer': 'clip_bpe', 'context_length': m.text.context_length,
           'how_to_tokenize': "open_clip.get_tokenizer('local-dir:FOLDER') (CLIP's BPE, the "
                              "run's tokenizer), or rils_jax.export.tokenize with " + CLIP_VOCAB}
  else:
    text_cfg.update(pool_type='eos', eos_id=eot_id, pad_id=pad_id)
    how = {'tokenizer': TOKENIZER, 'context_length': m.text.context_length, 'eot_id': eot_id,
           'pad_id': pad_id,
           'how_to_tokenize': (
               'Not open_clip.get_tokenizer (CLIP BPE). Each row: sentencepiece ids of the text '
               'from tokenizer.model, cut to context_length - 1, then eot_id, then pad_id up to '
               'context_length (rils_jax.export.tokenize).')}
  return {
      'model_cfg': {
          'embed_dim': m.embed_dim,
          'quick_gelu': True,  # The text tower's QuickGELU; timm trunks keep exact GELU.
          'vision_cfg': {
              'image_size': [h, w] if h != w else h,
              'timm_model_name': trunk, 'timm_model_pretrained': False,
              'timm_pool': 'avg', 'timm_proj': 'linear', 'timm_proj_bias': False,
          },
          'text_cfg': text_cfg,
      },
      'preprocess_cfg': {
          'size': [h, w] if h != w else h, 'mode': 'RGB', 'mean': list(config.input.mean),
          'std': list(config.input.std), 'interpolation': 'bicubic', 'resize_mode': 'shortest',
      },
      'rils_jax': how,
  }


def tokenize(texts: Sequence[str], tokenizer_path: str, context_length: int) -> np.ndarray:
  """Token rows for the exported text tower: the run's tokenizer's `encode` with the exported
  tokenizer file (tokenizer.model, or bpe_simple_vocab_16e6.txt.gz: then the same ids as
  `open_clip.get_tokenizer`), as int64 (len(texts), context_length) for `torch.from_numpy`.

  Raises:
    FileNotFoundError: if `tokenizer_path` does not exist.
  """
  return tokenizer_lib.load(tokenizer_path).encode(list(texts), context_length).astype(
      np.int64)


def left_out(params: Dict[str, Any], fmt: str) -> List[str]:
  """What the export to `fmt` does not carry, one line each, with parameter counts."""

  def count(tree) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))

  lines = []
  if 'decoder' in params:
    lines.append(f'decoder ({count(params["decoder"]):,} parameters): the masked-reconstruction '
                 'decoder serves only the pre-training loss; timm and open_clip have no module '
                 'for it')
  if fmt == 'timm' and 'text' in params:  # MAE has no text tower.
    text = {k: params[k] for k in ('text', 'text_projection', 'logit_scale') if k in params}
    lines.append(f'text tower, text_projection, logit_scale ({count(text):,} parameters): '
                 'use --format=open_clip')
  lines.append('optimizer state, step and data position: resume training with rils_jax.main')
  return lines


def check_out(fmt: str, out: str) -> str:
  """Checks an output path before anything is read or written; returns its absolute path.

  Raises:
    ValueError: for an empty path, a timm path not ending in .safetensors, a parent that is not
      a folder, or a path among a run's checkpoints (orbax would take it for one).
    FileExistsError: if the output (or, for timm, its .json) exists.
    PermissionError: if the output cannot be written there.
  """
  if not out or not out.strip():
    raise ValueError('--out is empty')
  if storage.looks_like_url(out):
    raise ValueError(f'--out={out} must be a local path (the export is small: copy it to a '
                     'bucket afterwards, e.g. gcloud storage cp -r)')
  if fmt == 'timm' and not out.endswith('.safetensors'):
    raise ValueError(f'--out must end in .safetensors for --format=timm, got {out!r}')
  out = os.path.abspath(out)
  targets = [out, out[:-len('.safetensors')] + '.json'] if fmt == 'timm' else [out]
  for path in targets:
    if os.path.lexists(path):
      raise FileExistsError(f'{path} exists; remove it or choose another --out (an export never '
                            'overwrites)')
  parent = os.path.dirname(out)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f'--out {out!r} lies under {parent}, which is a file, not a folder')
  if not os.access(parent, os.W_OK):  # Read-only file systems too (EROFS).
    raise PermissionError(f'cannot write under {parent}')
  if os.path.basename(os.path.dirname(out)) == 'checkpoints':
    raise ValueError(f'--out {out!r} is inside a checkpoints folder, where a run would take it for '
                     'a training checkpoint; choose another place')
  return out


def _write_json(path: str, data: Dict[str, Any]) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(data, f, indent=2)
    f.write('\n')


def _umask() -> int:
  umask = os.umask(0)  # Reading the umask means setting it; put it back at once.
  os.umask(umask)
  return umask


def _staging_folder(parent: str) -> str:
  """A new folder beside the output, readable like any other (mkdtemp makes it private)."""
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix='.export-')
  except OSError as e:
    raise OSError(f'cannot write in {parent}: {e.strerror or e}') from e
  os.chmod(tmp, 0o777 & ~_umask())
  return tmp


def _save_safetensors(tensors: Dict[str, np.ndarray], path: str) -> None:
  try:
    safetensors_numpy.save_file(tensors, path, metadata={'format': 'pt'})
  except safetensors.SafetensorError as e:  # e.g. "No space left on device".
    raise OSError(f'cannot write {path}: {e}') from e
  os.chmod(path, 0o666 & ~_umask())  # safetensors creates it owner-only; others may load it.


def export_timm(params: Dict[str, Any], config: ml_collections.ConfigDict, out: str,
                head: str = 'none') -> Dict[str, Any]:
  """Writes `out` (.safetensors) and its spec beside it (same name, .json).

  Both files are written in a staging folder beside them and then hard-linked into place, which
  fails if a file of that name appeared meanwhile: nothing is ever overwritten, and a crash
  leaves no half-written file.

  Returns:
    The spec (`timm_model_spec`).

  Raises:
    ValueError, FileExistsError: see `check_out`; ValueError for an unknown `head`.
    OSError: when the files cannot be written (read-only or full disk, ...).
  """
  out = check_out('timm', out)
  spec_path = out[:-len('.safetensors')] + '.json'
  spec = timm_model_spec(config, head)
  tensors = timm_state_dict(params, config, head)
  tmp = _staging_folder(os.path.dirname(out))
  placed = []
  try:
    _save_safetensors(tensors, os.path.join(tmp, 'weights'))
    _write_json(os.path.join(tmp, 'spec'), spec)
    for name, target in (('weights', out), ('spec', spec_path)):
      try:
        os.link(os.path.join(tmp, name), target)
      except FileExistsError as e:
        raise FileExistsError(f'{target} appeared while exporting; it was left as it is') from e
      placed.append(target)
  except BaseException:
    for target in placed:  # Both files or neither.
      os.remove(target)
    raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return spec


def export_open_clip(params: Dict[str, Any], config: ml_collections.ConfigDict, out: str,
                     tokenizer_path: str, eot_id: int, pad_id: int) -> Dict[str, Any]:
  """Writes the open_clip folder `out` (see the module docstring): staged beside it, then
  renamed into place, so that it appears whole or not at all.

  Returns:
    The open_clip_config.json content.

  Raises:
    ValueError, FileExistsError: see `check_out` (FileExistsError also when `out` appears
      while exporting: it is left as it is).
    FileNotFoundError: if `tokenizer_path` (a sentencepiece model, or CLIP's vocabulary for a
      clip_bpe run) does not exist.
    OSError: when the folder cannot be written (read-only or full disk, ...).
  """
  out = check_out('open_clip', out)
  if not os.path.isfile(tokenizer_path):
    raise FileNotFoundError(f'tokenizer file not found: {tokenizer_path}')
  with open(tokenizer_path, 'rb') as f:
    kind = tokenizer_lib.kind_of(f.read(2))
  trunk = timm_model_name(config) or 'local-dir:' + out
  oc_config = open_clip_model_config(config, eot_id, pad_id, trunk, kind)
  tensors = open_clip_state_dict(params, config)
  tmp = _staging_folder(os.path.dirname(out))
  try:
    _save_safetensors(tensors, os.path.join(tmp, OPEN_CLIP_WEIGHTS))
    _write_json(os.path.join(tmp, OPEN_CLIP_CONFIG), oc_config)
    shutil.copyfile(tokenizer_path,
                    os.path.join(tmp, CLIP_VOCAB if kind == 'clip_bpe' else TOKENIZER))
    if trunk.startswith('local-dir:'):
      spec = timm_model_spec(config)
      _write_json(os.path.join(tmp, TIMM_CONFIG), dict(
          architecture=spec['model_name'], num_classes=0,
          num_features=spec['model_kwargs']['embed_dim'], global_pool='avg',
          model_args=spec['model_kwargs'],
          pretrained_cfg=spec['pretrained_cfg_overlay']))
    # rename() would replace an empty folder that appeared meanwhile; refuse it instead.
    if os.path.lexists(out):
      raise FileExistsError(f'{out} appeared while exporting; it was left as it is')
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return oc_config


def _define_flags():
  flags.DEFINE_string('checkpoint', None, "A run's workdir or one checkpoint folder.")
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_enum('format', None, FORMATS, 'timm: the vision encoder; open_clip: both towers.')
  flags.DEFINE_string('out', None, 'timm: FILE.safetensors (spec in FILE.json); '
                      'open_clip: a new folder.')
  flags.DEFINE_enum('head', 'none', HEADS, 'timm: projection puts image_projection in the head.')
  flags.mark_flags_as_required(['checkpoint', 'format', 'out'])


def _export(fmt: str, checkpoint: str, step: Optional[int], out: str, head: str) -> str:
  """Runs one export; returns what to print."""
  if fmt == 'open_clip' and head != 'none':
    raise ValueError('--head applies to --format=timm (open_clip keeps image_projection in '
                     'visual.head.proj)')
  # Refused before the checkpoint is read: nothing is overwritten, and no time is lost.
  check_out(fmt, out)
  folder = storage.absolute(checkpoint).rstrip('/')
  if storage.basename(folder) == 'params' or (
      storage.is_dir(storage.join(folder, 'params')) and
      not storage.is_dir(storage.join(folder, 'checkpoints'))):
    raise ValueError(f'{checkpoint} looks like a rils_jax.finetune output (params/ with the '
                     'encoder and a classification head): only pre-training checkpoints '
                     '(WORKDIR or WORKDIR/checkpoints/<step>) are exported')
  restored = restore_lib.restore(checkpoint, step)
  if fmt == 'open_clip' and 'text' not in restored.params:
    raise ValueError(f'{checkpoint} is a config.loss.kind={restored.config.loss.kind!r} run, '
                     'which has no text tower: export its image encoder with --format=timm')
  params = jax.device_get(restored.params)
  source = f'step {restored.step} of {restored.path}'
  if fmt == 'timm':
    spec = export_timm(params, restored.config, out, head)
    spec_path = out[:-len('.safetensors')] + '.json'
    lines = [f'Wrote {out} and {spec_path} ({source}). Load with:',
             '  import json, timm',
             f'  spec = json.load(open({spec_path!r}))',
             f"  model = timm.create_model(spec['model_name'], checkpoint_path={out!r},",
             "                            pretrained_cfg_overlay=spec['pretrained_cfg_overlay'],"
             " **spec['model_kwargs'])",
             'model_kwargs: ' + json.dumps(spec['model_kwargs'])]
  else:
    oc = export_open_clip(params, restored.config, out, restored.tokenizer.model_path,
                          restored.tokenizer.eot_id, restored.tokenizer.pad_id)
    out = os.path.abspath(out)
    context = restored.config.model.text.context_length
    if restored.tokenizer.kind == 'clip_bpe':
      lines = [f'Wrote {out}/ ({source}). Load with:',
               '  import open_clip',
               '  model, _, preprocess = open_clip.create_model_and_transforms('
               f"{'local-dir:' + out!r})",
               f"  tokenizer = open_clip.get_tokenizer({'local-dir:' + out!r})",
               "  tokens = tokenizer(['a photo of a dog'])",
               f'(CLIP\'s BPE, the run\'s tokenizer; context length {context})']
    else:
      lines = [f'Wrote {out}/ ({source}). Load with (from the rils_jax folder, or with it on '
               'PYTHONPATH):',
               '  import open_clip, torch',
               '  from rils_jax.export import tokenize',
               '  model, _, preprocess = open_clip.create_model_and_transforms('
               f"{'local-dir:' + out!r})",
               f"  tokens = torch.from_numpy(tokenize(['a photo of a dog'], "
               f'{os.path.join(out, TOKENIZER)!r}, {context}))',
               '(tokenize uses the run\'s sentencepiece model; open_clip.get_tokenizer would '
               'give CLIP\'s BPE tokenizer and wrong ids)']
    trunk = oc['model_cfg']['vision_cfg']['timm_model_name']
    if trunk.startswith('local-dir:'):
      lines.append(f'The vision trunk is named by this folder\'s path ({trunk}): after moving '
                   'the folder, set vision_cfg.timm_model_name in open_clip_config.json to match.')
  lines.append('Not exported:')
  lines += ['  - ' + line for line in left_out(params, fmt)]
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.quiet_libraries()
  f = flags.FLAGS
  # SIGTERM (a scheduler's kill) unwinds like Ctrl-C, so the staging folder is removed.
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  try:
    print(_export(f.format, f.checkpoint, f.step, f.out, f.head))
  except (ValueError, OSError) as e:  # OSError: not found, exists, read-only, disk full, ...
    raise SystemExit(f'error: {e}') from e
  except KeyboardInterrupt as e:
    raise SystemExit('error: interrupted; nothing was written') from e


if __name__ == '__main__':
  _define_flags()
  console.run(main)
