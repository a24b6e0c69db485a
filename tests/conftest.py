"""Test set-up: 8 fake CPU devices for the multi-device tests, no accelerator for TensorFlow, XLA:CPU's backend
optimization level 2, and a persistent compilation cache.

The XLA flags must be set before JAX initialises its backends, so they are set here, at import time of the
first conftest, before any test module imports jax. Commands the tests start inherit them.

Most of the suite's CPU time is XLA compiling small programs. At ``--xla_backend_optimization_level=2`` (LLVM -O2
instead of XLA:CPU's default -O3) they compile about 2.5 times faster (a tiny U-Net's init: 7.4 s -> 3.0 s here),
and the tiny programs run about as fast. It changes how the same HLO is compiled, not what it computes; the parity
tests keep their tolerances with it. A level the user set in ``XLA_FLAGS`` is left alone.

Many tests compile the same programs (the tiny config's train step and sampler, a tiny U-Net's init): JAX's
persistent compilation cache loads them instead of compiling them again, in the test process and in the commands
it starts. Each xdist worker has its own cache folder (JAX's cache files are not written atomically), removed when
the session ends; a JAX_COMPILATION_CACHE_DIR the user set is left alone.
"""

import atexit
import os
import shutil
import tempfile

_FLAG = '--xla_force_host_platform_device_count=8'
_OPT_LEVEL = '--xla_backend_optimization_level'
for _flag in (_FLAG, f'{_OPT_LEVEL}=2'):
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

_CACHE_ROOT = 'DDPM_JAX_TEST_XLA_CACHE'  # set by the first process (the xdist controller), inherited by workers
if _CACHE_ROOT in os.environ or 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  if _CACHE_ROOT not in os.environ:
    os.environ[_CACHE_ROOT] = tempfile.mkdtemp(prefix='ddpm_jax_test_xla_cache_')
    atexit.register(shutil.rmtree, os.environ[_CACHE_ROOT], ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(
    os.environ[_CACHE_ROOT], os.environ.get('PYTEST_XDIST_WORKER', 'main')
  )


def pytest_configure(config):
  config.addinivalue_line(
    'markers', 'slow: a test of tens of seconds (a training run, subprocesses); collected first, see below'
  )


def pytest_collection_modifyitems(items):
  """Runs the `slow` tests first: under `pytest -n 2` the workers then end on short tests, and neither waits
  alone on a long one at the end of the run. Only tests without module-scoped fixtures are marked, so moving
  them builds nothing twice."""
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)  # stable: otherwise collection order
