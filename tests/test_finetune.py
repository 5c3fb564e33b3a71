"""Fine-tuning (rils_jax/finetune.py): bad configs are refused before anything is read or
written. The layer-wise decay factors: tests/test_optim.py; a real fine-tune from a pre-trained
checkpoint: tests/test_main.py."""

import os

import ml_collections
import pytest

from rils_jax import config_lib
from rils_jax import finetune


def test_finetune_rejects_bad_configs(tmp_path):
  config = ml_collections.ConfigDict(dict(init_from='', batch_size=8, total_steps=1,
                                          optim=dict(layer_decay=0.65)))
  with pytest.raises(ValueError, match='init_from'):
    finetune.finetune(config, str(tmp_path))
  config.init_from = str(tmp_path / 'none')
  config.optim.layer_decay = 1.5
  with pytest.raises(ValueError, match='layer_decay'):
    finetune.finetune(config, str(tmp_path))


def test_finetune_config_keys_are_checked(tmp_path):
  config = config_lib.finetune_base_config()
  config.init_from = str(tmp_path / 'none')
  config.optim.layer_decy = 0.5
  config.eval_evry = 10
  with pytest.raises(ValueError, match=r'unknown config keys: eval_evry \(did you mean '
                     r'eval_every, log_every\?\); optim.layer_decy \(did you mean '
                     r'optim.layer_decay\?\)\. .*finetune_base_config'):
    finetune.finetune(config, str(tmp_path / 'ft'))
  assert not os.path.exists(tmp_path / 'ft')
  config = config_lib.finetune_base_config()
  config.data.train = dict(kind='folder', root='/x', any_key_of_a_dataset_spec=1)
  config_lib.check_finetune_keys(config)  # Dataset specs are checked when opened.
