r"""configs/finetune_cifar10.py with MAE's fine-tuning augmentation and regularisation: the
CPU-sized counterpart of configs/finetune_mae_vit_b16.py, to compare against the plain recipe.

  python -m rils_jax.finetune \
      --config=configs/finetune_cifar10_mae.py:init_from=/tmp/rils_real --workdir=/tmp/rils_ft_mae

Same data split, steps, batch and optimiser as configs/finetune_cifar10.py (300 steps of 64,
lr 1e-3 with 30 warm-up steps, layer decay 0.65, weight decay 0.05), so that the two differ
only in what MAE adds (`apply_mae_recipe`): drop path 0.1, RandAugment 'rand-m9-mstd0.5-inc1',
random erasing 0.25, mixup 0.8 / cutmix 1.0 (prob 1, switch 0.5); label smoothing 0.1 in both.
MAE's lr rule (5e-4 * 64 / 256 = 1.25e-4) and 5% warm-up are meant for 100 epochs, not 300
steps, and are not used. README.md has measured figures.

Arguments: `init_from=PATH` (required), `data_dir=PATH` (default ../shared/data).
"""

from configs import finetune_cifar10
from configs import finetune_mae_vit_b16


def get_config(arg=None):
  return finetune_mae_vit_b16.apply_mae_recipe(finetune_cifar10.get_config(arg))
