"""Multi-process training on one machine: two JAX processes with two CPU devices each (gloo collectives).

The same global batch must give the same run on 2 processes x 2 devices as on 1 process x 4 devices: the
loss, the checkpoints, and the chief's sample grid (every host's images, gathered). This is the path of
Cloud TPU pods and multi-node GPU clusters (`config.multihost`), which cannot be run here otherwise.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# argv: workdir, number of processes, process id, coordinator port, devices per process.
_WORKER = r"""
import os, sys
workdir, nproc, pid, port, ndev = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={ndev}'
import jax
from configs import tiny
from ddpm_jax import train_lib
config = tiny.get_config()
config.model.ch_mult, config.model.attn_resolutions = (1,), ()  # lighter: one level, no attention
if nproc > 1:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=nproc, process_id=pid)
  config.multihost = True
config.train.num_steps = 4
config.train.checkpoint_every = 2
config.train.sample_every = 4
config.train.num_samples = 8
summary = train_lib.train_and_evaluate(config, workdir)
print('RESULT', jax.process_index(), jax.device_count(), summary['final_step'], repr(summary['loss']), flush=True)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # no shared cache: two processes would write one entry
  # The test process's flags (tests/conftest.py) but its device count: each worker sets its own.
  env['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '').replace('--xla_force_host_platform_device_count=8', '')
  env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=ROOT)
  return env


def _start(workdir, nproc, pid, port, ndev):
  return subprocess.Popen(
    [sys.executable, '-c', _WORKER, workdir, str(nproc), str(pid), str(port), str(ndev)],
    env=_env(),
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
  )


# Generous: the pair waits on each other at every collective, and on a busy 2-core machine a run took up to ~300 s.
# A hang still fails, after this budget per run.
BUDGET_S = 900


def _result(proc, timeout=BUDGET_S):
  out = proc.communicate(timeout=timeout)[0].decode()
  assert proc.returncode == 0, out[-3000:]
  line = [l for l in out.splitlines() if l.startswith('RESULT ')][-1].split()
  return int(line[1]), int(line[2]), int(line[3]), float(line[4])


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  port = _free_port()
  procs = [_start(multi, 2, pid, port, 2) for pid in range(2)]
  try:
    results = [_result(p) for p in procs]
  finally:
    for p in procs:
      p.kill()
  # The reference after the pair, not beside it: three processes on two cores made the pair's collectives wait.
  reference = _start(single, 1, 0, 0, 4)
  try:
    ref = _result(reference)
  finally:
    reference.kill()
  assert ref[1:3] == (4, 4)
  assert sorted(r[0] for r in results) == [0, 1]
  for _, devices, final_step, loss in results:
    assert (devices, final_step) == (4, 4)
    np.testing.assert_allclose(loss, ref[3], rtol=1e-5)  # Same examples, t and noise; float summation order.
  for workdir in (multi, single):
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()) == [2, 4]
  grids = [np.asarray(Image.open(os.path.join(w, 'samples', 'step_00000004.png'))).astype(int) for w in (multi, single)]
  assert grids[0].shape == grids[1].shape  # all 8 images, not only the chief's own
  assert np.abs(grids[0] - grids[1]).max() <= 2


# argv: process id, coordinator port. Each process maps over its own two devices with its own shared value.
_LOCAL_WORKER = r"""
import json, os, sys
pid, port = int(sys.argv[1]), sys.argv[2]
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'
import jax
import numpy as np
from ddpm_jax import data_parallel
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2, process_id=pid)
devices = jax.local_devices()
run = data_parallel.map_over_devices(lambda s, x: x * s['k'] + jax.lax.axis_index(data_parallel.AXIS), devices)
out = run(data_parallel.replicate({'k': np.float32(pid + 2)}, devices), np.arange(6, dtype=np.float32).reshape(2, 3))
print('RESULT', pid, jax.device_count(), json.dumps(np.asarray(out).ravel().tolist()), flush=True)
"""


def test_map_over_devices_runs_on_each_process_alone():
  """What sample.py and the bits/dim evaluation do on a multi-process host: local devices only, no collectives."""
  port = _free_port()
  env = _env()
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', _LOCAL_WORKER, str(pid), str(port)],
      env=env,
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for pid in range(2)
  ]
  try:
    outs = [p.communicate(timeout=BUDGET_S)[0].decode() for p in procs]
  finally:
    for p in procs:
      p.kill()
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  for pid, (proc, out) in enumerate(zip(procs, outs)):
    assert proc.returncode == 0, out[-3000:]
    line = [l for l in out.splitlines() if l.startswith('RESULT ')][-1].split(' ', 3)
    assert (int(line[1]), int(line[2])) == (pid, 4)  # 4 devices in all, 2 of them this process's
    expected = x * (pid + 2) + np.arange(2)[:, None]  # local device d computes block d
    np.testing.assert_allclose(json.loads(line[3]), expected.ravel())
