r"""The transfer suite on ../shared/data, for a checkpoint of any run (evaluation only).

  python -m rils_jax.evaluate --config=configs/evals_shared.py --checkpoint=/tmp/rils_real

Evaluators (one JSON line each; the model, tokenizer and image size come from the checkpoint):
- zeroshot: CIFAR-10 test, all 10,000 photos, CLIP's 18 CIFAR templates; top-1 / top-5.
- retrieval: the last 100 Flickr8k images (held out by configs/flickr8k_coco.py) with their 500
  captions; R@1/5/10 both ways.
- fewshot: 1, 5, 10 shots per class drawn from the first 500 CIFAR-10 photos of each class
  (5 seeds), closed-form ridge regression, tested on the last 500 of each class.
- lowshot: logistic regression on 1% and 10% of the 5,000 pool labels (3 seeds), same test set.
- linear_probe: logistic regression on all 5,000 pool photos (L2 chosen on 20% of them).
- knn: 20 nearest pool photos by cosine, weighted votes (temperature 0.07).
About 4 minutes on 2 CPU cores for the 64 px ViT of configs/flickr8k_coco.py.

Argument: `configs/evals_shared.py:data_dir=PATH` (default ../shared/data beside the repo).
"""

import os

from configs import common
from rils_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data_dir=common.SHARED_DATA)
  c = config_lib.base_config()
  c.evals.batch_size = 500
  common.shared_data(c, arg.data_dir)
  cifar = os.path.join(arg.data_dir, 'cifar10_test')
  pool = dict(kind='folder', root=cifar, per_class=':500')
  test = dict(kind='folder', root=cifar, per_class='500:')
  c.evals.fewshot = dict(kind='fewshot', train=pool, test=test, shots=(1, 5, 10), seeds=5)
  c.evals.lowshot = dict(kind='lowshot', train=pool, test=test, fractions=(0.01, 0.1), seeds=3)
  c.evals.linear_probe = dict(kind='linear_probe', train=pool, test=test)
  c.evals.knn = dict(kind='knn', train=pool, test=test, k=20, temperature=0.07)
  return c
