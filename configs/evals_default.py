r"""The transfer suite on the default generated data, for a checkpoint of configs/default.py.

  python -m rils_jax.main --config=configs/default.py --workdir=/tmp/rils_default
  python -m rils_jax.evaluate --config=configs/evals_default.py --checkpoint=/tmp/rils_default

Reads the generated zero-shot folder (20 classes 'colour shape', 20 pictures each) under
$RILS_JAX_CACHE or ~/.cache/rils_jax, which the training run writes; its first 10 pictures of
each class are the training pool of few-shot (1, 2, 5 shots, 5 seeds), low-shot (10% and 50%
of the pool's labels), the linear probe and k-NN (k = 5), and the last 10 the test set;
zero-shot and retrieval are the training run's own. About half a minute on 2 CPU cores.

Argument (optional): `configs/evals_default.py:num_train=4000` (as given to default.py).
"""

import os

from configs import common
from rils_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, num_train=4000)
  c = config_lib.base_config()
  c.evals.batch_size = 200
  common.synthetic_data(c, image_size=32, num_train=arg.num_train)
  folder = os.path.join(c.synthetic.root, 'zeroshot')
  pool = dict(kind='folder', root=folder, per_class=':10')
  test = dict(kind='folder', root=folder, per_class='10:')
  c.evals.fewshot = dict(kind='fewshot', train=pool, test=test, shots=(1, 2, 5), seeds=5)
  c.evals.lowshot = dict(kind='lowshot', train=pool, test=test, fractions=(0.1, 0.5), seeds=3)
  c.evals.linear_probe = dict(kind='linear_probe', train=pool, test=test)
  c.evals.knn = dict(kind='knn', train=pool, test=test, k=5)
  return c
