"""Test set-up: 8 fake CPU devices for the multi-device tests, no accelerator for TensorFlow, and a persistent
compilation cache.

The XLA flag must be set before JAX initialises its backends, so it is set here, at import time of the
first conftest, before any test module imports jax.

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
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FLAG).strip()
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
