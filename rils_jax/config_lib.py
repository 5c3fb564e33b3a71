"""The configuration fields rils_jax reads, with their defaults, and the checks of config keys.

Every field that `rils_jax.main` reads is defined by `base_config` (and every field that
`rils_jax.finetune` reads by `finetune_base_config`), so a config file only states what it
changes, an override such as `--config.loss.kind=clip` works for every config, and a key that
is not defined here is a typo (`check_keys`). The recipes and data presets that config files
share live beside them, in configs/common.py.
"""

import difflib
import json
from typing import Any, Dict, List, Optional, Sequence

import ml_collections

from rils_jax import sharding

# ImageNet mean / std (RGB, [0, 1] scale), used by SLIP and the RILS release.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """Parses a config-file argument 'key=value,key=value' (big_vision's `parse_arg`).

  Values take the type of their default (bool accepts true/false/1/0).

  Raises:
    ValueError: for an unknown or repeated key, or a malformed pair.
  """
  out = dict(defaults)
  seen = set()
  for pair in filter(None, (arg or '').split(',')):
    if '=' not in pair:
      hint = (": commas separate the argument's keys, so write brace alternatives {a,b} as two "
              "patterns joined by '::'" if '{' in (arg or '') else '')
      raise ValueError(f'config argument {pair!r} must look like key=value{hint}')
    key, value = pair.split('=', 1)
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; known: {sorted(defaults)}')
    if key in seen:
      raise ValueError(f'config argument {key!r} is given twice')
    seen.add(key)
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ('1', 'true', 'yes', '0', 'false', 'no'):
        raise ValueError(f'config argument {key}={value!r} must be true or false')
      out[key] = value.lower() in ('1', 'true', 'yes')
    elif defaults[key] is None:
      out[key] = value
    else:
      try:
        out[key] = kind(value)
      except ValueError as e:
        raise ValueError(f'config argument {key}={value!r} must be a{"n" if kind is int else ""} '
                         f'{kind.__name__}') from e
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """Defaults: RILS release hyper-parameters, ViT-B/16 sizes, no data."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 10            # Steps between metric lines.
  # On a URL workdir (gs://...) the logs are uploaded whole this often, at every checkpoint and
  # at the end (rils_jax/storage.py): a SIGKILL loses at most this many seconds of log lines.
  c.log_upload_seconds = 30.0
  # Checkpoints (rils_jax/checkpoints.py): asynchronous, atomic, resumed from by themselves.
  c.checkpoint_every = 1000   # Steps between checkpoints (and one at the end).
  c.checkpoint_minutes = 0.0  # Also save when this many minutes passed since the last; 0: off.
  c.keep_checkpoints = 2      # Keep the last K...
  c.keep_every = 0            # ...and those whose step is a multiple of M (0: none).
  # Also keep the parameters of the best periodic evaluation under WORKDIR/best, by this metric
  # ('NAME/metric' of config.evals, e.g. 'zeroshot/top1'; '' : off), highest ('max') or lowest.
  c.keep_best = ''
  c.keep_best_mode = 'max'
  c.init_from = ''            # Warm start: parameters only, from a run's workdir or checkpoint.
  c.max_consecutive_nonfinite = 10  # NaN/Inf steps in a row (updates skipped) that stop the run.
  # Device mesh (rils_jax/sharding.py): axis -> size, -1 takes the remaining devices. `slice`
  # spans TPU slices (DCN), `fsdp` shards parameters and optimizer state (ZeRO-3), `tensor`
  # splits heads and MLP. The batch is split over slice x data x fsdp.
  c.mesh = ml_collections.ConfigDict({'slice': 1, 'data': -1, 'fsdp': 1, 'tensor': 1})
  # Logical axis name -> mesh axes, for parameters and activations (sharding.DEFAULT_RULES).
  c.sharding_rules = [(name, list(axes) if isinstance(axes, tuple) else axes)
                      for name, axes in sharding.DEFAULT_RULES]

  c.model = ml_collections.ConfigDict()
  c.model.variant = 'B/16'    # Ti/S/B/L with any patch size, e.g. 'L/14'.
  c.model.vision = dict(width=0, depth=0, num_heads=0)  # Non-zero values override the variant.
  c.model.image_size = 224
  c.model.mask_ratio = 0.75   # RILS release (MAE-style, 25% visible).
  c.model.keep_rounding = 'floor'  # Visible patches int(N (1 - mask_ratio)) (release); 'round'.
  # 'release': the patch-embedding and text MLP biases at PyTorch's default uniform init, as
  # the release leaves them; 'zeros': zeroed (rils_jax before).
  c.model.bias_init = 'release'
  c.model.decoder = dict(width=0, depth=1, num_heads=0)  # 0: same as the encoder (release).
  c.model.text = dict(width=512, num_layers=12, num_heads=8, context_length=77, vocab_size=49408)
  c.model.embed_dim = 512
  c.model.dtype = 'float32'   # Compute dtype: float32, bfloat16 or auto (bf16 unless on CPU).
  # Parameters are always float32.
  c.model.remat = 'none'      # Per-block rematerialisation: none, block (keep matmuls), full,
  #                             offload (as block, kept in host memory).
  # Attention kernel (vit.attention_implementation): 'auto' (cuDNN's fused attention on GPU in
  # bfloat16, XLA's elsewhere), 'xla' or 'cudnn'.
  c.model.attention = 'auto'
  # True: each tower's blocks are one nn.scan over stacked parameters (compiled once, not once
  # per layer); checkpoints of either layout resume, warm-start and export (models/layout.py).
  c.model.scan_layers = False
  # LiT (Zhai et al. 2022): 'image' or 'text' locks that tower (and its projection) at the
  # values of `init_from`: no gradient, no optimizer moments; '' trains everything.
  c.model.freeze = ''

  c.loss = ml_collections.ConfigDict()
  # 'rils', or a baseline in the same code: 'clip' (no masked branch), 'flip' (CLIP on the
  # visible patches, `flip`), 'mae' (pixel reconstruction, no text; `mae`).
  c.loss.kind = 'rils'
  # The image-text term of rils / clip / flip: 'softmax' (CLIP's InfoNCE) or 'sigmoid'
  # (SigLIP's pairwise sigmoid with a learnable bias; logit scale starts at 10, bias at -10).
  c.loss.contrastive = 'softmax'
  c.loss.contrastive_chunk_size = 0  # sigmoid: image rows per chunk of logits; 0: all at once.
  # sigmoid: the bias's init (SigLIP: -10, for long runs; Adam moves it by about lr per step, so
  # a run of a few hundred steps wants it near its optimum, about -log(batch)).
  c.loss.sigmoid_bias_init = -10.0
  c.loss.norm_pix_loss = True  # mae: per-patch normalised pixel targets (MAE).
  c.loss.weight = 0.5         # lambda (release).
  c.loss.student_temperature = 0.1   # tau_s (release).
  c.loss.teacher_temperature = 0.04  # tau_t (release).
  c.loss.gate = True          # Reconstruction only for correctly retrieved samples (release).
  c.loss.stop_gradient_prototypes = True  # Captions as prototypes get no L_rec gradient (release).
  c.loss.max_logit_scale = 100.0  # The step clamps ln(scale) to [0, ln max] (SLIP).
  c.loss.local_gradients = False  # True: the release's multi-GPU CLIP gradient (losses.py).
  # N > 0: the release's whole loss as N GPUs compute it (losses.rils_loss; overrides the two
  # switches above); 0: exact global losses, the same for any device count.
  c.loss.release_gpus = 0
  c.loss.chunk_size = 0       # Masked patches per chunk of reconstruction logits; 0: all at once.

  # FLIP (Li et al. 2023): the share of patches dropped, and the last steps trained unmasked
  # (FLIP's unmasked tuning; 0: none).
  c.flip = ml_collections.ConfigDict({'mask_ratio': 0.5, 'unmasked_steps': 0})
  # MAE (He et al. 2022): its decoder (8 blocks of 512, 16 heads); masks config.model.mask_ratio.
  c.mae = ml_collections.ConfigDict({'decoder': {'width': 512, 'depth': 8, 'num_heads': 16}})

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 100
  c.optim.lr_start = 1e-6     # Warm-up from here (SLIP: 1e-6)...
  c.optim.min_lr_ratio = 0.02  # ...cosine down to lr * ratio (SLIP: 1e-5 at lr 5e-4).
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.5
  # 'slip': decay all but biases, norms and the logit scale (SLIP / release); 'kernels':
  # dense / conv kernels and the projections only (optim.py).
  c.optim.weight_decay_mask = 'slip'
  c.optim.grad_clip = 0.0     # Global-norm clipping; 0 disables (SLIP does not clip).
  c.optim.mu_dtype = 'float32'  # AdamW first moment: float32 or bfloat16.
  c.optim.accum_steps = 1     # Micro-batches per step (exact full-batch gradient, GradCache).

  c.input = ml_collections.ConfigDict()
  # Training sources (rils_jax/data/sources.py): dicts with `kind` csv | coco (captions,
  # images), arrayrecord | webdataset (files: a shard pattern), tfds (name, split, data_dir);
  # optional `select` ('start:stop') and `weight` (all weighted: a mixture; none: concatenated).
  c.input.sources = []
  c.input.batch_size = 4096   # Global batch.
  c.input.num_workers = 0     # grain worker processes per host.
  # grain's read threads per process (ReadOptions.num_threads; grain's default 16): they overlap
  # slow reads (buckets, network disks). 0 reads in the loader's own thread: with small local
  # files on few cores the threads only contend for the GIL (configs/default.py measures it).
  c.input.read_threads = 16
  # How the processes split the data: 'global_batch' (each reads its rows of the seed's global
  # batches: the same batches for any process count) or 'records' (grain's ShardByJaxProcess).
  c.input.sharding = 'global_batch'
  c.input.draft_decoding = True   # Reduced-size JPEG decoding where equivalent (transforms.py).
  c.input.prefetch_to_device = 2  # Batches transferred ahead of the step (0: none).
  # Each batch's captions are cut after its last end-of-text token, rounded up to a multiple of
  # this (0: always the whole context): exact up to float rounding, and less work on padding
  # (rils_jax/data/pipeline.py, `trim_text`). Single-process runs; not MAE (no text).
  c.input.text_trim = 16
  c.input.crop_scale = (0.5, 1.0)
  c.input.max_consecutive_skips = 1000  # Unreadable images in a row before the run stops.
  c.input.max_skip_fraction = 0.5       # Fraction of unreadable images that stops the run.
  c.input.resume_position = True  # Resume the data stream where the checkpoint left it.
  c.input.log_example_ids = False  # Write each step's example ids to WORKDIR/example_ids/.
  c.input.mean = IMAGENET_MEAN
  c.input.std = IMAGENET_STD

  c.tokenizer = ml_collections.ConfigDict()
  # 'sentencepiece' (trained on the captions, or `model`) or 'clip_bpe' (CLIP's 49,408-token BPE
  # as the release, needs model.text.vocab_size >= 49,408; rils_jax/tokenizer.py).
  c.tokenizer.kind = 'sentencepiece'
  c.tokenizer.model = ''      # sentencepiece .model; '' trains one on the training captions.
  c.tokenizer.vocab_size = 8000  # Upper bound when training one.
  # clip_bpe: CLIP's bpe_simple_vocab_16e6.txt.gz; '' reads the installed open_clip_torch's.
  c.tokenizer.clip_vocab = ''

  # Evaluations (rils_jax/evals/runner.py): `batch_size`, plus named evaluators, each a dict
  # with `kind` (zeroshot, retrieval, linear_probe, fewshot, lowshot, knn), `every` (steps; 0:
  # at the end only) and the kind's settings. The data presets of configs/common.py add some.
  c.evals = ml_collections.ConfigDict()
  c.evals.batch_size = 256

  # Weights & Biases (rils_jax/wandb_run.py; `pip install -r requirements-wandb.txt`): process 0
  # sends the metrics it writes to TensorBoard, and this config, to one wandb run per workdir,
  # which a resumed run continues (its id is kept in WORKDIR/wandb_run_id.txt).
  c.wandb = ml_collections.ConfigDict()
  c.wandb.mode = 'disabled'   # 'disabled' (off), 'online', or 'offline' (`wandb sync` later).
  c.wandb.project = 'rils_jax'
  c.wandb.entity = ''         # Team or user; '': the API key's default entity.
  c.wandb.name = ''           # Display name; '': the workdir's basename.
  c.wandb.tags = ()           # Strings of 1-64 characters.

  c.debug = ml_collections.ConfigDict()
  c.debug.nan_loss_steps = ()  # Fault injection: steps (1-based) whose loss is made NaN.
  return c


# Keys that presets add to some configs only (configs/common.py: synthetic_data,
# platforms.apply_platform), and values that are free-form (lists of sources and rules; the mesh's
# axes are checked by sharding.make_mesh, evals by rils_jax.evals.runner.evaluator_specs).
OPTIONAL_KEYS = ('synthetic', 'platform')
FREE_FORM_KEYS = ('mesh', 'sharding_rules', 'input.sources', 'evals')


def finetune_base_config() -> ml_collections.ConfigDict:
  """Defaults of `rils_jax.finetune` (MAE / BEiT fine-tuning recipe, CPU-sized steps), no
  checkpoint and no data: a config sets `init_from` and `data.train` / `data.test` (dataset
  specs of rils_jax/evals/datasets.py). RandAugment, mixup / cutmix, random erasing and drop
  path default to off (the recipe before they existed); configs/finetune_mae_vit_b16.py turns
  them on with MAE's values."""
  c = ml_collections.ConfigDict()
  c.init_from = ''            # The pre-training run's workdir or one checkpoint folder.
  c.seed = 0
  c.total_steps = 300
  c.batch_size = 64
  c.eval_batch_size = 500
  c.log_every = 25
  c.eval_every = 0            # Test-set evaluation every N steps (0: at the end only).
  c.image_size = 0            # Fine-tuning resolution in pixels; 0: the checkpoint's.
  c.label_smoothing = 0.1
  c.drop_path = 0.0           # Stochastic depth of the last block, 0 at the first (MAE B: 0.1).
  c.attention = 'auto'        # The encoder's attention kernel, as config.model.attention.
  c.scan_layers = False       # The encoder's blocks as one nn.scan, as config.model.scan_layers.
  c.optim = dict(lr=1e-3, warmup_steps=30, min_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.05, grad_clip=0.0, layer_decay=0.65)
  # rand_augment: timm's spec, e.g. 'rand-m9-mstd0.5-inc1' (MAE / BEiT); '' off.
  # random_erasing: probability of timm's RandomErasing, mode 'pixel' (MAE: 0.25); 0 off.
  c.input = dict(crop_scale=(0.08, 1.0), num_workers=0, rand_augment='', random_erasing=0.0)
  # timm's Mixup in mode 'batch' (MAE: mixup_alpha 0.8, cutmix_alpha 1.0); alphas 0: off.
  c.mixup = dict(mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5)
  # WORKDIR/checkpoints (rils_jax/checkpoints.py), from which a stopped run resumes.
  c.checkpoint_every = 100    # Steps between checkpoints (and one at the end).
  c.checkpoint_minutes = 0.0  # Also save when this many minutes passed since the last; 0: off.
  c.keep_checkpoints = 2      # Keep the last K...
  c.keep_every = 0            # ...and those whose step is a multiple of M (0: none).
  c.data = dict(train=None, test=None)
  return c




def check_keys(config: ml_collections.ConfigDict,
               reference: Optional[ml_collections.ConfigDict] = None,
               free_form: Sequence[str] = FREE_FORM_KEYS,
               optional: Sequence[str] = OPTIONAL_KEYS,
               where: str = 'rils_jax/config_lib.py:base_config') -> None:
  """Rejects keys that the reference config (default: `base_config()`) does not define: a typo
  in a config file would otherwise be ignored silently (command-line overrides are already
  checked by ml_collections). `free_form` keys hold values of any shape; `optional` top-level
  keys may appear although the reference lacks them; `where` names the reference in the error.

  Raises:
    ValueError: naming each unknown key and the closest known ones.
  """
  unknown = []

  def walk(value, reference, prefix):
    if prefix.rstrip('.') in free_form:
      return
    if isinstance(value, ml_collections.ConfigDict):
      # Keys only: a lazy value (own data's total_steps = ceil(images / batch)) is not computed
      # here, so that a bad batch meets its own check rather than a ZeroDivisionError.
      children = value.items(preserve_field_references=True)
    elif isinstance(value, dict):
      children = value.items()
    else:
      return
    for key, child in children:
      name = prefix + key
      if prefix == '' and key in optional:
        continue
      if key not in reference:
        close = difflib.get_close_matches(key, list(reference.keys()), n=2)
        unknown.append(name + (f' (did you mean {", ".join(prefix + c for c in close)}?)'
                               if close else ''))
      elif isinstance(child, (dict, ml_collections.ConfigDict)):
        walk(child, reference[key], name + '.')

  walk(config, base_config() if reference is None else reference, '')
  if unknown:
    raise ValueError(f'unknown config keys: {"; ".join(unknown)}. The known keys and their '
                     f'meaning are in {where}')


def check_finetune_keys(config: ml_collections.ConfigDict) -> None:
  """`check_keys` against `finetune_base_config` (the dataset specs are free-form: checked by
  rils_jax/evals/datasets.py when opened).

  Raises:
    ValueError: naming each unknown key and the closest known ones.
  """
  check_keys(config, finetune_base_config(), free_form=('data.train', 'data.test'), optional=(),
             where='rils_jax/config_lib.py:finetune_base_config')


def differences(saved: Dict[str, Any], current: Dict[str, Any], sections: Sequence[str],
                limit: int = 6) -> List[str]:
  """'KEY: SAVED -> CURRENT' for the leaves under `sections` (dotted prefixes, e.g. 'model',
  'input.sources') where two configs as dicts (a checkpoint's saved config, this run's
  `config.to_dict()`) differ; at most `limit` lines, then a count of the rest."""

  def leaves(tree, prefix=''):
    if isinstance(tree, dict):
      for k, v in tree.items():
        yield from leaves(v, f'{prefix}{k}.')
    else:
      yield prefix[:-1], tree

  def plain(v):  # Tuples and lists compare (and print) alike; JSON turned tuples into lists.
    return json.dumps(v, default=str, sort_keys=True)

  a, b = dict(leaves(saved)), dict(leaves(current))
  keys = [k for k in sorted(set(a) | set(b))
          if any(k == s or k.startswith(s + '.') for s in sections)
          and plain(a.get(k, '(none)')) != plain(b.get(k, '(none)'))]
  out = [f'{k}: {plain(a.get(k, "(none)"))} -> {plain(b.get(k, "(none)"))}' for k in keys[:limit]]
  if len(keys) > limit:
    out.append(f'and {len(keys) - limit} more')
  return out
