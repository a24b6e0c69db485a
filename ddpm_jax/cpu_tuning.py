"""CPU settings that make the U-Net faster on a CPU: an XLA:CPU flag (`tune_cpu`) and glibc's malloc with
transparent huge pages (`restart_with_malloc_tuning`, under "Memory" below), applied by the commands before JAX
starts, and the choice of the U-Net's layers (`model_layers`, under "Layers" below), made when a model is built.

XLA:CPU in jaxlib 0.10 hands matmuls, convolutions, element-wise ops and reductions to the YNNPACK library by
default. For this U-Net that is slower than XLA's own kernels for the convolutions and their gradients, and faster
for the reductions (GroupNorm). ``--xla_cpu_experimental_ynn_fusion_type`` chooses what YNNPACK gets: training
runs with ``reduce`` and sampling-only commands with ``individual_dot``, the fastest of the values measured for
each (the table "What the performance features do here" in BENCHMARKS.md has the numbers and commands).
`ynn_reductions` tells which of the two is in force; with XLA's own reduction kernels the CPU layers compute the
GroupNorm statistics and the attention softmax's row max and sum as trees of halvings, which are faster there
(``UNet.cpu_tree_reductions``, set by `model_layers`). The flag only concerns the CPU backend: on GPU and TPU
hosts it changes nothing (the device does the work).

Nothing here is applied when the user set the flag in ``XLA_FLAGS`` already, when ``DDPM_JAX_CPU_TUNING=0``, when
JAX's backends are already running (too late to change flags), or with a jaxlib outside the 0.10 series (the flag
is experimental, and an unknown flag value stops XLA at start-up).

Layers: `model_layers` gives the ``UNet`` fields ``layers`` and ``cpu_tree_reductions`` for the backend a command
computes on: the layers of `ddpm_jax.models.cpu_layers` (``'cpu'``) on XLA:CPU, the plain Flax layers
(``'reference'``, the paper's exact formulation) on every other backend. A config or flag can force either
(``'cpu'`` only on a CPU). No accelerator was available to measure whether the CPU layers would help there, so
the accelerator default is the reference. The choice is made once, when the model is built, and logged.

Memory: each call of a compiled program allocates its buffers afresh, and glibc's malloc hands large blocks out as
new 4 KiB pages, so the kernel takes hundreds of thousands of page faults per training step to map and zero them, a
noticeable share of a step's CPU time (BENCHMARKS.md, "Why huge pages", has the counts). With glibc's
``glibc.malloc.hugetlb=1`` tunable malloc asks for transparent huge pages (2 MiB) instead, and the faults drop to a
few thousand. glibc reads its tunables only when a process starts, so `restart_with_malloc_tuning` re-executes a
command with ``GLIBC_TUNABLES`` set; the commands call it first thing. It applies only on Linux with glibc 2.35 or
newer, with transparent huge pages in ``madvise`` mode (in ``always`` mode malloc gets them anyway; in ``never``
mode there are none), when JAX computes on the CPU (``JAX_PLATFORMS`` starts with ``cpu``, or no GPU/TPU plug-in
is installed), when the user has not set the tunable, and not with ``DDPM_JAX_CPU_TUNING=0``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import sys
from collections.abc import Mapping
from typing import Any

FLAG = '--xla_cpu_experimental_ynn_fusion_type'
PRESETS = {'train': 'reduce', 'inference': 'individual_dot'}

MALLOC_TUNABLE = 'glibc.malloc.hugetlb=1'
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'
# What `model_layers` accepts: 'auto' (by backend) or a `ddpm_jax.models.unet.LAYERS` name.
LAYER_CHOICES = ('auto', 'reference', 'cpu')
# JAX plug-ins that give it a GPU or TPU backend: with one installed the model does not run on XLA:CPU.
ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin', 'jax_rocm7_plugin', 'libtpu')

_log = logging.getLogger(__name__)
_added: str | None = None  # the flag this process added to XLA_FLAGS, if any


def _opted_out(environ: Mapping[str, str]) -> bool:
  """Whether the user turned all of this module's settings off (``DDPM_JAX_CPU_TUNING=0``)."""
  return environ.get('DDPM_JAX_CPU_TUNING', '1') == '0'


def tune_cpu(workload: str) -> str | None:
  """Adds the XLA:CPU flag for ``workload`` ('train' or 'inference') to ``XLA_FLAGS``; returns it, or None.

  Call it before the first JAX computation (the commands do, first thing in ``main``).
  """
  if workload not in PRESETS:
    raise ValueError(f'Unknown workload {workload!r}; choose one of {sorted(PRESETS)}.')
  flags = os.environ.get('XLA_FLAGS', '')
  if FLAG in flags or _opted_out(os.environ):
    return None
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  if not jax.__version__.startswith('0.10.') or xla_bridge.backends_are_initialized():
    return None
  global _added
  flag = f'{FLAG}={PRESETS[workload]}'
  os.environ['XLA_FLAGS'] = f'{flags} {flag}'.strip()
  _added = flag
  _log.debug('XLA:CPU tuning for %s: %s', workload, flag)
  return flag


def user_xla_flags() -> str:
  """``XLA_FLAGS`` without the flag :func:`tune_cpu` added: what a child process should start from."""
  flags = os.environ.get('XLA_FLAGS', '')
  return ' '.join(f for f in flags.split() if f != _added) if _added else flags


def ynn_reductions() -> bool:
  """Whether XLA:CPU hands reductions to YNNPACK in this process, judged from ``XLA_FLAGS``.

  True unless ``--xla_cpu_experimental_ynn_fusion_type`` is set (last occurrence wins) to a list without
  ``reduce`` or with ``-reduce``. `model_layers` uses it to pick the form of the CPU layers' reductions that is
  fast for the kernels XLA:CPU will use (plain reductions or trees of halvings).
  """
  value = None
  for f in os.environ.get('XLA_FLAGS', '').split():
    if f.startswith(FLAG + '='):
      value = f.split('=', 1)[1]
  if value is None:
    return True
  items = [v for v in value.split(',') if v]
  if any(v.startswith(('+', '-')) for v in items):
    return '-reduce' not in items
  return 'reduce' in items


def model_layers(requested: str = 'auto', backend: str | None = None) -> dict[str, Any]:
  """The U-Net's implementation fields for ``backend``: ``{'layers': ..., 'cpu_tree_reductions': ...}``.

  Call it when the model is built (e.g. ``model.clone(**model_layers(config_value))``), after `tune_cpu`: the tree
  reductions follow this process's XLA flags at that moment (`ynn_reductions`); nothing is read while tracing.

  Args:
    requested: 'auto' ('cpu' on the XLA:CPU backend, 'reference' on any other), or 'reference' or 'cpu' to force
      one (see ``ddpm_jax.models.unet.UNet.layers``).
    backend: the JAX backend the model will run on ('cpu', 'gpu', 'tpu', ...); default ``jax.default_backend()``.

  Returns:
    ``layers`` ('reference' or 'cpu') and ``cpu_tree_reductions`` (True only for 'cpu' layers when XLA:CPU runs
    reductions on its own kernels).

  Raises:
    ValueError: for an unknown ``requested``, or 'cpu' on a backend other than the CPU (before anything compiles).
  """
  if not isinstance(requested, str) or requested not in LAYER_CHOICES:
    raise ValueError(
      f'Unknown U-Net layers {requested!r}; choose one of {LAYER_CHOICES} ('
      "'auto': the CPU layers on a CPU, the reference layers elsewhere)."
    )
  if backend is None:
    import jax  # pylint: disable=g-import-not-at-top  (this module is imported before JAX may start)

    backend = jax.default_backend()
  if requested == 'cpu' and backend != 'cpu':
    raise ValueError(
      f"U-Net layers 'cpu' are written for XLA:CPU, but this computation runs on the {backend!r} backend; use "
      "'reference' or 'auto'."
    )
  layers = requested if requested != 'auto' else ('cpu' if backend == 'cpu' else 'reference')
  tree = layers == 'cpu' and not ynn_reductions()
  _log.info(
    'U-Net layers: %r (%s on the %r backend)%s.',
    layers,
    'chosen' if requested == 'auto' else 'forced',
    backend,
    ', reductions as trees of halvings' if tree else '',
  )
  return {'layers': layers, 'cpu_tree_reductions': tree}


def _thp_mode() -> str:
  """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'), or '' where unknown."""
  try:
    with open(THP_MODE_FILE) as f:
      text = f.read()
  except OSError:
    return ''
  start, end = text.find('['), text.find(']')
  return text[start + 1 : end] if 0 <= start < end else ''


def _glibc_version() -> tuple[int, ...]:
  """glibc's (major, minor) version, or () where the C library is another one or unknown."""
  lib, version = platform.libc_ver()
  try:
    return tuple(int(v) for v in version.split('.')[:2]) if lib == 'glibc' and version else ()
  except ValueError:
    return ()


def _computes_on_cpu(environ: Mapping[str, str]) -> bool:
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


def malloc_tuning_env(
  environ: Mapping[str, str] | None = None,
  *,
  thp_mode: str | None = None,
  glibc: tuple[int, ...] | None = None,
  on_cpu: bool | None = None,
) -> dict[str, str] | None:
  """``environ`` (default ``os.environ``) with `MALLOC_TUNABLE` added to ``GLIBC_TUNABLES``, or None where it
  does not apply (see the module docstring: platform, glibc, huge-page mode, backend, the user's settings).

  ``thp_mode`` ('' = unknown), ``glibc`` (() = not glibc) and ``on_cpu`` default to what this machine and
  ``environ`` say (for tests).
  """
  environ = dict(os.environ if environ is None else environ)
  tunables = environ.get('GLIBC_TUNABLES', '')
  if _opted_out(environ) or 'glibc.malloc.hugetlb' in tunables:
    return None
  if not sys.platform.startswith('linux'):
    return None
  glibc = _glibc_version() if glibc is None else glibc
  thp_mode = _thp_mode() if thp_mode is None else thp_mode
  on_cpu = _computes_on_cpu(environ) if on_cpu is None else on_cpu
  if not glibc or glibc < (2, 35) or thp_mode != 'madvise' or not on_cpu:
    return None
  environ['GLIBC_TUNABLES'] = f'{tunables}:{MALLOC_TUNABLE}' if tunables else MALLOC_TUNABLE
  return environ


def restart_with_malloc_tuning() -> None:
  """Re-executes this Python process (same interpreter, same arguments) with `malloc_tuning_env`'s environment.

  Does nothing where that does not apply, or in a process that already has the tunable (so it restarts at most
  once); if the restart itself fails, logs a warning and returns (the command runs with the default malloc).
  Call it first thing in a command's ``if __name__ == '__main__':`` block, before anything else has run: the
  process is replaced, and nothing after the call runs in the old one. Never call it from library code.
  """
  env = malloc_tuning_env()
  if env is None or not sys.executable or not getattr(sys, 'orig_argv', None):
    return
  _log.debug('Restarting with GLIBC_TUNABLES=%s', env['GLIBC_TUNABLES'])
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError as e:  # the command still runs, with the default malloc
    _log.warning('Could not restart with GLIBC_TUNABLES=%s (%s); continuing without it.', env['GLIBC_TUNABLES'], e)
