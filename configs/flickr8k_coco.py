r"""A small RILS ViT on real photos: ../shared/data flickr8k_1k + coco_mini_train, on CPU.

  python -m rils_jax.main --config=configs/flickr8k_coco.py --workdir=/tmp/rils_real

Training data: the first 900 Flickr8k images (5 captions each) + the 80 COCO images (5 captions
each); held-out retrieval: the last 100 Flickr8k images with all 5 captions; zero-shot: CIFAR-10
test photos (100 per class, upscaled). A sentencepiece model (at most 2,000 pieces) is trained on
the training captions. The model is ViT-Ti-sized (width 192, 6 blocks, patch 8, 64 px) with a
width-192 text tower; at this scale (980 images) expect retrieval a few times above chance,
not CLIP-level transfer. See README.md for measured figures.

Arguments: `configs/flickr8k_coco.py:data_dir=PATH` (default ../shared/data beside the repo);
or this model on your own photos: `data=csv:CAPTIONS.csv:IMAGES` (or coco:JSON:IMAGES,
txt:IMAGES) with `epochs=E` and `heldout=N` (configs/common.py:own_data; README.md, "Your own
data").
"""

from configs import common
from rils_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data_dir=common.SHARED_DATA, data='shared', epochs=0.0,
                             heldout=-1)
  c = config_lib.base_config()
  c.total_steps = 600
  c.log_every = 50
  c.checkpoint_every = 300

  c.model.variant = 'Ti/8'
  c.model.vision = dict(width=192, depth=6, num_heads=3)
  c.model.image_size = 64
  c.model.decoder = dict(width=192, depth=1, num_heads=3)
  c.model.text = dict(width=192, num_layers=4, num_heads=3, context_length=32, vocab_size=2048)
  c.model.embed_dim = 128

  c.optim.lr = 5e-4
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.2

  c.input.batch_size = 64
  c.input.num_workers = 1
  c.tokenizer.vocab_size = 2000
  if not common.data_argument(c, arg.data, arg.epochs, arg.heldout):
    if arg.data != 'shared':
      raise ValueError(f"data must be 'shared' or own data ({common.OWN_KINDS}), got "
                       f'{arg.data!r}')
    common.shared_data(c, arg.data_dir, zeroshot_per_class=':100')
  c.evals.batch_size = 250
  return c
