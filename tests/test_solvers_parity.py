"""ddpm_jax.solvers against diffusers 0.42's schedulers, trajectory for trajectory.

Every sampler runs N = 10 and 25 steps of the DDPM linear schedule (T = 1000, eps-prediction) with a fixed
stand-in network written twice (jnp and torch), from the same initial noise and, for the stochastic samplers,
with the noise our sampler draws from its keys handed to diffusers, for every spacing the scheduler offers.

Tolerance: |ours - diffusers| <= 2e-5 on samples of magnitude ~1.5. Both sides compute in float32 (unit roundoff
6e-8); each of the <= 34 network calls adds a few ulps relative to the state, and the first update
coefficients reach ~150 (sigma_max of the schedule), so differences of a few 1e-6 are expected (the largest
observed is 5e-6). Any wrong coefficient is far outside it: ``test_tolerance_separates_neighbouring_algorithms``
checks that the closest variants (bh1 vs bh2, midpoint vs heun, 2M vs 3M, PLMS vs PNDM, offset 0 vs 1) differ
by more than 100x the tolerance.

Schedule tables: diffusers builds alphas_cumprod in float32 (a cumulative product of 1000 float32 factors;
1 - abar near t = 0 keeps only ~4 digits); ours are float64. To compare the algorithms rather than the table
precision, the schedulers get the same float64 alphas_cumprod (``_f64``); ``test_stock_float32_tables`` shows the
difference this makes (up to ~2e-5, within 1e-4).

Speed: the matrix runs our samplers op by op (``jax.disable_jit``), the same code without compiling one scan per
case; ``test_compiled_matches_diffusers`` checks the compiled path.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module  # noqa: E402
from diffusers import (  # noqa: E402
  DPMSolverMultistepScheduler,
  EulerAncestralDiscreteScheduler,
  EulerDiscreteScheduler,
  HeunDiscreteScheduler,
  PNDMScheduler,
  UniPCMultistepScheduler,
)

from ddpm_jax import schedule as sched_lib  # noqa: E402
from ddpm_jax import solvers  # noqa: E402

SCHED = sched_lib.get_schedule('linear')
ABAR64 = np.cumprod(1.0 - np.asarray(SCHED.betas, np.float64))
SIGMAS64 = np.sqrt((1.0 - ABAR64) / ABAR64)
SHAPE = (2, 4, 4, 3)
TOL = 2e-5
CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear')
KEY = jax.random.key(3)
X_INIT = np.asarray(jax.random.normal(jax.random.key(7), SHAPE, jnp.float32))
MIX = np.array([[0.6, -0.3, 0.2], [0.1, 0.5, -0.4], [-0.2, 0.3, 0.7]], np.float32)


# The stand-in network: roughly the optimal eps for N(0.1, 0.5^2) data (abar(t) in a smooth closed form, so any
# fractional t works), plus a nonlinear channel-mixing term. Written in jnp and in torch.
def eps_jax(x, t):
  t = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  u = 1e-4 * t + 9.95e-6 * t * t
  a = jnp.exp(-u)
  return jnp.sqrt(-jnp.expm1(-u)) * (x - jnp.sqrt(a) * 0.1) / (a * 0.25 + 1 - a) + 0.05 * jnp.tanh(x @ MIX + t / 500)


def eps_torch(x, t):
  t = torch.full((x.shape[0],) + (1,) * (x.ndim - 1), float(t), dtype=torch.float32)
  u = 1e-4 * t + 9.95e-6 * t * t
  a = torch.exp(-u)
  mixed = x @ torch.from_numpy(MIX)
  return torch.sqrt(-torch.expm1(-u)) * (x - torch.sqrt(a) * 0.1) / (a * 0.25 + 1 - a) + 0.05 * torch.tanh(
    mixed + t / 500
  )


# An x0-predicting stand-in for the 'xstart' parameterization (diffusers' prediction_type='sample').
def x0_jax(x, t):
  return 1.3 * jnp.tanh(x @ MIX + t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1)) / 700)


def x0_torch(x, t):
  return 1.3 * torch.tanh(x @ torch.from_numpy(MIX) + float(t) / 700)


def _f64(scheduler):
  scheduler.alphas_cumprod = torch.from_numpy(ABAR64.copy())
  return scheduler


def ours(name, steps, *, fn=eps_jax, **options):
  with jax.disable_jit():
    return np.asarray(solvers.sample(name, SCHED, fn, SHAPE, KEY, steps=steps, x_init=jnp.asarray(X_INIT), **options))


def our_noise(name, steps):
  """The noise our stochastic samplers draw: call k uses split(loop_key, R)[k] (ddpm_jax.solvers docstring)."""
  keys = jax.random.split(jax.random.split(KEY)[1], solvers.network_calls(name, steps))
  return [torch.from_numpy(np.asarray(jax.random.normal(k, SHAPE, jnp.float32))) for k in keys]


def run_diffusers(scheduler, steps, *, scale=1.0, noise=None, x0_at_end=False, timesteps=None, patch=None, net=None):
  """diffusers' sampling loop (as its pipelines run it) from our initial state times ``scale``."""
  net = net or eps_torch
  if timesteps is not None:
    scheduler.set_timesteps(timesteps=timesteps)
  else:
    scheduler.set_timesteps(steps)
  if patch is not None:
    patch(scheduler)
  x = torch.from_numpy(X_INIT.copy()) * scale
  ts = list(scheduler.timesteps)
  for i, t in enumerate(ts):
    out = net(scheduler.scale_model_input(x, t), t)
    if x0_at_end and i == len(ts) - 1:
      # UniPC bh1 returns NaN at the final step to sigma = 0 (-alpha_t * B(h) * 0 with B(h) = h = -inf); that
      # step is the order-1 predictor with sigma_t = 0, i.e. x0-hat, which convert_model_output gives.
      return scheduler.convert_model_output(out, sample=x).numpy()
    kwargs = {'variance_noise': noise[i]} if noise is not None else {}
    x = scheduler.step(out, t, x, **kwargs).prev_sample
  return x.numpy()


def quadratic(steps):
  return np.floor(np.linspace(0, math.sqrt(800), steps) ** 2)[::-1].astype(np.int64)


def euler_scale(name, steps, spacing, offset=0):
  """Our x_init is the VP state x_t; the Euler schedulers' state is x_t / sqrt(abar) = x_t sqrt(1 + sigma_0^2).

  (diffusers' pipelines scale the initial noise by sigma_max for 'linspace'/'trailing' instead, 2e-5 relative
  less; we start from the exact VP-to-sigma conversion for every spacing.)
  """
  sigma0 = float(solvers.make_grid(name, SCHED, steps, spacing, steps_offset=offset).sigmas[0])
  return math.sqrt(1.0 + sigma0**2)


MULTISTEP = {  # our spacing -> DPMSolverMultistepScheduler / UniPCMultistepScheduler config
  'linspace': dict(timestep_spacing='linspace'),
  'leading': dict(timestep_spacing='leading', steps_offset=1),
  'trailing': dict(timestep_spacing='trailing'),
  'karras': dict(use_karras_sigmas=True),
  'logsnr': 'see below',
  'quadratic': 'custom timesteps',
}
EULER = {
  'linspace': dict(timestep_spacing='linspace'),
  'leading': dict(timestep_spacing='leading', steps_offset=1),
  'trailing': dict(timestep_spacing='trailing'),
  'karras': dict(use_karras_sigmas=True),
  'logsnr': dict(use_exponential_sigmas=True),  # exp(linspace(log sigma_max, log sigma_min)): our logsnr levels
  'quadratic': {},
}
OFFSET = {'leading': 1}


@pytest.mark.parametrize('steps', [10, 25])
@pytest.mark.parametrize('spacing', solvers.SPACINGS)
@pytest.mark.parametrize('name,order', [('dpmpp', 2), ('dpmpp', 3), ('dpmpp_sde', 2)])
def test_dpmpp_matches_dpmsolver_multistep(name, order, spacing, steps):
  config = dict(CONFIG, solver_order=order, prediction_type='epsilon')
  if name == 'dpmpp_sde':
    config['algorithm_type'] = 'sde-dpmsolver++'
  config.update({'logsnr': dict(use_lu_lambdas=True), 'quadratic': {}}.get(spacing, MULTISTEP[spacing]))
  custom = [int(t) for t in quadratic(steps)] if spacing == 'quadratic' else None
  noise = our_noise(name, steps) if name == 'dpmpp_sde' else None
  theirs = run_diffusers(_f64(DPMSolverMultistepScheduler(**config)), steps, noise=noise, timesteps=custom)
  mine = ours(name, steps, order=order, spacing=spacing, steps_offset=OFFSET.get(spacing, 0))
  np.testing.assert_allclose(mine, theirs, rtol=0, atol=TOL)


def _unipc_patch(spacing, steps):
  """UniPCMultistepScheduler has no use_lu_lambdas nor custom timesteps: install ours where it lacks them."""
  if spacing == 'logsnr':

    def patch(s):  # use_exponential_sigmas gives our levels but truncates the timesteps; DPM-Solver rounds
      levels = s.sigmas.double().numpy()[:-1]
      s.timesteps = torch.from_numpy(np.round(s._sigma_to_t(levels, np.log(SIGMAS64))).astype(np.int64))

    return dict(use_exponential_sigmas=True), patch
  if spacing == 'quadratic':

    def patch(s):
      t = quadratic(steps)
      s.timesteps = torch.from_numpy(t)
      s.sigmas = torch.from_numpy(np.append(SIGMAS64[t], 0.0).astype(np.float32))

    return {}, patch
  return MULTISTEP[spacing], None


@pytest.mark.parametrize('steps', [10, 25])
@pytest.mark.parametrize('spacing', solvers.SPACINGS)
@pytest.mark.parametrize('order,variant', [(2, 'bh2'), (3, 'bh2'), (2, 'bh1'), (3, 'bh1')])
def test_unipc_matches_unipc_multistep(order, variant, spacing, steps):
  extra, patch = _unipc_patch(spacing, steps)
  scheduler = UniPCMultistepScheduler(
    **CONFIG, prediction_type='epsilon', solver_order=order, solver_type=variant, **extra
  )
  theirs = run_diffusers(_f64(scheduler), steps, x0_at_end=variant == 'bh1', patch=patch)
  mine = ours('unipc', steps, order=order, variant=variant, spacing=spacing, steps_offset=OFFSET.get(spacing, 0))
  np.testing.assert_allclose(mine, theirs, rtol=0, atol=TOL)


def _euler_reference(spacing, steps):
  scheduler = _f64(EulerDiscreteScheduler(**CONFIG, prediction_type='epsilon', **EULER[spacing]))
  if spacing == 'quadratic':
    scheduler.set_timesteps(timesteps=[float(t) for t in quadratic(steps)])
  else:
    scheduler.set_timesteps(steps)
  return scheduler


@pytest.mark.parametrize('steps', [10, 25])
@pytest.mark.parametrize('spacing', solvers.SPACINGS)
@pytest.mark.parametrize('name', ['euler', 'heun', 'euler_ancestral'])
def test_euler_family_matches_k_diffusion_schedulers(name, spacing, steps, monkeypatch):
  offset = OFFSET.get(spacing, 0)
  scale = euler_scale(name, steps, spacing, offset)
  custom = [float(t) for t in quadratic(steps)] if spacing == 'quadratic' else None
  if name == 'euler_ancestral':
    # EulerAncestralDiscreteScheduler offers only linspace/leading/trailing: give it the sigma/timestep table
    # that EulerDiscreteScheduler builds for the spacing, and our noise in place of its randn_tensor.
    table = _euler_reference(spacing, steps)

    def patch(s):
      s.sigmas, s.timesteps = table.sigmas.clone(), table.timesteps.clone()

    noise = iter(our_noise(name, steps))
    monkeypatch.setattr(euler_a_module, 'randn_tensor', lambda *a, **k: next(noise))
    uniform = {k: v for k, v in EULER[spacing].items() if k in ('timestep_spacing', 'steps_offset')}
    scheduler = EulerAncestralDiscreteScheduler(**CONFIG, prediction_type='epsilon', **uniform)
    theirs = run_diffusers(_f64(scheduler), steps, scale=scale, patch=patch)
  else:
    cls = EulerDiscreteScheduler if name == 'euler' else HeunDiscreteScheduler
    theirs = run_diffusers(
      _f64(cls(**CONFIG, prediction_type='epsilon', **EULER[spacing])), steps, scale=scale, timesteps=custom
    )
  mine = ours(name, steps, spacing=spacing, steps_offset=offset)
  np.testing.assert_allclose(mine, theirs, rtol=0, atol=TOL)


PNDM_CONFIG = dict(CONFIG, set_alpha_to_one=True)  # we land on abar = 1, the clean sample (see docs/sampling.md)


@pytest.mark.parametrize('steps', [10, 25])
@pytest.mark.parametrize('spacing,offset', [('leading', 1), ('leading', 0), ('trailing', 0)])
@pytest.mark.parametrize('name', ['plms', 'pndm'])
def test_plms_pndm_match_pndm_scheduler(name, spacing, offset, steps):
  scheduler = PNDMScheduler(**PNDM_CONFIG, skip_prk_steps=name == 'plms', timestep_spacing=spacing, steps_offset=offset)
  theirs = run_diffusers(_f64(scheduler), steps)
  np.testing.assert_allclose(ours(name, steps, spacing=spacing, steps_offset=offset), theirs, rtol=0, atol=TOL)


def test_plms_linspace_steps_to_the_next_timestep():
  """PNDMScheduler always steps by T // N, which for 'linspace' is not the gap between its own timesteps (100 vs
  111 at N = 10), so it evaluates the network at 888 on a sample it moved to 899. We step to the next timestep;
  diffusers with its stride set to the gap computes the same. (PNDM's Runge-Kutta half steps cannot be lined up
  this way: for an odd gap diffusers moves the sample to t - gap // 2 but calls the network at t_next + gap // 2;
  we use the latter for both.)"""
  steps, gap = 10, 111
  assert np.all(-np.diff(solvers.make_grid('plms', SCHED, steps, 'linspace').timesteps) == gap)

  def patch(s):
    s.num_inference_steps = 1000 // gap  # T // 9 = 111: the stride step_plms uses

  scheduler = PNDMScheduler(**PNDM_CONFIG, skip_prk_steps=True, timestep_spacing='linspace')
  theirs = run_diffusers(_f64(scheduler), steps, patch=patch)
  np.testing.assert_allclose(ours('plms', steps, spacing='linspace'), theirs, rtol=0, atol=TOL)


@pytest.mark.parametrize(
  'name,cls,extra',
  [
    ('dpmpp', DPMSolverMultistepScheduler, dict(timestep_spacing='linspace')),
    ('unipc', UniPCMultistepScheduler, dict(timestep_spacing='linspace')),
    ('euler', EulerDiscreteScheduler, dict(timestep_spacing='linspace')),
    ('heun', HeunDiscreteScheduler, dict(timestep_spacing='linspace')),
  ],
)
def test_xstart_parameterization_matches_sample_prediction(name, cls, extra):
  steps = 10
  scale = euler_scale(name, steps, 'linspace') if name in ('euler', 'heun') else 1.0
  scheduler = _f64(cls(**CONFIG, prediction_type='sample', **extra))
  theirs = run_diffusers(scheduler, steps, scale=scale, net=x0_torch)
  mine = ours(name, steps, fn=x0_jax, mean_type='xstart', spacing='linspace')
  np.testing.assert_allclose(mine, theirs, rtol=0, atol=TOL)


@pytest.mark.parametrize(
  'name,cls,extra',
  [
    ('dpmpp', DPMSolverMultistepScheduler, dict(thresholding=True, sample_max_value=1.0)),
    ('unipc', UniPCMultistepScheduler, dict(thresholding=True, sample_max_value=1.0)),
    ('heun', HeunDiscreteScheduler, dict(clip_sample=True)),
  ],
)
def test_clip_denoised_matches_thresholding_at_one(name, cls, extra):
  steps = 10
  scale = euler_scale(name, steps, 'linspace') if name == 'heun' else 1.0
  theirs = run_diffusers(_f64(cls(**CONFIG, prediction_type='epsilon', **extra)), steps, scale=scale)
  clipped = ours(name, steps, spacing='linspace', clip_denoised=True)
  np.testing.assert_allclose(clipped, theirs, rtol=0, atol=TOL)
  assert np.abs(clipped - ours(name, steps, spacing='linspace')).max() > 100 * TOL  # clipping did something


def test_stock_float32_tables():
  """With diffusers' own float32 alphas_cumprod the trajectories still agree to 1e-4 (up to ~2e-5 observed)."""
  for spacing, extra in (('karras', dict(use_karras_sigmas=True)), ('logsnr', dict(use_lu_lambdas=True))):
    theirs = run_diffusers(DPMSolverMultistepScheduler(**CONFIG, solver_order=3, **extra), 10)
    np.testing.assert_allclose(ours('dpmpp', 10, order=3, spacing=spacing), theirs, rtol=0, atol=1e-4)


def test_tolerance_separates_neighbouring_algorithms():
  steps = 10
  pairs = [
    (dict(name='unipc', variant='bh1', spacing='linspace'), dict(name='unipc', variant='bh2', spacing='linspace')),
    (
      dict(name='dpmpp', variant='heun', spacing='linspace'),
      dict(name='dpmpp', variant='midpoint', spacing='linspace'),
    ),
    (dict(name='dpmpp', order=2, spacing='linspace'), dict(name='dpmpp', order=3, spacing='linspace')),
    (dict(name='plms'), dict(name='pndm')),
    (dict(name='euler', spacing='leading'), dict(name='euler', spacing='leading', steps_offset=1)),
  ]
  for a, b in pairs:
    assert np.abs(ours(steps=steps, **a) - ours(steps=steps, **b)).max() > 100 * TOL, (a, b)


@pytest.mark.parametrize('name', ['dpmpp', 'unipc', 'pndm'])
def test_compiled_matches_diffusers(name):
  """The samplers as users run them (under jit, one scan) against the peer."""
  steps = 25
  run = jax.jit(lambda x: solvers.sample(name, SCHED, eps_jax, SHAPE, KEY, steps=steps, spacing='leading', x_init=x))
  mine = np.asarray(run(jnp.asarray(X_INIT)))
  if name == 'pndm':
    scheduler = PNDMScheduler(**PNDM_CONFIG, timestep_spacing='leading')
  else:
    cls = DPMSolverMultistepScheduler if name == 'dpmpp' else UniPCMultistepScheduler
    scheduler = cls(**CONFIG, timestep_spacing='leading')
  np.testing.assert_allclose(mine, run_diffusers(_f64(scheduler), steps), rtol=0, atol=TOL)
