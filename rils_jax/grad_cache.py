"""GradCache: the full-batch gradient of a loss that couples the batch, at the activation memory
of one micro-batch (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup", Sec. 3).

A contrastive loss (and RILS's reconstruction loss, whose prototypes are all captions of the
batch) is not a sum over examples, so summing the gradients of independent micro-batch losses
would change the objective (fewer negatives, fewer prototypes). GradCache instead:
  1. computes every micro-batch's outputs (embeddings, features) without keeping activations;
  2. computes the loss of the whole batch from those outputs and its gradient with respect to
     them (and to any parameter the loss reads directly, such as a temperature);
  3. re-runs each micro-batch's forward pass and back-propagates its slice of the output
     gradient (a vector-Jacobian product), summing the parameter gradients.
The result equals the full-batch gradient up to float rounding, for one extra forward pass.
"""

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp


def _splitter(accum: int, sharding: Optional[jax.sharding.Sharding]):
  """x (B, ...) -> (A, B / A, ...): micro-batch a holds rows a, a + A, a + 2A, ... (see
  `grad_cache`), constrained to `sharding` when given."""

  def split(x):
    x = jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
    if sharding is not None:
      x = jax.lax.with_sharding_constraint(x, sharding)
    return x

  return split


def grad_cache(features_fn: Callable[[Any, Any], Any],
               loss_fn: Callable[[Any, Any], Tuple[jax.Array, Any]], params, inputs,
               num_micro_batches: int, *,
               micro_batch_sharding: Optional[jax.sharding.Sharding] = None,
               param_shardings=None) -> Tuple[Tuple[jax.Array, Any], Any]:
  """`jax.value_and_grad(lambda p: loss_fn(p, features_fn(p, inputs)), has_aux=True)(params)`
  computed `num_micro_batches` rows-at-a-time (see the module docstring). Traceable (`jit`).

  Micro-batch a holds rows a, a + A, a + 2A, ... of the batch: a strided split keeps every
  micro-batch spread over all data-parallel devices when the batch is sharded by rows.

  Args:
    features_fn: (params, inputs) -> outputs, a pytree of arrays whose leading axis is the batch
      (rows independent of each other: the per-example part of the model).
    loss_fn: (params, outputs) -> (scalar loss, aux): the batch-coupled part; may also read
      parameters directly (their gradient is added to the one through `features_fn`).
    params: the parameter pytree.
    inputs: a pytree of arrays with leading batch axis B (B divisible by `num_micro_batches`).
    num_micro_batches: A >= 1.
    micro_batch_sharding: when given, the sharding of the inputs stacked as (A, B / A, ...),
      e.g. `NamedSharding(mesh, P(None, data_axes))`.
    param_shardings: when given, the shardings of the gradient accumulator (a pytree like
      `params`), e.g. the parameters' own.

  Returns:
    ((loss, aux), grads): the full batch's loss and aux, and the gradient of the loss with
    respect to `params` (a pytree like `params`).
  """
  accum = num_micro_batches
  split = _splitter(accum, micro_batch_sharding)

  def merge(x):
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])

  micro = jax.tree.map(split, inputs)
  _, outputs = jax.lax.scan(lambda _, mb: (None, features_fn(params, mb)), None, micro)
  outputs = jax.tree.map(merge, outputs)
  (loss, aux), (d_params, d_outputs) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(params, outputs)

  def backward(grads, xs):
    micro_batch, d_out = xs
    _, vjp = jax.vjp(lambda p: features_fn(p, micro_batch), params)
    return jax.tree.map(jnp.add, grads, vjp(d_out)[0]), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  if param_shardings is not None:
    zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
  grads, _ = jax.lax.scan(backward, zeros, (micro, jax.tree.map(split, d_outputs)))
  return (loss, aux), jax.tree.map(jnp.add, grads, d_params)


def summed_gradients(loss_fn: Callable[[Any, Any], Tuple[jax.Array, Any]], params, inputs,
                     num_micro_batches: int, *,
                     micro_batch_sharding: Optional[jax.sharding.Sharding] = None,
                     param_shardings=None) -> Tuple[Tuple[jax.Array, Any], Any]:
  """`jax.value_and_grad(loss_fn, has_aux=True)(params, inputs)` for a loss that is a mean of
  per-example terms (MAE's pixel loss: every example has the same number of masked patches), as
  the mean of the micro-batches' losses, gradients and aux values: plain accumulation, one
  forward and backward pass per micro-batch and nothing kept between them. Exact for such a
  loss; use `grad_cache` for a loss that couples the batch. Traceable (`jit`).

  Args: as `grad_cache`'s, with `loss_fn(params, micro_batch_inputs) -> (loss, aux)`.

  Returns:
    ((loss, aux), grads) averaged over the micro-batches (aux leaves must be float scalars).
  """
  accum = num_micro_batches
  split = _splitter(accum, micro_batch_sharding)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def body(carry, micro_batch):
    (loss, aux), grads = grad_fn(params, micro_batch)
    return jax.tree.map(jnp.add, carry, ((loss, aux), grads)), None

  zeros = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: split(x)[0], inputs))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
  if param_shardings is not None:
    zeros = (zeros[0], jax.lax.with_sharding_constraint(zeros[1], param_shardings))
  total, _ = jax.lax.scan(body, zeros, jax.tree.map(split, inputs))
  return jax.tree.map(lambda x: x / accum, total)
