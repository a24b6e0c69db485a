"""The XLA:CPU flag the commands set before JAX starts (each case in a fresh interpreter)."""

import os
import subprocess
import sys

import pytest

from ddpm_jax import cpu_tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fresh(code, **env):
  full = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', **env)
  if 'XLA_FLAGS' not in env:
    full.pop('XLA_FLAGS', None)
  res = subprocess.run([sys.executable, '-c', code], env=full, capture_output=True, text=True, timeout=120,
                       check=False)
  assert res.returncode == 0, res.stderr[-2000:]
  return [line.removeprefix('flags:') for line in res.stdout.strip().splitlines()]


CODE = '''
import os
from ddpm_jax import cpu_tuning
print(cpu_tuning.tune_cpu({workload!r}))
import jax
jax.numpy.ones(3).block_until_ready()  # XLA starts with the flag (an unknown value would abort here)
print('flags:' + os.environ.get('XLA_FLAGS', ''))
'''


@pytest.mark.parametrize('workload,value', [('train', 'reduce'), ('inference', 'individual_dot')])
def test_flag_is_added_before_jax_starts(workload, value):
  added, flags = _fresh(CODE.format(workload=workload))
  assert added == f'{cpu_tuning.FLAG}={value}' and flags.endswith(added)


def test_children_start_from_the_users_flags():
  code = CODE.format(workload='train') + 'print(cpu_tuning.user_xla_flags())\n'
  added, flags, user = _fresh(code, XLA_FLAGS='--xla_cpu_enable_fast_math=false')
  assert flags == f'--xla_cpu_enable_fast_math=false {added}' and user == '--xla_cpu_enable_fast_math=false'


def test_user_settings_win_and_late_calls_do_nothing():
  added, flags = _fresh(CODE.format(workload='train'), XLA_FLAGS=f'{cpu_tuning.FLAG}=individual_dot')
  assert added == 'None' and flags == f'{cpu_tuning.FLAG}=individual_dot'
  added, flags = _fresh(CODE.format(workload='train'), DDPM_JAX_CPU_TUNING='0')
  assert added == 'None' and cpu_tuning.FLAG not in flags
  late = _fresh('import jax; jax.devices()\nfrom ddpm_jax import cpu_tuning\nprint(cpu_tuning.tune_cpu("train"))')
  assert late == ['None']  # the backends already run: too late to change XLA flags


def test_unknown_workload():
  with pytest.raises(ValueError, match='workload'):
    cpu_tuning.tune_cpu('serve')


@pytest.mark.parametrize('xla_flags,expected', [
    (None, True),  # jaxlib's default hands reductions to YNNPACK
    ('--xla_cpu_experimental_ynn_fusion_type=reduce', True),
    ('--xla_cpu_experimental_ynn_fusion_type=individual_dot', False),
    ('--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce', True),
    ('--xla_cpu_experimental_ynn_fusion_type=', False),
    ('--xla_cpu_experimental_ynn_fusion_type=-reduce', False),
    ('--xla_cpu_experimental_ynn_fusion_type=+individual_dot', True),
    ('--xla_cpu_experimental_ynn_fusion_type=reduce --xla_cpu_experimental_ynn_fusion_type=individual_dot', False),
])
def test_ynn_reductions_reads_the_flag(monkeypatch, xla_flags, expected):
  if xla_flags is None:
    monkeypatch.delenv('XLA_FLAGS', raising=False)
  else:
    monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1 ' + xla_flags)
  assert cpu_tuning.ynn_reductions() is expected
