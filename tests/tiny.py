"""A tiny config and model shared by the tests."""

import ml_collections

from rils_jax import config_lib


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.total_steps = 20
  c.model.variant = 'Ti/8'
  c.model.vision = dict(width=32, depth=2, num_heads=2)
  c.model.image_size = 32
  c.model.decoder = dict(width=32, depth=1, num_heads=2)
  c.model.text = dict(width=32, num_layers=2, num_heads=2, context_length=8, vocab_size=64)
  c.model.embed_dim = 16
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 2
  c.input.batch_size = 8
  return apply_overrides(c, **overrides)


def apply_overrides(c: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """Sets dotted keys, e.g. apply_overrides(c, **{'loss.kind': 'clip'})."""
  for key, value in overrides.items():
    target = c
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return c


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The tiny model on a small generated dataset, as a config file for `rils_jax.main`:

    python -m rils_jax.main --config=tests/tiny.py:root=/tmp/shapes,steps=4 --workdir=DIR
  """
  arg = config_lib.parse_arg(arg, root='', steps=4)
  c = tiny_config(total_steps=arg.steps)
  c.optim.eps = 1e-3  # See test_train_step.test_eight_devices_match_one_device.
  c.checkpoint_every = arg.steps
  c.log_every = 1
  c.tokenizer.vocab_size = 64
  config_lib.synthetic_data(c, image_size=32, num_train=64, num_heldout=16,
                            zeroshot_per_class=2, root=arg.root)
  return c
