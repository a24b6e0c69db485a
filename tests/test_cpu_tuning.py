"""The CPU settings: the XLA:CPU flag the commands set before JAX starts (each case in a fresh interpreter), the
choice of the U-Net's layers (model_layers) and glibc's malloc tuning."""

import os
import subprocess
import sys

import jax
import pytest

from ddpm_jax import cpu_tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fresh(code, **env):
  full = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', **env)
  if 'XLA_FLAGS' not in env:
    full.pop('XLA_FLAGS', None)
  res = subprocess.run([sys.executable, '-c', code], env=full, capture_output=True, text=True, timeout=120, check=False)
  assert res.returncode == 0, res.stderr[-2000:]
  return [line.removeprefix('flags:') for line in res.stdout.strip().splitlines()]


CODE = """
import os
from ddpm_jax import cpu_tuning
print(cpu_tuning.tune_cpu({workload!r}))
import jax
jax.numpy.ones(3).block_until_ready()  # XLA starts with the flag (an unknown value would abort here)
print('flags:' + os.environ.get('XLA_FLAGS', ''))
"""


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


@pytest.mark.parametrize(
  'xla_flags,expected',
  [
    (None, True),  # jaxlib's default hands reductions to YNNPACK
    ('--xla_cpu_experimental_ynn_fusion_type=reduce', True),
    ('--xla_cpu_experimental_ynn_fusion_type=individual_dot', False),
    ('--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce', True),
    ('--xla_cpu_experimental_ynn_fusion_type=', False),
    ('--xla_cpu_experimental_ynn_fusion_type=-reduce', False),
    ('--xla_cpu_experimental_ynn_fusion_type=+individual_dot', True),
    ('--xla_cpu_experimental_ynn_fusion_type=reduce --xla_cpu_experimental_ynn_fusion_type=individual_dot', False),
  ],
)
def test_ynn_reductions_reads_the_flag(monkeypatch, xla_flags, expected):
  if xla_flags is None:
    monkeypatch.delenv('XLA_FLAGS', raising=False)
  else:
    monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1 ' + xla_flags)
  assert cpu_tuning.ynn_reductions() is expected


# ----------------------------------------------------------------------------------------------------------------
# The U-Net's layers (model_layers)
# ----------------------------------------------------------------------------------------------------------------

_REDUCE = '--xla_cpu_experimental_ynn_fusion_type=reduce'
_INDIVIDUAL_DOT = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'


@pytest.mark.parametrize(
  'requested,backend,expected',
  [
    ('auto', 'cpu', 'cpu'),
    ('auto', 'gpu', 'reference'),
    ('auto', 'tpu', 'reference'),
    ('auto', 'cuda', 'reference'),
    ('reference', 'cpu', 'reference'),
    ('reference', 'gpu', 'reference'),
    ('cpu', 'cpu', 'cpu'),
  ],
)
def test_model_layers_chooses_by_backend(monkeypatch, caplog, requested, backend, expected):
  monkeypatch.setenv('XLA_FLAGS', _INDIVIDUAL_DOT)  # XLA:CPU's own reductions: trees of halvings for the CPU layers
  with caplog.at_level('INFO', logger=cpu_tuning.__name__):
    fields = cpu_tuning.model_layers(requested, backend)
  assert fields == {'layers': expected, 'cpu_tree_reductions': expected == 'cpu'}
  # One info line names the choice.
  (record,) = [r for r in caplog.records if r.name == cpu_tuning.__name__]
  assert record.levelname == 'INFO' and repr(expected) in record.getMessage() and repr(backend) in record.getMessage()


def test_model_layers_tree_reductions_follow_the_flags_when_called(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', _REDUCE)
  assert cpu_tuning.model_layers('cpu', 'cpu') == {'layers': 'cpu', 'cpu_tree_reductions': False}
  monkeypatch.delenv('XLA_FLAGS')  # jaxlib's default: YNNPACK's reductions
  assert cpu_tuning.model_layers('auto', 'cpu') == {'layers': 'cpu', 'cpu_tree_reductions': False}
  monkeypatch.setenv('XLA_FLAGS', _INDIVIDUAL_DOT)
  assert cpu_tuning.model_layers('auto', 'cpu') == {'layers': 'cpu', 'cpu_tree_reductions': True}
  assert cpu_tuning.model_layers('auto', 'gpu') == {'layers': 'reference', 'cpu_tree_reductions': False}


def test_model_layers_default_backend_is_jaxs():
  assert jax.default_backend() == 'cpu'  # this machine
  assert cpu_tuning.model_layers()['layers'] == 'cpu'


def test_model_layers_rejects_bad_choices():
  for bad in ('gpu', 'Reference', '', None, 1):
    with pytest.raises(ValueError, match=f'Unknown U-Net layers {bad!r}.*auto'):
      cpu_tuning.model_layers(bad, 'cpu')
  for backend in ('gpu', 'tpu'):
    with pytest.raises(ValueError, match=f"'cpu' are written for XLA:CPU.*{backend!r}.*'reference' or 'auto'"):
      cpu_tuning.model_layers('cpu', backend)


def test_module_imports_without_jax():
  out = _fresh('import sys\nfrom ddpm_jax import cpu_tuning\nprint("jax" in sys.modules)')
  assert out == ['False']


# ----------------------------------------------------------------------------------------------------------------
# glibc malloc with transparent huge pages (restart_with_malloc_tuning)
# ----------------------------------------------------------------------------------------------------------------

FACTS = dict(thp_mode='madvise', glibc=(2, 36), on_cpu=True)


def test_malloc_tuning_env_adds_the_tunable_where_it_applies(monkeypatch):
  monkeypatch.setattr(sys, 'platform', 'linux')
  env = {'PATH': '/bin'}
  assert cpu_tuning.malloc_tuning_env(env, **FACTS) == {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  assert env == {'PATH': '/bin'}  # the caller's mapping is left alone
  other = {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}
  assert (
    cpu_tuning.malloc_tuning_env(other, **FACTS)['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  )


@pytest.mark.parametrize(
  'env,facts',
  [
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, {}),  # the user's own setting wins
    ({'DDPM_JAX_CPU_TUNING': '0'}, {}),
    ({}, {'thp_mode': 'always'}),  # malloc gets huge pages anyway
    ({}, {'thp_mode': 'never'}),
    ({}, {'thp_mode': ''}),  # no such kernel setting
    ({}, {'glibc': (2, 34)}),  # the tunable came with glibc 2.35
    ({}, {'glibc': ()}),  # musl, or not Linux
    ({}, {'on_cpu': False}),  # a GPU/TPU does the work
  ],
)
def test_malloc_tuning_env_does_nothing_elsewhere(monkeypatch, env, facts):
  monkeypatch.setattr(sys, 'platform', 'linux')
  assert cpu_tuning.malloc_tuning_env(env, **{**FACTS, **facts}) is None


def test_malloc_tuning_env_only_on_linux(monkeypatch):
  monkeypatch.setattr(sys, 'platform', 'darwin')
  assert cpu_tuning.malloc_tuning_env({}, **FACTS) is None


def test_backend_and_huge_page_mode_detection(monkeypatch, tmp_path):
  assert cpu_tuning._computes_on_cpu({'JAX_PLATFORMS': 'cpu'})
  assert cpu_tuning._computes_on_cpu({'JAX_PLATFORMS': 'cpu,cuda'})
  assert not cpu_tuning._computes_on_cpu({'JAX_PLATFORMS': 'cuda,cpu'})
  assert not cpu_tuning._computes_on_cpu({'JAX_PLATFORMS': 'tpu'})
  monkeypatch.setattr(cpu_tuning, 'ACCELERATOR_PLUGINS', ('json',))  # an importable module stands in for a plug-in
  assert not cpu_tuning._computes_on_cpu({})
  monkeypatch.setattr(cpu_tuning, 'ACCELERATOR_PLUGINS', ('no_such_plugin_xyz',))
  assert cpu_tuning._computes_on_cpu({})
  mode = tmp_path / 'enabled'
  mode.write_text('always [madvise] never\n')
  monkeypatch.setattr(cpu_tuning, 'THP_MODE_FILE', str(mode))
  assert cpu_tuning._thp_mode() == 'madvise'
  monkeypatch.setattr(cpu_tuning, 'THP_MODE_FILE', str(tmp_path / 'missing'))
  assert cpu_tuning._thp_mode() == ''


RESTART = """
import ctypes, os, resource, sys
from ddpm_jax import cpu_tuning
print('start', os.getpid(), flush=True)  # printed twice when the process restarts itself
cpu_tuning.restart_with_malloc_tuning()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(n), 1, n)  # a large block, touched once
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print('end', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:], faults)
"""


def _restart(tmp_path, **env):
  """Runs RESTART as a command; returns (its environment, the pids of its 'start' lines, the rest of its 'end' line)."""
  script = tmp_path / 'cmd.py'
  script.write_text(RESTART)
  full = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', **env)
  if 'GLIBC_TUNABLES' not in env:
    full.pop('GLIBC_TUNABLES', None)
  res = subprocess.run(
    [sys.executable, str(script), 'a', '--b=c d'], env=full, capture_output=True, text=True, timeout=60, check=False
  )
  assert res.returncode == 0, res.stderr[-2000:]
  *starts, end = res.stdout.strip().splitlines()
  _, pid, rest = end.split(' ', 2)
  assert all(line == f'start {pid}' for line in starts)  # one process, re-executed in place
  return full, len(starts), rest


def test_restart_reexecutes_the_command_once_with_the_tunable(tmp_path):
  env, starts, rest = _restart(tmp_path)
  if cpu_tuning.malloc_tuning_env(env) is None:  # not this machine: nothing happens
    assert starts == 1 and rest.startswith(" ['a', '--b=c d']")
    pytest.skip('malloc tuning does not apply here (platform, glibc or huge-page mode)')
  assert starts == 2 and rest.startswith("glibc.malloc.hugetlb=1 ['a', '--b=c d']")
  tuned_faults = int(rest.rsplit(' ', 1)[1])
  _, starts, rest = _restart(tmp_path, GLIBC_TUNABLES='glibc.malloc.hugetlb=0')  # the user's setting: no restart
  assert starts == 1 and rest.startswith("glibc.malloc.hugetlb=0 ['a', '--b=c d']")
  plain_faults = int(rest.rsplit(' ', 1)[1])
  # 256 MiB in 4 KiB pages is 65,536 faults; in 2 MiB pages 128 (the kernel may fall back to small pages).
  assert tuned_faults < plain_faults / 2, (tuned_faults, plain_faults)
  _, starts, rest = _restart(tmp_path, DDPM_JAX_CPU_TUNING='0')
  assert starts == 1 and rest.startswith(" ['a', '--b=c d']")


def test_restart_that_fails_lets_the_command_run_on(monkeypatch, caplog):
  monkeypatch.setattr(cpu_tuning, 'malloc_tuning_env', lambda: {'GLIBC_TUNABLES': cpu_tuning.MALLOC_TUNABLE})
  calls = []

  def execve(*args):
    calls.append(args)
    raise PermissionError('exec not allowed here')

  monkeypatch.setattr(os, 'execve', execve)
  with caplog.at_level('WARNING'):
    cpu_tuning.restart_with_malloc_tuning()  # returns instead of raising
  assert calls and calls[0][0] == sys.executable and calls[0][2] == {'GLIBC_TUNABLES': cpu_tuning.MALLOC_TUNABLE}
  assert 'exec not allowed here' in caplog.text
