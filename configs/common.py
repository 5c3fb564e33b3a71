"""Recipes and data presets shared by the config files of this folder.

A config file starts from `config_lib.base_config()` (every field `rils_jax.main` reads, with
the release's defaults) and changes what it needs; the helpers here set what several files
share: the paper's pre-training recipe (`paper_recipe`) and where the data comes from (the
generated shapes, ../shared/data, or shard files). They are imported as `configs.common`, so
commands run from the repository's root folder.
"""

import math
import os
import re
from typing import Dict

import ml_collections

from rils_jax import config_lib
from rils_jax import platforms
from rils_jax.data import synthetic

# The real image-caption and labelled photos beside the repository (../shared/data/README.md).
SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'shared', 'data')


def paper_recipe(arg, variant: str, text: Dict[str, int], embed_dim: int
                 ) -> ml_collections.ConfigDict:
  """The RILS paper's pre-training set-up for a ViT variant (see configs/vit_b16.py).

  `arg`: 'data=DATA,dtype=auto|bfloat16|float32,platform=NAME,epochs=E,heldout=N' (platform: a
  preset of rils_jax/platforms.py, which also sets the dtype); DATA is synthetic, shared,
  shards (see `shard_data`) or own data (`own_data`, with `epochs` and `heldout`).

  Raises:
    ValueError: for an unknown argument, data or platform name.
  """
  arg = config_lib.parse_arg(arg, data='synthetic', dtype='auto', platform='', epochs=0.0,
                             heldout=-1)
  c = config_lib.base_config()
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
  # SLIP's main.py (base_config's defaults, repeated because the recipe depends on them):
  # warm-up from 1e-6, cosine to 1e-5, decay on all but biases / norms / logit scale, no
  # gradient clipping.
  c.optim.lr_start = 1e-6
  c.optim.min_lr_ratio = 1e-5 / c.optim.lr
  c.optim.weight_decay_mask = 'slip'
  c.optim.grad_clip = 0.0
  c.input.batch_size = 4096
  c.input.num_workers = 8
  c.tokenizer.kind = 'clip_bpe'  # CLIP's 49,408-token BPE, as the release.
  c.tokenizer.vocab_size = 49_408  # The sentencepiece bound, with --config.tokenizer.kind.
  if data_argument(c, arg.data, arg.epochs, arg.heldout):
    pass
  elif arg.data == 'synthetic':
    synthetic_data(c, image_size=224, num_train=4096, num_heldout=100, zeroshot_per_class=10)
  elif arg.data == 'shared':
    shared_data(c)
  elif arg.data.split(':', 1)[0] in SHARD_KINDS:
    shard_data(c, arg.data)
  else:
    raise ValueError("data must be 'synthetic', 'shared', 'webdataset:PATTERN', "
                     "'arrayrecord:PATTERN', 'tfds:NAME' or own data ('csv:CAPTIONS.csv:IMAGES', "
                     f"'coco:CAPTIONS.json:IMAGES', 'txt:IMAGES'), got {arg.data!r}")
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


def synthetic_data(config: ml_collections.ConfigDict, image_size: int, num_train: int = 4000,
                   seed: int = 0, num_heldout: int = 200, zeroshot_per_class: int = 20,
                   root: str = '') -> None:
  """Points the config at the generated shapes dataset (see rils_jax/data/synthetic.py).

  `rils_jax.main` generates it on first use under `synthetic.cache_dir()`.
  """
  root = root or os.path.join(synthetic.cache_dir(), f'shapes_v2_{image_size}px_{num_train}_seed{seed}')
  config.synthetic = dict(root=root, image_size=image_size, num_train=num_train, seed=seed,
                          num_heldout=num_heldout, zeroshot_per_class=zeroshot_per_class)
  config.input.sources = [dict(kind='csv', captions=os.path.join(root, 'train', 'captions.csv'),
                               images=os.path.join(root, 'train', 'images'), select='')]
  config.evals.zeroshot = dict(kind='zeroshot', every=0, templates='short',
                               data=dict(kind='folder', root=os.path.join(root, 'zeroshot')))
  config.evals.retrieval = dict(kind='retrieval', every=0, sources=[
      dict(kind='csv', captions=os.path.join(root, 'heldout', 'captions.csv'),
           images=os.path.join(root, 'heldout', 'images'), select='')])


OWN_KINDS = ('csv', 'coco', 'txt')


def own_data(config: ml_collections.ConfigDict, spec: str, epochs: float = 0,
             heldout: int = -1) -> None:
  """Trains on your own image-caption data, given as a config argument `data=SPEC`:

    csv:CAPTIONS.csv:IMAGES     a CSV with `image,caption` columns + its image folder
    coco:CAPTIONS.json:IMAGES   COCO captions JSON + its image folder
    txt:IMAGES                  images each with a .txt of captions beside it (dog.jpg, dog.txt)

  The last `heldout` images (default: a tenth, at most 100) are held out for image<->text
  retrieval, the only evaluation (own data has no classes for zero-shot). With `epochs` > 0,
  `config.total_steps` becomes ceil(epochs x training images / batch size), following a batch
  size set later on the command line. The files are read here, so a wrong path or an empty
  file fails before anything else.

  Raises:
    ValueError: for a malformed SPEC, `epochs` negative, NaN or infinite, or no images left to
      train on; the readers' errors
      (FileNotFoundError for a missing file or folder).
  """
  from rils_jax.data import sources  # pylint: disable=g-import-not-at-top
  if not 0 <= epochs < math.inf:  # Also NaN.
    raise ValueError(f'epochs={epochs} must be a number >= 0 (0: the config\'s total_steps)')
  if heldout < -1:
    raise ValueError(f'heldout={heldout} must be >= 0 (or -1: a tenth, at most 100)')
  kind, _, rest = spec.partition(':')
  paths = re.split(r':(?!//)', rest) if rest else []  # gs://bucket/x keeps its '://'.
  if kind not in OWN_KINDS or len(paths) != (1 if kind == 'txt' else 2) or not all(paths):
    raise ValueError(f'data={spec!r}: own data is csv:CAPTIONS.csv:IMAGES, '
                     'coco:CAPTIONS.json:IMAGES or txt:IMAGES')
  source = (dict(kind='txt', images=paths[0]) if kind == 'txt' else
            dict(kind=kind, captions=paths[0], images=paths[1]))
  records, _ = sources.read_image_captions(source)
  held = min(100, len(records) // 10) if heldout < 0 else heldout
  train = len(records) - held
  if train < 1:
    raise ValueError(f'data={spec!r} holds {len(records)} images with a caption, '
                     f'{held} of them held out: nothing left to train on')
  config.input.sources = [dict(source, select=f':-{held}' if held else '')]
  remove_evals(config)
  if held:
    config.evals.retrieval = dict(kind='retrieval', every=0,
                                  sources=[dict(source, select=f'-{held}:')])
  if epochs > 0:
    batch = config.input.get_ref('batch_size')
    images = int(math.ceil(epochs * train))
    config.total_steps = (batch * 0 + images + batch - 1) // batch


def data_argument(config: ml_collections.ConfigDict, data: str, epochs: float = 0,
                  heldout: int = -1) -> bool:
  """Applies a `data=` config argument that names own data (`own_data`); returns False for
  any other value (the config's own presets: synthetic, shared, shards)."""
  if data.partition(':')[0] not in OWN_KINDS:
    return False
  own_data(config, data, epochs, heldout)
  return True
