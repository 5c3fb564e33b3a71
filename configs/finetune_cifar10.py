r"""Fine-tune a pre-trained RILS encoder on CIFAR-10 photos from ../shared/data (CPU-sized).

  python -m rils_jax.finetune \
      --config=configs/finetune_cifar10.py:init_from=/tmp/rils_real --workdir=/tmp/rils_ft

Training: the first 500 test photos of each CIFAR-10 class (5,000 images; ../shared/data has
only the test split), upscaled to the pre-training image size; test: the last 500 of each class.
300 steps of 64 images with layer-wise learning-rate decay 0.65 (MAE / BEiT) and the rest of
the recipe in rils_jax/finetune.py. The model, image size and normalisation come from the
checkpoint. For the 64 px ViT of configs/flickr8k_coco.py this takes a few minutes on 2 cores;
README.md has measured figures.

Arguments: `init_from=PATH` (required), `data_dir=PATH` (default ../shared/data).
"""

import os

import ml_collections

from rils_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, init_from='', data_dir=config_lib.SHARED_DATA)
  c = ml_collections.ConfigDict()
  c.init_from = arg.init_from
  c.seed = 0
  c.total_steps = 300
  c.batch_size = 64
  c.eval_batch_size = 500
  c.log_every = 25
  c.eval_every = 0   # Test-set evaluation every N steps (0: at the end only).
  c.label_smoothing = 0.1
  c.optim = dict(lr=1e-3, warmup_steps=30, min_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.05, grad_clip=0.0, layer_decay=0.65)
  c.input = dict(crop_scale=(0.08, 1.0), num_workers=0)
  cifar = os.path.join(arg.data_dir, 'cifar10_test')
  c.data = dict(train=dict(kind='folder', root=cifar, per_class=':500'),
                test=dict(kind='folder', root=cifar, per_class='500:'))
  return c
