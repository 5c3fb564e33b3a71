"""Platform presets (rils_jax/platforms.py): what they set, and their refusals."""

import pytest

from rils_jax import config_lib
from rils_jax import dry_run
from rils_jax import main as main_lib
from rils_jax import platforms
from rils_jax import train_step
from tests import test_configs
from tests import tiny


def test_platform_presets_set_mesh_accumulation_and_dtype():
  c = test_configs._load('vit_b16', 'platform=gpu_8xh100')
  assert dict(c.mesh) == {'slice': 1, 'data': 1, 'fsdp': 8, 'tensor': 1}
  assert (c.optim.accum_steps, c.model.dtype, c.model.remat) == (2, 'bfloat16', 'block')
  assert c.platform.num_devices == 8 and c.input.batch_size == 4096
  c = test_configs._load('vit_l16', 'platform=tpu_v5e_256')
  assert c.optim.accum_steps == 1 and c.platform.accelerator == 'v5litepod-256'
  with pytest.raises(ValueError, match='unknown platform'):
    test_configs._load('vit_b16', 'platform=tpu_v9')
  # The batch set on the command line (after the preset) sets the accumulation: the preset's
  # 256 images per device stay, whatever the batch.
  c = test_configs._load('vit_b16', 'platform=gpu_8xh100')
  c.input.batch_size = 16384  # As --config.input.batch_size=16384 does.
  assert c.optim.accum_steps == 8
  c.optim.accum_steps = 4  # An explicit --config.optim.accum_steps still wins.
  assert c.optim.accum_steps == 4 and c.input.batch_size == 16384
  c = config_lib.base_config()
  platforms.apply_platform(c, 'gpu_8xh100')
  c.input.batch_size = 1000
  with pytest.raises(ValueError, match='not a multiple of 2048, the images per micro-batch of '
                     'platform preset gpu_8xh100'):
    train_step.check_platform(c, devices=8)


def test_a_preset_for_another_machine_or_with_a_dtype_is_refused():
  # A preset for another machine is refused before anything is read or compiled.
  c = test_configs._load('vit_b16', 'platform=tpu_v4_32')
  with pytest.raises(ValueError, match='tpu_v4_32 is for 16 devices .* this job has 8'):
    main_lib.validate_config(c)
  with pytest.raises(ValueError, match='sets bfloat16 compute'):
    test_configs._load('vit_b16', 'platform=tpu_v4_32,dtype=float32')
  with pytest.raises(ValueError, match='given twice'):
    test_configs._load('vit_b16', 'platform=tpu_v4_32,platform=gpu_8xh100')


def test_the_dry_run_measures_a_preset_on_another_device_count():
  c = tiny.tiny_config()
  c.platform = dict(name='tiny_16', accelerator='16 devices', num_devices=16, num_hosts=2,
                    memory_gib=1, per_device_batch=1, remat='none')
  with pytest.raises(ValueError, match='tiny_16 is for 16 devices'):
    main_lib.validate_config(c)  # Training refuses it...
  report = dry_run.dry_run(c, compile_step=False)  # ...the dry run measures it on 8.
  assert report['num_devices'] == 8 and report['config']['platform'] == 'tiny_16'
  assert report['fits'] == (report['estimate_bytes'] <= 0.9 * 2**30)


def test_a_gpu_preset_with_one_process_per_node_is_refused_with_the_fix():
  c = test_configs._load('vit_b16', 'platform=gpu_2x8xh100')
  # sbatch --nodes=2 slurm.sbatch with one task per node: 2 processes x 1 GPU.
  with pytest.raises(ValueError) as e:
    train_step.check_platform(c, backend='gpu', devices=2, local_devices=1)
  assert str(e.value) == (
      'platform preset gpu_2x8xh100 is for 2 node(s) x 8 GPUs, but each process of this job uses '
      '1 GPU(s) (2 in all): with one process per node, JAX gives a SLURM task only the GPU of its '
      'SLURM_LOCALID. Run one process per GPU: sbatch --nodes=2 --ntasks-per-node=8 '
      '--gpus-per-node=8 launch/slurm.sbatch, or launch/slurm.sh --nodes=2 --gpus_per_node=8; or '
      'one process per node with all its GPUs: launch/gpu_multinode.sh')
  # One process per GPU (16 x 1) and one per node with all its GPUs (2 x 8) are this machine.
  train_step.check_platform(c, backend='gpu', devices=16, local_devices=1)
  train_step.check_platform(c, backend='gpu', devices=16, local_devices=8)
  # All GPUs of one node, but one node short: the device count is what is wrong.
  with pytest.raises(ValueError, match='is for 16 devices .* this job has 8'):
    train_step.check_platform(c, backend='gpu', devices=8, local_devices=8)
  # On TPUs the local device count says nothing about this.
  with pytest.raises(ValueError, match='is for 16 devices .* this job has 2'):
    train_step.check_platform(c, backend='tpu', devices=2, local_devices=1)
