r"""Would one dot over the tokens of RILS's two encoder passes beat two? Times the forward and
backward of a ViT-B/16 MLP (768 -> 3072 -> 768) and qkv projection (768 -> 2304) on the full
branch's tokens and the masked branch's apart (two dots per weight) and concatenated (one), in
one process, alternating, and prints one JSON line.

  .venv/bin/python benchmarks/packed_dots.py             # batch 8: 1,576 + 400 tokens

Fields: `apart_s`, `packed_s` (medians of `--rounds` timings), `packed_over_apart_speed` =
apart_s / packed_s (> 1: packing is faster), `rounds_*` (every timing), the token counts and
`max_gradient_difference` between the two forms' weight gradients (the same weights and tokens:
the same sums, up to float32 rounding). Float32, the default XLA flags of this process. Used
for issue 18's "batching the two encoder passes" (README, "Speed").
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rils_jax  # noqa: E402,F401  (its CPU defaults, as in training)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

flags.DEFINE_integer('batch_size', 8, 'Images per batch.')
flags.DEFINE_integer('width', 768, 'Token width (ViT-B: 768).')
flags.DEFINE_integer('full_tokens', 197, 'Tokens per image of the full branch (224 px, CLS).')
flags.DEFINE_integer('masked_tokens', 50, 'Tokens per image of the masked branch (25% + CLS).')
flags.DEFINE_integer('rounds', 8, 'Alternating timings of each form.')


def _dense_loss(x, fc1, fc2, qkv):
  return jnp.sum(jnp.tanh(x @ fc1) @ fc2) + jnp.sum((x @ qkv) ** 2)


def run(batch_size: int, width: int, full_tokens: int, masked_tokens: int, rounds: int) -> dict:
  """Compiles both forms, times them alternately; returns the figures (module docstring)."""
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  weights = (jax.random.normal(keys[0], (width, 4 * width)) * 0.02,
             jax.random.normal(keys[1], (4 * width, width)) * 0.02,
             jax.random.normal(keys[2], (width, 3 * width)) * 0.02)
  full = jax.random.normal(keys[3], (batch_size * full_tokens, width))
  masked = jax.random.normal(keys[4], (batch_size * masked_tokens, width))
  apart = jax.jit(jax.grad(lambda w, a, b: _dense_loss(a, *w) + _dense_loss(b, *w)))
  packed = jax.jit(jax.grad(lambda w, a, b: _dense_loss(jnp.concatenate([a, b]), *w)))
  forms = {'apart': apart, 'packed': packed}
  grads = {name: f(weights, full, masked) for name, f in forms.items()}
  difference = max(float(jnp.max(jnp.abs(a - b)))
                   for a, b in zip(grads['apart'], grads['packed']))
  times = {name: [] for name in forms}
  for _ in range(rounds):
    for name, f in forms.items():
      t = time.perf_counter()
      jax.block_until_ready(f(weights, full, masked))
      times[name].append(time.perf_counter() - t)
  apart_s, packed_s = statistics.median(times['apart']), statistics.median(times['packed'])
  return dict(apart_s=round(apart_s, 4), packed_s=round(packed_s, 4),
              packed_over_apart_speed=round(apart_s / packed_s, 3),
              rounds_apart=[round(x, 4) for x in times['apart']],
              rounds_packed=[round(x, 4) for x in times['packed']],
              tokens=dict(full=batch_size * full_tokens, masked=batch_size * masked_tokens),
              width=width, threads=len(os.sched_getaffinity(0)),
              max_gradient_difference=difference)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  print(json.dumps(run(f.batch_size, f.width, f.full_tokens, f.masked_tokens, f.rounds)))


if __name__ == '__main__':
  app.run(main)
