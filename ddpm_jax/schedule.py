"""Noise schedules of the forward process, and the tables derived from them.

The forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) is fixed by its betas. Every
quantity the diffusion math needs (cumulative products, posterior coefficients, log-variances) is a
per-timestep table derived from the betas. As in the original code (diffusion_tf/diffusion_utils_2.py),
all tables are computed in float64 with numpy and only then stored as float32: in float32, quantities
such as ``sqrt(1/alpha_bar - 1)`` lose several significant digits at small t, where 1 - alpha_bar
cancels.

Timesteps are indexed ``i = 0 .. T-1`` in code; paper time is ``t = i + 1`` (``betas[0]`` is the paper's
beta_1, and "i == 0 means diffused for one step").

Example:
  >>> from ddpm_jax import schedule
  >>> s = schedule.get_schedule('linear')          # the paper's 1e-4 -> 0.02 over T = 1000
  >>> s.num_timesteps
  1000
  >>> float(s.alphas_cumprod[-1])                    # doctest: +ELLIPSIS
  4.035...e-05
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

BETA_SCHEDULES = ('linear', 'quad', 'const', 'jsd', 'warmup10', 'warmup50', 'cosine')


def get_beta_schedule(
  name: str = 'linear',
  *,
  beta_start: float = 1e-4,
  beta_end: float = 0.02,
  num_timesteps: int = 1000,
  cosine_s: float = 0.008,
) -> np.ndarray:
  """Returns the betas of a named schedule as a float64 numpy array of shape [num_timesteps].

  Schedules (the first six as in the original code; ``cosine`` from Nichol & Dhariwal 2021, Eq. 17):
    - ``linear``: ``linspace(beta_start, beta_end, T)`` (the paper's choice with 1e-4, 0.02, 1000).
    - ``quad``: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``.
    - ``const``: ``beta_end`` everywhere.
    - ``jsd``: ``1/T, 1/(T-1), ..., 1`` (the last step destroys all signal).
    - ``warmup10`` / ``warmup50``: ``beta_end`` everywhere except a linear ramp from ``beta_start`` over the
      first 10% / 50% of the steps.
    - ``cosine``: ``alpha_bar(t) = cos((t/T + s)/(1 + s) * pi/2)**2``, ``beta_i = min(1 - alpha_bar(i+1) /
      alpha_bar(i), 0.999)``; ``beta_start``/``beta_end`` are ignored.

  Args:
    name: one of ``BETA_SCHEDULES``.
    beta_start: first beta (paper: 1e-4).
    beta_end: last beta (paper: 0.02).
    num_timesteps: T (paper: 1000).
    cosine_s: the offset ``s`` of the cosine schedule.

  Returns:
    float64 array of shape [num_timesteps].

  Raises:
    ValueError: for an unknown name, a non-positive T, or betas outside (0, 1].
  """
  if name not in BETA_SCHEDULES:
    raise ValueError(f'Unknown beta schedule {name!r}; choose one of {BETA_SCHEDULES}.')
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
    raise ValueError(f'num_timesteps must be a positive integer, got {num_timesteps!r}.')
  if name != 'cosine' and not 0.0 < beta_start <= beta_end <= 1.0:
    raise ValueError(f'Need 0 < beta_start <= beta_end <= 1, got beta_start={beta_start!r}, beta_end={beta_end!r}.')
  n = int(num_timesteps)
  if name == 'linear':
    betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
  elif name == 'quad':
    betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
  elif name == 'const':
    betas = np.full(n, beta_end, dtype=np.float64)
  elif name == 'jsd':
    betas = 1.0 / np.linspace(n, 1, n, dtype=np.float64)
  elif name in ('warmup10', 'warmup50'):
    betas = np.full(n, beta_end, dtype=np.float64)
    warmup = int(n * (0.1 if name == 'warmup10' else 0.5))
    betas[:warmup] = np.linspace(beta_start, beta_end, warmup, dtype=np.float64)
  else:  # cosine
    steps = np.arange(n + 1, dtype=np.float64) / n
    alpha_bar = np.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
  return betas


class Schedule(NamedTuple):
  """Per-timestep tables of the forward process, each float32 of shape [T].

  A NamedTuple of arrays, hence a pytree: pass it to jitted functions as an ordinary argument.
  Index ``i`` is code time (paper time ``t = i + 1``).

  Attributes:
    betas: beta_i.
    alphas_cumprod: alpha_bar_i = prod_{j <= i} (1 - beta_j).
    alphas_cumprod_prev: alpha_bar_{i-1}, with alpha_bar_{-1} = 1.
    sqrt_alphas_cumprod: sqrt(alpha_bar_i); the mean scale of q(x_i | x_0).
    sqrt_one_minus_alphas_cumprod: sqrt(1 - alpha_bar_i); the std of q(x_i | x_0).
    log_one_minus_alphas_cumprod: log(1 - alpha_bar_i).
    sqrt_recip_alphas_cumprod: sqrt(1 / alpha_bar_i), for x0 from eps.
    sqrt_recipm1_alphas_cumprod: sqrt(1 / alpha_bar_i - 1), for x0 from eps.
    posterior_variance: beta-tilde_i = beta_i (1 - alpha_bar_{i-1}) / (1 - alpha_bar_i) (0 at i = 0).
    posterior_log_variance_clipped: log beta-tilde_i with entry 0 replaced by log beta-tilde_1 (the
      posterior variance is 0 there).
    posterior_mean_coef1: coefficient of x_0 in the posterior mean.
    posterior_mean_coef2: coefficient of x_i in the posterior mean.
    recip_posterior_mean_coef1: 1 / posterior_mean_coef1, for x0 from the posterior mean.
    posterior_mean_coef2_over_coef1: posterior_mean_coef2 / posterior_mean_coef1, likewise.
    fixedlarge_variance: the 'fixedlarge' reverse variance sigma_i^2 = beta_i.
    fixedlarge_log_variance: log([beta-tilde_1, beta_1, ..., beta_{T-1}]): the original code puts
      beta-tilde_1 at i = 0 "to get a better decoder log likelihood".
  """

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  recip_posterior_mean_coef1: jax.Array
  posterior_mean_coef2_over_coef1: jax.Array
  fixedlarge_variance: jax.Array
  fixedlarge_log_variance: jax.Array

  @property
  def num_timesteps(self) -> int:
    """T, the number of diffusion steps (static, also under jit)."""
    return self.betas.shape[0]


def schedule_tables(betas: np.ndarray | Sequence[float]) -> dict[str, np.ndarray]:
  """Computes every table of :class:`Schedule` in float64 (numpy), keyed by field name.

  Exposed for tests and for code that needs float64 precision; most users want :func:`make_schedule`.

  Args:
    betas: [T] betas in (0, 1].

  Returns:
    dict mapping each ``Schedule`` field name to a float64 array of shape [T].
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 2:
    raise ValueError(f'betas must be a 1-D array with at least 2 entries, got shape {betas.shape}.')
  if not np.all((betas > 0) & (betas <= 1)):
    bad = betas[~((betas > 0) & (betas <= 1))]
    raise ValueError(f'betas must lie in (0, 1]; found {bad[:5]}.')
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  with np.errstate(divide='ignore', invalid='ignore'):  # jsd ends with alpha_bar = 0 (infinite 1/alpha_bar)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
    tables = dict(
      betas=betas,
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
      posterior_variance=posterior_variance,
      # posterior_variance[0] is 0, so its log is replaced by the next entry's, as in the original.
      posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
      posterior_mean_coef1=coef1,
      posterior_mean_coef2=coef2,
      recip_posterior_mean_coef1=1.0 / coef1,
      posterior_mean_coef2_over_coef1=coef2 / coef1,
      fixedlarge_variance=betas,
      fixedlarge_log_variance=np.log(np.append(posterior_variance[1], betas[1:])),
    )
  return tables


def make_schedule(betas: np.ndarray | Sequence[float]) -> Schedule:
  """Builds a :class:`Schedule` from betas: tables computed in float64, stored as float32.

  Args:
    betas: [T] betas in (0, 1], e.g. from :func:`get_beta_schedule`.

  Returns:
    The schedule, a pytree of float32 numpy arrays of shape [T] (they become jax arrays when passed
    through jit).
  """
  tables = schedule_tables(betas)
  return Schedule(**{k: v.astype(np.float32) for k, v in tables.items()})


def get_schedule(
  name: str = 'linear',
  *,
  beta_start: float = 1e-4,
  beta_end: float = 0.02,
  num_timesteps: int = 1000,
) -> Schedule:
  """``make_schedule(get_beta_schedule(...))``: the paper's schedule with the default arguments."""
  return make_schedule(get_beta_schedule(name, beta_start=beta_start, beta_end=beta_end, num_timesteps=num_timesteps))


def find_beta_schedule(schedule: Schedule) -> dict | None:
  """The :func:`get_schedule` arguments that give exactly ``schedule``'s tables, or None if no named one does.

  What the exporters write, so that a re-imported schedule is bit-for-bit the same (explicit float32 betas
  would lose the float64 precision the tables were computed with). ``beta_start``/``beta_end`` are taken as
  the shortest decimals that round to the first and last float32 beta (1e-4, not 9.99999974e-05).

  Returns:
    ``{'name', 'beta_start', 'beta_end', 'num_timesteps'}`` or None.
  """
  betas = np.asarray(schedule.betas)
  start, end = float(str(np.float32(betas[0]))), float(str(np.float32(betas[-1])))
  for name in BETA_SCHEDULES:
    kwargs = dict(name=name, beta_start=start, beta_end=end, num_timesteps=int(betas.shape[0]))
    try:
      candidate = get_beta_schedule(**kwargs)
    except ValueError:  # e.g. beta_start > beta_end: not this name
      continue
    if not np.array_equal(candidate.astype(np.float32), betas):
      continue
    if all(np.array_equal(a, b) for a, b in zip(make_schedule(candidate), schedule)):
      return kwargs
  return None


def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """Evenly strided subset of ``num_steps`` timesteps out of ``0 .. num_timesteps-1``, always keeping 0.

  The timesteps are ``round(linspace(0, T-1, num_steps))`` (unique, increasing), so the last one is T-1
  and sampling starts from pure noise.

  Args:
    num_timesteps: T of the original schedule.
    num_steps: how many timesteps to keep, 1 <= num_steps <= T.

  Returns:
    int64 array of shape [num_steps], increasing.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'num_steps must be in [1, {num_timesteps}], got {num_steps}.')
  steps = np.unique(np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64))
  if steps.shape[0] != num_steps:  # cannot happen for num_steps <= T, kept as a guard
    raise ValueError(f'Could not space {num_steps} distinct steps over {num_timesteps}.')
  return steps


def respace_betas(
  betas: np.ndarray | Sequence[float], use_timesteps: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Betas of a shorter forward process that visits only ``use_timesteps`` of the original one.

  Keeps alpha_bar at each kept step unchanged (Nichol & Dhariwal 2021, Sec. 4): with kept steps
  ``k_0 < k_1 < ...``, the new ``beta_j = 1 - alpha_bar[k_j] / alpha_bar[k_{j-1}]`` (and
  ``1 - alpha_bar[k_0]`` for j = 0). A network trained on the original process is then called with the
  original timestep ``timestep_map[j]``.

  Args:
    betas: [T] betas of the original schedule.
    use_timesteps: increasing distinct indices into 0..T-1 to keep.

  Returns:
    ``(new_betas, timestep_map)``: float64 [K] and int32 [K].
  """
  betas = np.asarray(betas, dtype=np.float64)
  keep = np.asarray(use_timesteps, dtype=np.int64)
  if keep.ndim != 1 or keep.size == 0:
    raise ValueError(f'use_timesteps must be a non-empty 1-D sequence, got shape {keep.shape}.')
  if np.any(np.diff(keep) <= 0) or keep[0] < 0 or keep[-1] >= betas.shape[0]:
    raise ValueError(f'use_timesteps must be strictly increasing indices in [0, {betas.shape[0] - 1}], got {keep}.')
  alphas_cumprod = np.cumprod(1.0 - betas)[keep]
  prev = np.append(1.0, alphas_cumprod[:-1])
  return 1.0 - alphas_cumprod / prev, keep.astype(np.int32)


def respace(schedule: Schedule, use_timesteps: Sequence[int] | np.ndarray) -> tuple[Schedule, np.ndarray]:
  """A shorter schedule that visits only ``use_timesteps`` of ``schedule`` (see :func:`respace_betas`).

  Sample from it with the network called at the original timesteps, e.g.
  ``sampling.p_sample_loop(short, sampling.remap_timesteps(denoise_fn, timestep_map), ...)``.

  Args:
    schedule: the schedule the network was trained with.
    use_timesteps: increasing indices into 0..T-1, e.g. ``space_timesteps(T, 100)``.

  Returns:
    ``(respaced schedule with K steps, timestep_map int32 [K])``.
  """
  new_betas, timestep_map = respace_betas(np.asarray(schedule.betas, np.float64), use_timesteps)
  return make_schedule(new_betas), timestep_map
