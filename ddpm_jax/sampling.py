"""Samplers of the reverse process, each one ``lax.scan`` over the reverse timesteps.

The paper's ancestral sampler (Algorithm 2 with the original code's x_0 clipping) is
:func:`p_sample_loop`: start from x_{T-1} ~ N(0, I) and for t = T-1 .. 0 draw
x_{t-1} = mu_theta(x_t, t) + sigma_t z, with no noise at t = 0 (the paper displays mu_theta(x_1, 1)
noiselessly). The network enters as ``denoise_fn(x_t, t)`` (see :mod:`ddpm_jax.diffusion`).

Faster samplers for the same trained network: :func:`ddim_sample_loop` (Song et al. 2021, any number of
steps and eta) and respaced ancestral sampling (Nichol & Dhariwal 2021): ``p_sample_loop`` on
``schedule.respace(...)`` with the network wrapped by :func:`remap_timesteps`.

The functions are pure and compile to one scan whose memory does not grow with T: pass the network
parameters as arguments of the function you jit, not as closed-over constants::

  @jax.jit
  def sample(params, key):
    denoise_fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
    return sampling.p_sample_loop(schedule, denoise_fn, (16, 32, 32, 3), key)

The same function runs unchanged under ``jax.pmap`` with one key per device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, progress
from ddpm_jax import schedule as sched_lib
from ddpm_jax.diffusion import DenoiseFn, MeanType, VarType
from ddpm_jax.schedule import Schedule


class SampleTrace(NamedTuple):
  """Snapshots along the reverse chain (e.g. for the paper's progressive-generation figure).

  Attributes:
    t: [N] int32, the timestep of each snapshot: x_t is the state after the reverse step at t (so the
      last snapshot, t = 0, holds the final sample).
    x: [N, B, H, W, C] the chain's state after the step at ``t``.
    pred_xstart: [N, B, H, W, C] the network's x_0 estimate at ``t``.
  """

  t: jax.Array
  x: jax.Array
  pred_xstart: jax.Array


def p_sample(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  x_t: jax.Array,
  t: jax.Array,
  key: jax.Array,
  *,
  mean_type: MeanType = 'eps',
  var_type: VarType = 'fixedlarge',
  clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """One ancestral step: x_{t-1} ~ p_theta(x_{t-1} | x_t), noiseless where t == 0.

  Args:
    schedule: the forward process.
    denoise_fn: ``denoise_fn(x_t, t) -> output``.
    x_t: [B, H, W, C].
    t: [B] int timesteps.
    key: PRNG key for the noise.
    mean_type: network parameterization.
    var_type: reverse variance: 'fixedlarge' (sigma^2 = beta, CIFAR-10), 'fixedsmall' (beta-tilde,
      LSUN/CelebA-HQ) or 'learned'.
    clip_denoised: clip the x_0 estimate to [-1, 1] before forming the mean (the original code does).

  Returns:
    ``(x_{t-1} [B, H, W, C], pred_xstart [B, H, W, C])``.
  """
  out = diffusion.p_mean_variance(
    schedule, denoise_fn, x_t, t, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised
  )
  noise = jax.random.normal(key, x_t.shape, x_t.dtype)
  nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
  return out.mean + nonzero * jnp.exp(0.5 * out.log_variance) * noise, out.pred_xstart


StepFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def reverse_scan(
  step_fn: StepFn,
  x_init: jax.Array,
  timesteps: jax.Array | Sequence[int],
  key: jax.Array,
  *,
  trace_every: int | None = None,
) -> jax.Array | tuple[jax.Array, SampleTrace]:
  """Runs ``x <- step_fn(x, t, key)[0]`` for t in ``timesteps`` (in the given order) as one scan.

  The building block of every sampler here. Keys are split up front, one per step. With ``trace_every
  = k`` the scan is nested (an outer scan over groups of k steps) and the state after every k-th step is
  kept, so memory grows with len(timesteps)/k, never with all the steps. The scan is `ddpm_jax.progress.scan`:
  inside a `ddpm_jax.progress.reporting` context (at trace time) each step counts as one network call; outside one
  it is ``jax.lax.scan``.

  Args:
    step_fn: ``step_fn(x, t [B] int32, key) -> (x_next, pred_xstart)``.
    x_init: the starting state [B, H, W, C].
    timesteps: [N] int timesteps in the order they are visited (usually decreasing).
    key: PRNG key; ``split(key, N)[j]`` drives step j.
    trace_every: if given, also return snapshots after steps k-1, 2k-1, ...; N must be divisible by k.

  Returns:
    The final state, or ``(final state, SampleTrace)`` with ``trace_every``.
  """
  timesteps = jnp.asarray(timesteps, dtype=jnp.int32)
  if timesteps.ndim != 1 or timesteps.shape[0] < 1:
    raise ValueError(f'timesteps must be a non-empty 1-D sequence, got shape {timesteps.shape}.')
  num_steps = timesteps.shape[0]
  batch = x_init.shape[0]
  keys = jax.random.split(key, num_steps)

  def body(x, inputs):
    t, step_key = inputs
    x, pred_xstart = step_fn(x, jnp.full((batch,), t, dtype=jnp.int32), step_key)
    return x, pred_xstart

  if trace_every is None:
    x, _ = progress.scan(lambda x, inp: (body(x, inp)[0], None), x_init, (timesteps, keys))
    return x
  if not isinstance(trace_every, int) or trace_every < 1 or num_steps % trace_every:
    raise ValueError(
      f'trace_every must be a positive integer dividing the number of steps ({num_steps}), got {trace_every!r}.'
    )
  groups = num_steps // trace_every
  grouped = (timesteps.reshape(groups, trace_every), keys.reshape((groups, trace_every) + keys.shape[1:]))

  def group_body(x, inputs):
    x, pred_xstarts = jax.lax.scan(body, x, inputs)
    return x, (inputs[0][-1], x, pred_xstarts[-1])

  x, (t_trace, x_trace, pred_trace) = progress.scan(group_body, x_init, grouped, units=np.full(groups, trace_every))
  return x, SampleTrace(t=t_trace, x=x_trace, pred_xstart=pred_trace)


def p_sample_loop(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  shape: Sequence[int],
  key: jax.Array,
  *,
  mean_type: MeanType = 'eps',
  var_type: VarType = 'fixedlarge',
  clip_denoised: bool = True,
  trace_every: int | None = None,
  x_init: jax.Array | None = None,
  start_t: int | None = None,
) -> jax.Array | tuple[jax.Array, SampleTrace]:
  """The paper's ancestral sampler: T network evaluations from pure noise to an image in [-1, 1].

  Args:
    schedule: the forward process (T = ``schedule.num_timesteps``).
    denoise_fn: ``denoise_fn(x_t, t) -> output``.
    shape: [B, H, W, C] of the samples.
    key: PRNG key; split into the initial-noise key and one key per step.
    mean_type: network parameterization.
    var_type: 'fixedlarge' (CIFAR-10 in the paper), 'fixedsmall' (LSUN, CelebA-HQ) or 'learned'.
    clip_denoised: clip x_0 estimates to [-1, 1] at every step (the original code's default).
    trace_every: if given, also return every ``trace_every``-th state and x_0 estimate (a divisor of T).
    x_init: optional starting state instead of fresh noise (e.g. for interpolation figures).
    start_t: run the chain from x_{start_t} = x_init down to 0 (default T-1; with a smaller start_t and
      ``x_init = q_sample(x0, start_t)`` this is noise-then-denoise reconstruction, or SDEdit).

  Returns:
    Samples [B, H, W, C] (not clipped or quantized), or ``(samples, SampleTrace)`` with ``trace_every``.
  """
  diffusion.check_types(mean_type=mean_type, var_type=var_type)
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2:
    raise ValueError(f'shape must be [B, ...] with a batch axis, got {shape}.')
  start_t = schedule.num_timesteps - 1 if start_t is None else start_t
  if not isinstance(start_t, int) or not 0 <= start_t < schedule.num_timesteps:
    raise ValueError(f'start_t must be an integer in [0, {schedule.num_timesteps - 1}], got {start_t!r}.')
  noise_key, loop_key = jax.random.split(key)
  if x_init is None:
    x_init = jax.random.normal(noise_key, shape, jnp.float32)
  elif x_init.shape != shape:
    raise ValueError(f'x_init has shape {x_init.shape}, expected {shape}.')

  def step(x, t, step_key):
    return p_sample(
      schedule, denoise_fn, x, t, step_key, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised
    )

  timesteps = jnp.arange(start_t, -1, -1, dtype=jnp.int32)
  return reverse_scan(step, x_init, timesteps, loop_key, trace_every=trace_every)


def remap_timesteps(denoise_fn: DenoiseFn, timestep_map: jax.Array | Sequence[int]) -> DenoiseFn:
  """Wraps ``denoise_fn`` so that a respaced schedule's step j calls the network at ``timestep_map[j]``."""
  timestep_map = jnp.asarray(timestep_map, dtype=jnp.int32)
  return lambda x_t, t: denoise_fn(x_t, jnp.take(timestep_map, t))


def ddim_sample_loop(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  shape: Sequence[int],
  key: jax.Array,
  *,
  num_steps: int | None = None,
  timesteps: Sequence[int] | None = None,
  eta: float = 0.0,
  mean_type: MeanType = 'eps',
  clip_denoised: bool = True,
  trace_every: int | None = None,
  x_init: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, SampleTrace]:
  """DDIM sampling (Song, Meng & Ermon 2021, Eq. 12) over a subsequence of the training timesteps.

  For consecutive kept timesteps t > s (s = -1 after the last, with alpha_bar_{-1} = 1):
  x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z, with
  sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s). x0_hat is clipped to [-1, 1]
  (if ``clip_denoised``) and eps_hat is recomputed from it. eta = 0 is deterministic given x_init;
  eta = 1 with all T timesteps is the ancestral sampler with the 'fixedsmall' variance.

  Args:
    schedule: the training schedule (T steps).
    denoise_fn: ``denoise_fn(x_t, t) -> output`` at the original timesteps.
    shape: [B, H, W, C].
    key: PRNG key (initial noise and, if eta > 0, per-step noise).
    num_steps: number of evenly spaced timesteps (``schedule.space_timesteps``); default T.
    timesteps: explicit increasing timesteps instead of ``num_steps``.
    eta: 0 for deterministic DDIM, 1 for DDPM-like stochasticity.
    mean_type: network parameterization (any; eps_hat is derived from x0_hat).
    clip_denoised: clip x0_hat to [-1, 1].
    trace_every: as in :func:`p_sample_loop` (must divide the number of steps).
    x_init: optional starting noise of ``shape``.

  Returns:
    Samples [B, H, W, C], or ``(samples, SampleTrace)`` with ``trace_every``.
  """
  diffusion.check_types(mean_type=mean_type)
  if num_steps is not None and timesteps is not None:
    raise ValueError('Pass num_steps or timesteps, not both.')
  if not 0.0 <= float(eta) <= 1.0:
    raise ValueError(f'eta must lie in [0, 1], got {eta!r}.')
  num_timesteps = schedule.num_timesteps
  if timesteps is None:
    timesteps = sched_lib.space_timesteps(num_timesteps, num_steps or num_timesteps)
  timesteps = np.asarray(timesteps, dtype=np.int64)
  if (
    timesteps.ndim != 1
    or timesteps.size == 0
    or np.any(np.diff(timesteps) <= 0)
    or timesteps[0] < 0
    or timesteps[-1] >= num_timesteps
  ):
    raise ValueError(f'timesteps must be strictly increasing indices in [0, {num_timesteps - 1}], got {timesteps}.')
  shape = tuple(int(s) for s in shape)
  # alpha_bar of the step each kept timestep jumps to, as a [T] table indexed by t (static).
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  abar_next = np.ones(num_timesteps)
  abar_next[timesteps[1:]] = abar[timesteps[:-1]]
  abar_next = jnp.asarray(abar_next, jnp.float32)
  noise_key, loop_key = jax.random.split(key)
  if x_init is None:
    x_init = jax.random.normal(noise_key, shape, jnp.float32)
  elif x_init.shape != shape:
    raise ValueError(f'x_init has shape {x_init.shape}, expected {shape}.')

  def step(x, t, step_key):
    out = diffusion.p_mean_variance(
      schedule, denoise_fn, x, t, mean_type=mean_type, var_type='fixedsmall', clip_denoised=clip_denoised
    )
    eps = diffusion.predict_eps_from_xstart(schedule, x, t, out.pred_xstart)
    a_t = diffusion.extract(schedule.alphas_cumprod, t, x.ndim)
    a_s = diffusion.extract(abar_next, t, x.ndim)
    sigma = eta * jnp.sqrt((1 - a_s) / (1 - a_t)) * jnp.sqrt(1 - a_t / a_s)
    mean = jnp.sqrt(a_s) * out.pred_xstart + jnp.sqrt(jnp.maximum(1 - a_s - sigma**2, 0.0)) * eps
    return mean + sigma * jax.random.normal(step_key, x.shape, x.dtype), out.pred_xstart

  return reverse_scan(step, x_init, timesteps[::-1].astype(np.int32), loop_key, trace_every=trace_every)
