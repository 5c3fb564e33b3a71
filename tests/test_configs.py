"""The config files load, name what they promise and build their models."""

import importlib.util
import os

import jax
import pytest

from configs import common
from rils_jax import config_lib
from rils_jax import flops
from rils_jax.evals import runner
from rils_jax.models import rils as rils_lib

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def _load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, name + '.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_vit_b16_is_the_paper_setup():
  c = _load('vit_b16')
  assert rils_lib.vision_size(c.model.variant) == (768, 12, 12, 16)
  assert (c.model.image_size, c.model.mask_ratio, c.model.embed_dim) == (224, 0.75, 512)
  assert (c.model.text.width, c.model.text.num_layers, c.model.text.context_length) == (
      512, 12, 77)
  assert (c.loss.weight, c.loss.student_temperature, c.loss.teacher_temperature) == (
      0.5, 0.1, 0.04)
  assert (c.input.batch_size, c.optim.b2, c.input.crop_scale) == (4096, 0.98, (0.5, 1.0))
  # The release's tokenizer and SLIP's loop (issue 17's recipe details).
  assert (c.tokenizer.kind, c.model.text.vocab_size) == ('clip_bpe', 49408)
  assert (c.optim.lr_start, c.optim.lr * c.optim.min_lr_ratio) == (1e-6, pytest.approx(1e-5))
  assert (c.optim.weight_decay_mask, c.optim.grad_clip) == ('slip', 0.0)
  assert (c.model.bias_init, c.model.keep_rounding, c.loss.release_gpus) == ('release', 'floor', 0)
  model = rils_lib.build_model(c, eot_id=2)
  params = jax.eval_shape(lambda: rils_lib.init_params(model, jax.random.PRNGKey(0)))
  vision = sum(x.size for x in jax.tree.leaves(params['visual']))
  assert 85e6 < vision < 87e6  # ViT-B/16 encoder: 85.8M parameters.
  # A ViT-B/16 forward pass at 224 px is 17.6 G multiply-adds (timm / DeiT tables), i.e.
  # 35.1 GFLOPs at 2 FLOPs per multiply-add.
  per_image = flops.train_step_flops(c)['encoder_full'] / 3 / c.input.batch_size
  assert 34.9e9 < per_image < 35.3e9


def test_vit_l16_is_the_release_large_model():
  c = _load('vit_l16')
  assert rils_lib.vision_size(c.model.variant) == (1024, 24, 16, 16)
  assert (c.model.text.width, c.model.text.num_layers, c.model.text.num_heads,
          c.model.embed_dim) == (768, 12, 12, 768)
  model = rils_lib.build_model(c, eot_id=2)
  params = jax.eval_shape(lambda: rils_lib.init_params(model, jax.random.PRNGKey(0)))
  vision = sum(x.size for x in jax.tree.leaves(params['visual']))
  assert 302e6 < vision < 305e6  # ViT-L/16 encoder: 303.3M parameters (timm: 304.3M with head).


@pytest.mark.parametrize('name,arg', [('default', None), ('default', 'num_train=100'),
                                      ('flickr8k_coco', None), ('vit_b16', 'data=shared'),
                                      ('vit_b16', 'dtype=float32'),
                                      ('vit_l16', 'platform=tpu_v4_64,data=shared')])
def test_configs_load_and_build(name, arg):
  c = _load(name, arg)
  assert c.input.sources and c.evals.zeroshot.data.root
  assert set(runner.evaluator_specs(c.evals)) == {'zeroshot', 'retrieval'}
  rils_lib.build_model(c, eot_id=2)


def test_evaluation_and_finetuning_configs():
  c = _load('evals_shared', 'data_dir=/data')
  specs = runner.evaluator_specs(c.evals)
  assert sorted(specs) == ['fewshot', 'knn', 'linear_probe', 'lowshot', 'retrieval', 'zeroshot']
  assert specs['fewshot']['train']['per_class'] == ':500'
  assert specs['fewshot']['test']['per_class'] == '500:'
  assert specs['zeroshot']['data'] == dict(kind='folder', root='/data/cifar10_test',
                                           per_class='')
  c = _load('evals_default')
  specs = runner.evaluator_specs(c.evals)
  assert specs['knn']['train']['root'] == specs['zeroshot']['data']['root'] == os.path.join(
      _load('default').synthetic.root, 'zeroshot')  # The default run's generated folder.
  c = _load('finetune_cifar10', 'init_from=/run')
  assert (c.init_from, c.optim.layer_decay, c.label_smoothing) == ('/run', 0.65, 0.1)
  config_lib.check_finetune_keys(c)
  assert c.data.train.to_dict() == dict(kind='folder', root=os.path.join(
      common.SHARED_DATA, 'cifar10_test'), per_class=':500')


def test_bad_config_argument():
  with pytest.raises(ValueError, match='unknown config argument'):
    _load('default', 'steps=3')
  with pytest.raises(ValueError, match="'synthetic', 'shared', 'webdataset:PATTERN'"):
    _load('vit_b16', 'data=laion')
  with pytest.raises(ValueError, match='KIND:PATTERN'):
    _load('vit_b16', 'data=webdataset:')
  with pytest.raises(ValueError, match="alternatives {a,b} as two patterns joined by '::'"):
    _load('vit_b16', 'data=webdataset:/d/{a,b}.tar')


def test_shard_data_arguments():
  c = _load('vit_b16', 'data=webdataset:/data/laion/{00000..01999}.tar')
  assert list(c.input.sources) == [dict(kind='webdataset',
                                        files='/data/laion/{00000..01999}.tar')]
  assert list(c.evals.keys()) == ['batch_size']
  c = _load('vit_l16', 'data=tfds:coco_captions,dtype=bfloat16')
  assert list(c.input.sources) == [dict(kind='tfds', name='coco_captions', split='train')]
  c = _load('vit_b16', 'data=arrayrecord:/d/train-*.array_record')
  assert c.input.sources[0]['kind'] == 'arrayrecord'


def test_parse_arg_types():
  arg = config_lib.parse_arg('n=3,flag=false,name=x', n=1, flag=True, name='')
  assert (arg.n, arg.flag, arg.name) == (3, False, 'x')
