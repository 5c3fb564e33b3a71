"""Shared configuration defaults and helpers for the files in configs/.

Every field that `rils_jax.main` reads is defined here, so a config file only states what it
changes, and an override such as `--config.loss.kind=clip` works for every config.
"""

import difflib
import os
from typing import Any, Dict

import ml_collections

from rils_jax import platforms
from rils_jax import sharding

# ImageNet mean / std (RGB, [0, 1] scale), used by SLIP and the RILS release.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'data')


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
      out[key] = value.lower() in ('1', 'true', 'yes')
    elif defaults[key] is None:
      out[key] = value
    else:
      out[key] = kind(value)
  return ml_collections.ConfigDict(out)


def cache_dir() -> str:
  """Where generated data lives: $RILS_JAX_CACHE, else $XDG_CACHE_HOME/rils_jax, else
  ~/.cache/rils_jax."""
  if os.environ.get('RILS_JAX_CACHE'):
    return os.environ['RILS_JAX_CACHE']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'rils_jax')


def synthetic_data(config: ml_collections.ConfigDict, image_size: int, num_train: int = 4000,
                   seed: int = 0, num_heldout: int = 200, zeroshot_per_class: int = 20,
                   root: str = '') -> None:
  """Points the config at the generated shapes dataset (see rils_jax/data/synthetic.py).

  `rils_jax.main` generates it on first use under `cache_dir()`.
  """
  root = root or os.path.join(cache_dir(), f'shapes_v2_{image_size}px_{num_train}_seed{seed}')
  config.synthetic = dict(root=root, image_size=image_size, num_train=num_train, seed=seed,
                          num_heldout=num_heldout, zeroshot_per_class=zeroshot_per_class)
  config.input.sources = [dict(kind='csv', captions=os.path.join(root, 'train', 'captions.csv'),
                               images=os.path.join(root, 'train', 'images'), select='')]
  config.evals.zeroshot = dict(kind='zeroshot', every=0, templates='short',
                               data=dict(kind='folder', root=os.path.join(root, 'zeroshot')))
  config.evals.retrieval = dict(kind='retrieval', every=0, sources=[
      dict(kind='csv', captions=os.path.join(root, 'heldout', 'captions.csv'),
           images=os.path.join(root, 'heldout', 'images'), select='')])


def base_config() -> ml_collections.ConfigDict:
  """Defaults: RILS release hyper-parameters, ViT-B/16 sizes, no data."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 10            # Steps between metric lines.
  # Checkpoints (rils_jax/checkpoints.py): asynchronous, atomic, resumed from by themselves.
  c.checkpoint_every = 1000   # Steps between checkpoints (and one at the end).
  c.checkpoint_minutes = 0.0  # Also save when this many minutes passed since the last; 0: off.
  c.keep_checkpoints = 2      # Keep the last K...
  c.keep_every = 0            # ...and those whose step is a multiple of M (0: none).
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
  c.model.decoder = dict(width=0, depth=1, num_heads=0)  # 0: same as the encoder (release).
  c.model.text = dict(width=512, num_layers=12, num_heads=8, context_length=77, vocab_size=49408)
  c.model.embed_dim = 512
  c.model.dtype = 'float32'   # Compute dtype: float32, bfloat16 or auto (bf16 unless on CPU).
  # Parameters are always float32.
  c.model.remat = 'none'      # Per-block rematerialisation: none, block (keep matmuls), full.

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = 'rils'        # 'rils' or 'clip' (baseline: no masked branch).
  c.loss.weight = 0.5         # lambda (release).
  c.loss.student_temperature = 0.1   # tau_s (release).
  c.loss.teacher_temperature = 0.04  # tau_t (release).
  c.loss.gate = True          # Reconstruction only for correctly retrieved samples (release).
  c.loss.stop_gradient_prototypes = True  # Captions as prototypes get no L_rec gradient (release).
  c.loss.max_logit_scale = 100.0
  c.loss.local_gradients = False  # True: the release's multi-GPU CLIP gradient (losses.py).
  c.loss.chunk_size = 0       # Masked patches per chunk of reconstruction logits; 0: all at once.

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 100
  c.optim.min_lr_ratio = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.5
  c.optim.grad_clip = 1.0     # Global-norm clipping; 0 disables.
  c.optim.mu_dtype = 'float32'  # AdamW first moment: float32 or bfloat16.
  c.optim.accum_steps = 1     # Micro-batches per step (exact full-batch gradient, GradCache).

  c.input = ml_collections.ConfigDict()
  # Training sources (rils_jax/data/sources.py): dicts with `kind` csv | coco (captions,
  # images), arrayrecord | webdataset (files: a shard pattern), tfds (name, split, data_dir);
  # optional `select` ('start:stop') and `weight` (all weighted: a mixture; none: concatenated).
  c.input.sources = []
  c.input.batch_size = 4096   # Global batch.
  c.input.num_workers = 0     # grain worker processes per host.
  # How the processes split the data: 'global_batch' (each reads its rows of the seed's global
  # batches: the same batches for any process count) or 'records' (grain's ShardByJaxProcess).
  c.input.sharding = 'global_batch'
  c.input.draft_decoding = True   # Reduced-size JPEG decoding where equivalent (transforms.py).
  c.input.prefetch_to_device = 2  # Batches transferred ahead of the step (0: none).
  c.input.crop_scale = (0.5, 1.0)
  c.input.max_consecutive_skips = 1000  # Unreadable images in a row before the run stops.
  c.input.max_skip_fraction = 0.5       # Fraction of unreadable images that stops the run.
  c.input.resume_position = True  # Resume the data stream where the checkpoint left it.
  c.input.log_example_ids = False  # Write each step's example ids to WORKDIR/example_ids/.
  c.input.mean = IMAGENET_MEAN
  c.input.std = IMAGENET_STD

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.model = ''      # sentencepiece .model; '' trains one on the training captions.
  c.tokenizer.vocab_size = 8000  # Upper bound when training one.

  # Evaluations (rils_jax/evals/runner.py): `batch_size`, plus named evaluators, each a dict
  # with `kind` (zeroshot, retrieval, linear_probe, fewshot, lowshot, knn), `every` (steps; 0:
  # at the end only) and the kind's settings. The data helpers below add some.
  c.evals = ml_collections.ConfigDict()
  c.evals.batch_size = 256

  c.debug = ml_collections.ConfigDict()
  c.debug.nan_loss_steps = ()  # Fault injection: steps (1-based) whose loss is made NaN.
  return c


# Keys that helpers add to some configs only (synthetic_data, platforms.apply_platform), and
# values that are free-form (lists of sources and rules, the mesh's axes are checked by
# sharding.make_mesh).
OPTIONAL_KEYS = ('synthetic', 'platform')
FREE_FORM_KEYS = ('mesh', 'sharding_rules', 'input.sources', 'evals')  # evals: checked by
# rils_jax.evals.runner.evaluator_specs.


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Rejects keys that `base_config` does not define (a typo in a config file would otherwise
  be ignored silently; command-line overrides are already checked by ml_collections).

  Raises:
    ValueError: naming each unknown key and the closest known ones.
  """
  unknown = []

  def walk(value, reference, prefix):
    if prefix.rstrip('.') in FREE_FORM_KEYS:
      return
    if not isinstance(value, (dict, ml_collections.ConfigDict)):
      return
    for key in value.keys():
      name = prefix + key
      if prefix == '' and key in OPTIONAL_KEYS:
        continue
      if key not in reference:
        close = difflib.get_close_matches(key, list(reference.keys()), n=2)
        unknown.append(name + (f' (did you mean {", ".join(prefix + c for c in close)}?)'
                               if close else ''))
      else:
        walk(value[key], reference[key], name + '.')

  walk(config, base_config(), '')
  if unknown:
    raise ValueError(f'unknown config keys: {"; ".join(unknown)}. The known keys and their '
                     'meaning are in rils_jax/config_lib.py:base_config')


def to_dict(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Plain nested dict, for JSON."""
  return config.to_dict()


def paper_recipe(arg, variant: str, text: Dict[str, int], embed_dim: int
                 ) -> ml_collections.ConfigDict:
  """The RILS paper's pre-training set-up for a ViT variant (see configs/vit_b16.py).

  `arg`: 'data=DATA,dtype=auto|bfloat16|float32,platform=NAME' (platform: a preset of
  rils_jax/platforms.py, which also sets the dtype); DATA is synthetic, shared, or shards
  (see `shard_data`).

  Raises:
    ValueError: for an unknown argument, data or platform name.
  """
  arg = parse_arg(arg, data='synthetic', dtype='auto', platform='')
  c = base_config()
  c.total_steps = 122_070
  c.log_every = 50
  c.checkpoint_every = 2000
  c.checkpoint_minutes = 30.0
  c.keep_every = 20_000
  c.model.variant = variant
  c.model.image_size = 224
  c.model.dtype = arg.dtype
  c.model.text = dict(width=text['width'], num_layers=text['num_layers'],
                      num_heads=text['num_heads'], context_length=77, vocab_size=49_408)
  c.model.embed_dim = embed_dim
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 4_883
  c.optim.weight_decay = 0.5
  c.input.batch_size = 4096
  c.input.num_workers = 8
  c.tokenizer.vocab_size = 49_408
  if arg.data == 'synthetic':
    synthetic_data(c, image_size=224, num_train=4096, num_heldout=100, zeroshot_per_class=10)
  elif arg.data == 'shared':
    shared_data(c)
  elif arg.data.split(':', 1)[0] in SHARD_KINDS:
    shard_data(c, arg.data)
  else:
    raise ValueError("data must be 'synthetic', 'shared', 'webdataset:PATTERN', "
                     f"'arrayrecord:PATTERN' or 'tfds:NAME', got {arg.data!r}")
  if arg.platform:
    if arg.dtype != 'auto':
      raise ValueError(f'platform={arg.platform} sets bfloat16 compute; drop dtype={arg.dtype} '
                       '(or override --config.model.dtype after it)')
    platforms.apply_platform(c, arg.platform)
  return c


SHARD_KINDS = ('webdataset', 'arrayrecord', 'tfds')


def shard_data(config: ml_collections.ConfigDict, spec: str) -> None:
  """Trains on one shard source, `KIND:WHAT`: `webdataset:/data/laion/{00000..01999}.tar`,
  `arrayrecord:/data/laion_ar/train-*.array_record` or `tfds:coco_captions` (split train,
  $TFDS_DATA_DIR). No evaluation data is set: add `config.evals` in a copy of the config.

  Raises:
    ValueError: for another kind or an empty pattern.
  """
  kind, _, what = spec.partition(':')
  if kind not in SHARD_KINDS or not what:
    raise ValueError(f'shard data must look like KIND:PATTERN with KIND in {SHARD_KINDS}, '
                     f'got {spec!r}')
  source = (dict(kind='tfds', name=what, split='train') if kind == 'tfds'
            else dict(kind=kind, files=what))
  config.input.sources = [source]
  remove_evals(config)


def remove_evals(config: ml_collections.ConfigDict) -> None:
  """Drops every evaluator of `config.evals` (keeps `evals.batch_size`)."""
  for name in [k for k in config.evals.keys() if k != 'batch_size']:
    del config.evals[name]


def shared_data(config: ml_collections.ConfigDict, data_dir: str = SHARED_DATA,
                heldout: int = 100, zeroshot_per_class: str = '') -> None:
  """Points the config at ../shared/data: Flickr8k 1k (all but the last `heldout` images) + COCO
  mini for training, the last `heldout` Flickr8k images for retrieval, CIFAR-10 test photos for
  zero-shot (`zeroshot_per_class`: a slice of each class, '' for all 1,000)."""
  flickr, coco = os.path.join(data_dir, 'flickr8k_1k'), os.path.join(data_dir, 'coco_mini_train')
  config.input.sources = [
      dict(kind='csv', captions=os.path.join(flickr, 'captions.csv'),
           images=os.path.join(flickr, 'images'), select=f':-{heldout}'),
      dict(kind='coco', captions=os.path.join(coco, 'captions_train2017.json'),
           images=os.path.join(coco, 'images'), select=''),
  ]
  config.evals.zeroshot = dict(kind='zeroshot', every=0, templates='clip_cifar_18', data=dict(
      kind='folder', root=os.path.join(data_dir, 'cifar10_test'), per_class=zeroshot_per_class))
  config.evals.retrieval = dict(kind='retrieval', every=0, sources=[
      dict(kind='csv', captions=os.path.join(flickr, 'captions.csv'),
           images=os.path.join(flickr, 'images'), select=f'-{heldout}:')])
