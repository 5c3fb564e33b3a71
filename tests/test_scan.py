"""config.model.scan_layers: the scanned towers start from the unrolled model's parameters and
compute the same losses and gradients, and every reader of parameters (resume, warm start,
fine-tuning, export) takes either layout (rils_jax/models/layout.py)."""

import json

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rils_jax import checkpoints as checkpoints_lib
from rils_jax import config_lib
from rils_jax import export
from rils_jax import finetune
from rils_jax import losses
from rils_jax import optim
from rils_jax import train_step as train_step_lib
from rils_jax.data import transforms
from rils_jax.models import layout
from rils_jax.models import rils as rils_lib
from rils_jax.models import vit
from tests import tiny

SCAN = {'model.scan_layers': True}
FSDP = {'mesh.data': 4, 'mesh.fsdp': 2}  # Sharded parameters: the layouts' shardings differ.
# XLA's backend (LLVM) optimisation level 0 halves the compile times of these tiny models. It
# changes the rounding of float32 sums, so the gradients, compared to 1e-6, use the default.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _run(f, *args):
  """`jax.jit(f)(*args)`, compiled with `FAST_COMPILE`."""
  return jax.jit(f).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _is_box(x):
  return isinstance(x, nn.Partitioned)


def _assert_equal_trees(a, b):
  """Same structure and bitwise equal leaves."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=jax.tree_util.keystr(path))


def _random_like(abstract, seed=0):
  """NumPy tree of the shapes and dtypes of `abstract`: N(0, 0.1) floats (every moment and
  bias distinct), zero integers."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
                      if jnp.issubdtype(x.dtype, jnp.floating) else np.zeros(x.shape, x.dtype),
                      abstract)


def test_scanned_model_starts_and_computes_as_unrolled():
  # The unrolled model, and the scanned one without and with remat 'block'.
  models = [rils_lib.build_model(tiny.tiny_config(**overrides), eot_id=2)
            for overrides in ({}, SCAN, {**SCAN, 'model.remat': 'block'})]
  # The scanned model's initial parameters are the unrolled model's of the same seed, stacked...
  params, stacked = _run(lambda: tuple(rils_lib.init_params(m, jax.random.PRNGKey(0))
                                       for m in models[:2]))
  _assert_equal_trees(layout.stack_layers(params), stacked)
  assert stacked['visual']['blocks']['mlp']['fc1']['kernel'].shape == (2, 32, 128)
  assert stacked['decoder']['decoder_blocks']['attn']['q_bias'].shape == (1, 2, 16)
  assert stacked['text']['blocks']['qkv']['bias'].shape == (2, 3, 2, 16)
  # ...with the logical axis names that flax's scan gives its own init ('layers' first).
  boxed = jax.eval_shape(lambda: rils_lib.boxed_params(models[1], jax.random.PRNGKey(0)))
  images, tokens = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2, 8), jnp.int32)
  masking = vit.random_masking(jax.random.PRNGKey(0), 2, 16, 0.5)
  own = jax.eval_shape(models[1].init, jax.random.PRNGKey(0), images, tokens, masking)['params']
  names = lambda tree: jax.tree.leaves(
      jax.tree.map(lambda b: b.names if _is_box(b) else 'none', tree, is_leaf=_is_box),
      is_leaf=lambda x: isinstance(x, tuple))
  assert names(own) == names(boxed)
  assert ('layers', 'embed', 'mlp') in names(own)
  assert jax.tree.map(np.shape, nn.unbox(own)) == jax.tree.map(np.shape, stacked)

  # Same outputs, losses and gradients (after unstacking) for one RILS batch: the unrolled
  # model and the scanned one with remat 'block'; the outputs of the scanned one without remat.
  config = tiny.tiny_config()
  batch = tiny.random_batch()
  pixels = transforms.normalize(batch['image'], config.input)
  masking = train_step_lib.masking_for(models[0], config, jax.random.PRNGKey(5), 8)
  results = []
  for model, p in ((models[0], params), (models[2], stacked)):
    def loss_fn(p, model=model):
      outputs = model.apply({'params': p}, pixels, batch['text'], masking)
      return losses.rils_loss(outputs, config.loss)[0], outputs
    (loss, outputs), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(p)
    results.append((loss, outputs, layout.unstack_layers(grads)))
  (loss0, out0, grads0), (loss1, out1, grads1) = results
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  out2 = _run(lambda p: models[1].apply({'params': p}, pixels, batch['text'], masking), stacked)
  for key in out0:
    for out in (out1, out2):
      np.testing.assert_allclose(out[key], out0[key], rtol=1e-6, atol=1e-6, err_msg=key)
  assert jax.tree.structure(grads1) == jax.tree.structure(grads0)
  for (path, g0), g1 in zip(jax.tree_util.tree_leaves_with_path(grads0), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(g1, g0, rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads0)) > 1.0  # Not all tiny.


def test_stack_unstack_round_trip_of_a_train_state():
  setups = [train_step_lib.setup(tiny.tiny_config(**FSDP, **scan)) for scan in ({}, SCAN)]
  state = _random_like(setups[0].abstract_state)
  stacked = layout.stack_layers(state)
  _assert_equal_trees(layout.unstack_layers(stacked), state)  # Exact, optimizer state included.
  _assert_equal_trees(layout.stack_layers(stacked), stacked)  # Already stacked: unchanged.
  mu = stacked.opt_state[0][0].mu
  np.testing.assert_array_equal(mu['text']['blocks']['fc2']['kernel'][1],
                                state.opt_state[0][0].mu['text']['blocks_1']['fc2']['kernel'])
  assert layout.is_stacked(stacked) and layout.is_stacked(state) is False
  assert layout.is_stacked({'logit_scale': 1.0}) is None
  # The abstract state (shapes and shardings) converts to that of the other layout's setup.
  for source, target in ((0, 1), (1, 0)):
    converted = layout.to_layout(setups[source].abstract_state, stacked=bool(target))
    assert converted == setups[target].abstract_state
  fc1 = setups[1].abstract_state.params['visual']['blocks']['mlp']['fc1']['kernel']
  assert fc1.shape == (2, 32, 128) and fc1.sharding.spec == jax.sharding.PartitionSpec(
      None, 'fsdp', None)  # 'layers' is never sharded.
  with pytest.raises(ValueError, match=r'layers blocks_\[0, 2\] are not numbered 0 to n-1'):
    layout.stack_layers({'blocks_0': np.zeros(2), 'blocks_2': np.zeros(2)})
  with pytest.raises(ValueError, match='a mix of the two layouts'):
    layout.stack_layers({'blocks_0': np.zeros(2), 'blocks': np.zeros((1, 2))})


def _save(workdir, config, state, tokenizer_path):
  checkpoints = checkpoints_lib.Checkpoints(workdir, config)
  checkpoints.save(1, state, iter(grain.MapDataset.range(4).to_iter_dataset()), config,
                   tokenizer_path)
  checkpoints.close()


def test_checkpoints_resume_and_warm_start_in_the_other_layout(tmp_path):
  configs = [tiny.tiny_config(**FSDP, **scan) for scan in ({}, SCAN)]
  setups = [train_step_lib.setup(c) for c in configs]
  host = _random_like(setups[0].abstract_state)
  hosts = [host, layout.stack_layers(host)]
  tokenizer = tmp_path / 'tokenizer.model'
  tokenizer.write_bytes(b'a tokenizer file')
  for saved, resumed in ((0, 1), (1, 0)):
    workdir = str(tmp_path / f'saved_{saved}')
    _save(workdir, configs[saved], jax.device_put(hosts[saved], setups[saved].shardings),
          str(tokenizer))
    checkpoints = checkpoints_lib.Checkpoints(workdir, configs[resumed])
    restored = checkpoints.restore(1, setups[resumed].abstract_state)
    checkpoints.close()
    _assert_equal_trees(jax.device_get(restored), hosts[resumed])
    assert jax.tree.map(lambda x: x.sharding, restored) == setups[resumed].shardings
    # Warm start (config.init_from) and evaluation read the parameters alone the same way.
    params = checkpoints_lib.load_params(workdir, setups[resumed].abstract_state.params)
    _assert_equal_trees(jax.device_get(params), hosts[resumed].params)
    assert (params['visual']['patch_embed']['kernel'].sharding ==
            setups[resumed].shardings.params['visual']['patch_embed']['kernel'])


def test_fine_tuning_in_either_layout():
  model = rils_lib.build_model(tiny.tiny_config(), 2)
  visual = _random_like(jax.eval_shape(lambda: rils_lib.init_params(
      model, jax.random.PRNGKey(0))))['visual']
  unrolled = finetune.Classifier(8, 32, 2, 2, num_classes=4)
  scanned = unrolled.clone(scan_layers=True)
  init = lambda classifier, v: _run(lambda v: finetune.init_params(classifier, v, 32, 0), v)
  params = init(unrolled, visual)
  stacked = init(scanned, visual)  # The pre-trained encoder is converted; the head is the same.
  _assert_equal_trees(stacked, layout.stack_layers(params))
  images = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
  logits = [_run(lambda p, m=m: m.apply({'params': p}, images), p)
            for m, p in ((unrolled, params), (scanned, stacked))]
  np.testing.assert_allclose(logits[1], logits[0], rtol=1e-6, atol=1e-6)
  # Layer-wise learning-rate decay: each stacked block gets its layer's multiplier, so the
  # scaled updates are the unrolled ones.
  updates = _random_like(params, seed=1)
  scaled = [optim.scale_by_tree(optim.layerwise_lr_scales(p, 0.65, 2)).update(u, None)[0]
            for p, u in ((params, updates), (stacked, layout.stack_layers(updates)))]
  _assert_equal_trees(layout.unstack_layers(scaled[1]), scaled[0])
  scales = optim.layerwise_lr_scales(stacked, 0.5, 2)
  np.testing.assert_array_equal(scales['visual']['blocks']['mlp']['fc1']['kernel'],
                                np.float32([0.25, 0.5]).reshape(2, 1, 1))
  # Drop path under scan: the per-layer rates linspace(0, 0.1, 2) reach the layers.
  rates = []

  def record(call, args, kwargs, context):
    if isinstance(context.module, vit.Block) and len(args) == 2:
      jax.debug.callback(lambda r: rates.append(float(r)), args[1])
    return call(*args, **kwargs)

  dropping = scanned.clone(drop_path=0.1)
  with nn.intercept_methods(record):
    trained = _run(lambda p: dropping.apply({'params': p}, images, train=True, rngs={
        'dropout': jax.random.PRNGKey(1)}), stacked)
  np.testing.assert_allclose(list(dict.fromkeys(rates)), [0.0, 0.1], rtol=1e-6)
  assert np.all(np.isfinite(trained))


def test_export_is_the_same_from_either_layout():
  config = tiny.tiny_config()
  params = _random_like(jax.eval_shape(lambda: rils_lib.init_params(
      rils_lib.build_model(config, 2), jax.random.PRNGKey(0))))
  stacked = layout.stack_layers(params)
  for convert in (lambda p: export.timm_state_dict(p, config, head='projection'),
                  export.open_clip_text_state_dict):
    expected, got = convert(params), convert(stacked)
    assert sorted(got) == sorted(expected) and 'blocks.1.mlp.fc1.weight' in set(
        export.timm_state_dict(params, config))
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_a_fine_tuning_run_resumes_in_the_other_layout(tmp_path):
  config = finetune.with_defaults(config_lib.finetune_base_config())
  config.init_from = '/pretraining/run'
  (tmp_path / 'config.json').write_text(json.dumps(config.to_dict()))
  (tmp_path / 'checkpoints').mkdir()
  config.scan_layers, config.attention = True, 'xla'  # Checkpoints.restore converts the state.
  assert finetune.check_workdir(str(tmp_path), config)
  config.drop_path = 0.2
  with pytest.raises(ValueError, match='holds a fine-tuning run of another config'):
    finetune.check_workdir(str(tmp_path), config)
