"""rils_jax.xla_cpu: which XLA:CPU flags `import rils_jax` adds with RILS_CPU_XLA_FLAGS=onednn,
and when it leaves XLA_FLAGS alone (by default among others)."""

import os
import subprocess
import sys

import pytest

from rils_jax import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = '--xla_force_host_platform_device_count=8'


@pytest.fixture
def measured(monkeypatch):
  """A measured jaxlib, no backend started: the conditions of a fresh CPU process."""
  monkeypatch.setattr(xla_cpu, '_jaxlib_version', lambda: xla_cpu.MEASURED_JAXLIB[0])
  monkeypatch.setattr(xla_cpu, '_backend_started', lambda: False)
  monkeypatch.setattr(xla_cpu, '_accelerator_plugins', lambda: False)


def test_defaults_follow_the_users_flags(measured):
  env = {'XLA_FLAGS': DEVICES, xla_cpu.ENV: 'onednn'}
  assert xla_cpu.apply_defaults(env) == xla_cpu.CPU_XLA_FLAGS
  assert env['XLA_FLAGS'].split() == [DEVICES, *xla_cpu.CPU_XLA_FLAGS]
  assert xla_cpu.apply_defaults(env) == ()  # Idempotent.


def test_a_flag_the_user_set_wins(measured):
  env = {'XLA_FLAGS': '--xla_cpu_use_onednn=false', xla_cpu.ENV: 'onednn'}
  added = xla_cpu.apply_defaults(env)
  assert '--xla_cpu_use_onednn=true' not in added and added
  assert env['XLA_FLAGS'].startswith('--xla_cpu_use_onednn=false ')


@pytest.mark.parametrize('env', [
    {},
    {xla_cpu.ENV: 'none'},
    {xla_cpu.ENV: 'onednn', 'JAX_PLATFORMS': 'tpu'},
    {xla_cpu.ENV: 'onednn', 'JAX_PLATFORMS': 'cuda,cpu'},
])
def test_default_and_accelerators_leave_xla_flags_alone(measured, env):
  env = dict(env, XLA_FLAGS=DEVICES)
  assert xla_cpu.apply_defaults(env) == () and env['XLA_FLAGS'] == DEVICES


def test_installed_accelerator_plugin_unless_cpu_is_asked_for(measured, monkeypatch):
  monkeypatch.setattr(xla_cpu, '_accelerator_plugins', lambda: True)
  assert xla_cpu.apply_defaults({xla_cpu.ENV: 'onednn'}) == ()
  assert xla_cpu.apply_defaults({xla_cpu.ENV: 'onednn', 'JAX_PLATFORMS': 'cpu'}) == (
      xla_cpu.CPU_XLA_FLAGS)


def test_unmeasured_jaxlib_or_started_backend(measured, monkeypatch):
  monkeypatch.setattr(xla_cpu, '_jaxlib_version', lambda: (9, 0))
  assert xla_cpu.apply_defaults({xla_cpu.ENV: 'onednn'}) == ()
  monkeypatch.setattr(xla_cpu, '_jaxlib_version', lambda: xla_cpu.MEASURED_JAXLIB[0])
  monkeypatch.setattr(xla_cpu, '_backend_started', lambda: True)
  assert xla_cpu.apply_defaults({xla_cpu.ENV: 'onednn'}) == ()


def test_bad_mode(measured):
  with pytest.raises(ValueError, match='RILS_CPU_XLA_FLAGS=off must be one of none, onednn, ynn'):
    xla_cpu.apply_defaults({xla_cpu.ENV: 'off'})


def test_import_applies_them_beside_the_device_count():
  """A fresh process with RILS_CPU_XLA_FLAGS=onednn: `import rils_jax` adds the flags before JAX
  starts, the 8 virtual devices of tests/conftest.py stay, and XLA compiles a dot with oneDNN."""
  if xla_cpu._jaxlib_version() not in xla_cpu.MEASURED_JAXLIB:  # pylint: disable=protected-access
    pytest.skip('this jaxlib gets no defaults (rils_jax.xla_cpu.MEASURED_JAXLIB)')
  code = ('import os, rils_jax, jax, jax.numpy as jnp\n'
          'hlo = jax.jit(lambda x: x @ x).lower(jnp.ones((8, 8))).compile().as_text()\n'
          'print(jax.device_count(), "onednn_fusion" in hlo, os.environ["XLA_FLAGS"])\n')
  env = {**os.environ, xla_cpu.ENV: 'onednn', 'XLA_FLAGS': DEVICES, 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=True).stdout.split()
  assert out[:2] == ['8', 'True'] and out[2] == DEVICES
  assert out[3:] == list(xla_cpu.CPU_XLA_FLAGS)


def test_the_ynn_mode_adds_its_flag_and_xla_takes_it(measured):
  """RILS_CPU_XLA_FLAGS=ynn adds YNN_XLA_FLAGS; in a fresh process XLA parses the flag (it aborts
  on one it does not know) and a dot, a reduction and elementwise ops give NumPy's values."""
  env = {'XLA_FLAGS': DEVICES, xla_cpu.ENV: 'ynn'}
  assert xla_cpu.apply_defaults(env) == xla_cpu.YNN_XLA_FLAGS
  assert env['XLA_FLAGS'].split() == [DEVICES, *xla_cpu.YNN_XLA_FLAGS]
  if xla_cpu._jaxlib_version() not in xla_cpu.MEASURED_JAXLIB:  # pylint: disable=protected-access
    return
  code = ('import os, rils_jax, jax, jax.numpy as jnp, numpy as np\n'
          'x = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)\n'
          'out = jax.jit(lambda a: (a @ a, jnp.tanh(a) * 2 + 1, a.sum(1)))(x)\n'
          'want = (x @ x, np.tanh(x) * 2 + 1, x.sum(1))\n'
          'print(max(float(np.abs(o - w).max()) for o, w in zip(out, want)), '
          'os.environ["XLA_FLAGS"])\n')
  run_env = {**os.environ, xla_cpu.ENV: 'ynn', 'XLA_FLAGS': DEVICES, 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=run_env, capture_output=True,
                       text=True, check=True).stdout.split()
  assert float(out[0]) < 1e-4 and out[1:] == [DEVICES, *xla_cpu.YNN_XLA_FLAGS]
