"""The computations behind the paper's figures, as pure functions over a schedule and a ``denoise_fn``.

Each returns arrays (images in [-1, 1] or curves); the ``figures.py`` command (`ddpm_jax.figures_lib`) maps them
over images on the local devices and renders them as PNG.

* :func:`forward_noising`: x_t of given images at several t (the forward process).
* :func:`progressive_generation`: x_t and the x_0 estimate along one reverse chain (paper Fig. 6).
* :func:`reconstruct`: noise images to t, denoise back, and measure the distance (paper Sec. 4.3).
* :func:`interpolate`: mix two images' x_t and denoise (paper Fig. 8).
* :func:`rate_distortion`: rate and distortion along the chain from the bound's terms (paper Fig. 5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, editing, sampling
from ddpm_jax.diffusion import DenoiseFn
from ddpm_jax.schedule import Schedule


def _check_timestep(schedule: Schedule, t: int, what: str = 't') -> None:
  if not isinstance(t, (int, np.integer)) or not 0 <= t < schedule.num_timesteps:
    raise ValueError(f'{what} must be an integer timestep in [0, {schedule.num_timesteps - 1}], got {t!r}.')


def forward_noising(
  schedule: Schedule, x0: jax.Array, key: jax.Array, timesteps: Sequence[int] = (0, 200, 400, 600, 800, 999)
) -> jax.Array:
  """Samples of q(x_t | x_0) for each t, with one noise draw shared across t (so rows are comparable).

  Args:
    schedule: the forward process.
    x0: [B, H, W, C] images in [-1, 1].
    key: PRNG key.
    timesteps: code timesteps to show.

  Returns:
    [len(timesteps), B, H, W, C].
  """
  for t in timesteps:
    _check_timestep(schedule, t, 'each timestep')
  noise = jax.random.normal(key, x0.shape, x0.dtype)
  return jnp.stack([diffusion.q_sample(schedule, x0, jnp.full((x0.shape[0],), t, jnp.int32), noise) for t in timesteps])


def progressive_generation(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  shape: Sequence[int],
  key: jax.Array,
  *,
  num_snapshots: int = 10,
  **sampler_kwargs,
) -> sampling.SampleTrace:
  """The reverse chain's state x_t and x_0 estimate at ``num_snapshots`` evenly spaced t (paper Fig. 6).

  Args:
    schedule: the forward process.
    denoise_fn: the network.
    shape: [B, H, W, C].
    key: PRNG key.
    num_snapshots: how many snapshots; must divide T.
    **sampler_kwargs: passed to :func:`sampling.p_sample_loop` (mean_type, var_type, clip_denoised).

  Returns:
    A :class:`sampling.SampleTrace` whose last snapshot (t = 0) is the sample.
  """
  if num_snapshots < 1 or schedule.num_timesteps % num_snapshots:
    raise ValueError(f'num_snapshots must divide T = {schedule.num_timesteps}, got {num_snapshots}.')
  _, trace = sampling.p_sample_loop(
    schedule, denoise_fn, shape, key, trace_every=schedule.num_timesteps // num_snapshots, **sampler_kwargs
  )
  return trace


class Reconstruction(NamedTuple):
  """Noise-then-denoise reconstructions.

  Attributes:
    x_t: [B, H, W, C] the noised images.
    x_rec: [B, H, W, C] the reconstructions.
    l2: [B] Euclidean distance ||x_rec - x0|| in the [-1, 1] scale.
    rmse_255: [B] root mean squared error per pixel on the [0, 255] scale (the paper's distortion unit).
  """

  x_t: jax.Array
  x_rec: jax.Array
  l2: jax.Array
  rmse_255: jax.Array


def reconstruct(
  schedule: Schedule, denoise_fn: DenoiseFn, x0: jax.Array, t: int, key: jax.Array, **sampler_kwargs
) -> Reconstruction:
  """Noises ``x0`` to x_t with q, then runs the reverse chain from t to 0.

  Args:
    schedule: the forward process.
    denoise_fn: the network.
    x0: [B, H, W, C] images in [-1, 1].
    t: code timestep to noise to (paper t = 1000 is code 999).
    key: PRNG key.
    **sampler_kwargs: passed to :func:`sampling.p_sample_loop`.

  Returns:
    A :class:`Reconstruction`.
  """
  _check_timestep(schedule, t)
  x_t, x_rec = editing.sdedit(schedule, denoise_fn, x0, int(t), key, **sampler_kwargs)  # the same chain as SDEdit
  diff = jnp.clip(x_rec, -1, 1) - x0
  l2 = jnp.sqrt(jnp.sum(jnp.square(diff), axis=tuple(range(1, x0.ndim))))
  rmse = jnp.sqrt(diffusion.mean_flat(jnp.square(diff))) * 127.5
  return Reconstruction(x_t=x_t, x_rec=x_rec, l2=l2, rmse_255=rmse)


def interpolate(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  x0_a: jax.Array,
  x0_b: jax.Array,
  t: int,
  key: jax.Array,
  lambdas: Sequence[float] = tuple(np.linspace(0, 1, 11)),
  **sampler_kwargs,
) -> jax.Array:
  """Interpolates in x_t and denoises (paper Fig. 8): x_t = (1 - lam) x_t^a + lam x_t^b, then t -> 0.

  The forward noise of each source image and the reverse-process noise are fixed across lambdas, as in
  the paper, so the rows differ only through lambda.

  Args:
    schedule: the forward process.
    denoise_fn: the network.
    x0_a: [B, H, W, C] first images in [-1, 1].
    x0_b: [B, H, W, C] second images.
    t: code timestep at which to mix (paper uses 500).
    key: PRNG key.
    lambdas: mixing weights.
    **sampler_kwargs: passed to :func:`sampling.p_sample_loop`.

  Returns:
    [len(lambdas), B, H, W, C].
  """
  _check_timestep(schedule, t)
  if x0_a.shape != x0_b.shape:
    raise ValueError(f'x0_a and x0_b must have the same shape, got {x0_a.shape} and {x0_b.shape}.')
  key_a, key_b, sample_key = jax.random.split(key, 3)
  tt = jnp.full((x0_a.shape[0],), t, jnp.int32)
  xt_a = diffusion.q_sample(schedule, x0_a, tt, jax.random.normal(key_a, x0_a.shape, x0_a.dtype))
  xt_b = diffusion.q_sample(schedule, x0_b, tt, jax.random.normal(key_b, x0_b.shape, x0_b.dtype))

  def decode(lam):
    x_t = (1.0 - lam) * xt_a + lam * xt_b
    return sampling.p_sample_loop(
      schedule, denoise_fn, x0_a.shape, sample_key, x_init=x_t, start_t=int(t), **sampler_kwargs
    )

  return jax.lax.map(decode, jnp.asarray(lambdas, jnp.float32))


class RateDistortion(NamedTuple):
  """Rate and distortion along the reverse chain (paper Fig. 5), dataset means, indexed by code t.

  Attributes:
    rate_bpd: [T] bits/dim a receiver holds once it has x_t: the prior term plus the KL terms of the
      steps above t (sum over s > t, s >= 1). ``rate_bpd[0]`` is the whole rate L_1 + ... + L_T
      (1.78 bits/dim for the paper's CIFAR-10 model); the decoder term L_0 is distortion, not rate.
    distortion_rmse: [T] RMSE of the x_0 estimate at t on the [0, 255] scale.
  """

  rate_bpd: np.ndarray
  distortion_rmse: np.ndarray


def rate_distortion(result: diffusion.BpdResult) -> RateDistortion:
  """Rate and distortion curves from :func:`diffusion.calc_bpd_loop` output (any batch).

  Args:
    result: a ``BpdResult`` with ``terms_bpd`` and ``mse`` of shape [B, T].

  Returns:
    A :class:`RateDistortion`.
  """
  terms = np.asarray(result.terms_bpd, np.float64).mean(axis=0)
  prior = float(np.asarray(result.prior_bpd, np.float64).mean())
  kl = terms.copy()
  kl[0] = 0.0  # L_0 is the decoder's distortion term
  rate = prior + np.cumsum(kl[::-1])[::-1] - kl  # exclusive: the step at t itself is not yet received
  distortion = np.sqrt(np.asarray(result.mse, np.float64).mean(axis=0)) * 127.5
  if not math.isfinite(rate[0]):
    raise ValueError('non-finite bound terms: cannot draw the rate-distortion curve.')
  return RateDistortion(rate_bpd=rate, distortion_rmse=distortion)
