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

from configs import common
from rils_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, init_from='', data_dir=common.SHARED_DATA)
  c = config_lib.finetune_base_config()  # 300 steps of 64, lr 1e-3, layer decay 0.65, ...
  c.init_from = arg.init_from
  cifar = os.path.join(arg.data_dir, 'cifar10_test')
  c.data.train = dict(kind='folder', root=cifar, per_class=':500')
  c.data.test = dict(kind='folder', root=cifar, per_class='500:')
  return c
