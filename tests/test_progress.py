"""Progress from inside the compiled chains (ddpm_jax.progress): counts that end at the total, and no callback
compiled into any program unless a command asks for it.

The chains here run a stand-in network (``denoise_fn = 0.1 x``) on short schedules, so they compile in a second.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import data_parallel, diffusion, editing, progress, sampling, solvers
from ddpm_jax import schedule as sched_lib

SCHEDULE = sched_lib.get_schedule(num_timesteps=40)
SHAPE = (1, 4, 4, 1)


def _denoise(scale):
  return lambda x, t: scale * x


def _chain(name, **options):
  """``fn(scale, key) -> [4, 4, 1]`` for IndexedMap: one image of a sampler, or RePaint as 'repaint'."""

  def fn(scale, key):
    if name == 'repaint':
      known = jnp.zeros(SHAPE, bool).at[:, :, :2].set(True)
      return editing.inpaint(SCHEDULE, _denoise(scale), jnp.zeros(SHAPE), known, key, **options)[0]
    return solvers.sample(name, SCHEDULE, _denoise(scale), SHAPE, key, **options)[0]

  return fn


def test_scan_is_lax_scan_and_reports_the_calls_in_chunks():
  f = lambda c, x: (c + x[0] * x[1], c * x[1])
  xs = (jnp.arange(7.0), jnp.linspace(0.5, 1.5, 7))
  calls = []
  for reverse in (False, True):
    want = jax.lax.scan(f, 1.0, xs, reverse=reverse)
    np.testing.assert_array_equal(progress.scan(f, 1.0, xs, reverse=reverse)[1], want[1])  # no context: lax.scan
    for updates, units in ((3, None), (100, None), (2, [1, 0, 0, 1, 1, 0, 1])):  # chunks of 3 (+1), 1, 4 (+3)
      calls.clear()
      with progress.reporting(calls.append, updates=updates):
        got = jax.jit(lambda xs: progress.scan(f, 1.0, xs, units=units, reverse=reverse))(xs)
      jax.effects_barrier()
      np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
      np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
      assert sum(int(c) for c in calls) == (7 if units is None else sum(units)) and len(calls) <= updates
  with pytest.raises(ValueError, match=r'units has shape \(3,\)'), progress.reporting(print):
    progress.scan(f, 1.0, xs, units=[1, 1, 1])


CASES = [
  ('ancestral', {}, 40),
  ('dpmpp', dict(steps=7, order=3), 7),  # multistep: one call per step
  ('heun', dict(steps=6), 11),  # two calls per step but the last
  ('pndm', dict(steps=5), 14),  # Runge-Kutta warm-up: N + 9 calls
  ('repaint', dict(jump_length=5, jump_n_sample=3), None),
]


@pytest.mark.parametrize('name,options,calls', CASES, ids=[c[0] for c in CASES])
def test_bar_ends_at_the_network_calls_on_several_devices(name, options, calls):
  if name == 'repaint':
    path = editing.repaint_path(40, **options)
    calls = int(np.sum(np.diff(path) < 0))
    assert calls > 40  # the jumps add calls; the steps up add none
  else:
    assert calls == solvers.network_calls(name, options.get('steps'), 40)
  fn = _chain(name, **options)
  bar = progress.Progress(leave=False)
  devices = jax.devices()[:3]
  counted = data_parallel.IndexedMap(fn, np.float32(0.1), key=0, devices=devices, progress=bar)
  with bar.job(2 * calls, name):
    first = counted(np.arange(5))  # 5 images on 3 devices (padded to 6): the chain counts once
    assert bar.count == calls
    again = counted(np.arange(5, 11))  # the same program (2 per device)
    assert bar.count == 2 * calls
  # The same images as without progress, bit for bit.
  plain = data_parallel.IndexedMap(fn, np.float32(0.1), key=0, devices=devices)
  np.testing.assert_array_equal(first, plain(np.arange(5)))
  np.testing.assert_array_equal(again, plain(np.arange(5, 11)))


def _lowered(fn):
  # A fresh function each time: jit caches traces by function, and the context is read when tracing.
  return jax.jit(lambda key: fn(key)).lower(jax.random.key(0)).as_text()


PROGRAMS = {
  'ancestral': lambda k: sampling.p_sample_loop(SCHEDULE, _denoise(0.1), SHAPE, k, trace_every=8),
  'ddim': lambda k: sampling.ddim_sample_loop(SCHEDULE, _denoise(0.1), SHAPE, k, num_steps=10),
  'heun': lambda k: solvers.sample('heun', SCHEDULE, _denoise(0.1), SHAPE, k, steps=6),
  'repaint': lambda k: editing.inpaint(
    SCHEDULE, _denoise(0.1), jnp.zeros(SHAPE), jnp.ones(SHAPE, bool), k, jump_length=5, jump_n_sample=2
  ),
  'bpd': lambda k: diffusion.calc_bpd_loop(SCHEDULE, _denoise(0.1), jnp.zeros(SHAPE), k).total_bpd,
}


@pytest.mark.parametrize('name', list(PROGRAMS))
def test_no_callback_is_compiled_unless_reporting(name):
  fn = PROGRAMS[name]
  before = _lowered(fn)
  assert 'callback' not in before
  with progress.reporting(lambda calls: None):
    reported = _lowered(fn)
  assert 'callback' in reported
  assert _lowered(fn) == before  # the context leaves nothing behind
  assert not progress.is_reporting()
