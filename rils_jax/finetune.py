r"""End-to-end fine-tuning of a pre-trained RILS vision encoder for image classification.

  python -m rils_jax.finetune --config=configs/finetune_cifar10.py:init_from=/tmp/rils_real \
      --workdir=/tmp/rils_ft

The classifier is the pre-trained ViT encoder (its `visual` parameters, restored from any
checkpoint of a `rils_jax.main` run) followed by the average of the patch tokens after the final
LayerNorm (the features the RILS image embedding pools) and a linear `head` initialised near
zero (N(0, 2e-5), MAE's trunc_normal(std=2e-5)). MAE's global-pool head pools first and then
applies a new LayerNorm (`fc_norm`), leaving the pre-trained final norm out; here the
pre-trained norm is kept, so the classifier sees the features pre-training produced.

Recipe (MAE, He et al. 2022, App. A.2 and FINETUNE.md; BEiT, Bao et al. 2022), each part a
config switch (config_lib.finetune_base_config):
- AdamW (0.9, 0.999), weight decay 0.05, warm-up then cosine decay, layer-wise learning-rate
  decay (`optim.layerwise_lr_scales`, 0.65 for ViT-B);
- label smoothing (0.1);
- RandomResizedCrop (0.08-1) and horizontal flips, then RandAugment (`input.rand_augment`,
  'rand-m9-mstd0.5-inc1', rils_jax/data/augment.py) and random erasing (`input.random_erasing`,
  0.25, boxes drawn on the host, filled with N(0, 1) after normalisation);
- mixup / CutMix (`mixup`, alphas 0.8 / 1.0, rils_jax/mixup.py) with soft-target
  cross-entropy;
- drop path (`drop_path`, 0.1 at the last block, linear from 0; vit.Encoder).
Not included: EMA, BEiT's layer scale and relative position bias (the pre-trained encoder has
neither).

Resolution (`image_size`, 0: the checkpoint's). The encoder's position embedding is the fixed
2-D sin-cos function of the patch grid (vit.sincos_pos_embed_2d, as in pre-training), so at
another resolution it is recomputed for the new grid: exact for a fixed embedding and no new
parameters (big_vision's ViT does the same with `posemb='sincos2d'`). The release does
otherwise: its fine-tuning ViT (vision_transformer.py `VisionTransformer`, BEiT / MAE style:
drop path, optional layer scale) has `pos_embed` as a learned nn.Parameter, which loading the
checkpoint fills with the pre-training's fixed sin-cos table and which then trains; at another
resolution MAE / BEiT resize that table bicubically first (MAE util/pos_embed.py
`interpolate_pos_embed`), so a position keeps its fraction of the image rather than its patch
index. Restoring that needs a learned table in vit.Encoder, which rils_jax does not have.

Workdir. It gets `config.json`, `metrics.jsonl` and TensorBoard events (train loss, test top-1
/ top-5 every `eval_every` steps and at the end), orbax checkpoints of the training state and the
data position under `checkpoints/` (rils_jax/checkpoints.py: every `checkpoint_every` steps and
at the end, asynchronous and atomic) and at the end the parameters in `params/` (blocks
unrolled, `blocks_<i>`, whatever `scan_layers`). Running the same command again in the workdir
of an unfinished run resumes from its last checkpoint, of either layer layout (the
data position, the per-step random draws and the state are restored, so the result equals an
uninterrupted run bitwise); SIGTERM saves a checkpoint after the current step and exits 0
(rils_jax/preemption.py). A workdir that holds anything else (a finished run, another config's
run, other files) is refused, and nothing in it is touched. Steps trained after the last
checkpoint and before a kill are logged twice in metrics.jsonl; the later line counts. WORKDIR
and `init_from` may be gs:// URLs (rils_jax/storage.py).
"""

import functools
import json
import time
from typing import Any, Dict, Optional

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app
from absl import flags
from absl import logging
from etils import epath
from ml_collections import config_flags
from PIL import Image

from rils_jax import checkpoints as checkpoints_lib
from rils_jax import config_lib
from rils_jax import console
from rils_jax import metric_writer
from rils_jax import mixup
from rils_jax import optim
from rils_jax import preemption
from rils_jax import sharding
from rils_jax import storage
from rils_jax.data import augment
from rils_jax.data import pipeline
from rils_jax.data import transforms
from rils_jax.evals import datasets
from rils_jax.evals import restore as restore_lib
from rils_jax.models import layout
from rils_jax.models import rils as rils_lib
from rils_jax.models import vit

# What a fine-tuning workdir holds (`params` only once finished).
RUN_FILES = ('config.json', 'metrics.jsonl', 'tensorboard', 'checkpoints')
# Config keys that do not change what is computed: a resumed run may change them (the layer
# layout too: the checkpoint is converted, models/layout.py).
RESUME_MAY_CHANGE = ('log_every', 'eval_every', 'eval_batch_size', 'checkpoint_every',
                     'checkpoint_minutes', 'keep_checkpoints', 'keep_every', 'attention',
                     'scan_layers')


class Classifier(nn.Module):
  """ViT encoder (named `visual`, as in `RILS`) + mean of the patch tokens + linear `head`.
  `drop_path`, `attention`, `scan_layers`: see `vit.Encoder`."""
  patch_size: int
  width: int
  depth: int
  num_heads: int
  num_classes: int
  dtype: jnp.dtype = jnp.float32
  drop_path: float = 0.0
  attention: str = 'auto'
  scan_layers: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    """float (B, H, W, 3) normalised pixels -> float32 (B, num_classes) logits. `train` turns
    drop path on (needs a 'dropout' rng)."""
    tokens = vit.Encoder(self.patch_size, self.width, self.depth, self.num_heads,
                         dtype=self.dtype, drop_path=self.drop_path, attention=self.attention,
                         scan_layers=self.scan_layers,
                         name='visual')(images, deterministic=not train)
    pooled = tokens[:, 1:].mean(axis=1).astype(jnp.float32)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(2e-5),
                    name='head')(pooled)


class TrainTransform(grain.transforms.RandomMap):
  """(image, label) -> dict(image uint8 (S, S, 3), label int64, erase int32 (4,)):
  RandomResizedCrop, random flip, then RandAugment when given (MAE's order); `erase` is the
  random-erasing box (top, bottom, left, right), empty when not erased. None for an unreadable
  image. All draws come from grain's per-element `rng`."""

  def __init__(self, image_size: int, crop_scale,
               rand_augment: Optional[augment.RandAugment] = None, erasing: float = 0.0):
    self.image_size, self.crop_scale = image_size, tuple(crop_scale)
    self.rand_augment, self.erasing = rand_augment, erasing
    self.warn_skip = transforms.SkipWarnings()

  def random_map(self, element, rng: np.random.Generator):
    image, label = element
    try:
      pixels = transforms.decode_crop(image, self.image_size, rng, self.crop_scale)
    except transforms.BadImageError as e:
      self.warn_skip('training image', e)
      return None
    if rng.random() < 0.5:
      pixels = pixels[:, ::-1]
    if self.rand_augment is not None:
      pixels = np.asarray(self.rand_augment(Image.fromarray(np.ascontiguousarray(pixels)), rng))
    box = augment.NO_BOX
    if self.erasing:
      box = augment.erasing_box(rng, self.image_size, self.image_size, self.erasing)
    return dict(image=np.ascontiguousarray(pixels), label=np.int64(label),
                erase=np.array(box, np.int32))


class SkipGuard(grain.transforms.Filter):
  """Drops unreadable images (None), raising after `limit` of them in a row: a training set
  that is (almost) all unreadable would otherwise never give a batch."""

  def __init__(self, limit: int = 1000):
    self.limit, self.in_a_row = limit, 0

  def filter(self, element) -> bool:
    if element is not None:
      self.in_a_row = 0
      return True
    self.in_a_row += 1
    if self.in_a_row >= self.limit:
      raise RuntimeError(f'{self.limit} training images in a row could not be read')
    return False


def first_readable(data: datasets.LabelledImages, name: str) -> int:
  """Index of the first image of `data` that decodes.

  Raises:
    ValueError: when none does.
  """
  for i in range(len(data)):
    try:
      transforms.load_image(data.items[i][0])
      return i
    except transforms.BadImageError:
      continue
  raise ValueError(f'no image of the {name} set {data.name} can be read')


def train_batches(data: datasets.LabelledImages, config: ml_collections.ConfigDict,
                  image_size: int, mean=config_lib.IMAGENET_MEAN):
  """Endless shuffled batches (dict image uint8 (B, S, S, 3), label int64 (B,), erase int32
  (B, 4)): a grain iterator whose position orbax checkpoints. `mean` is the normalisation
  mean, whose colour RandAugment's geometric ops fill with."""
  spec = config.input.rand_augment
  rand_augment = augment.parse(spec, mean) if spec else None
  ds = grain.MapDataset.source(data.items).seed(config.seed).shuffle().repeat()
  ds = ds.random_map(TrainTransform(image_size, config.input.crop_scale, rand_augment,
                                    config.input.random_erasing)).to_iter_dataset()
  ds = ds.filter(SkipGuard())
  if config.input.num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.input.num_workers))
  return iter(ds.batch(config.batch_size, drop_remainder=True))


def init_params(model: Classifier, pretrained_visual, image_size: int, seed: int):
  """The classifier's parameters: `pretrained_visual` (either layer layout, see
  models/layout.py) for the encoder, in the classifier's layout, and a fresh head.

  Raises:
    ValueError: when the encoder's shapes differ from the classifier's.
  """
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, image_size, image_size, 3)))
  params = nn.unbox(params['params'])
  pretrained_visual = layout.to_layout(pretrained_visual, model.scan_layers)
  have = jax.tree.map(jnp.shape, params['visual'])
  got = jax.tree.map(jnp.shape, pretrained_visual)
  if have != got:
    raise ValueError('the pre-trained encoder does not fit the classifier built from its config')
  return dict(params, visual=jax.tree.map(jnp.asarray, pretrained_visual))


def fill_boxes(images: jax.Array, boxes: jax.Array, noise: jax.Array) -> jax.Array:
  """Random erasing's fill (timm, mode 'pixel'): `noise` inside each sample's box.

  Args:
    images, noise: float (B, H, W, C).
    boxes: int32 (B, 4) (top, bottom, left, right); an empty box leaves the sample as it is.
  """
  rows = jnp.arange(images.shape[1])[None, :, None]
  cols = jnp.arange(images.shape[2])[None, None, :]
  b = boxes[:, :, None, None]
  inside = (rows >= b[:, 0]) & (rows < b[:, 1]) & (cols >= b[:, 2]) & (cols < b[:, 3])
  return jnp.where(inside[..., None], noise, images)


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` over `config_lib.finetune_base_config()`: the keys a config leaves out (older
  configs, hand-made ones) take their defaults."""

  def merge(base, over):
    out = dict(base)
    for key, value in over.items():
      out[key] = (merge(base[key], value) if isinstance(base.get(key), dict) and
                  isinstance(value, dict) else value)
    return out

  return ml_collections.ConfigDict(merge(config_lib.finetune_base_config().to_dict(),
                                         config.to_dict()))


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks what would fail late or silently, before anything is read or written.

  Raises:
    ValueError: for an unknown key, a missing `init_from`, non-positive sizes, a layer decay
      outside (0, 1], a drop path outside [0, 1), an unknown attention, probabilities outside
      [0, 1], negative mixup alphas, an odd batch with mixing on, a bad RandAugment spec or
      checkpoint setting.
    FileNotFoundError: for an `init_from` that holds no checkpoint.
  """
  if not config.init_from:
    raise ValueError('config.init_from must name a pre-training workdir or checkpoint')
  if config.batch_size < 1 or config.total_steps < 1 or not 0 < config.optim.layer_decay <= 1:
    raise ValueError('batch_size and total_steps must be >= 1 and optim.layer_decay in (0, 1]')
  if config.log_every < 1 or config.eval_every < 0 or config.image_size < 0:
    raise ValueError(f'config.log_every={config.log_every} must be >= 1, eval_every='
                     f'{config.eval_every} and image_size={config.image_size} >= 0')
  if not 0 <= config.drop_path < 1:
    raise ValueError(f'config.drop_path={config.drop_path} must be in [0, 1)')
  if config.attention not in vit.ATTENTIONS:
    raise ValueError(f'config.attention must be one of {vit.ATTENTIONS}, got {config.attention!r}')
  if not 0 <= config.input.random_erasing <= 1:
    raise ValueError(f'config.input.random_erasing={config.input.random_erasing} must be a '
                     'probability in [0, 1]')
  m = config.mixup
  mixup.check(m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob, config.batch_size)
  if config.input.rand_augment:
    augment.parse(config.input.rand_augment)
  checkpoints_lib.check_config(config)


def _flat(tree, prefix=''):
  """{'a.b': value} of a nested dict, values as JSON gives them back (tuples -> lists)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = json.loads(json.dumps(value, default=str))
  return out


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> bool:
  """Whether `workdir` holds an unfinished fine-tuning run of `config` to resume (True) or is
  new or empty (False). Reads only.

  Raises:
    ValueError: for a file, a finished run (it has `params/`), another config's run (one that
      differs in a key other than `RESUME_MAY_CHANGE`), or a folder with other files.
  """
  storage.check_path(workdir, 'the workdir')
  if storage.is_file(workdir):
    raise ValueError(f'the workdir {workdir} is a file; give a folder')
  if not storage.is_dir(workdir):
    return False
  names = sorted(p.name for p in epath.Path(workdir).iterdir())
  if not names:
    return False
  if 'params' in names:
    raise ValueError(f'the workdir {workdir} is not empty: it holds a finished fine-tuning run '
                     '(params/); use a new workdir')
  # An orbax temporary folder left by a kill during the final save of params/.
  others = [n for n in names if n not in RUN_FILES and
            not n.startswith('params.orbax-checkpoint-tmp')]
  if others or 'config.json' not in names:
    found = ', '.join(others[:3]) if others else 'no config.json'
    raise ValueError(f'the workdir {workdir} is not empty and holds no fine-tuning run '
                     f'({found}); use a new or empty workdir')
  try:
    saved = _flat(json.loads(storage.read_bytes(storage.join(workdir, 'config.json'))))
  except (OSError, ValueError) as e:
    raise ValueError(f'{storage.join(workdir, "config.json")} cannot be read ({e}); use a new '
                     'workdir') from e
  current = _flat(config.to_dict())
  differ = sorted(k for k in set(saved) | set(current)
                  if k not in RESUME_MAY_CHANGE and saved.get(k) != current.get(k))
  if differ:
    shown = '; '.join(f'{k}: {saved.get(k)!r} there, {current.get(k)!r} here' for k in differ[:3])
    raise ValueError(f'the workdir {workdir} holds a fine-tuning run of another config ({shown}'
                     f'{"; ..." if len(differ) > 3 else ""}); resume it with the same config or '
                     'use a new workdir')
  return True


def finetune(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Fine-tunes and evaluates, resuming the unfinished run of the same config in `workdir`;
  returns the final test metrics (`test/top1`, `test/top5`), or {} when SIGTERM stopped the
  run (after saving a checkpoint).

  Raises:
    ValueError: for a bad config (an unknown key, see `config_lib.finetune_base_config`, or a
      bad value, see `check_config`), a workdir that holds something else (see
      `check_workdir`), an image size that the patch size does not divide, datasets whose
      classes differ, or a dataset none of whose images can be read.
    FileNotFoundError: for a missing checkpoint or dataset.
    RuntimeError: when 1000 training images in a row cannot be read.
  """
  config_lib.check_finetune_keys(config)
  config = with_defaults(config)
  check_config(config)
  resume = check_workdir(workdir, config)
  watcher = preemption.Watcher()  # Installed before the (long) set-up: no notice is lost.
  # On a bucket the logs are written to a local staging folder and uploaded
  # (rils_jax/storage.py); for a local workdir `logs.local` is the workdir.
  logs = storage.Mirror(workdir, uploads=('metrics.jsonl', 'tensorboard'),
                        continues=('metrics.jsonl',))
  try:
    return _finetune(config, workdir, logs, watcher, resume)
  finally:
    logs.close()
    watcher.close()


def make_train_step(model: Classifier, optimizer: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, input_config, mesh):
  """The jitted step (state, batch, mix) -> (state, loss): normalisation, random erasing,
  mixup / CutMix (`mix`: `mixup.MixParams.as_arrays()`), soft-target cross-entropy with label
  smoothing, drop path, and the optimizer update. `state` is dict(step, params, opt_state),
  replicated; `batch` is split over the mesh's devices. Drop path and erasing noise use keys
  of (seed, step), so that a resumed run draws what the interrupted one would have."""
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  mixing = bool(config.mixup.prob and (config.mixup.mixup_alpha or config.mixup.cutmix_alpha))
  base_key = jax.random.PRNGKey(config.seed)

  @functools.partial(jax.jit, donate_argnums=(0,),
                     in_shardings=(replicated, batch_sharding, replicated),
                     out_shardings=(replicated, replicated))
  def train_step(state, batch, mix):
    drop_key, noise_key = jax.random.split(jax.random.fold_in(base_key, state['step'] + 1))

    def loss_fn(params):
      images = transforms.normalize(batch['image'], input_config)
      if config.input.random_erasing:
        images = fill_boxes(images, batch['erase'],
                            jax.random.normal(noise_key, images.shape, images.dtype))
      if mixing:
        images = mixup.mix_images(images, mix['weights'], mix['cutmix'], mix['box'])
        targets = mixup.mix_targets(batch['label'], model.num_classes, mix['weights'],
                                    config.label_smoothing)
      else:
        targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], model.num_classes),
                                      config.label_smoothing)
      logits = model.apply({'params': params}, images, train=True, rngs={'dropout': drop_key})
      return optax.softmax_cross_entropy(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state['params'])
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    return dict(step=state['step'] + 1, params=optax.apply_updates(state['params'], updates),
                opt_state=opt_state), loss

  return train_step


def mix_params(config: ml_collections.ConfigDict, step: int, image_size: int) -> Dict[str, Any]:
  """The mixing of `step`'s batch (`mixup.draw` from a generator seeded by (seed, step)), as
  `make_train_step`'s `mix` argument."""
  m = config.mixup
  if not (m.prob and (m.mixup_alpha or m.cutmix_alpha)):
    return mixup.NO_MIX.as_arrays()
  return mixup.draw(np.random.default_rng([config.seed, step]), (image_size, image_size),
                    m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob).as_arrays()


def make_evaluator(model: Classifier, test_data: datasets.LabelledImages, image_size: int,
                   config: ml_collections.ConfigDict, input_config, mesh):
  """params -> test top-1 / top-5 on the resized, centre-cropped test images."""
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  predict = jax.jit(
      lambda p, x: model.apply({'params': p}, transforms.normalize(x, input_config)),
      in_shardings=(replicated, batch_sharding), out_shardings=replicated)

  def evaluate(params) -> Dict[str, float]:
    hits1 = hits5 = count = 0
    size = mesh.size * max(1, config.eval_batch_size // mesh.size)
    for batch in pipeline.eval_batches(test_data.items, image_size, size,
                                       config.input.num_workers):
      n = len(batch['label'])
      padded = np.zeros((size, *batch['image'].shape[1:]), np.uint8)
      padded[:n] = batch['image']
      top = np.argsort(-np.asarray(predict(params, padded))[:n], axis=1)[:, :5]
      hits1 += int(np.sum(top[:, 0] == batch['label']))
      hits5 += int(np.sum(np.any(top == batch['label'][:, None], axis=1)))
      count += n
    if not count:
      raise ValueError('no test image could be decoded')
    return {'test/top1': hits1 / count, 'test/top5': hits5 / count,
            'test/images': count, 'test/skipped_images': len(test_data) - count}

  return evaluate


def _finetune(config: ml_collections.ConfigDict, workdir: str, logs: storage.Mirror,
              watcher: preemption.Watcher, resume: bool) -> Dict[str, float]:
  train_data = datasets.load(config.data.train)
  test_data = datasets.load(config.data.test)
  if train_data.classes != test_data.classes:
    raise ValueError(f'train classes {train_data.classes} differ from test classes '
                     f'{test_data.classes}')
  for name, data in (('train', train_data), ('test', test_data)):
    first_readable(data, name)  # Fails now rather than loop or divide by zero later.
  restored = restore_lib.restore(config.init_from)
  pre = restored.config
  width, depth, heads, patch = rils_lib.vision_dims(pre.model)
  image_size = config.image_size or pre.model.image_size
  if image_size % patch:
    raise ValueError(f'config.image_size={image_size} must be a multiple of the patch size '
                     f'{patch}')
  dtype = rils_lib.compute_dtype(pre.model.dtype)
  vit.attention_implementation(config.attention, dtype, width // heads)  # Raises if it can't run.
  model = Classifier(patch, width, depth, heads, len(train_data.classes), dtype=dtype,
                     drop_path=config.drop_path, attention=config.attention,
                     scan_layers=bool(config.scan_layers))
  mesh = restore_lib.data_parallel_mesh()
  if config.batch_size % mesh.size:
    raise ValueError(f'batch_size={config.batch_size} must be a multiple of the {mesh.size} '
                     'devices')
  params = init_params(model, restored.params['visual'], image_size, config.seed)
  optimizer = optim.make_finetune_optimizer(config, params, depth)
  state = jax.device_put(dict(step=jnp.int32(0), params=params,
                              opt_state=optimizer.init(params)), sharding.replicated(mesh))
  train_step = make_train_step(model, optimizer, config, pre.input, mesh)
  evaluate = make_evaluator(model, test_data, image_size, config, pre.input, mesh)

  storage.prepare_workdir(workdir)
  if not resume:
    storage.write_text(storage.join(workdir, 'config.json'),
                       json.dumps(config.to_dict(), indent=2, default=str))
  checkpoints = checkpoints_lib.Checkpoints(workdir, config)
  batches = train_batches(train_data, config, image_size, pre.input.mean)
  writer = metric_writer.MetricWriter(logs.local)
  try:
    start_step = checkpoints.latest_step() or 0
    if start_step:
      state = checkpoints.restore(start_step, state, batches)
      console.say(f'Resuming the fine-tuning run in {workdir} from its checkpoint at step '
                  f'{start_step}')
    logging.info('Fine-tuning %s (step %d) at %d px: %d classes, %d training / %d test images',
                 restored.path, restored.step, image_size, len(train_data.classes),
                 len(train_data), len(test_data))
    start = time.time()
    for step in range(start_step + 1, config.total_steps + 1):
      state, loss = train_step(state, next(batches), mix_params(config, step, image_size))
      if step % config.log_every == 0 or step in (start_step + 1, config.total_steps):
        writer.write(step, {'loss': float(loss), 'images_per_sec':
                            (step - start_step) * config.batch_size / (time.time() - start)})
        print(f'step {step}/{config.total_steps}  loss {float(loss):.4f}', flush=True)
      preempted = watcher.reached(step)
      if preempted or step == config.total_steps or checkpoints.should_save(step):
        checkpoints.save(step, state, batches, config, restored.tokenizer.model_path)
        logs.flush()  # A resumed run finds the logs up to its checkpoint.
      if preempted:
        checkpoints.wait()
        console.say(f'Preempted ({watcher.signal_name}) at step {step}: saved the checkpoint '
                    f'{storage.join(checkpoints.directory, str(step))}; run the same command '
                    'again to resume from it.')
        return {}
      if step < config.total_steps and config.eval_every and step % config.eval_every == 0:
        results = evaluate(state['params'])
        writer.write(step, results)
        console.say(f'Evaluation at step {step}:', json.dumps(results, sort_keys=True))
    checkpoints.wait()
    results = evaluate(state['params'])
    writer.write(config.total_steps, results)
    console.say(f'Evaluation at step {config.total_steps}:', json.dumps(results, sort_keys=True))
    checkpointer = ocp.StandardCheckpointer()
    # One layout for every reader: the blocks unrolled, whatever `scan_layers` trained with.
    checkpointer.save(storage.join(storage.absolute(workdir), 'params'),
                      layout.unstack_layers(jax.device_get(state['params'])))
    checkpointer.wait_until_finished()  # The save is asynchronous.
    checkpointer.close()
    console.say(f'Fine-tuning done: steps {start_step + 1}-{config.total_steps} in '
                f'{time.time() - start:.1f} s; parameters in {storage.join(workdir, "params")}')
    return results
  finally:
    checkpoints.close()  # Waits for a save in flight: an error never loses it.
    if hasattr(batches, 'close'):  # Stops grain's workers (the last save has read the position).
      batches.close()
    writer.close()


def _define_flags():
  config_flags.DEFINE_config_file('config', None, 'Fine-tuning config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where metrics, checkpoints and the fine-tuned parameters '
                      'go; an unfinished run there of the same config is resumed.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.quiet_libraries()
  finetune(flags.FLAGS.config, flags.FLAGS.workdir)  # User errors: one line (console.run).


if __name__ == '__main__':
  _define_flags()
  console.run(main)
