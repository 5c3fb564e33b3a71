r"""End-to-end fine-tuning of a pre-trained RILS vision encoder for image classification.

  python -m rils_jax.finetune --config=configs/finetune_cifar10.py:init_from=/tmp/rils_real \
      --workdir=/tmp/rils_ft

The classifier is the pre-trained ViT encoder (its `visual` parameters, restored from any
checkpoint of a `rils_jax.main` run) followed by the average of the patch tokens after the final
LayerNorm (the features the RILS image embedding pools) and a linear `head` initialised near
zero. Recipe (MAE, He et al. 2022, App. A.2; BEiT, Bao et al. 2022): AdamW (0.9, 0.999), weight
decay 0.05, warm-up then cosine decay, layer-wise learning-rate decay (`optim.layerwise_lr_scales`,
0.65 for ViT-B in MAE / BEiT), label smoothing 0.1, RandomResizedCrop (0.08-1) and horizontal
flips. Not included: RandAugment, mixup / cutmix, drop path, EMA (they matter at ImageNet scale).

Writes WORKDIR/metrics.jsonl and TensorBoard events (train loss, test top-1 / top-5 every
`eval_every` steps and at the end) and the final parameters to WORKDIR/params (orbax); a workdir
that is not empty is refused, so nothing saved there is overwritten. WORKDIR and `init_from` may
be gs:// URLs (rils_jax/storage.py).
"""

import functools
import json
import time
from typing import Dict

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

from rils_jax import config_lib
from rils_jax import console
from rils_jax import metric_writer
from rils_jax import optim
from rils_jax import sharding
from rils_jax import storage
from rils_jax.data import pipeline
from rils_jax.data import transforms
from rils_jax.evals import datasets
from rils_jax.evals import restore as restore_lib
from rils_jax.models import rils as rils_lib
from rils_jax.models import vit


class Classifier(nn.Module):
  """ViT encoder (named `visual`, as in `RILS`) + mean of the patch tokens + linear `head`."""
  patch_size: int
  width: int
  depth: int
  num_heads: int
  num_classes: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    """float (B, H, W, 3) normalised pixels -> float32 (B, num_classes) logits."""
    tokens = vit.Encoder(self.patch_size, self.width, self.depth, self.num_heads,
                         dtype=self.dtype, name='visual')(images)
    pooled = tokens[:, 1:].mean(axis=1).astype(jnp.float32)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(2e-5),
                    name='head')(pooled)


class TrainCrop(grain.transforms.RandomMap):
  """(image, label) -> dict(image uint8 (S, S, 3), label), RandomResizedCrop + random flip; None
  for an unreadable image."""

  def __init__(self, image_size: int, crop_scale):
    self.image_size, self.crop_scale = image_size, tuple(crop_scale)

  def random_map(self, element, rng: np.random.Generator):
    image, label = element
    try:
      pixels = transforms.decode_crop(image, self.image_size, rng, self.crop_scale)
    except transforms.BadImageError as e:
      logging.warning('Skipping training image: %s', e)
      return None
    if rng.random() < 0.5:
      pixels = pixels[:, ::-1]
    return dict(image=np.ascontiguousarray(pixels), label=np.int64(label))


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
                  image_size: int):
  """Endless shuffled batches (dict image uint8 (B, S, S, 3), label int64 (B,))."""
  ds = grain.MapDataset.source(data.items).seed(config.seed).shuffle().repeat()
  ds = ds.random_map(TrainCrop(image_size, config.input.crop_scale)).to_iter_dataset()
  ds = ds.filter(SkipGuard())
  if config.input.num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.input.num_workers))
  return iter(ds.batch(config.batch_size, drop_remainder=True))


def init_params(model: Classifier, pretrained_visual, image_size: int, seed: int):
  """The classifier's parameters: `pretrained_visual` for the encoder, a fresh head."""
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, image_size, image_size, 3)))
  params = nn.unbox(params['params'])
  have = jax.tree.map(jnp.shape, params['visual'])
  got = jax.tree.map(jnp.shape, pretrained_visual)
  if have != got:
    raise ValueError('the pre-trained encoder does not fit the classifier built from its config')
  return dict(params, visual=jax.tree.map(jnp.asarray, pretrained_visual))


def finetune(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Fine-tunes and evaluates; returns the final test metrics (`test/top1`, `test/top5`).

  Raises:
    ValueError: for a bad config (an unknown key, see `config_lib.finetune_base_config`), a
      workdir that is not empty, datasets whose classes differ,
      or a dataset none of whose images can be read.
    FileNotFoundError: for a missing checkpoint or dataset.
    RuntimeError: when 1000 training images in a row cannot be read.
  """
  # On a bucket the logs are written to a local staging folder and uploaded
  # (rils_jax/storage.py); for a local workdir `logs.local` is the workdir.
  logs = storage.Mirror(workdir, uploads=('metrics.jsonl', 'tensorboard'))
  try:
    return _finetune(config, workdir, logs.local)
  finally:
    logs.close()


def _finetune(config: ml_collections.ConfigDict, workdir: str, local: str) -> Dict[str, float]:
  config_lib.check_finetune_keys(config)
  if not config.init_from:
    raise ValueError('config.init_from must name a pre-training workdir or checkpoint')
  storage.check_path(workdir, 'the workdir')
  if storage.is_file(workdir) or (storage.is_dir(workdir) and
                                  any(epath.Path(workdir).iterdir())):
    raise ValueError(f'the workdir {workdir} is not empty (fine-tuned parameters, or another '
                     "run's files, would be mixed up or overwritten); use a new workdir")
  if config.batch_size < 1 or config.total_steps < 1 or not 0 < config.optim.layer_decay <= 1:
    raise ValueError('batch_size and total_steps must be >= 1 and optim.layer_decay in (0, 1]')
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
  image_size = pre.model.image_size
  model = Classifier(patch, width, depth, heads, len(train_data.classes),
                     dtype=rils_lib.compute_dtype(pre.model.dtype))
  mesh = restore_lib.data_parallel_mesh()
  if config.batch_size % mesh.size:
    raise ValueError(f'batch_size={config.batch_size} must be a multiple of the {mesh.size} '
                     'devices')
  params = init_params(model, restored.params['visual'], image_size, config.seed)
  optimizer = optim.make_finetune_optimizer(config, params, depth)
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  params = jax.device_put(params, replicated)
  opt_state = jax.device_put(optimizer.init(params), replicated)
  def normalize(images):
    return transforms.normalize(images, pre.input)

  @functools.partial(jax.jit, donate_argnums=(0, 1),
                     in_shardings=(replicated, replicated, batch_sharding, batch_sharding),
                     out_shardings=(replicated, replicated, replicated))
  def train_step(params, opt_state, images, labels):
    def loss_fn(p):
      logits = model.apply({'params': p}, normalize(images))
      targets = optax.smooth_labels(jax.nn.one_hot(labels, model.num_classes),
                                    config.label_smoothing)
      return optax.softmax_cross_entropy(logits, targets).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  predict = jax.jit(lambda p, x: model.apply({'params': p}, normalize(x)),
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

  storage.prepare_workdir(workdir)
  writer = metric_writer.MetricWriter(local)
  storage.write_text(storage.join(workdir, 'config.json'),
                     json.dumps(config.to_dict(), indent=2, default=str))
  logging.info('Fine-tuning %s (step %d): %d classes, %d training / %d test images',
               restored.path, restored.step, len(train_data.classes), len(train_data),
               len(test_data))
  batches = train_batches(train_data, config, image_size)
  start = time.time()
  results = {}
  for step in range(1, config.total_steps + 1):
    batch = next(batches)
    params, opt_state, loss = train_step(params, opt_state, batch['image'], batch['label'])
    if step % config.log_every == 0 or step in (1, config.total_steps):
      writer.write(step, {'loss': float(loss),
                          'images_per_sec': step * config.batch_size / (time.time() - start)})
      print(f'step {step}/{config.total_steps}  loss {float(loss):.4f}', flush=True)
    if step == config.total_steps or (config.eval_every and step % config.eval_every == 0):
      results = evaluate(params)
      writer.write(step, results)
      print(f'Evaluation at step {step}:', json.dumps(results, sort_keys=True), flush=True)
  if hasattr(batches, 'close'):  # Stops grain's workers.
    batches.close()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(storage.join(storage.absolute(workdir), 'params'), jax.device_get(params))
  checkpointer.wait_until_finished()  # The save is asynchronous.
  checkpointer.close()
  writer.close()
  print(f'Fine-tuning done: {config.total_steps} steps in {time.time() - start:.1f} s; '
        f'parameters in {storage.join(workdir, "params")}', flush=True)
  return results


def _define_flags():
  config_flags.DEFINE_config_file('config', None, 'Fine-tuning config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where metrics and the fine-tuned parameters go.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.quiet_libraries()
  try:
    finetune(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    raise SystemExit(f'error: {e}') from e


if __name__ == '__main__':
  _define_flags()
  app.run(main)
