"""ddpm_jax.solvers without training: exact denoisers of a Gaussian mixture, the registry and its validation.

A 2-D Gaussian mixture has the exact eps-prediction E[eps | x_t] in closed form, so the samplers can be checked
against the probability-flow ODE itself (order of convergence) and against the data distribution. These run
compiled, as users run the samplers; the property tests further down run op by op (``eager``: the same code,
without compiling one scan per case).
"""

import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from ddpm_jax import guidance, sampling, solvers
from ddpm_jax import schedule as sched_lib
from ddpm_jax.models import UNet, get_timestep_embedding

WEIGHTS = np.array([0.3, 0.7])
MEANS = np.array([[-0.5, -0.3], [0.5, 0.4]])
LINEAR = sched_lib.get_schedule('linear')


def posterior_noise(x_ve, sigma, stds, xp=np):
  """E[n | x] for x = x0 + sigma n, x0 ~ sum_k w_k N(m_k, s_k^2 I) in 2-D (the VE form; n is also eps)."""
  sigma = xp.reshape(xp.asarray(sigma) * xp.ones(x_ve.shape[0]), (-1, 1))
  var = xp.asarray(stds)[None] ** 2 + sigma**2  # [B, K]
  diff = x_ve[:, None, :] - MEANS[None]  # [B, K, 2]
  logp = xp.log(WEIGHTS)[None] - xp.sum(diff**2, -1) / (2 * var) - xp.log(var)
  resp = xp.exp(logp - logp.max(-1, keepdims=True))
  resp = resp / resp.sum(-1, keepdims=True)
  return sigma * xp.sum(resp[..., None] * diff / var[..., None], 1)


def mixture_eps(schedule, stds):
  """The exact eps-network for the mixture under ``schedule``; any (fractional) timestep t."""
  sigma_table = solvers.sigma_table(schedule)

  def eps(x, t):
    grid = jnp.arange(sigma_table.shape[0], dtype=x.dtype)
    sigma = jnp.interp(t.astype(x.dtype), grid, jnp.asarray(sigma_table, x.dtype))
    return posterior_noise(x * jnp.sqrt(1 + sigma**2)[:, None], sigma, stds, jnp)

  return eps


# ------------------------------------------------------------------------------------- order of convergence

# On the DDPM linear schedule sigma ~ sqrt(t) near t = 0, so a grid uniform in t has log-SNR steps
# log(sigma(2d)/sigma(d)) -> log(2)/2 at its low end that never shrink with N: no solver reaches its asymptotic
# regime there. This schedule has log sigma linear in t (sigma from 0.02 to 80), so the 'trailing' grid (uniform
# integer timesteps for N dividing T) is uniform in log-SNR and the network is called exactly at the nodes.
_T = np.arange(1000)
_SIG = np.exp(np.log(0.02) + (np.log(80.0) - np.log(0.02)) * _T / 999)
_ABAR = 1 / (1 + _SIG**2)
LOGLINEAR = sched_lib.make_schedule(1 - _ABAR / np.append(1.0, _ABAR[:-1]))
SMOOTH_STDS = np.array([0.3, 0.4])
_AB = {4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


@pytest.fixture(scope='module')
def pf_ode():
  """x_init (VP, at t = T-1) and the exact probability-flow ODE solution from it, dense in sigma (float64)."""
  x_init = np.asarray(jax.random.normal(jax.random.key(0), (64, 2)), np.float64)
  sigmas = solvers.sigma_table(LOGLINEAR)
  y0 = (x_init * np.sqrt(1 + sigmas[-1] ** 2)).ravel()
  # dx/dsigma = E[n | x]; integrated in u = log sigma.
  rhs = lambda u, y: (np.exp(u) * posterior_noise(y.reshape(-1, 2), np.exp(u), SMOOTH_STDS)).ravel()
  span = (np.log(sigmas[-1]), np.log(sigmas[0]) - 0.1)
  sol = solve_ivp(rhs, span, y0, method='DOP853', rtol=1e-12, atol=1e-13, dense_output=True).sol
  return x_init, lambda sigma: sol(np.log(sigma)).reshape(-1, 2)


_ERRORS = {}  # (name, steps, options) -> error: tests share the runs


def _error(name, steps, options, pf_ode):
  cache_key = (name, steps, tuple(sorted(options.items())))
  if cache_key not in _ERRORS:
    _ERRORS[cache_key] = _compute_error(name, steps, options, pf_ode)
  return _ERRORS[cache_key]


def _compute_error(name, steps, options, pf_ode):
  x_init, exact = pf_ode
  grid = solvers.make_grid(name, LOGLINEAR, steps, 'trailing')
  sig = grid.sigmas[:-1]
  # Every sampler ends with a jump from the last node to sigma = 0 that is not an ODE step: x0-hat = x - sigma
  # eps-hat (Tweedie; DPM-Solver++, UniPC, Euler, Heun), or PLMS's extrapolated x - sigma (AB4 of eps-hat). Its
  # error is O(sigma_last^2), the same for any solver; compare with the exact solution at the last node pushed
  # through the same jump, so that what is measured is the ODE solve.
  if name in ('plms', 'pndm'):
    eps_hist = [posterior_noise(exact(s), s, SMOOTH_STDS) for s in sig[-4:][::-1]]
    eps_last = sum(c * e for c, e in zip(_AB[4], eps_hist))
  else:
    eps_last = posterior_noise(exact(sig[-1]), sig[-1], SMOOTH_STDS)
  reference = exact(sig[-1]) - sig[-1] * eps_last
  with jax.enable_x64(True):
    eps = mixture_eps(LOGLINEAR, SMOOTH_STDS)
    run = jax.jit(
      lambda x: solvers.sample(
        name, LOGLINEAR, eps, x.shape, jax.random.key(1), steps=steps, spacing='trailing', x_init=x, **options
      )
    )
    out = np.asarray(run(jnp.asarray(x_init, jnp.float64)))
  return np.sqrt(np.mean((out - reference) ** 2))


# (sampler, options, global order, N pair). DPM-Solver++ 3M and UniPC-3 are of order 3 and 4 on every step but
# their warm-up (3M: a first-order first step; UniPC-3: a first step of order 2 after its correction), whose
# O(h^2) / O(h^3) error is damped by the flow from sigma_max but dominates once N is large: their global order is
# one less, reached only at N >= 200 (UniPC-3 shows its order 4 at N = 40..100, checked below).
ORDERS = [
  ('euler', {}, 1, (40, 100)),
  ('ddim', dict(clip_denoised=False), 1, (40, 100)),  # ddpm_jax.sampling's, for comparison
  ('heun', {}, 2, (40, 100)),
  ('plms', {}, 2, (40, 100)),  # AB4 in t on eps inside a transfer in sigma: second order unless sigma is affine in t
  ('pndm', {}, 2, (40, 100)),
  ('dpmpp', dict(order=2), 2, (40, 100)),
  ('dpmpp', dict(order=3), 2, (200, 500)),
  ('unipc', dict(order=1), 2, (40, 100)),  # UniC raises UniP-p to p + 1
  ('unipc', dict(order=2), 3, (40, 100)),
  ('unipc', dict(order=2, variant='bh1'), 3, (40, 100)),
  ('unipc', dict(order=3), 3, (200, 500)),
  ('unipc', dict(order=3), 4, (40, 100)),
]


@pytest.mark.parametrize('name,options,order,steps', ORDERS)
def test_probability_flow_solvers_converge_at_their_order(name, options, order, steps, pf_ode):
  errors = [_error(name, n, options, pf_ode) for n in steps]
  slope = -np.log(errors[1] / errors[0]) / np.log(steps[1] / steps[0])
  assert abs(slope - order) <= 0.3, (errors, slope)
  assert errors[1] < 1e-2


def test_higher_orders_are_more_accurate(pf_ode):
  """At N = 100 the third-order solvers are well ahead of the second-order ones despite their warm-up."""
  dpmpp = [_error('dpmpp', 100, dict(order=o), pf_ode) for o in (2, 3)]
  unipc = [_error('unipc', 100, dict(order=o), pf_ode) for o in (2, 3)]
  assert dpmpp[0] > 2 * dpmpp[1] and unipc[0] > 10 * unipc[1]


# ----------------------------------------------------------------------------------- the sampled distribution

SHARP_STDS = np.array([0.15, 0.2])
HIGH_ORDER = ('dpmpp', 'dpmpp_sde', 'unipc', 'heun', 'plms', 'pndm')


def _mixture_statistics(x):
  label = np.argmin(((x[:, None] - MEANS[None]) ** 2).sum(-1), 1)
  weights = np.array([(label == k).mean() for k in range(2)])
  means = np.stack([x[label == k].mean(0) for k in range(2)])
  stds = np.array([x[label == k].std(0).mean() for k in range(2)])
  return weights, means, stds


@pytest.mark.parametrize('name', [n for n in solvers.SAMPLERS if n not in ('ancestral', 'respaced')])
def test_samples_match_the_mixture_at_25_steps(name):
  """Modes, weights and spreads of 4,000 samples at N = 25 on the paper's schedule, each sampler's defaults.

  Monte Carlo standard errors: weight 0.007, mean 0.005, spread ~1.5%. The second-order and better samplers are
  held to 3.5x that plus a small discretization bias; the first-order ones (Euler, Euler ancestral, DDIM) carry
  an O(1/N) bias at 25 steps (up to 0.04 in the weights, -20% in a spread) and get a wider band.
  """
  x = solvers.sample(name, LINEAR, mixture_eps(LINEAR, SHARP_STDS), (4000, 2), jax.random.key(0), steps=25)
  weights, means, stds = _mixture_statistics(np.asarray(x))
  tight = name in HIGH_ORDER
  np.testing.assert_allclose(weights, WEIGHTS, atol=0.025 if tight else 0.06)
  np.testing.assert_allclose(means, MEANS, atol=0.03 if tight else 0.07)
  np.testing.assert_allclose(stds / SHARP_STDS, 1.0, atol=0.08 if tight else 0.25)


def test_linspace_grid_of_the_multistep_solvers_ends_with_a_shrinking_jump():
  """Why 'logsnr' is their default: diffusers' 'linspace' drops t = 0 and ends with x0-hat from t = 40 at N = 25
  (sigma = 0.14), the posterior mean, whose spread is s^2 / sqrt(s^2 + sigma^2): ~0.75 s here."""
  eps = mixture_eps(LINEAR, SHARP_STDS)
  x = solvers.sample('dpmpp', LINEAR, eps, (4000, 2), jax.random.key(0), steps=25, spacing='linspace')
  assert solvers.make_grid('dpmpp', LINEAR, 25, 'linspace').timesteps[-1] == 40
  _, _, stds = _mixture_statistics(np.asarray(x))
  assert np.all(stds / SHARP_STDS < 0.85)


# ------------------------------------------------------------------------------------------ API properties

SMALL = sched_lib.get_schedule('linear', num_timesteps=100)


@pytest.fixture
def eager():
  with jax.disable_jit():
    yield


SHAPE = (3, 4, 4, 2)


def toy_eps(x, t):
  t = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.4 * jnp.tanh(x) + 0.002 * t * x


SOLVERS = ('dpmpp', 'dpmpp_sde', 'unipc', 'euler', 'heun', 'euler_ancestral', 'plms', 'pndm')


@pytest.mark.parametrize('name', SOLVERS)
def test_network_calls_counts_the_calls(name):
  for steps in (4, 7):
    calls = []

    def counting(x, t):
      calls.append(np.asarray(t))
      return toy_eps(x, t)

    with jax.disable_jit():  # the scan runs as a Python loop: one denoise_fn call per network call
      solvers.sample(name, SMALL, counting, SHAPE, jax.random.key(0), steps=steps)
    assert len(calls) == solvers.network_calls(name, steps, SMALL.num_timesteps)
    dtype = np.float32 if name in ('euler', 'heun', 'euler_ancestral') else np.int32
    assert all(c.dtype == dtype and c.shape == (SHAPE[0],) for c in calls)


def test_network_calls_table():
  assert [solvers.network_calls(n, 10) for n in SOLVERS] == [10, 10, 10, 10, 19, 10, 11, 19]
  assert solvers.network_calls('plms', 1) == 1
  assert solvers.network_calls('ancestral') == 1000
  assert solvers.network_calls('ddim') == 1000  # the samplers of ddpm_jax.sampling default to T steps
  assert solvers.network_calls('unipc') == 25  # the solvers to 25


def test_registry_lists_every_sampler_with_one_line_of_help():
  lines = solvers.help_lines()
  assert [line.split(':')[0] for line in lines] == list(solvers.SAMPLERS)
  assert set(solvers.SAMPLERS) == {'ancestral', 'respaced', 'ddim', *SOLVERS}
  for info in solvers.SAMPLERS.values():
    assert '\n' not in info.help and len(info.help) < 100
    assert info.default_order in info.orders or not info.orders
    assert info.default_variant in info.variants or not info.variants
    assert info.default_spacing in info.spacings or not info.spacings
    assert set(info.spacings) <= set(solvers.SPACINGS)


def _explodes(x, t):
  raise AssertionError('validation must fail before the network is called')


@pytest.mark.parametrize(
  'name,kwargs,match',
  [
    ('dpm', {}, r"Unknown sampler 'dpm'; choose one of \('ancestral'"),
    ('dpmpp', dict(spacing='cosine'), r"Unknown spacing 'cosine'; choose one of \('linspace'"),
    ('plms', dict(spacing='karras'), r"spacing 'karras' is not available for sampler 'plms'; choose one of"),
    ('ancestral', dict(spacing='linspace'), r"'ancestral' runs all T steps and takes no spacing"),
    ('unipc', dict(steps=0), r'steps must be in \[1, 100\] for sampler .unipc., got 0'),
    ('euler', dict(steps=101), r'steps must be in \[1, 100\]'),
    ('pndm', dict(steps=3), r'steps must be in \[4, 100\] for sampler .pndm.'),
    ('ancestral', dict(steps=10), r"runs all T = 100 steps; for steps=10 use 'respaced'"),
    ('dpmpp', dict(order=4), r"order=4 is not available for sampler 'dpmpp'; choose one of \(1, 2, 3\)"),
    ('euler', dict(order=2), r"Sampler 'euler' has no order option"),
    (
      'unipc',
      dict(variant='bh3'),
      r"variant='bh3' is not available for sampler 'unipc'; choose one of \('bh1', 'bh2'\)",
    ),
    (
      'dpmpp',
      dict(eta=0.5),
      r"Sampler 'dpmpp' takes no eta \(got eta=0.5\); eta applies to \('ddim', 'euler_ancestral'\)",
    ),
    ('ddim', dict(eta=1.5), r'eta must lie in \[0, 1\], got 1.5'),
    ('dpmpp', dict(steps_offset=1), r"steps_offset=1 applies to the 'leading' spacing only"),
    ('dpmpp', dict(spacing='leading', steps_offset=2, steps=99), r'reaches timestep 101, outside \[0, 99\]'),
    (
      'dpmpp',
      dict(spacing='linspace', steps=100),
      r"'linspace' with steps=100 repeats timestep 50; .* at most 99 steps",
    ),
    ('euler', dict(spacing='quadratic', steps=20), r"'quadratic' with steps=20 repeats timestep 0; .* at most 9 steps"),
    ('heun', dict(trace_every=1), r"Sampler 'heun' makes more than one network call per step and has no trace_every"),
    ('dpmpp', dict(steps=10, trace_every=3), r'trace_every must be a positive integer dividing the number of steps'),
    ('unipc', dict(mean_type='xprev'), r"mean_type='xprev' does not work with sampler 'unipc'"),
    ('unipc', dict(mean_type='x0'), r"Unknown mean_type 'x0'"),
  ],
)
def test_bad_choices_raise_before_anything_compiles(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    solvers.validate(name, SMALL.num_timesteps, **kwargs)
  with pytest.raises(ValueError, match=match):
    solvers.sample(name, SMALL, _explodes, SHAPE, jax.random.key(0), **kwargs)


@pytest.mark.usefixtures('eager')
def test_bad_shapes_raise():
  with pytest.raises(ValueError, match=r'x_init has shape \(3, 4, 4, 1\), expected \(3, 4, 4, 2\)'):
    solvers.sample('dpmpp', SMALL, _explodes, SHAPE, jax.random.key(0), steps=5, x_init=jnp.zeros((3, 4, 4, 1)))
  with pytest.raises(ValueError, match=r'denoise_fn returned shape \(3, 4, 4, 3\) .* expected the same shape, or 2C'):
    solvers.sample('dpmpp', SMALL, lambda x, t: jnp.zeros(x.shape[:-1] + (3,)), SHAPE, jax.random.key(0), steps=5)


def test_solver_compiles_once_per_shape_and_step_count():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(scale, key):
    return solvers.sample('unipc', SMALL, lambda x, t: scale * x, SHAPE, key, steps=8)

  outs = [run(jnp.float32(0.1 * s), jax.random.key(s)) for s in range(3)]
  assert not np.allclose(outs[0], outs[1])


@pytest.mark.parametrize('name', ['dpmpp', 'unipc', 'euler', 'euler_ancestral', 'dpmpp_sde', 'ddim'])
@pytest.mark.usefixtures('eager')
def test_trace_every(name):
  key = jax.random.key(2)
  plain = solvers.sample(name, SMALL, toy_eps, SHAPE, key, steps=6)
  final, trace = solvers.sample(name, SMALL, toy_eps, SHAPE, key, steps=6, trace_every=2)
  np.testing.assert_allclose(final, plain, rtol=1e-6, atol=1e-6)
  assert trace.x.shape == (3,) + SHAPE and trace.pred_xstart.shape == (3,) + SHAPE
  np.testing.assert_allclose(trace.x[-1], final, rtol=1e-6, atol=1e-6)
  if name != 'ddim':
    grid = solvers.make_grid(name, SMALL, 6)
    np.testing.assert_allclose(trace.t, grid.timesteps[1::2], rtol=1e-6)  # the timestep of each step's call
    # The last step lands on sigma = 0 with x = x0-hat of its call.
    np.testing.assert_allclose(trace.pred_xstart[-1], final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', SOLVERS)
@pytest.mark.usefixtures('eager')
def test_xstart_network_gives_the_same_samples(name):
  """An x0-predicting network equal to the eps network's x0-hat samples the same chain."""
  abar = jnp.asarray(np.cumprod(1 - np.asarray(SMALL.betas, np.float64)), jnp.float32)

  def x0_net(x, t):  # 'leading' has integer timesteps, where both networks see the node's noise level
    a = jnp.take(abar, t.astype(jnp.int32)).reshape((-1,) + (1,) * (x.ndim - 1))
    return (x - jnp.sqrt(1 - a) * toy_eps(x, t)) / jnp.sqrt(a)

  key = jax.random.key(4)
  a = solvers.sample(name, SMALL, toy_eps, SHAPE, key, steps=8, spacing='leading')
  b = solvers.sample(name, SMALL, x0_net, SHAPE, key, steps=8, spacing='leading', mean_type='xstart')
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', SOLVERS)
@pytest.mark.usefixtures('eager')
def test_learned_variance_channels_are_ignored(name):
  key = jax.random.key(5)
  a = solvers.sample(name, SMALL, toy_eps, SHAPE, key, steps=5)
  b = solvers.sample(name, SMALL, lambda x, t: jnp.concatenate([toy_eps(x, t), 7 + x], -1), SHAPE, key, steps=5)
  np.testing.assert_array_equal(a, b)


@pytest.mark.usefixtures('eager')
def test_clip_denoised_keeps_x0_in_range():
  wild = lambda x, t: 3.0 * jnp.sin(5 * x)  # x0-hat far outside [-1, 1]
  key = jax.random.key(6)
  clipped = solvers.sample('dpmpp', SMALL, wild, SHAPE, key, steps=6, clip_denoised=True)
  assert np.all(np.abs(np.asarray(clipped)) <= 1.0 + 1e-6)  # the last step returns the clipped x0-hat
  assert np.abs(np.asarray(solvers.sample('dpmpp', SMALL, wild, SHAPE, key, steps=6))).max() > 1.5


@pytest.mark.usefixtures('eager')
def test_euler_ancestral_at_eta_0_is_euler():
  key = jax.random.key(7)
  a = solvers.sample('euler_ancestral', SMALL, toy_eps, SHAPE, key, steps=8, eta=0.0)
  np.testing.assert_allclose(a, solvers.sample('euler', SMALL, toy_eps, SHAPE, key, steps=8), rtol=1e-6, atol=1e-6)
  b = solvers.sample('euler_ancestral', SMALL, toy_eps, SHAPE, key, steps=8)
  assert not np.allclose(a, b)


@pytest.mark.usefixtures('eager')
def test_the_samplers_of_sampling_are_wrapped_unchanged():
  key = jax.random.key(8)
  shape = (2, 2, 2, 1)
  tiny = sched_lib.get_schedule('linear', num_timesteps=20)
  np.testing.assert_array_equal(
    solvers.sample('ddim', tiny, toy_eps, shape, key, steps=10, eta=0.3),
    sampling.ddim_sample_loop(tiny, toy_eps, shape, key, num_steps=10, eta=0.3),
  )
  short, timestep_map = sched_lib.respace(tiny, sched_lib.space_timesteps(20, 10))
  np.testing.assert_array_equal(
    solvers.sample('respaced', tiny, toy_eps, shape, key, steps=10, var_type='fixedsmall'),
    sampling.p_sample_loop(short, sampling.remap_timesteps(toy_eps, timestep_map), shape, key, var_type='fixedsmall'),
  )
  np.testing.assert_array_equal(
    solvers.sample('ancestral', tiny, toy_eps, shape, key), sampling.p_sample_loop(tiny, toy_eps, shape, key)
  )
  # Other spacings pass their timesteps: DDIMScheduler's 'trailing' = round(T - k T / N) - 1.
  np.testing.assert_array_equal(
    solvers.sample('ddim', tiny, toy_eps, shape, key, steps=10, spacing='trailing'),
    sampling.ddim_sample_loop(tiny, toy_eps, shape, key, timesteps=np.arange(1, 20, 2)),
  )


@pytest.mark.usefixtures('eager')
@pytest.mark.parametrize('name', ['dpmpp_sde', 'heun', 'pndm'])
def test_vmap_over_keys_is_per_image_sampling(name):
  """sample.py's path: one image per key, vmapped; each image equals its own batch-of-one run."""
  keys = jax.random.split(jax.random.key(10), 3)
  one = lambda k: solvers.sample(name, SMALL, toy_eps, (1, 4, 4, 2), k, steps=5)[0]
  batched = jax.vmap(one)(keys)
  for j in range(3):
    np.testing.assert_allclose(batched[j], one(keys[j]), rtol=1e-6, atol=1e-6)
  assert not np.allclose(batched[0], batched[1])


@pytest.mark.usefixtures('eager')
def test_classifier_free_guidance_acts_on_the_prediction():
  def model_fn(x, t, y):
    return toy_eps(x, t) + 0.1 * (y.astype(jnp.float32) - 1.5).reshape((-1,) + (1,) * (x.ndim - 1))

  labels = jnp.array([0, 1, 2])
  guided = guidance.classifier_free_guidance(model_fn, labels, null_label=3, guidance_scale=2.0)
  by_hand = lambda x, t: 3.0 * model_fn(x, t, labels) - 2.0 * model_fn(x, t, jnp.full_like(labels, 3))
  key = jax.random.key(9)
  for name in ('unipc', 'heun'):
    a = solvers.sample(name, SMALL, guided, SHAPE, key, steps=6)
    np.testing.assert_allclose(a, solvers.sample(name, SMALL, by_hand, SHAPE, key, steps=6), rtol=1e-5, atol=1e-5)


def test_unet_accepts_fractional_timesteps():
  """The Euler family calls the network at interpolated timesteps: the U-Net embeds t as a float32 number."""
  emb = lambda t: np.asarray(get_timestep_embedding(jnp.asarray(t), 128))
  np.testing.assert_array_equal(emb([5, 999]), emb([5.0, 999.0]))
  half = emb([5.5])[0]
  assert np.all(np.isfinite(half)) and not np.allclose(half, emb([5])[0]) and not np.allclose(half, emb([6])[0])
  model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
  x = jnp.zeros((2, 16, 16, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((2,), jnp.int32), train=False))
  out = jax.eval_shape(lambda p: model.apply(p, x, jnp.array([0.5, 41.625]), train=False), params)
  assert out.shape == (2, 16, 16, 3)


def test_docs_example_runs():
  text = (pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'sampling.md').read_text()
  code = re.search(r'```python\n(.*?)```', text, re.S).group(1)
  namespace = {}
  exec(compile(code, 'docs/sampling.md', 'exec'), namespace)  # noqa: S102
  assert namespace['images'].shape == (4, 8, 8, 3)
  assert np.all(np.isfinite(np.asarray(namespace['images'])))
