"""XLA:CPU settings that make the U-Net faster on a CPU, applied by the commands before JAX starts its backends.

XLA:CPU in jaxlib 0.10 hands matmuls, convolutions, element-wise ops and reductions to the YNNPACK library by
default. For this U-Net that is slower than XLA's own kernels for the convolutions and their gradients, and faster
for the reductions (GroupNorm). Measured with ``benchmarks/bench.py --batch 32 --impl jax`` on the 2-core
development machine (BENCHMARKS.md), ``--xla_cpu_experimental_ynn_fusion_type`` =

  ====================  =============  ==================
  value                 train img/s    sample img-steps/s
  ====================  =============  ==================
  (jaxlib default)      2.72 - 3.02    14.2 - 14.9
  ``reduce``            4.29           16.7
  ``individual_dot``    3.08           19.8
  ====================  =============  ==================

(measured before the hand-written gradients of `ddpm_jax.models.layers`; BENCHMARKS.md has the current
figures), so training runs with ``reduce`` and sampling-only commands with ``individual_dot``. `ynn_reductions`
tells `ddpm_jax.models.layers` which of the two is in force: with XLA's own reduction kernels it computes the
GroupNorm statistics and the attention softmax's row max and sum as trees of halvings, which are faster there.
The flag only concerns the CPU backend: on GPU and TPU hosts it changes nothing (the device does the work).

Nothing here is applied when the user set the flag in ``XLA_FLAGS`` already, when ``DDPM_JAX_CPU_TUNING=0``, when
JAX's backends are already running (too late to change flags), or with a jaxlib outside the 0.10 series (the flag
is experimental, and an unknown flag value stops XLA at start-up).
"""

from __future__ import annotations

import logging
import os

FLAG = '--xla_cpu_experimental_ynn_fusion_type'
PRESETS = {'train': 'reduce', 'inference': 'individual_dot'}

_log = logging.getLogger(__name__)
_added: str | None = None  # the flag this process added to XLA_FLAGS, if any


def tune_cpu(workload: str) -> str | None:
  """Adds the XLA:CPU flag for ``workload`` ('train' or 'inference') to ``XLA_FLAGS``; returns it, or None.

  Call it before the first JAX computation (the commands do, first thing in ``main``).
  """
  if workload not in PRESETS:
    raise ValueError(f'Unknown workload {workload!r}; choose one of {sorted(PRESETS)}.')
  flags = os.environ.get('XLA_FLAGS', '')
  if FLAG in flags or os.environ.get('DDPM_JAX_CPU_TUNING', '1') == '0':
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
  ``reduce`` or with ``-reduce``. `ddpm_jax.models.layers` uses it to pick the form of its reductions that is
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
