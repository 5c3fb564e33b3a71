"""Platform presets: the mesh, per-device batch, dtype and rematerialisation for an accelerator.

Selected with a config argument, e.g. `--config=configs/vit_b16.py:platform=tpu_v4_32`. The
global batch stays the config's (the recipe's 4096); the preset's per-device micro-batch sets
the gradient accumulation: accum_steps = batch / (per_device_batch x devices), computed from
the final batch size, so `--config.input.batch_size=16384` on the command line gives 4x the
accumulation, not 4x the images per device (`--config.optim.accum_steps` still overrides it). Check a preset
before paying for the machine with the memory dry run:

  python -m rils_jax.dry_run --config=configs/vit_l16.py:platform=tpu_v4_64

Sizes are from the vendors' data sheets: TPU v4 32 GiB HBM per chip (4 chips per host), v5e
16 GiB (4 per host), v5p 95 GiB (4 per host), H100 SXM 80 GB (8 per host).
"""

from typing import Any, Dict

import ml_collections

PLATFORMS: Dict[str, Dict[str, Any]] = {
    # FSDP over the whole slice (ZeRO-3; ICI all-gathers are cheap next to the matmuls).
    'tpu_v4_32': dict(accelerator='v4-32', num_devices=16, num_hosts=4, memory_gib=32,
                      mesh={'data': 1, 'fsdp': -1}, per_device_batch=256, remat='block'),
    'tpu_v4_64': dict(accelerator='v4-64', num_devices=32, num_hosts=8, memory_gib=32,
                      mesh={'data': 1, 'fsdp': -1}, per_device_batch=128, remat='block'),
    'tpu_v5e_256': dict(accelerator='v5litepod-256', num_devices=256, num_hosts=64,
                        memory_gib=16, mesh={'data': 1, 'fsdp': -1}, per_device_batch=16,
                        remat='block'),
    'tpu_v5p_128': dict(accelerator='v5p-128', num_devices=64, num_hosts=16, memory_gib=95,
                        mesh={'data': 1, 'fsdp': -1}, per_device_batch=64, remat='none'),
    # FSDP inside a node (NVLink), data parallelism across nodes (InfiniBand / Ethernet).
    'gpu_8xh100': dict(accelerator='8x H100 80GB', num_devices=8, num_hosts=1, memory_gib=80,
                       mesh={'data': 1, 'fsdp': 8}, per_device_batch=256, remat='block'),
    'gpu_2x8xh100': dict(accelerator='2 nodes x 8x H100 80GB', num_devices=16, num_hosts=2,
                         memory_gib=80, mesh={'data': 2, 'fsdp': 8}, per_device_batch=256,
                         remat='block'),
}


def apply_platform(config: ml_collections.ConfigDict, name: str) -> None:
  """Sets `config.mesh`, `model.dtype` (bfloat16), `model.remat`, `optim.accum_steps` and
  `config.platform` (the preset, for the dry run and the launch scripts) for preset `name`.

  `optim.accum_steps` is a reference to `input.batch_size` // (per-device batch x devices),
  resolved when read: a batch set later (on the command line) sets the accumulation; a batch
  that is not a multiple is refused by `train_step.check_batch`.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in PLATFORMS:
    raise ValueError(f'unknown platform {name!r}; known: {sorted(PLATFORMS)}')
  p = PLATFORMS[name]
  per_step = p['per_device_batch'] * p['num_devices']
  config.mesh = ml_collections.ConfigDict({'slice': 1, 'data': 1, 'fsdp': 1, 'tensor': 1,
                                           **p['mesh']})
  config.model.dtype = 'bfloat16'
  config.model.remat = p['remat']
  config.optim.accum_steps = config.input.get_ref('batch_size') // per_step
  config.platform = dict(name=name, **{k: v for k, v in p.items() if k != 'mesh'})
