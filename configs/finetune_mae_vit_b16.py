r"""MAE's ViT-B/16 ImageNet-1k fine-tuning recipe, for a RILS ViT-B/16 (configs/vit_b16.py).

  python -m rils_jax.finetune --config=configs/finetune_mae_vit_b16.py:init_from=DIR,data_dir=IN \
      --workdir=DIR_FT

Sources: MAE (He et al. 2022) App. A.2 Table 9 and the MAE repo's FINETUNE.md / main_finetune.py
(ViT-Base command line), which the RILS paper follows for end-to-end fine-tuning; BEiT (Bao et
al. 2022) App. / its repo's ViT-B command where it differs (noted below, not used):
- batch 1024 (MAE: 32 per GPU x 8 GPUs x 4 nodes), 100 epochs, 5 warm-up epochs
  (BEiT: 20), epochs of floor(1,281,167 / 1024) = 1251 steps (drop_last);
- AdamW beta (0.9, 0.999), weight decay 0.05, no gradient clipping;
- base lr 5e-4, lr = blr * batch / 256 = 2e-3 (BEiT: 4e-3), cosine to min lr 1e-6
  (min_lr_ratio = 1e-6 / 2e-3), layer-wise lr decay 0.65 (MAE and BEiT ViT-B);
- drop path 0.1 (ViT-B; MAE ViT-L 0.2);
- RandomResizedCrop (0.08-1, bicubic) + flip, RandAugment 'rand-m9-mstd0.5-inc1', random
  erasing 0.25 (mode 'pixel', one box);
- mixup 0.8, cutmix 1.0, prob 1.0, switch prob 0.5, label smoothing 0.1;
- global average pooling of the patch tokens (MAE `--global_pool`; BEiT `use_mean_pooling`).
Differences that remain (rils_jax/finetune.py): the pre-trained final LayerNorm is kept before
pooling (MAE replaces it by a new `fc_norm` after pooling); position embeddings stay fixed
sin-cos (MAE and BEiT learn the table); BEiT's layer scale (0.1) and relative position bias are
absent; evaluation resizes the shorter side to 224 and centre-crops (MAE: 256 then a 224 crop).

Arguments: `init_from=PATH` (required), `data_dir=PATH` (ImageNet as image folders
PATH/train/<class>/*.JPEG and PATH/val/<class>/*.JPEG, MAE's layout), `tfds=true` (read the
prepared TFDS `imagenet2012` under data_dir instead).
"""

import os

import ml_collections

from rils_jax import config_lib

STEPS_PER_EPOCH = 1_281_167 // 1024  # 1251: MAE's data loader drops the last partial batch.


def apply_mae_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns on MAE's regularisation and augmentation (drop path 0.1, RandAugment m9-mstd0.5-inc1,
  random erasing 0.25, mixup 0.8 / cutmix 1.0 / prob 1 / switch 0.5, label smoothing 0.1)
  in `c`; the optimiser settings and steps are left to the caller."""
  c.drop_path = 0.1
  c.label_smoothing = 0.1
  c.input.rand_augment = 'rand-m9-mstd0.5-inc1'
  c.input.random_erasing = 0.25
  c.mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
  return c


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, init_from='', data_dir='', tfds=False)
  c = config_lib.finetune_base_config()
  c.init_from = arg.init_from
  apply_mae_recipe(c)
  c.batch_size = 1024
  c.total_steps = 100 * STEPS_PER_EPOCH
  c.image_size = 224
  lr = 5e-4 * c.batch_size / 256
  c.optim = dict(lr=lr, warmup_steps=5 * STEPS_PER_EPOCH, min_lr_ratio=1e-6 / lr, b1=0.9,
                 b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip=0.0, layer_decay=0.65)
  c.input.crop_scale = (0.08, 1.0)
  c.input.num_workers = 10    # MAE's --num_workers.
  c.eval_batch_size = 1000
  c.eval_every = 10 * STEPS_PER_EPOCH
  c.log_every = 100
  c.checkpoint_every = STEPS_PER_EPOCH
  if arg.tfds:
    c.data.train = dict(kind='tfds', name='imagenet2012', split='train', data_dir=arg.data_dir)
    c.data.test = dict(kind='tfds', name='imagenet2012', split='validation',
                       data_dir=arg.data_dir)
  else:
    c.data.train = dict(kind='folder', root=os.path.join(arg.data_dir, 'train'))
    c.data.test = dict(kind='folder', root=os.path.join(arg.data_dir, 'val'))
  return c
