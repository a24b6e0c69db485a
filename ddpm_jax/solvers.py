"""Fast samplers for a trained DDPM: DPM-Solver++, UniPC, Euler/Heun/Euler-ancestral and PLMS/PNDM.

Each sampler is a pure function ``*_sample_loop(schedule, denoise_fn, shape, key, *, steps, ...)`` that runs ONE
``lax.scan`` over a table of coefficients computed up front in float64 numpy (from the schedule's betas and the
step spacing), so it compiles once per shape and step count, and whose memory does not grow with the number of
steps. Every update is linear in the current state, a stored state, the history of network predictions and (for
the stochastic samplers) fresh noise; the table holds those linear coefficients, one row per network call, and
the scan body evaluates the network once and applies its row (see docs/sampling.md for the formulas).

What the samplers compute matches the reference implementation, diffusers 0.42 (its ``DPMSolverMultistepScheduler``,
``UniPCMultistepScheduler``, ``EulerDiscreteScheduler``, ``HeunDiscreteScheduler``,
``EulerAncestralDiscreteScheduler`` and ``PNDMScheduler``: the same warm-up and final-step orders, every spacing
they offer), trajectory for trajectory (tests/test_solvers_parity.py); the deliberate differences (default
spacings among them) are listed in docs/sampling.md.

Conventions:
  * The network enters as ``denoise_fn(x_t, t)`` exactly as for :mod:`ddpm_jax.sampling`: ``x_t`` is the
    variance-preserving state (``sqrt(abar) x_0 + sqrt(1 - abar) eps``) and ``t`` a [B] vector of timesteps in
    code units 0..T-1. Discrete-time samplers (DPM-Solver++, UniPC, PLMS/PNDM) pass int32 timesteps; the Euler
    family passes float32 timesteps, fractional for the 'linspace', 'karras' and 'logsnr' spacings (diffusers and
    k-diffusion do the same: the noise level sigma is interpolated between the trained timesteps). The U-Net of
    :mod:`ddpm_jax.models` accepts fractional timesteps (its sinusoidal embedding is computed in float32 from the
    number); a ``denoise_fn`` that indexes a table by ``t`` (e.g. :func:`ddpm_jax.sampling.remap_timesteps`)
    needs integer timesteps and only works with the discrete-time samplers.
  * Classifier-free guidance: pass a guided ``denoise_fn`` (:func:`ddpm_jax.guidance.denoise_fn`).
    The guidance is then applied to the network's prediction (eps-hat, or x0-hat for an 'xstart' model) at every
    call, before the solver converts it and forms its update; the multistep solvers extrapolate the guided
    predictions.
  * ``mean_type`` 'eps' and 'xstart' are supported; outputs with 2C channels (a learned variance) are used through
    their first C channels. 'xprev' raises ``ValueError``.
  * x_0 clipping: off by default (``clip_denoised=False``), as in diffusers' defaults (``thresholding=False``,
    ``clip_sample=False``). With ``clip_denoised=True`` every x0-hat is clipped to [-1, 1] and eps-hat recomputed
    from it before the update, as the paper's code clips for its ancestral sampler; for DPM-Solver++ and UniPC
    this equals diffusers' ``thresholding=True`` with ``sample_max_value=1``.
  * Noise: ``key`` is split into the initial-noise key and the loop key; ``split(loop_key, R)[k]`` draws the
    noise of network call k (R = :func:`network_calls`), used by the stochastic samplers only.
  * The state and the coefficients take the dtype of ``x_init`` (float32 by default, float64 under
    ``jax.enable_x64``); keep it float32 for a bfloat16 network (the network's output is cast to it).
  * ``schedule`` must be concrete (closed over, not a traced argument): its tables are read in numpy.

Usage (the same rules as :mod:`ddpm_jax.sampling`: pass the parameters as arguments of the function you jit)::

  @jax.jit
  def sample(params, key):
    denoise_fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
    return solvers.sample('dpmpp', schedule, denoise_fn, (16, 32, 32, 3), key, steps=20)

The registry :data:`SAMPLERS` lists every sampler (also the paper's ancestral sampler, respaced ancestral sampling
and DDIM from :mod:`ddpm_jax.sampling`, wrapped unchanged), with one line of help, its options and its cost;
:func:`validate` checks a choice before anything compiles.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, progress, sampling
from ddpm_jax import schedule as sched_lib
from ddpm_jax.diffusion import DenoiseFn
from ddpm_jax.sampling import SampleTrace
from ddpm_jax.schedule import Schedule

SPACINGS: tuple[str, ...] = ('linspace', 'leading', 'trailing', 'quadratic', 'logsnr', 'karras')
"""Step spacings (which sampler takes which: ``SAMPLERS[name].spacings``).

* 'linspace', 'leading' (with ``steps_offset``), 'trailing': diffusers' ``timestep_spacing`` of the sampler's
  scheduler (Table 2 of Lin et al. 2023). The multistep solvers follow ``DPMSolverMultistepScheduler``
  (N+1 points, the lowest dropped); the others ``DDIMScheduler``/``EulerDiscreteScheduler``/``PNDMScheduler``.
* 'quadratic': the DDIM paper's ``int(linspace(0, sqrt(0.8 T), N)**2)``.
* 'logsnr': noise levels uniform in log-SNR between the schedule's ends (diffusers' ``use_lu_lambdas``;
  ``use_exponential_sigmas`` for the Euler family: the same levels).
* 'karras': Karras et al. (2022) sigma_i = (sigma_max^(1/7) + i/(N-1) (sigma_min^(1/7) - sigma_max^(1/7)))^7
  (diffusers' ``use_karras_sigmas``).
"""

_RHO = 7.0  # Karras et al. (2022), Eq. 5


# --------------------------------------------------------------------------------------------- the grid


class Grid(NamedTuple):
  """Where a sampler calls the network and which noise levels it steps through.

  Attributes:
    timesteps: [N] float64, the timestep passed to the network at node i (integers for the discrete-time
      samplers, possibly fractional for the Euler family), decreasing.
    sigmas: [N + 1] float64, the noise level sigma_i = sqrt((1 - abar_i) / abar_i) of node i, then 0 (the clean
      sample the last step lands on).
  """

  timesteps: np.ndarray
  sigmas: np.ndarray


def sigma_table(schedule: Schedule) -> np.ndarray:
  """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..T-1, float64 from the schedule's betas.

  abar is recomputed as the float64 cumulative product of 1 - beta: the stored float32 ``alphas_cumprod`` would
  lose most digits of 1 - abar near t = 0.
  """
  betas = np.asarray(schedule.betas, np.float64)
  abar = np.cumprod(1.0 - betas)
  return np.sqrt((1.0 - abar) / abar)


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """Fractional timestep of each sigma: linear interpolation of log sigma between trained timesteps (k-diffusion)."""
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, None]
  low = np.clip(np.cumsum(dists >= 0, axis=0).argmax(axis=0), None, log_sigmas.shape[0] - 2)
  w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
  return (1 - w) * low + w * (low + 1)


def _integer_timesteps(spacing: str, T: int, N: int, convention: str, steps_offset: int) -> np.ndarray:
  """Decreasing timesteps of the uniform and quadratic spacings (float64; integers except Euler's 'linspace')."""
  if spacing == 'linspace':
    if convention == 'multistep':  # DPMSolverMultistepScheduler / UniPCMultistepScheduler
      return np.round(np.linspace(0, T - 1, N + 1))[::-1][:-1].copy()
    t = np.linspace(0, T - 1, N)[::-1].copy()
    return t if convention == 'sigma' else np.round(t)
  if spacing == 'leading':
    if convention == 'multistep':
      return (np.arange(N + 1) * (T // (N + 1)))[::-1][:-1].astype(np.float64) + steps_offset
    return (np.arange(N) * (T // N))[::-1].astype(np.float64) + steps_offset
  if spacing == 'trailing':
    return np.round(T - np.arange(N) * (T / N)) - 1
  if spacing == 'quadratic':
    return np.floor(np.linspace(0, math.sqrt(0.8 * T), N) ** 2)[::-1].copy()
  raise ValueError(f'Unknown spacing {spacing!r}; choose one of {SPACINGS}.')


def _uniform_timesteps(T: int, steps: int, spacing: str, convention: str, steps_offset: int) -> np.ndarray:
  """The timesteps of a uniform or quadratic spacing, checked to be distinct and within [0, T-1]."""
  t = _integer_timesteps(spacing, T, steps, convention, steps_offset)
  outside = t[(t < 0) | (t > T - 1)]
  if outside.size:
    raise ValueError(
      f'spacing {spacing!r} with steps={steps} and steps_offset={steps_offset} reaches timestep {int(outside[0])}, '
      f'outside [0, {T - 1}]; use fewer steps or a smaller steps_offset.'
    )
  if t.size != steps or np.any(np.diff(t) >= 0):
    fit = next(
      n for n in range(steps - 1, 0, -1) if np.all(np.diff(_integer_timesteps(spacing, T, n, convention, 0)) < 0)
    )
    repeated = int(t[np.flatnonzero(np.diff(t) >= 0)[0]]) if t.size == steps else None
    raise ValueError(
      f'spacing {spacing!r} with steps={steps} repeats timestep {repeated}; it has distinct timesteps for at most '
      f'{fit} steps of T = {T}: use fewer steps or another spacing.'
    )
  return t


def _make_grid(sigmas_T: np.ndarray, steps: int, spacing: str, convention: str, steps_offset: int) -> Grid:
  """The grid of ``steps`` nodes (see :func:`make_grid`); ``convention`` is the sampler family's."""
  T = sigmas_T.shape[0]
  if spacing not in ('karras', 'logsnr'):
    t = _uniform_timesteps(T, steps, spacing, convention, steps_offset)
    return Grid(timesteps=t, sigmas=np.append(np.interp(t, np.arange(T), sigmas_T), 0.0))
  s_max, s_min = sigmas_T[-1], sigmas_T[0]
  if spacing == 'karras':
    ramp = np.linspace(0, 1, steps)
    sig = (s_max ** (1 / _RHO) + ramp * (s_min ** (1 / _RHO) - s_max ** (1 / _RHO))) ** _RHO
  else:
    sig = np.exp(np.linspace(math.log(s_max), math.log(s_min), steps))
  t = _sigma_to_t(sig, np.log(sigmas_T))
  if convention != 'sigma':  # discrete-time solvers call the network at the nearest trained timestep
    t = np.round(t)
  return Grid(timesteps=t, sigmas=np.append(sig, 0.0))


# ------------------------------------------------------------------------------------------ the engine


@dataclasses.dataclass(frozen=True)
class _Plan:
  """One row per network call k; every update is linear (coefficients in float64 here).

  Row k calls the network at (x, t[k]) and converts its output with the VP coefficients (alpha[k], sigma[k]) of
  that point to d = x0-hat or eps-hat (``predict``). With the history Hn = [d, H_0, .., H_{Kh-2}] (always pushed)
  and En = [d, E_0, ..] if ``push_e[k]`` else E (pushed on demand, for PNDM's eps history):
    y  = y_x x + y_base base + y_h . Hn + y_e . En        (the anchor; stored as the next ``base``)
    x' = x_y y + x_h . Hn + x_e . En + x_z z              (z ~ N(0, I) from the row's key)
  """

  t: np.ndarray  # [R]
  alpha: np.ndarray  # [R]
  sigma: np.ndarray  # [R]
  y_x: np.ndarray  # [R]
  y_base: np.ndarray  # [R]
  y_h: np.ndarray  # [R, Kh]
  y_e: np.ndarray  # [R, Ke]
  x_y: np.ndarray  # [R]
  x_h: np.ndarray  # [R, Kh]
  x_e: np.ndarray  # [R, Ke]
  x_z: np.ndarray  # [R]
  push_e: np.ndarray  # [R] bool
  predict: str  # 'x0' or 'eps'
  t_dtype: Any  # jnp.int32 or jnp.float32


class _Rows:
  """Builds a :class:`_Plan` row by row (plain Python lists of float64 coefficients)."""

  def __init__(self, kh: int, ke: int = 0):
    self.kh, self.ke, self.rows = kh, ke, []

  def add(self, t, alpha, sigma, *, y=None, x, push_e=False):
    """Appends a row; ``y``/``x`` map 'x', 'base', ('h', j), ('e', j), 'y', 'z' to coefficients (y default: x)."""
    y = {'x': 1.0} if y is None else y
    self.rows.append((t, alpha, sigma, y, x, push_e))

  def plan(self, predict: str, t_dtype) -> _Plan:
    r = len(self.rows)
    arr = {
      k: np.zeros(s)
      for k, s in dict(
        y_x=r, y_base=r, y_h=(r, self.kh), y_e=(r, self.ke), x_y=r, x_h=(r, self.kh), x_e=(r, self.ke), x_z=r
      ).items()
    }
    for i, (_, _, _, y, x, _) in enumerate(self.rows):
      for prefix, coefs in (('y', y), ('x', x)):
        for key, c in coefs.items():
          if isinstance(key, tuple):
            arr[f'{prefix}_{key[0]}'][i, key[1]] += c
          else:
            arr[f'{prefix}_{key}'][i] += c
    col = lambda j: np.array([row[j] for row in self.rows], np.float64)
    return _Plan(
      t=col(0),
      alpha=col(1),
      sigma=col(2),
      push_e=np.array([row[5] for row in self.rows], bool),
      predict=predict,
      t_dtype=t_dtype,
      **arr,
    )


def _model_prediction(out: jax.Array, x: jax.Array, alpha, sigma, mean_type: str, clip: bool):
  """(x0-hat, eps-hat) from the network output at the VP point (x, alpha, sigma); first C channels only."""
  c = x.shape[-1]
  if out.shape[:-1] != x.shape[:-1] or out.shape[-1] not in (c, 2 * c):
    raise ValueError(
      f'denoise_fn returned shape {out.shape} for x of shape {x.shape}; expected the same shape, or 2C = {2 * c} '
      'channels (a learned variance, whose second half the solvers ignore).'
    )
  out = out[..., :c].astype(x.dtype)
  if mean_type == 'eps':
    eps = out
    x0 = (x - sigma * eps) / alpha
  else:
    x0 = out
    eps = (x - alpha * x0) / sigma
  if clip:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = (x - alpha * x0) / sigma
  return x0, eps


def _run_plan(
  plan: _Plan,
  denoise_fn: DenoiseFn,
  x_init: jax.Array,
  loop_key: jax.Array,
  *,
  mean_type: str,
  clip_denoised: bool,
  trace_every: int | None,
) -> jax.Array | tuple[jax.Array, SampleTrace]:
  """Runs the plan as one ``lax.scan`` (nested once with ``trace_every``), one network call per row.

  The scan is `ddpm_jax.progress.scan`: inside a `ddpm_jax.progress.reporting` context (at trace time) the rows are
  counted; outside one it is ``jax.lax.scan``.
  """
  dtype = x_init.dtype
  rows = plan.t.shape[0]
  kh, ke = plan.y_h.shape[1], plan.y_e.shape[1]
  stochastic = bool(np.any(plan.x_z != 0))
  uses_base = bool(np.any(plan.y_base != 0))
  # One [R, columns] table (a single slice per step); the column layout is static.
  columns = [plan.alpha, plan.sigma, plan.y_x, plan.y_base, plan.y_h, plan.y_e, plan.x_y, plan.x_h, plan.x_e, plan.x_z]
  columns = [c.reshape(rows, -1) for c in columns] + [plan.push_e.reshape(rows, 1).astype(np.float64)]
  widths = np.cumsum([0] + [c.shape[1] for c in columns])
  names = ('alpha', 'sigma', 'y_x', 'y_base', 'y_h', 'y_e', 'x_y', 'x_h', 'x_e', 'x_z', 'push_e')
  span = {n: (int(widths[i]), int(widths[i + 1])) for i, n in enumerate(names)}
  # The scan carries the row index and reads the tables by it (no per-step xs), so that the un-jitted scan of
  # jax.disable_jit slices them with one dynamic index instead of one static slice per step.
  t_table = jnp.asarray(plan.t, plan.t_dtype)
  table = jnp.asarray(np.concatenate(columns, axis=1), dtype)
  keys = jax.random.split(loop_key, rows) if stochastic else None
  batch = x_init.shape[0]

  def body(carry, _):
    i, x, base, hist, ets = carry
    coef, t = table[i], t_table[i]
    col = lambda n: coef[span[n][0]] if span[n][1] - span[n][0] == 1 else coef[span[n][0] : span[n][1]]
    out = denoise_fn(x, jnp.full((batch,), t, plan.t_dtype))
    x0, eps = _model_prediction(out, x, col('alpha'), col('sigma'), mean_type, clip_denoised)
    d = x0 if plan.predict == 'x0' else eps
    if kh:
      hist = jnp.concatenate([d[None], hist[:-1]])
    if ke:
      ets = jnp.where(col('push_e') > 0, jnp.concatenate([d[None], ets[:-1]]), ets)
    y = col('y_x') * x
    if uses_base:
      y = y + col('y_base') * base
    x_new = 0.0
    for stack, k, name in ((hist, kh, 'h'), (ets, ke, 'e')):
      if k:
        y = y + jnp.tensordot(coef[span[f'y_{name}'][0] : span[f'y_{name}'][1]], stack, axes=1)
        x_new = x_new + jnp.tensordot(coef[span[f'x_{name}'][0] : span[f'x_{name}'][1]], stack, axes=1)
    x_new = x_new + col('x_y') * y
    if stochastic:
      x_new = x_new + col('x_z') * jax.random.normal(keys[i], x.shape, dtype)
    return (i + 1, x_new, y if uses_base else base, hist, ets), (t, x_new, x0)

  zeros = lambda k: jnp.zeros((k,) + x_init.shape, dtype)
  base = jnp.zeros_like(x_init) if uses_base else jnp.zeros((), dtype)
  carry = (jnp.zeros((), jnp.int32), x_init, base, zeros(kh), zeros(ke))
  if trace_every is None:
    carry, _ = progress.scan(lambda c, r: (body(c, r)[0], None), carry, None, length=rows)
    return carry[1]

  def group_body(c, _):
    c, (t, xk, x0) = jax.lax.scan(body, c, None, length=trace_every)
    return c, (t[-1], xk[-1], x0[-1])

  groups = rows // trace_every
  carry, (t_tr, x_tr, x0_tr) = progress.scan(group_body, carry, None, length=groups, units=np.full(groups, trace_every))
  return carry[1], SampleTrace(t=t_tr, x=x_tr, pred_xstart=x0_tr)


def _vp(sig: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """VP (alpha, sigma) of noise level sigma: alpha = 1/sqrt(1 + sigma^2), sigma_vp = sigma alpha."""
  alpha = 1.0 / np.sqrt(1.0 + sig**2)
  return alpha, sig * alpha


# ------------------------------------------------------------------------------------ DPM-Solver++


def _dpmpp_orders(n: int, order: int) -> list[int]:
  """diffusers' order per step: warm-up, then lower order on the last steps (``lower_order_final=True``).

  The last step (to sigma = 0) is always first order (``final_sigmas_type='zero'``); below 15 steps the one
  before it is at most second order.
  """
  orders = []
  for k in range(n):
    if order == 1 or k < 1 or k == n - 1:
      orders.append(1)
    elif order == 2 or k < 2 or (k == n - 2 and n < 15):
      orders.append(2)
    else:
      orders.append(3)
  return orders


def _dpmpp_plan(grid: Grid, order: int, variant: str, sde: bool) -> _Plan:
  """DPM-Solver++ multistep (Lu et al. 2022, Alg. 2 and the SDE variant), data prediction, in lambda = -log sigma."""
  sig = grid.sigmas
  n = sig.shape[0] - 1
  alpha, sig_vp = _vp(sig)
  with np.errstate(divide='ignore'):
    lam = -np.log(sig)
  rows = _Rows(kh=order)
  for k, o in enumerate(_dpmpp_orders(n, order)):
    t, a_s, s_s = grid.timesteps[k], alpha[k], sig_vp[k]
    if k == n - 1:  # to sigma = 0: x = x0-hat (the first-order update with h = inf), no noise
      rows.add(t, a_s, s_s, x={('h', 0): 1.0})
      continue
    a_t, s_t = alpha[k + 1], sig_vp[k + 1]
    h = lam[k + 1] - lam[k]
    # x' = x_coef x + c0 D0 + c1 D1 + c2 D2 with D0 = m0 and D1, D2 finite differences of the history m_j = H_j.
    if sde:
      x_coef = s_t / s_s * math.exp(-h)
      one_m = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
      c0 = a_t * one_m
      c1 = 0.5 * c0 if variant == 'midpoint' else a_t * (one_m / (-2.0 * h) + 1.0)
      c1 = c1 if o == 2 else a_t * (one_m / (-2.0 * h) + 1.0)
      c2 = a_t * ((one_m - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
      noise = s_t * math.sqrt(one_m)
    else:
      x_coef = s_t / s_s
      em1 = math.expm1(-h)  # e^{-h} - 1
      c0 = -a_t * em1
      c1 = 0.5 * c0 if variant == 'midpoint' else a_t * (em1 / h + 1.0)
      c1 = c1 if o == 2 else a_t * (em1 / h + 1.0)
      c2 = -a_t * ((em1 + h) / h**2 - 0.5)
      noise = 0.0
    m = np.eye(3)  # rows: coefficient vectors of m0, m1, m2 over the history
    coef = c0 * m[0]
    if o >= 2:
      r0 = (lam[k] - lam[k - 1]) / h
      d1_0 = (m[0] - m[1]) / r0
      if o == 2:
        coef = coef + c1 * d1_0
      else:
        r1 = (lam[k - 1] - lam[k - 2]) / h
        d1_1 = (m[1] - m[2]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        coef = coef + c1 * d1 + c2 * d2
    x = {'y': x_coef, 'z': noise}
    x.update({('h', j): coef[j] for j in range(order)})
    rows.add(t, a_s, s_s, x=x)
  return rows.plan('x0', jnp.int32)


# ------------------------------------------------------------------------------------------- UniPC


def _unipc_coefficients(
  lam_from: float, lam_to: float, lam_prev: Sequence[float], order: int, variant: str, full: bool
):
  """UniPC's B(h) update weights (Zhao et al. 2023, Alg. 2/3 with diffusers' order-2 simplifications).

  Returns (h_phi_1, B_h, rks[:-1], rhos): the update is x' = (sigma_to/sigma_from) x_from - alpha_to h_phi_1 m0
  - alpha_to B_h sum_i rhos_i D_i, D_i = (m_i - m0) / rk_i for the earlier predictions and, for the corrector
  (``full``), D_last = m_new - m0 weighted by rhos[-1].
  """
  h = lam_to - lam_from
  rks = [(lp - lam_from) / h for lp in lam_prev] + [1.0]
  hh = -h
  h_phi_1 = math.expm1(hh)
  h_phi_k = h_phi_1 / hh - 1.0
  b_h = hh if variant == 'bh1' else math.expm1(hh)
  factorial = 1
  r_rows, b = [], []
  for i in range(1, order + 1):
    r_rows.append(np.power(np.array(rks), i - 1))
    b.append(h_phi_k * factorial / b_h)
    factorial *= i + 1
    h_phi_k = h_phi_k / hh - 1.0 / factorial
  r_mat, b = np.array(r_rows), np.array(b)
  if full:  # corrector: order unknowns
    rhos = np.array([0.5]) if order == 1 else np.linalg.solve(r_mat, b)
  elif order == 1:
    rhos = np.zeros(0)
  elif order == 2:
    rhos = np.array([0.5])
  else:
    rhos = np.linalg.solve(r_mat[:-1, :-1], b[:-1])
  return h_phi_1, b_h, rks[:-1], rhos


def _unipc_plan(grid: Grid, order: int, variant: str) -> _Plan:
  """UniPC multistep (Zhao et al. 2023): UniP-p predictor, UniC corrector on every step but the first.

  History Hn = [m_k, m_{k-1}, ...] of data predictions. At call k (state x = the predictor's result at node k):
  the corrector refines it from the previous anchor (base) with m_k; the predictor then steps from the corrected
  anchor to node k+1. The corrector reuses the network call the next predictor needs (no extra call).
  """
  sig = grid.sigmas
  n = sig.shape[0] - 1
  alpha, sig_vp = _vp(sig)
  with np.errstate(divide='ignore'):
    lam = -np.log(sig)
  p_orders = [min(order, n - k, k + 1) for k in range(n)]
  rows = _Rows(kh=order + 1)
  for k in range(n):
    t, a_k, s_k = grid.timesteps[k], alpha[k], sig_vp[k]
    if k == 0:
      y = {'x': 1.0}
    else:  # corrector of order p_c = the previous predictor's, using m_k (= H_0) and m_{k-1}, ..., m_{k-p_c}
      p_c = p_orders[k - 1]
      lam_prev = [lam[k - 1 - i] for i in range(1, p_c)]
      h_phi_1, b_h, rks, rhos = _unipc_coefficients(lam[k - 1], lam[k], lam_prev, p_c, variant, full=True)
      y = {'base': s_k / sig_vp[k - 1], ('h', 1): -a_k * h_phi_1}
      for i, rk in enumerate(rks, start=1):  # D_i = (m_{k-1-i} - m_{k-1}) / rk
        y[('h', 1 + i)] = y.get(('h', 1 + i), 0.0) - a_k * b_h * rhos[i - 1] / rk
        y[('h', 1)] += a_k * b_h * rhos[i - 1] / rk
      y[('h', 0)] = -a_k * b_h * rhos[-1]  # D_last = m_k - m_{k-1}
      y[('h', 1)] += a_k * b_h * rhos[-1]
    if k == n - 1:  # to sigma = 0: the order-1 predictor gives x0-hat = m_k
      rows.add(t, a_k, s_k, y=y, x={('h', 0): 1.0})
      continue
    p = p_orders[k]
    a_t, s_t = alpha[k + 1], sig_vp[k + 1]
    lam_prev = [lam[k - i] for i in range(1, p)]
    h_phi_1, b_h, rks, rhos = _unipc_coefficients(lam[k], lam[k + 1], lam_prev, p, variant, full=False)
    x = {'y': s_t / s_k, ('h', 0): -a_t * h_phi_1}
    for i, rk in enumerate(rks, start=1):  # D_i = (m_{k-i} - m_k) / rk
      x[('h', i)] = x.get(('h', i), 0.0) - a_t * b_h * rhos[i - 1] / rk
      x[('h', 0)] += a_t * b_h * rhos[i - 1] / rk
    rows.add(t, a_k, s_k, y=y, x=x)
  return rows.plan('x0', jnp.int32)


# ------------------------------------------------------------------------------------ the Euler family


def _euler_step(a_from, s_from, s_to, s_down=None):
  """VP coefficients of x_VE' = x_VE + (s_down - s_from) eps with x_VE = x / alpha: (coef of x, coef of eps)."""
  a_to = 1.0 / math.sqrt(1.0 + s_to**2)
  s_down = s_to if s_down is None else s_down
  return a_to / a_from, a_to * (s_down - s_from)


def _euler_plan(grid: Grid, eta: float | None) -> _Plan:
  """Euler (Karras et al. 2022, Alg. 1 without the Heun correction) or, with ``eta``, Euler ancestral."""
  sig, t = grid.sigmas, grid.timesteps
  rows = _Rows(kh=1)
  for k in range(sig.shape[0] - 1):
    (a, s_vp), s_from, s_to = _vp(sig[k]), sig[k], sig[k + 1]
    s_up = 0.0
    s_down = s_to
    if eta is not None:  # k-diffusion's get_ancestral_step
      s_up = min(s_to, eta * math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2))
      s_down = math.sqrt(s_to**2 - s_up**2)
    cx, ce = _euler_step(a, s_from, s_to, s_down)
    a_to = 1.0 / math.sqrt(1.0 + s_to**2)
    rows.add(t[k], a, s_vp, x={'y': cx, ('h', 0): ce, 'z': a_to * s_up})
  return rows.plan('eps', jnp.float32)


def _heun_plan(grid: Grid) -> _Plan:
  """Heun's second-order method (Karras et al. 2022, Alg. 1): 2 calls per step, Euler on the last (to sigma = 0)."""
  sig, t = grid.sigmas, grid.timesteps
  n = sig.shape[0] - 1
  rows = _Rows(kh=2)
  for k in range(n):
    (a, s_vp), s_from, s_to = _vp(sig[k]), sig[k], sig[k + 1]
    cx, ce = _euler_step(a, s_from, s_to)
    rows.add(t[k], a, s_vp, x={'y': cx, ('h', 0): ce})  # Euler predictor; y = x is kept as base
    if k < n - 1:  # corrector at the predicted point: average the two slopes, from the stored base
      a_to, s_to_vp = _vp(s_to)
      rows.add(t[k + 1], a_to, s_to_vp, y={'base': 1.0}, x={'y': cx, ('h', 0): 0.5 * ce, ('h', 1): 0.5 * ce})
  return rows.plan('eps', jnp.float32)


# --------------------------------------------------------------------------------------------- PNDM


def _pndm_transfer(abar: np.ndarray, t_from: int, t_to: int) -> tuple[float, float]:
  """PNDM's transfer phi (Liu et al. 2022, Eq. 9): x' = c_x x + c_e eps; abar at t < 0 is 1."""
  a = abar[t_from]
  a_prev = abar[t_to] if t_to >= 0 else 1.0
  denom = a * math.sqrt(1 - a_prev) + math.sqrt(a * (1 - a) * a_prev)
  return math.sqrt(a_prev / a), -(a_prev - a) / denom


def _pndm_plan(abar: np.ndarray, nodes: np.ndarray, runge_kutta: bool) -> _Plan:
  """PLMS (``runge_kutta=False``) or PNDM: pseudo linear multistep in eps with the DDIM-like transfer phi.

  ``nodes``: decreasing integer timesteps; the last step goes to t = -1 (abar = 1, the clean sample).
  """
  t = [int(v) for v in nodes] + [-1]
  n = len(nodes)
  sig = lambda tt: _vp(np.sqrt((1 - abar[tt]) / abar[tt]))
  rows = _Rows(kh=4 if runge_kutta else 2, ke=4)
  ab = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}

  def add(t_eval, t_from, t_to, *, y, mix, push):
    a, s = sig(t_eval)
    cx, ce = _pndm_transfer(abar, t_from, t_to)
    x = {'y': cx}
    for key, w in mix.items():
      x[key] = x.get(key, 0.0) + ce * w
    rows.add(t_eval, a, s, y=y, x=x, push_e=push)

  start = 0
  if runge_kutta:  # three RK4 steps (4 calls each) build the eps history
    for k in range(3):
      mid = t[k + 1] + (t[k] - t[k + 1]) // 2
      add(t[k], t[k], mid, y={'x': 1.0}, mix={('h', 0): 1.0}, push=True)
      add(mid, t[k], mid, y={'base': 1.0}, mix={('h', 0): 1.0}, push=False)
      add(mid, t[k], t[k + 1], y={'base': 1.0}, mix={('h', 0): 1.0}, push=False)
      rk4 = {('h', 3): 1 / 6, ('h', 2): 1 / 3, ('h', 1): 1 / 3, ('h', 0): 1 / 6}
      add(t[k + 1], t[k], t[k + 1], y={'base': 1.0}, mix=rk4, push=False)
    start, pushed = 3, 3
  elif n >= 2:  # PLMS's first step: a pseudo improved-Euler step (2 calls)
    add(t[0], t[0], t[1], y={'x': 1.0}, mix={('e', 0): 1.0}, push=True)
    add(t[1], t[0], t[1], y={'base': 1.0}, mix={('h', 0): 0.5, ('h', 1): 0.5}, push=False)
    start, pushed = 1, 1
  else:
    pushed = 0
  for k in range(start, n):  # Adams-Bashforth on the pushed eps history, order up to 4
    pushed = min(pushed + 1, 4)
    add(t[k], t[k], t[k + 1], y={'x': 1.0}, mix={('e', j): w for j, w in enumerate(ab[pushed])}, push=True)
  return rows.plan('eps', jnp.int32)


# ---------------------------------------------------------------------------------- the registry


@dataclasses.dataclass(frozen=True)
class SamplerInfo:
  """A sampler in :data:`SAMPLERS`.

  Attributes:
    name: the registry key (``--sampler NAME``).
    help: one line for ``--help``.
    fn: the ``*_sample_loop`` function (:func:`sample` calls it with the options below).
    calls: ``calls(steps, T) -> int`` network calls for ``steps`` steps.
    orders: the orders it takes (empty: no ``order`` option); ``default_order``.
    variants: the variants it takes (empty: none); ``default_variant``.
    spacings: the spacings it takes (empty: none, it runs all T steps); ``default_spacing``.
    eta: its default eta if it takes one (None: no ``eta`` option).
    stochastic: draws fresh noise along the way (otherwise deterministic given the initial noise).
    default_steps: steps when none are given (None: T).
    min_steps: the fewest steps it runs.
    default_clip: its ``clip_denoised`` default.
    trace: supports ``trace_every`` (one network call per step).
  """

  name: str
  help: str
  fn: Callable[..., Any]
  calls: Callable[[int, int], int]
  orders: tuple[int, ...] = ()
  default_order: int | None = None
  variants: tuple[str, ...] = ()
  default_variant: str | None = None
  spacings: tuple[str, ...] = ()
  default_spacing: str | None = None
  eta: float | None = None
  stochastic: bool = False
  default_steps: int | None = 25
  min_steps: int = 1
  default_clip: bool = False
  trace: bool = True


_GRID_CONVENTION = {
  'dpmpp': 'multistep',
  'dpmpp_sde': 'multistep',
  'unipc': 'multistep',
  'euler': 'sigma',
  'heun': 'sigma',
  'euler_ancestral': 'sigma',
  'plms': 'ddim',
  'pndm': 'ddim',
  'respaced': 'ddim',
  'ddim': 'ddim',
}


def validate(
  name: str,
  num_timesteps: int,
  *,
  steps: int | None = None,
  order: int | None = None,
  variant: str | None = None,
  spacing: str | None = None,
  eta: float | None = None,
  steps_offset: int = 0,
  mean_type: str = 'eps',
  trace_every: int | None = None,
) -> None:
  """Raises ``ValueError`` naming the bad value and the choices, for any option ``name`` does not take.

  Pure Python and numpy: call it before anything compiles (the ``*_sample_loop`` functions call it too).

  Args:
    name: a key of :data:`SAMPLERS`.
    num_timesteps: T of the schedule the network was trained with.
    steps: number of steps (None: the sampler's default); must lie in [min_steps, T].
    order, variant, spacing, eta: the sampler's options (None: its default); passing one it does not take raises.
    steps_offset: diffusers' offset of the 'leading' spacing (0 otherwise).
    mean_type: the network's parameterization.
    trace_every: must divide the number of steps, for samplers with ``trace``.

  Raises:
    ValueError: naming the value and the choices (or the fix).
  """
  if name not in SAMPLERS:
    raise ValueError(f'Unknown sampler {name!r}; choose one of {tuple(SAMPLERS)}.')
  info = SAMPLERS[name]
  diffusion.check_types(mean_type=mean_type)
  if mean_type == 'xprev' and name not in ('ancestral', 'respaced', 'ddim'):
    raise ValueError(
      f"mean_type='xprev' does not work with sampler {name!r}: its x0 estimate exists only through the one-step "
      'posterior at an integer t (x0 = (mu - c2_t x_t) / c1_t, which amplifies the error by 1/c1_t, up to ~1e4). '
      "Sample an 'xprev' model with 'ancestral', 'respaced' or 'ddim'."
    )
  if steps is not None:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool):
      raise ValueError(f'steps must be an integer, got {steps!r}.')
    if name == 'ancestral' and steps != num_timesteps:
      raise ValueError(
        f"The 'ancestral' sampler runs all T = {num_timesteps} steps; for steps={steps} use "
        "'respaced', 'ddim' or one of the solvers."
      )
    if not info.min_steps <= steps <= num_timesteps:
      raise ValueError(f'steps must be in [{info.min_steps}, {num_timesteps}] for sampler {name!r}, got {steps}.')
  for what, value, choices in (('order', order, info.orders), ('variant', variant, info.variants)):
    if value is not None and value not in choices:
      if not choices:
        raise ValueError(f'Sampler {name!r} has no {what} option (got {what}={value!r}).')
      raise ValueError(f'{what}={value!r} is not available for sampler {name!r}; choose one of {choices}.')
  if spacing is not None:
    if spacing not in SPACINGS:
      raise ValueError(f'Unknown spacing {spacing!r}; choose one of {SPACINGS}.')
    if spacing not in info.spacings:
      if not info.spacings:
        raise ValueError(f'Sampler {name!r} runs all T steps and takes no spacing (got {spacing!r}).')
      raise ValueError(f'spacing {spacing!r} is not available for sampler {name!r}; choose one of {info.spacings}.')
  if eta is not None:
    if info.eta is None:
      with_eta = tuple(k for k, v in SAMPLERS.items() if v.eta is not None)
      raise ValueError(f'Sampler {name!r} takes no eta (got eta={eta!r}); eta applies to {with_eta}.')
    if not 0.0 <= float(eta) <= 1.0:
      raise ValueError(f'eta must lie in [0, 1], got {eta!r}.')
  if not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
    raise ValueError(f'steps_offset must be a non-negative integer, got {steps_offset!r}.')
  spacing = info.default_spacing if spacing is None else spacing
  if steps_offset and spacing != 'leading':
    raise ValueError(f"steps_offset={steps_offset} applies to the 'leading' spacing only (spacing is {spacing!r}).")
  n = _resolve_steps(info, steps, num_timesteps)
  if info.spacings and spacing not in ('karras', 'logsnr'):
    _uniform_timesteps(num_timesteps, n, spacing, _GRID_CONVENTION[name], steps_offset)
  if trace_every is not None:
    if not info.trace:
      with_trace = tuple(k for k, v in SAMPLERS.items() if v.trace)
      raise ValueError(
        f'Sampler {name!r} makes more than one network call per step and has no trace_every; use one of {with_trace}.'
      )
    if not isinstance(trace_every, int) or trace_every < 1 or n % trace_every:
      raise ValueError(
        f'trace_every must be a positive integer dividing the number of steps ({n}), got {trace_every!r}.'
      )


def _resolve_steps(info: SamplerInfo, steps: int | None, num_timesteps: int) -> int:
  if steps is not None:
    return int(steps)
  return num_timesteps if info.default_steps is None else min(info.default_steps, num_timesteps)


def make_grid(name: str, schedule: Schedule, steps: int, spacing: str | None = None, *, steps_offset: int = 0) -> Grid:
  """The timesteps at which sampler ``name`` calls the network and the noise levels it steps through.

  For PNDM's Runge-Kutta warm-up, the extra half-step calls lie between the first four nodes.

  Args:
    name: a solver of :data:`SAMPLERS` that takes a spacing.
    schedule: the training schedule.
    steps: N, the number of steps.
    spacing: one of the sampler's spacings (None: its default).
    steps_offset: the 'leading' spacing's offset.

  Returns:
    The :class:`Grid` (N timesteps, N + 1 noise levels ending with 0).
  """
  validate(name, schedule.num_timesteps, steps=steps, spacing=spacing, steps_offset=steps_offset)
  info = SAMPLERS[name]
  if not info.spacings:
    raise ValueError(f'Sampler {name!r} takes no spacing; it runs all T = {schedule.num_timesteps} steps.')
  spacing = info.default_spacing if spacing is None else spacing
  return _make_grid(sigma_table(schedule), steps, spacing, _GRID_CONVENTION[name], steps_offset)


def network_calls(name: str, steps: int | None = None, num_timesteps: int = 1000) -> int:
  """How many times sampler ``name`` calls the network for ``steps`` steps (None: its default)."""
  validate(name, num_timesteps, steps=steps)
  info = SAMPLERS[name]
  return info.calls(_resolve_steps(info, steps, num_timesteps), num_timesteps)


def help_lines() -> list[str]:
  """``'name: one line of help'`` for every sampler, in registry order (for a command's ``--help``)."""
  return [f'{name}: {info.help}' for name, info in SAMPLERS.items()]


# ------------------------------------------------------------------------------------ public samplers


def _prepare(
  name: str,
  schedule: Schedule,
  shape: Sequence[int],
  key: jax.Array,
  x_init: jax.Array | None,
  **options,
) -> tuple[jax.Array, jax.Array]:
  validate(name, schedule.num_timesteps, **options)
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2:
    raise ValueError(f'shape must be [B, ...] with a batch axis, got {shape}.')
  noise_key, loop_key = jax.random.split(key)
  if x_init is None:
    x_init = jax.random.normal(noise_key, shape, jnp.float32)
  elif tuple(x_init.shape) != shape:
    raise ValueError(f'x_init has shape {tuple(x_init.shape)}, expected {shape}.')
  elif not jnp.issubdtype(x_init.dtype, jnp.floating):
    raise ValueError(f'x_init must be a float array, got dtype {x_init.dtype}.')
  return x_init, loop_key


def _solve(name: str, plan_fn, schedule, denoise_fn, shape, key, opts: dict, run: dict):
  """Validates ``opts`` (the sampler's options), builds its plan from its grid and runs it with ``run``."""
  x_init, loop_key = _prepare(
    name, schedule, shape, key, run['x_init'], mean_type=run['mean_type'], trace_every=run['trace_every'], **opts
  )
  grid = make_grid(name, schedule, opts['steps'], opts['spacing'], steps_offset=opts['steps_offset'])
  return _run_plan(
    plan_fn(grid),
    denoise_fn,
    x_init,
    loop_key,
    mean_type=run['mean_type'],
    clip_denoised=run['clip_denoised'],
    trace_every=run['trace_every'],
  )


def dpmpp_sample_loop(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  shape: Sequence[int],
  key: jax.Array,
  *,
  steps: int,
  order: int = 2,
  variant: str = 'midpoint',
  spacing: str = 'logsnr',
  steps_offset: int = 0,
  mean_type: str = 'eps',
  clip_denoised: bool = False,
  trace_every: int | None = None,
  x_init: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, SampleTrace]:
  """DPM-Solver++ multistep (Lu et al. 2022): a data-prediction exponential integrator in lambda = -log sigma.

  Order 2 is "DPM++ 2M", order 3 "DPM++ 3M". The first steps warm up with lower orders and, as diffusers'
  ``lower_order_final=True``, the step before the last is at most second order below 15 steps; the last step (to
  sigma = 0) returns x0-hat. One network call per step.

  Args:
    schedule: the schedule the network was trained with (concrete: its tables are read in numpy).
    denoise_fn: ``denoise_fn(x_t [B, ...], t [B] int32) -> output``; a guided one for classifier-free guidance
      (guidance acts on the prediction before the update).
    shape: [B, H, W, C] of the samples.
    key: PRNG key for the initial noise.
    steps: number of steps N (= network calls).
    order: 1 (DDIM), 2 or 3.
    variant: the second-order formula, 'midpoint' (diffusers' default) or 'heun'.
    spacing: any of :data:`SPACINGS` (default 'logsnr'; see docs/sampling.md).
    steps_offset: the 'leading' spacing's offset.
    mean_type: 'eps' or 'xstart' (a 2C-channel output is read through its first C channels).
    clip_denoised: clip every x0-hat to [-1, 1] (diffusers' ``thresholding=True, sample_max_value=1``).
    trace_every: also return every k-th state and x0-hat (k divides N).
    x_init: the starting state [B, H, W, C] at the first node (default: N(0, I) from ``key``).

  Returns:
    Samples [B, H, W, C] (not clipped), or ``(samples, SampleTrace)`` with ``trace_every``.
  """
  opts = dict(steps=steps, order=order, variant=variant, spacing=spacing, steps_offset=steps_offset)
  run = dict(mean_type=mean_type, clip_denoised=clip_denoised, trace_every=trace_every, x_init=x_init)
  return _solve(
    'dpmpp', lambda grid: _dpmpp_plan(grid, order, variant, sde=False), schedule, denoise_fn, shape, key, opts, run
  )


def dpmpp_sde_sample_loop(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  shape: Sequence[int],
  key: jax.Array,
  *,
  steps: int,
  order: int = 2,
  variant: str = 'midpoint',
  spacing: str = 'logsnr',
  steps_offset: int = 0,
  mean_type: str = 'eps',
  clip_denoised: bool = False,
  trace_every: int | None = None,
  x_init: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, SampleTrace]:
  """SDE-DPM-Solver++ multistep ("DPM++ 2M SDE"; diffusers' ``algorithm_type='sde-dpmsolver++'``).

  The data-prediction integrator of the reverse SDE: each step shrinks the state by an extra e^{-h} and adds
  fresh noise sigma_t sqrt(1 - e^{-2h}) z (call k draws z from ``split(loop_key, N)[k]``, see the module
  docstring). Orders as in :func:`dpmpp_sample_loop`. One network call per step.

  Args:
    schedule: the training schedule (concrete).
    denoise_fn: ``denoise_fn(x_t, t [B] int32) -> output`` (guided for classifier-free guidance).
    shape: [B, H, W, C].
    key: PRNG key (initial noise and the per-step noise).
    steps: number of steps N (= network calls).
    order: 1, 2 (default) or 3.
    variant: 'midpoint' (default) or 'heun'.
    spacing: any of :data:`SPACINGS` (default 'logsnr').
    steps_offset: the 'leading' spacing's offset.
    mean_type: 'eps' or 'xstart'.
    clip_denoised: clip every x0-hat to [-1, 1].
    trace_every: also return every k-th state and x0-hat.
    x_init: the starting state (default: N(0, I) from ``key``).

  Returns:
    Samples [B, H, W, C], or ``(samples, SampleTrace)`` with ``trace_every``.
  """
  opts = dict(steps=steps, order=order, variant=variant, spacing=spacing, steps_offset=steps_offset)
  run = dict(mean_type=mean_type, clip_denoised=clip_denoised, trace_every=trace_every, x_init=x_init)
  return _solve(
    'dpmpp_sde', lambda grid: _dpmpp_plan(grid, order, variant, sde=True), schedule, denoise_fn, shape, key, opts, run
  )


def unipc_sample_loop(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  shape: Sequence[int],
  key: jax.Array,
  *,
  steps: int,
  order: int = 2,
  variant: str = 'bh2',
  spacing: str = 'logsnr',
  steps_offset: int = 0,
  mean_type: str = 'eps',
  clip_denoised: bool = False,
  trace_every: int | None = None,
  x_init: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, SampleTrace]:
  """UniPC multistep (Zhao et al. 2023): the UniP-p predictor with the UniC corrector, data prediction.

  The corrector refines each new state with the network call the next predictor needs anyway, so UniPC costs
  one call per step and raises the predictor's order p by one. As diffusers' defaults: the corrector runs at
  every step but the first, the predictor's order warms up and drops on the last steps
  (``lower_order_final=True``), and the last step (to sigma = 0) returns x0-hat.

  Args:
    schedule: the training schedule (concrete).
    denoise_fn: ``denoise_fn(x_t, t [B] int32) -> output`` (guided for classifier-free guidance).
    shape: [B, H, W, C].
    key: PRNG key for the initial noise.
    steps: number of steps N (= network calls).
    order: p = 1, 2 (default) or 3.
    variant: B(h) = h ('bh1') or e^h - 1 ('bh2', default).
    spacing: any of :data:`SPACINGS` (default 'logsnr').
    steps_offset: the 'leading' spacing's offset.
    mean_type: 'eps' or 'xstart'.
    clip_denoised: clip every x0-hat to [-1, 1] (diffusers' ``thresholding=True, sample_max_value=1``).
    trace_every: also return every k-th state (the predictor's, before its correction) and x0-hat.
    x_init: the starting state (default: N(0, I) from ``key``).

  Returns:
    Samples [B, H, W, C], or ``(samples, SampleTrace)`` with ``trace_every``.
  """
  opts = dict(steps=steps, order=order, variant=variant, spacing=spacing, steps_offset=steps_offset)
  run = dict(mean_type=mean_type, clip_denoised=clip_denoised, trace_every=trace_every, x_init=x_init)
  return _solve('unipc', lambda grid: _unipc_plan(grid, order, variant), schedule, denoise_fn, shape, key, opts, run)


def euler_sample_loop(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  shape: Sequence[int],
  key: jax.Array,
  *,
  steps: int,
  spacing: str = 'karras',
  steps_offset: int = 0,
  mean_type: str = 'eps',
  clip_denoised: bool = False,
  trace_every: int | None = None,
  x_init: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, SampleTrace]:
  """Euler's method on the probability-flow ODE dx/dsigma = eps-hat, x = x_t / sqrt(abar) (Karras et al. 2022).

  First order, one network call per step, called at the (interpolated, possibly fractional) timestep of each
  noise level.

  Args:
    schedule: the training schedule (concrete).
    denoise_fn: ``denoise_fn(x_t, t [B] float32) -> output``; must accept fractional timesteps.
    shape: [B, H, W, C].
    key: PRNG key for the initial noise.
    steps: number of steps N (= network calls).
    spacing: any of :data:`SPACINGS` (default 'karras').
    steps_offset: the 'leading' spacing's offset.
    mean_type: 'eps' or 'xstart'.
    clip_denoised: clip every x0-hat to [-1, 1].
    trace_every: also return every k-th state and x0-hat.
    x_init: the starting VP state x_t at the first node (default: N(0, I) from ``key``).

  Returns:
    Samples [B, H, W, C], or ``(samples, SampleTrace)`` with ``trace_every`` (states in the VP scale x_t).
  """
  opts = dict(steps=steps, spacing=spacing, steps_offset=steps_offset)
  run = dict(mean_type=mean_type, clip_denoised=clip_denoised, trace_every=trace_every, x_init=x_init)
  return _solve('euler', lambda grid: _euler_plan(grid, eta=None), schedule, denoise_fn, shape, key, opts, run)


def euler_ancestral_sample_loop(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  shape: Sequence[int],
  key: jax.Array,
  *,
  steps: int,
  eta: float = 1.0,
  spacing: str = 'karras',
  steps_offset: int = 0,
  mean_type: str = 'eps',
  clip_denoised: bool = False,
  trace_every: int | None = None,
  x_init: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, SampleTrace]:
  """Euler ancestral (k-diffusion's ``sample_euler_ancestral``; diffusers' ``EulerAncestralDiscreteScheduler``).

  Each step goes down to sigma_down by Euler and adds noise sigma_up z, with sigma_up = min(sigma_to, eta
  sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)) and sigma_down^2 = sigma_to^2 - sigma_up^2.
  eta = 1 (default) is diffusers' scheduler, eta = 0 is :func:`euler_sample_loop`. One network call per step.

  Args:
    schedule: the training schedule (concrete).
    denoise_fn: ``denoise_fn(x_t, t [B] float32) -> output``; must accept fractional timesteps.
    shape: [B, H, W, C].
    key: PRNG key (initial noise and the per-step noise).
    steps: number of steps N (= network calls).
    eta: the share of fresh noise, in [0, 1].
    spacing: any of :data:`SPACINGS` (default 'karras').
    steps_offset: the 'leading' spacing's offset.
    mean_type: 'eps' or 'xstart'.
    clip_denoised: clip every x0-hat to [-1, 1].
    trace_every: also return every k-th state and x0-hat.
    x_init: the starting VP state (default: N(0, I) from ``key``).

  Returns:
    Samples [B, H, W, C], or ``(samples, SampleTrace)`` with ``trace_every``.
  """
  opts = dict(steps=steps, eta=eta, spacing=spacing, steps_offset=steps_offset)
  run = dict(mean_type=mean_type, clip_denoised=clip_denoised, trace_every=trace_every, x_init=x_init)
  return _solve(
    'euler_ancestral', lambda grid: _euler_plan(grid, eta=float(eta)), schedule, denoise_fn, shape, key, opts, run
  )


def heun_sample_loop(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  shape: Sequence[int],
  key: jax.Array,
  *,
  steps: int,
  spacing: str = 'karras',
  steps_offset: int = 0,
  mean_type: str = 'eps',
  clip_denoised: bool = False,
  x_init: jax.Array | None = None,
) -> jax.Array:
  """Heun's method (Karras et al. 2022, Alg. 1 without churn), as diffusers' ``HeunDiscreteScheduler``.

  An Euler step, a second call at the predicted point and a step with the mean of the two slopes; the last step
  (to sigma = 0) is a plain Euler step. 2N - 1 network calls; no ``trace_every``.

  Args:
    schedule: the training schedule (concrete).
    denoise_fn: ``denoise_fn(x_t, t [B] float32) -> output``; must accept fractional timesteps.
    shape: [B, H, W, C].
    key: PRNG key for the initial noise.
    steps: number of steps N.
    spacing: any of :data:`SPACINGS` (default 'karras').
    steps_offset: the 'leading' spacing's offset.
    mean_type: 'eps' or 'xstart'.
    clip_denoised: clip every x0-hat to [-1, 1] (diffusers' ``clip_sample=True``).
    x_init: the starting VP state (default: N(0, I) from ``key``).

  Returns:
    Samples [B, H, W, C].
  """
  opts = dict(steps=steps, spacing=spacing, steps_offset=steps_offset)
  run = dict(mean_type=mean_type, clip_denoised=clip_denoised, trace_every=None, x_init=x_init)
  return _solve('heun', _heun_plan, schedule, denoise_fn, shape, key, opts, run)


def _abar64(schedule: Schedule) -> np.ndarray:
  return np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))


def plms_sample_loop(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  shape: Sequence[int],
  key: jax.Array,
  *,
  steps: int,
  spacing: str = 'leading',
  steps_offset: int = 0,
  mean_type: str = 'eps',
  clip_denoised: bool = False,
  x_init: jax.Array | None = None,
) -> jax.Array:
  """PLMS, PNDM's pseudo linear multistep method (Liu et al. 2022): ``PNDMScheduler(skip_prk_steps=True)``.

  Adams-Bashforth (up to 4 steps) on eps-hat inside the DDIM transfer phi; the first step is a pseudo
  improved-Euler step with two calls, so N steps cost N + 1 calls (1 for N = 1). Each step goes to the next
  timestep of the spacing, the last to abar = 1 (diffusers' ``set_alpha_to_one=True``). No ``trace_every``.

  Args:
    schedule: the training schedule (concrete).
    denoise_fn: ``denoise_fn(x_t, t [B] int32) -> output`` (guided for classifier-free guidance).
    shape: [B, H, W, C].
    key: PRNG key for the initial noise.
    steps: number of steps N.
    spacing: 'leading' (default, diffusers' for PNDM), 'trailing' or 'linspace'.
    steps_offset: the 'leading' spacing's offset.
    mean_type: 'eps' or 'xstart'.
    clip_denoised: clip every x0-hat to [-1, 1].
    x_init: the starting state (default: N(0, I) from ``key``).

  Returns:
    Samples [B, H, W, C].
  """
  opts = dict(steps=steps, spacing=spacing, steps_offset=steps_offset)
  run = dict(mean_type=mean_type, clip_denoised=clip_denoised, trace_every=None, x_init=x_init)
  return _solve(
    'plms',
    lambda grid: _pndm_plan(_abar64(schedule), grid.timesteps.astype(np.int64), runge_kutta=False),
    schedule,
    denoise_fn,
    shape,
    key,
    opts,
    run,
  )


def pndm_sample_loop(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  shape: Sequence[int],
  key: jax.Array,
  *,
  steps: int,
  spacing: str = 'leading',
  steps_offset: int = 0,
  mean_type: str = 'eps',
  clip_denoised: bool = False,
  x_init: jax.Array | None = None,
) -> jax.Array:
  """PNDM (Liu et al. 2022): PLMS after three pseudo Runge-Kutta (RK4) warm-up steps; diffusers' ``PNDMScheduler``.

  The warm-up costs 4 calls per step (the half steps at the midpoint timestep between two nodes), so N >= 4 steps
  cost N + 9 calls. The last step lands on abar = 1. No ``trace_every``.

  Args:
    schedule: the training schedule (concrete).
    denoise_fn: ``denoise_fn(x_t, t [B] int32) -> output`` (guided for classifier-free guidance).
    shape: [B, H, W, C].
    key: PRNG key for the initial noise.
    steps: number of steps N >= 4.
    spacing: 'leading' (default), 'trailing' or 'linspace'.
    steps_offset: the 'leading' spacing's offset.
    mean_type: 'eps' or 'xstart'.
    clip_denoised: clip every x0-hat to [-1, 1].
    x_init: the starting state (default: N(0, I) from ``key``).

  Returns:
    Samples [B, H, W, C].
  """
  opts = dict(steps=steps, spacing=spacing, steps_offset=steps_offset)
  run = dict(mean_type=mean_type, clip_denoised=clip_denoised, trace_every=None, x_init=x_init)
  return _solve(
    'pndm',
    lambda grid: _pndm_plan(_abar64(schedule), grid.timesteps.astype(np.int64), runge_kutta=True),
    schedule,
    denoise_fn,
    shape,
    key,
    opts,
    run,
  )


# --------------------------------------------------- the samplers of ddpm_jax.sampling, wrapped unchanged


def _ddim_timesteps(schedule: Schedule, steps: int, spacing: str, steps_offset: int) -> np.ndarray:
  """Increasing timesteps of DDIMScheduler's spacing (DDIM's and respaced sampling's convention)."""
  grid = make_grid('ddim', schedule, steps, spacing, steps_offset=steps_offset)
  return grid.timesteps[::-1].astype(np.int64)


def _ancestral(schedule, denoise_fn, shape, key, *, var_type, mean_type, clip_denoised, trace_every, x_init, **_):
  return sampling.p_sample_loop(
    schedule,
    denoise_fn,
    shape,
    key,
    mean_type=mean_type,
    var_type=var_type,
    clip_denoised=clip_denoised,
    trace_every=trace_every,
    x_init=x_init,
  )


def _respaced(schedule, denoise_fn, shape, key, *, steps, spacing, steps_offset, var_type, mean_type, **kw):
  short, timestep_map = sched_lib.respace(schedule, _ddim_timesteps(schedule, steps, spacing, steps_offset))
  return sampling.p_sample_loop(
    short,
    sampling.remap_timesteps(denoise_fn, timestep_map),
    shape,
    key,
    mean_type=mean_type,
    var_type=var_type,
    clip_denoised=kw['clip_denoised'],
    trace_every=kw['trace_every'],
    x_init=kw['x_init'],
  )


def _ddim(schedule, denoise_fn, shape, key, *, steps, spacing, steps_offset, eta, mean_type, **kw):
  return sampling.ddim_sample_loop(
    schedule,
    denoise_fn,
    shape,
    key,
    timesteps=_ddim_timesteps(schedule, steps, spacing, steps_offset),
    eta=eta,
    mean_type=mean_type,
    clip_denoised=kw['clip_denoised'],
    trace_every=kw['trace_every'],
    x_init=kw['x_init'],
  )


def sample(
  name: str,
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  shape: Sequence[int],
  key: jax.Array,
  *,
  steps: int | None = None,
  order: int | None = None,
  variant: str | None = None,
  spacing: str | None = None,
  eta: float | None = None,
  steps_offset: int = 0,
  mean_type: str = 'eps',
  var_type: str = 'fixedlarge',
  clip_denoised: bool | None = None,
  trace_every: int | None = None,
  x_init: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, SampleTrace]:
  """Runs sampler ``name`` of :data:`SAMPLERS` with its defaults for the options left as None.

  One entry point for a command: ``validate`` first, then the sampler's function. 'ancestral', 'respaced' and
  'ddim' are :mod:`ddpm_jax.sampling`'s samplers, called exactly as before ('respaced' and 'ddim' with the
  spacing's timesteps; 'linspace' is ``schedule.space_timesteps``).

  Args:
    name: a key of :data:`SAMPLERS`.
    schedule: the training schedule.
    denoise_fn: ``denoise_fn(x_t, t) -> output`` (a guided one for classifier-free guidance).
    shape: [B, H, W, C].
    key: PRNG key.
    steps: number of steps (None: the sampler's ``default_steps``, T for the three samplers of ``sampling``).
    order, variant, spacing, eta: the sampler's options (None: its defaults); others raise ``ValueError``.
    steps_offset: the 'leading' spacing's offset.
    mean_type: the network's parameterization.
    var_type: the reverse variance of 'ancestral' and 'respaced' (ignored by the others, whose noise follows
      from their update).
    clip_denoised: clip x0-hat to [-1, 1] (None: the sampler's default: True for the three samplers of
      ``sampling``, as the paper's code, False for the solvers, as diffusers).
    trace_every: as in :func:`ddpm_jax.sampling.p_sample_loop`, for samplers with ``trace``.
    x_init: optional starting state.

  Returns:
    Samples [B, H, W, C], or ``(samples, SampleTrace)`` with ``trace_every``.
  """
  validate(
    name,
    schedule.num_timesteps,
    steps=steps,
    order=order,
    variant=variant,
    spacing=spacing,
    eta=eta,
    steps_offset=steps_offset,
    mean_type=mean_type,
    trace_every=trace_every,
  )
  info = SAMPLERS[name]
  kwargs: dict[str, Any] = dict(mean_type=mean_type, x_init=x_init)
  kwargs['clip_denoised'] = info.default_clip if clip_denoised is None else bool(clip_denoised)
  if info.trace:
    kwargs['trace_every'] = trace_every
  if info.spacings:
    kwargs.update(steps=_resolve_steps(info, steps, schedule.num_timesteps), steps_offset=steps_offset)
    kwargs['spacing'] = info.default_spacing if spacing is None else spacing
  if info.orders:
    kwargs['order'] = info.default_order if order is None else order
  if info.variants:
    kwargs['variant'] = info.default_variant if variant is None else variant
  if info.eta is not None:
    kwargs['eta'] = info.eta if eta is None else float(eta)
  if name in ('ancestral', 'respaced'):
    kwargs['var_type'] = var_type
  return info.fn(schedule, denoise_fn, shape, key, **kwargs)


_SOLVER_SPACINGS = SPACINGS
_DISCRETE_SPACINGS = ('linspace', 'leading', 'trailing', 'quadratic')
_PNDM_SPACINGS = ('leading', 'trailing', 'linspace')

SAMPLERS: dict[str, SamplerInfo] = {
  info.name: info
  for info in (
    SamplerInfo(
      'ancestral',
      "the paper's sampler (Algorithm 2, x0 clipped as in its code): all T steps, T calls",
      _ancestral,
      calls=lambda n, T: T,
      stochastic=True,
      default_steps=None,
      default_clip=True,
    ),
    SamplerInfo(
      'respaced',
      'ancestral sampling on N of the T steps (Nichol & Dhariwal 2021), N calls',
      _respaced,
      calls=lambda n, T: n,
      spacings=_DISCRETE_SPACINGS,
      default_spacing='linspace',
      stochastic=True,
      default_steps=None,
      default_clip=True,
    ),
    SamplerInfo(
      'ddim',
      'DDIM (Song et al. 2021), deterministic at eta 0, N calls',
      _ddim,
      calls=lambda n, T: n,
      spacings=_DISCRETE_SPACINGS,
      default_spacing='linspace',
      eta=0.0,
      default_steps=None,
      default_clip=True,
    ),
    SamplerInfo(
      'dpmpp',
      'DPM-Solver++ multistep, order 2 (2M, default) or 3 (3M); 10-25 steps, N calls',
      dpmpp_sample_loop,
      calls=lambda n, T: n,
      orders=(1, 2, 3),
      default_order=2,
      variants=('midpoint', 'heun'),
      default_variant='midpoint',
      spacings=_SOLVER_SPACINGS,
      default_spacing='logsnr',
    ),
    SamplerInfo(
      'dpmpp_sde',
      'SDE-DPM-Solver++ multistep (2M SDE): stochastic, order 2 (default), N calls',
      dpmpp_sde_sample_loop,
      calls=lambda n, T: n,
      orders=(1, 2, 3),
      default_order=2,
      variants=('midpoint', 'heun'),
      default_variant='midpoint',
      spacings=_SOLVER_SPACINGS,
      default_spacing='logsnr',
      stochastic=True,
    ),
    SamplerInfo(
      'unipc',
      'UniPC multistep predictor-corrector, order 2 (default) or 3, bh2 (default) or bh1; N calls',
      unipc_sample_loop,
      calls=lambda n, T: n,
      orders=(1, 2, 3),
      default_order=2,
      variants=('bh1', 'bh2'),
      default_variant='bh2',
      spacings=_SOLVER_SPACINGS,
      default_spacing='logsnr',
    ),
    SamplerInfo(
      'euler',
      'Euler on the probability-flow ODE in sigma (Karras et al. 2022), first order, N calls',
      euler_sample_loop,
      calls=lambda n, T: n,
      spacings=_SOLVER_SPACINGS,
      default_spacing='karras',
    ),
    SamplerInfo(
      'heun',
      "Heun's method in sigma (Karras et al. 2022), second order, 2N-1 calls",
      heun_sample_loop,
      calls=lambda n, T: 2 * n - 1,
      spacings=_SOLVER_SPACINGS,
      default_spacing='karras',
      trace=False,
    ),
    SamplerInfo(
      'euler_ancestral',
      'Euler ancestral in sigma: stochastic, eta 1 (default) to 0 (= euler), N calls',
      euler_ancestral_sample_loop,
      calls=lambda n, T: n,
      spacings=_SOLVER_SPACINGS,
      default_spacing='karras',
      eta=1.0,
      stochastic=True,
    ),
    SamplerInfo(
      'plms',
      'PLMS (PNDM without the Runge-Kutta warm-up, Liu et al. 2022), N+1 calls',
      plms_sample_loop,
      calls=lambda n, T: n + 1 if n > 1 else 1,
      spacings=_PNDM_SPACINGS,
      default_spacing='leading',
      trace=False,
    ),
    SamplerInfo(
      'pndm',
      'PNDM: PLMS after 3 Runge-Kutta warm-up steps (Liu et al. 2022), N >= 4, N+9 calls',
      pndm_sample_loop,
      calls=lambda n, T: n + 9,
      spacings=_PNDM_SPACINGS,
      default_spacing='leading',
      min_steps=4,
      trace=False,
    ),
  )
}
"""Every sampler by name, in the order a command lists them (see :class:`SamplerInfo`)."""
