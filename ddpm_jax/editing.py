"""Inpainting and image-to-image editing with any trained DDPM, as pure functions over a ``denoise_fn``.

Neither needs retraining: both steer the paper's ancestral sampler with a real image.

* :func:`inpaint`: RePaint (Lugmayr et al. 2022). At every reverse step the known pixels are replaced by the
  original image noised to the same level, so the generated pixels are drawn in harmony with them; with
  *resampling jumps* the chain repeatedly goes back up ``jump_length`` forward steps and down again, which gives
  the network more passes to reconcile the two regions. The known pixels of the result equal the input exactly.
* :func:`sdedit`: SDEdit (Meng et al. 2022). Noise an image to ``t_start`` with q(x_t | x_0) and run the reverse
  chain from there: small ``t_start`` keeps the layout and details, large ``t_start`` keeps only the coarse
  structure (``t_start = T - 1`` forgets the image). The paper's reconstruction experiment (Sec. 4.3) is this.

The network enters the math only as ``denoise_fn(x_t, t)`` (see :mod:`ddpm_jax.diffusion`), so a
class-conditional model with classifier-free guidance (`ddpm_jax.guidance.denoise_fn`) inpaints and edits
unchanged. What the ``edit.py`` command does around these (models, image files, masks, output folders) is
`ddpm_jax.edit_lib`.

State indexing: ``x_n`` is the image after ``n`` forward steps (``x_0`` the data, ``x_T`` pure noise). The
network's code timestep for the reverse step ``x_n -> x_{n-1}`` is ``t = n - 1``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, progress, sampling
from ddpm_jax.diffusion import DenoiseFn, MeanType, VarType
from ddpm_jax.schedule import Schedule

# Regions that ``--mask`` names instead of a PNG: the part of the image to regenerate.
MASK_PRESETS = ('center', 'left', 'right', 'top', 'bottom')


# ------------------------------------------------------------------------------------------------ inpainting


def repaint_path(num_timesteps: int, *, jump_length: int = 1, jump_n_sample: int = 1) -> np.ndarray:
  """The states ``n`` that RePaint's chain visits, from ``T`` (noise) down to 0 (the image).

  Going down, each state ``n = k * jump_length`` (``k >= 1``, ``n + jump_length <= T``) is a resampling point:
  the first ``jump_n_sample - 1`` times the chain arrives there it goes back up ``jump_length`` forward steps
  and comes down again. Consecutive entries differ by exactly one step. With ``jump_n_sample = 1`` (or
  ``jump_length`` = 1 and ``jump_n_sample`` = 1) this is the plain chain ``T, T-1, ..., 0``.

  Args:
    num_timesteps: T.
    jump_length: forward steps per jump (RePaint: 10).
    jump_n_sample: how many times each resampling stretch is traversed (RePaint: 10; 1 = no jumps).

  Returns:
    int32 array of the visited states, ``path[0] = T`` and ``path[-1] = 0``; its length minus one is the number
    of transitions, of which ``T + (jump_n_sample - 1) * jump_length * num_points`` go down (network calls).
  """
  for name, value in (('num_timesteps', num_timesteps), ('jump_length', jump_length), ('jump_n_sample', jump_n_sample)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}.')
  if jump_n_sample > 1 and jump_length >= num_timesteps:
    raise ValueError(
      f'jump_length={jump_length} leaves no resampling point in T = {num_timesteps} steps; '
      f'use a jump_length below {num_timesteps}, or jump_n_sample=1 for no jumps.'
    )
  jumps_left = {n: jump_n_sample - 1 for n in range(jump_length, num_timesteps - jump_length + 1, jump_length)}
  path = [num_timesteps]
  n = num_timesteps
  while n > 0:
    n -= 1
    path.append(n)
    if jumps_left.get(n, 0) > 0:
      jumps_left[n] -= 1
      for _ in range(jump_length):
        n += 1
        path.append(n)
  return np.asarray(path, np.int32)


def _check_known(x0: jax.Array, known: jax.Array) -> jax.Array:
  known = jnp.asarray(known)
  try:
    known = jnp.broadcast_to(known, x0.shape)
  except ValueError as e:
    raise ValueError(
      f'known has shape {known.shape}; it must broadcast to the images {x0.shape} (e.g. [B, H, W, 1] or [H, W, 1]).'
    ) from e
  return known if known.dtype == bool else known > 0.5


def inpaint(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  x0: jax.Array,
  known: jax.Array,
  key: jax.Array,
  *,
  jump_length: int = 1,
  jump_n_sample: int = 1,
  mean_type: MeanType = 'eps',
  var_type: VarType = 'fixedlarge',
  clip_denoised: bool = True,
) -> jax.Array:
  """Fills the unknown pixels of ``x0`` with the model (RePaint), as one ``lax.scan``.

  The chain starts from ``x_T ~ N(0, I)`` with the known pixels drawn from q(x_T | x_0). Each reverse step
  ``x_n -> x_{n-1}`` draws the unknown pixels from p_theta(x_{n-1} | x_n) and sets the known
  ones to a fresh sample of q(x_{n-1} | x_0) (to ``x0`` itself at the last step). Each jump back up
  draws ``x_{n+1} ~ q(x_{n+1} | x_n) = N(sqrt(1 - beta) x_n, beta I)``; it costs no network call.

  Args:
    schedule: the forward process the network was trained with.
    denoise_fn: ``denoise_fn(x_t, t) -> output``.
    x0: [B, H, W, C] images in [-1, 1]; only their known pixels are used.
    known: 1/True where a pixel is given and kept, 0/False where it is generated; broadcastable to ``x0``
      (e.g. [B, H, W, 1] to mask all channels alike). Values above 0.5 count as known.
    key: PRNG key.
    jump_length: forward steps per resampling jump (see :func:`repaint_path`).
    jump_n_sample: traversals of each resampling stretch; 1 = no jumps (T network calls).
    mean_type: the network's parameterization.
    var_type: reverse variance, as for :func:`ddpm_jax.sampling.p_sample_loop`.
    clip_denoised: clip the x_0 estimate at every step.

  Returns:
    [B, H, W, C]: equal to ``x0`` (exactly) where ``known``; the model's completion elsewhere (not clipped).
  """
  diffusion.check_types(mean_type=mean_type, var_type=var_type)
  if x0.ndim != 4:
    raise ValueError(f'x0 must be [B, H, W, C] images, got shape {x0.shape}.')
  known = _check_known(x0, known)
  path = repaint_path(schedule.num_timesteps, jump_length=jump_length, jump_n_sample=jump_n_sample)
  starts, going_up = path[:-1], path[1:] > path[:-1]
  batch = x0.shape[0]
  init_key, loop_key = jax.random.split(key)
  keys = jax.random.split(loop_key, len(starts))

  def down(x, n, step_key):  # x_n -> x_{n-1}
    sample_key, known_key = jax.random.split(step_key)
    t = jnp.full((batch,), n - 1, jnp.int32)
    x_gen, _ = sampling.p_sample(
      schedule, denoise_fn, x, t, sample_key, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised
    )
    # x_{n-1} of the known pixels: q(x_{n-1} | x0), i.e. code timestep n - 2; x0 itself when n - 1 = 0.
    t_prev = jnp.full((batch,), jnp.maximum(n - 2, 0), jnp.int32)
    x_known = diffusion.q_sample(schedule, x0, t_prev, jax.random.normal(known_key, x0.shape, x0.dtype))
    x_known = jnp.where(n == 1, x0, x_known)
    return jnp.where(known, x_known, x_gen)

  def up(x, n, step_key):  # x_n -> x_{n+1} ~ q(x_{n+1} | x_n); beta of that step is betas[n]
    beta = jnp.take(schedule.betas, n)
    return jnp.sqrt(1.0 - beta) * x + jnp.sqrt(beta) * jax.random.normal(step_key, x.shape, x.dtype)

  def body(x, inputs):
    n, is_up, step_key = inputs
    return jax.lax.cond(is_up, up, down, x, n, step_key), None

  # x_T: noise, with the known pixels drawn from q(x_T | x0) like at every later step (for the paper's schedule
  # alpha_bar_T = 4e-5 and the two hardly differ; for short schedules they do).
  noise_key, known_key = jax.random.split(init_key)
  x_init = jax.random.normal(noise_key, x0.shape, jnp.float32)
  x_init = jnp.where(
    known,
    diffusion.q_sample(
      schedule,
      x0,
      jnp.full((batch,), schedule.num_timesteps - 1, jnp.int32),
      jax.random.normal(known_key, x0.shape, x0.dtype),
    ),
    x_init,
  )
  # Progress (ddpm_jax.progress, only when reported) counts network calls: the steps down.
  x, _ = progress.scan(body, x_init, (jnp.asarray(starts), jnp.asarray(going_up), keys), units=~going_up)
  return x


# ---------------------------------------------------------------------------------------------------- SDEdit


class SDEditResult(NamedTuple):
  """An SDEdit run.

  Attributes:
    x_t: [B, H, W, C] the input noised to ``t_start`` (what the chain starts from).
    x_edit: [B, H, W, C] the result of the reverse chain from ``t_start`` to 0 (not clipped).
  """

  x_t: jax.Array
  x_edit: jax.Array


def sdedit(
  schedule: Schedule, denoise_fn: DenoiseFn, x0: jax.Array, t_start: int, key: jax.Array, **sampler_kwargs: Any
) -> SDEditResult:
  """Noises ``x0`` to x_{t_start} with q(x_t | x_0), then runs the ancestral sampler from ``t_start`` to 0.

  Args:
    schedule: the forward process.
    denoise_fn: ``denoise_fn(x_t, t) -> output``.
    x0: [B, H, W, C] images in [-1, 1] (a sketch, a photo, another model's sample).
    t_start: code timestep 0..T-1 to noise to (paper time ``t_start + 1``; ``T - 1`` keeps nothing).
    key: PRNG key (split into the forward noise and the sampler's key).
    **sampler_kwargs: ``mean_type``, ``var_type``, ``clip_denoised`` of :func:`sampling.p_sample_loop`.

  Returns:
    An :class:`SDEditResult`.
  """
  if not isinstance(t_start, (int, np.integer)) or not 0 <= t_start < schedule.num_timesteps:
    raise ValueError(f't_start must be an integer timestep in [0, {schedule.num_timesteps - 1}], got {t_start!r}.')
  noise_key, sample_key = jax.random.split(key)
  x_t = diffusion.q_sample(
    schedule, x0, jnp.full((x0.shape[0],), t_start, jnp.int32), jax.random.normal(noise_key, x0.shape, x0.dtype)
  )
  x_edit = sampling.p_sample_loop(
    schedule, denoise_fn, x0.shape, sample_key, x_init=x_t, start_t=int(t_start), **sampler_kwargs
  )
  return SDEditResult(x_t=x_t, x_edit=x_edit)


# ------------------------------------------------------------------------------------------------ masks


def preset_mask(name: str, image_size: int) -> np.ndarray:
  """A [S, S, 1] bool mask that is True on the named region to regenerate (one of ``MASK_PRESETS``).

  ``left``/``right``/``top``/``bottom`` are halves of the image; ``center`` is the central square of half the
  side.
  """
  if name not in MASK_PRESETS:
    raise ValueError(f'Unknown mask preset {name!r}; choose one of {MASK_PRESETS} or give a PNG path.')
  s, h = image_size, image_size // 2
  m = np.zeros((s, s, 1), bool)
  if name == 'left':
    m[:, :h] = True
  elif name == 'right':
    m[:, s - h :] = True
  elif name == 'top':
    m[:h] = True
  elif name == 'bottom':
    m[s - h :] = True
  else:
    q = (s - h) // 2
    m[q : q + h, q : q + h] = True
  return m
