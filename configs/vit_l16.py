r"""RILS ViT-L/16: the paper's larger model (Yang et al., CVPR 2023), same recipe as vit_b16.py.

  python -m rils_jax.dry_run --config=configs/vit_l16.py:platform=tpu_v4_64   # memory check
  python -m rils_jax.main --config=configs/vit_l16.py:platform=tpu_v4_64 --workdir=gs://... \
      --distributed=on                                                  # on every TPU host

Model (RILS release, ../shared/docs/RILS_METHOD.md "Architectures"): ViT-L/16 at 224 px (width
1024, 24 blocks, 16 heads), 1-block decoder 1024 wide, text transformer 768 wide / 12 layers /
12 heads, context 77, joint width 768. Loss, optimiser, data and arguments as in vit_b16.py
(`:data=synthetic|shared|KIND:PATTERN,dtype=...,platform=NAME`).
"""

from configs import common


def get_config(arg=None):
  return common.paper_recipe(arg, 'L/16', dict(width=768, num_layers=12, num_heads=12),
                                 embed_dim=768)
