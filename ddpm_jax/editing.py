"""Inpainting and image-to-image editing with any trained DDPM, as pure functions over a ``denoise_fn``.

Neither needs retraining: both steer the paper's ancestral sampler with a real image.

* :func:`inpaint`: RePaint (Lugmayr et al. 2022). At every reverse step the known pixels are replaced by the
  original image noised to the same level, so the generated pixels are drawn in harmony with them; with
  *resampling jumps* the chain repeatedly goes back up ``jump_length`` forward steps and down again, which gives
  the network more passes to reconcile the two regions. The known pixels of the result equal the input exactly.
* :func:`sdedit`: SDEdit (Meng et al. 2022). Noise an image to ``t_start`` with q(x_t | x_0) and run the reverse
  chain from there: small ``t_start`` keeps the layout and details, large ``t_start`` keeps only the coarse
  structure (``t_start = T - 1`` forgets the image). The paper's reconstruction experiment (Sec. 4.3) is this.

The ``run`` function at the bottom is what the ``edit.py`` command calls: load a model and images, edit, write
PNGs. The network enters the math only as ``denoise_fn(x_t, t)`` (see :mod:`ddpm_jax.diffusion`), so a
class-conditional model with classifier-free guidance inpaints and edits unchanged.

State indexing: ``x_n`` is the image after ``n`` forward steps (``x_0`` the data, ``x_T`` pure noise). The
network's code timestep for the reverse step ``x_n -> x_{n-1}`` is ``t = n - 1``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, errors, guidance, paths, sampling
from ddpm_jax.diffusion import DenoiseFn, MeanType, VarType
from ddpm_jax.schedule import Schedule

MODES = ('inpaint', 'sdedit')
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
      raise errors.UserError(f'{name} must be a positive integer, got {value!r}.')
  if jump_n_sample > 1 and jump_length >= num_timesteps:
    raise errors.UserError(
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
  x, _ = jax.lax.scan(body, x_init, (jnp.asarray(starts), jnp.asarray(going_up), keys))
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
    raise errors.UserError(f'Unknown mask preset {name!r}; choose one of {MASK_PRESETS} or give a PNG path.')
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


def load_mask(spec: str, image_size: int) -> np.ndarray:
  """The region to regenerate, [S, S, 1] bool: a preset name or a PNG/JPEG whose white (>= 128) pixels mark it.

  A mask image of another size is resized with nearest-neighbour sampling.
  """
  if spec in MASK_PRESETS:
    return preset_mask(spec, image_size)
  if not os.path.isfile(spec):
    raise errors.UserError(f'--mask {spec!r} is neither a preset {MASK_PRESETS} nor an existing image file.')
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(spec) as im:
    im = im.convert('L')
    if im.size != (image_size, image_size):
      im = im.resize((image_size, image_size), Image.Resampling.NEAREST)
    m = np.asarray(im) >= 128
  return m[..., None]


# ------------------------------------------------------------------------------------------------ the command


@dataclasses.dataclass(frozen=True)
class EditSpec:
  """What ``edit.py`` does to each image.

  Attributes:
    mode: 'inpaint' or 'sdedit'.
    mask: inpaint: a preset region (``MASK_PRESETS``) or a mask image path; white = regenerate.
    jump_length: inpaint: forward steps per resampling jump.
    jump_n_sample: inpaint: traversals of each resampling stretch (1 = no jumps).
    t_start: sdedit: code timestep to noise to, 0..T-1.
    num_samples: results per input image (each from its own noise).
    class_label: class-conditional models: the class to steer towards (None = the null class, unconditional).
    guidance_scale: classifier-free guidance weight w (class-conditional models only).
  """

  mode: str
  mask: str | None = None
  jump_length: int = 1
  jump_n_sample: int = 1
  t_start: int | None = None
  num_samples: int = 4
  class_label: int | None = None
  guidance_scale: float = 0.0

  def validate(self, num_timesteps: int) -> None:
    """Raises ValueError naming the bad value and the fix (before anything compiles)."""
    if self.mode not in MODES:
      raise errors.UserError(f'Unknown --mode {self.mode!r}; choose one of {MODES}.')
    if not isinstance(self.num_samples, int) or self.num_samples < 1:
      raise errors.UserError(f'--num_samples must be a positive integer, got {self.num_samples!r}.')
    if self.mode == 'inpaint':
      if not self.mask:
        raise errors.UserError(
          f'--mode inpaint needs --mask: a preset {MASK_PRESETS} or a PNG whose white pixels mark '
          'the region to regenerate.'
        )
      if self.t_start is not None:
        raise errors.UserError('--t_start applies to --mode sdedit only; inpainting always starts from noise.')
      repaint_path(num_timesteps, jump_length=self.jump_length, jump_n_sample=self.jump_n_sample)
    else:
      if self.t_start is None:
        raise errors.UserError(
          f'--mode sdedit needs --t_start in [0, {num_timesteps - 1}] (e.g. {num_timesteps // 2 - 1}:'
          ' lower keeps more of the input).'
        )
      if not 0 <= self.t_start < num_timesteps:
        raise errors.UserError(
          f'--t_start={self.t_start} must lie in [0, {num_timesteps - 1}] (code timesteps; paper time is t_start + 1).'
        )
      if self.mask is not None or self.jump_length != 1 or self.jump_n_sample != 1:
        raise errors.UserError('--mask, --jump_length and --jump_n_sample apply to --mode inpaint only.')


def _write_settings(out_dir: str, settings: dict) -> None:
  """Records the settings; refuses a folder holding results of other settings (so none is overwritten)."""
  path = os.path.join(out_dir, 'edit.json')
  settings = json.loads(json.dumps(settings, default=str))
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != settings:
      diff = {
        k: (old.get(k), settings.get(k)) for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)
      }
      raise errors.UserError(f'{out_dir!r} holds results of other settings {diff} (old, new); choose another --out.')
  with open(path + '.tmp', 'w') as f:
    json.dump(settings, f, indent=2, sort_keys=True)
  os.replace(path + '.tmp', path)


def run(
  *,
  mode: str,
  out_dir: str,
  images: np.ndarray,
  workdir: str | None = None,
  pretrained: str | None = None,
  step: int | None = None,
  mask: str | None = None,
  jump_length: int = 1,
  jump_n_sample: int = 1,
  t_start: int | None = None,
  num_samples: int = 4,
  seed: int = 0,
  class_label: int | None = None,
  guidance_scale: float = 0.0,
  source_name: str = '',
  loaded: Any = None,
) -> dict:
  """What ``edit.py`` does: inpaint or SDEdit ``images`` with a model, writing PNGs and ``results.npz``.

  Every argument is checked before anything compiles. Result ``j`` of image ``i`` depends only on
  ``(seed, i, j)``.

  Args:
    mode: 'inpaint' or 'sdedit'.
    out_dir: output folder: ``grid.png`` (one row per image: the input, the masked input or x_t, then the
      results), ``result_<i>_<j>.png``, ``results.npz`` (uint8 ``inputs``, ``results`` [N, num_samples, S, S, C],
      ``regenerate`` masks) and ``edit.json``.
    images: uint8 [N, S, S, C] inputs at the model's resolution and channels.
    workdir, pretrained, step: the model, as for ``sample.py`` (exactly one of workdir and pretrained).
    mask, jump_length, jump_n_sample, t_start, num_samples, class_label, guidance_scale: see :class:`EditSpec`.
    seed: PRNG seed.
    source_name: where the images came from, recorded in ``edit.json``.
    loaded: an already loaded model (a ``loading.LoadedModel``) instead of ``workdir``/``pretrained``.

  Returns:
    A summary dict: ``out_dir``, ``grid``, ``num_images``, ``num_samples``, ``network_calls_per_result`` and,
    for inpainting, ``known_pixels_max_abs_error`` (0 unless something is wrong).
  """
  # pylint: disable-next=g-import-not-at-top
  from ddpm_jax import image_grid, input_pipeline, loading

  paths.check_output_dir(out_dir, '--out')
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8 or not len(images):
    raise errors.UserError(f'images must be uint8 [N, S, S, C] with N >= 1, got {images.dtype} {images.shape}.')
  if loaded is None:
    loaded = loading.load_model(workdir=workdir, pretrained=pretrained, step=step)
  big_t = loaded.schedule.num_timesteps
  spec = EditSpec(
    mode=mode,
    mask=mask,
    jump_length=jump_length,
    jump_n_sample=jump_n_sample,
    t_start=t_start,
    num_samples=num_samples,
    class_label=class_label,
    guidance_scale=guidance_scale,
  )
  spec.validate(big_t)
  k = getattr(loaded.model, 'num_classes', 0)
  label = class_label if class_label is not None or not k else loaded.model.null_label()
  try:  # --class_label / --guidance_scale against this model
    guidance.check_conditioning(k, label, guidance_scale, label_name='--class_label', scale_name='--guidance_scale')
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  want = (loaded.image_size, loaded.image_size, loaded.in_channels)
  if images.shape[1:] != want:
    raise errors.UserError(
      f'images are {images.shape[1:]} but the model takes {want}; resize them first '
      '(input_pipeline.load_image_file does).'
    )
  regenerate = load_mask(mask, loaded.image_size) if mode == 'inpaint' else np.zeros(want[:2] + (1,), bool)

  n, s = len(images), spec.num_samples
  x0 = jnp.asarray(input_pipeline.to_model_range(images))
  known = jnp.asarray(~regenerate)
  sample_kwargs = loaded.sample_kwargs()

  # Before any compilation: a folder of other results is refused, never overwritten.
  os.makedirs(out_dir, exist_ok=True)
  settings = dict(
    spec=dataclasses.asdict(spec),
    seed=seed,
    model=loaded.source,
    images=source_name,
    num_images=n,
    sample_kwargs=sample_kwargs,
  )
  _write_settings(out_dir, settings)

  def edit_one(params, x, key):
    """One result and what the grid shows beside the input (the masked input, or x_t)."""
    denoise_fn = loaded.denoise_fn(params, class_label=label, guidance_scale=guidance_scale)
    if mode == 'inpaint':
      result = inpaint(
        loaded.schedule,
        denoise_fn,
        x[None],
        known[None],
        key,
        jump_length=jump_length,
        jump_n_sample=jump_n_sample,
        **sample_kwargs,
      )[0]
      return result, jnp.where(known, x, 0.0)  # grey where the model fills in
    res = sdedit(loaded.schedule, denoise_fn, x[None], int(t_start), key, **sample_kwargs)
    return res.x_edit[0], res.x_t[0]

  root = jax.random.key(seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(n * s, dtype=jnp.uint32))
  logging.info('%s: %d images x %d results with %s.', mode, n, s, loaded.source)
  fn = jax.jit(jax.vmap(edit_one, in_axes=(None, 0, 0)))
  out, shown = fn(loaded.params, jnp.repeat(x0, s, axis=0), keys)
  results = input_pipeline.to_uint8(np.asarray(out)).reshape((n, s) + want)
  shown = input_pipeline.to_uint8(np.asarray(shown)).reshape((n, s) + want)[:, 0]  # of each image's first result

  for i in range(n):
    for j in range(s):
      image_grid.save_png(os.path.join(out_dir, f'result_{i:03d}_{j:02d}.png'), results[i, j : j + 1], padding=0)
  rows = np.concatenate([images[:, None], shown[:, None], results], axis=1).reshape((-1,) + want)
  grid = image_grid.save_png(
    os.path.join(out_dir, 'grid.png'), rows, ncols=s + 2, scale=max(1, 64 // loaded.image_size)
  )
  tmp = os.path.join(out_dir, 'results.tmp.npz')
  np.savez(tmp, inputs=images, results=results, regenerate=np.broadcast_to(regenerate, want))
  os.replace(tmp, os.path.join(out_dir, 'results.npz'))
  summary = dict(out_dir=out_dir, grid=grid, num_images=n, num_samples=s)
  if mode == 'inpaint':
    path = repaint_path(big_t, jump_length=jump_length, jump_n_sample=jump_n_sample)
    summary['network_calls_per_result'] = int(np.sum(np.diff(path) < 0))
    keep = np.broadcast_to(~regenerate, want)
    err = np.abs(results.astype(np.int16) - images[:, None].astype(np.int16))
    summary['known_pixels_max_abs_error'] = int(err[:, :, keep].max()) if keep.any() else 0
  else:
    summary['network_calls_per_result'] = int(t_start) + 1
  return summary


def load_images(
  *,
  image: str | None,
  dataset: str | None,
  image_size: int,
  channels: int,
  num_images: int,
  split: str = 'test',
  folder: str = '',
  data_dir: str = '',
) -> tuple[np.ndarray, str]:
  """The inputs of ``edit.py``: one image file, or the first ``num_images`` of a dataset split.

  Returns:
    ``(uint8 [N, S, S, C], a description for edit.json)``.
  """
  from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  if (image is None) == (dataset is None):
    raise errors.UserError(
      'Pass exactly one of --image (a PNG/JPEG file) and --dataset (digits, cifar10, folder, ...).'
    )
  if image is not None:
    if not os.path.isfile(image):
      raise errors.UserError(f'--image {image!r} is not a file; pass a PNG or JPEG image.')
    return input_pipeline.load_image_file(image, image_size, channels)[None], image
  if num_images < 1:
    raise errors.UserError(f'--num_images must be positive, got {num_images}.')
  batch = next(
    input_pipeline.eval_images(
      dataset,
      split=split,
      image_size=image_size,
      channels=channels,
      batch_size=num_images,
      folder=folder,
      data_dir=data_dir,
      num_images=num_images,
    )
  )
  return batch, f'{dataset} {split} first {len(batch)}'
