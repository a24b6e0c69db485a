"""What ``edit.py`` runs: inpaint (RePaint) or SDEdit real images with a model, writing PNGs and ``results.npz``.

The math is `ddpm_jax.editing` (pure functions over a ``denoise_fn``); this module checks the request, reads the
inputs and the mask, maps the editing chain over every (image, result) pair on the local devices
(`ddpm_jax.data_parallel.IndexedMap`: result ``j`` of image ``i`` depends only on ``(seed, i, j)``) and writes the
output folder, refusing one that holds results of other settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from ddpm_jax import data_parallel, editing, errors, guidance, image_grid, input_pipeline, loading, paths
from ddpm_jax import progress as progress_lib

MODES = ('inpaint', 'sdedit')


@dataclasses.dataclass(frozen=True)
class EditSpec:
  """What ``edit.py`` does to each image.

  Attributes:
    mode: 'inpaint' or 'sdedit'.
    mask: inpaint: a preset region (``editing.MASK_PRESETS``) or a mask image path; white = regenerate.
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
    """Raises `errors.UserError` naming the bad value and the fix (before anything compiles)."""
    if self.mode not in MODES:
      raise errors.UserError(f'Unknown --mode {self.mode!r}; choose one of {MODES}.')
    if not isinstance(self.num_samples, int) or self.num_samples < 1:
      raise errors.UserError(f'--num_samples must be a positive integer, got {self.num_samples!r}.')
    if self.mode == 'inpaint':
      if not self.mask:
        raise errors.UserError(
          f'--mode inpaint needs --mask: a preset {editing.MASK_PRESETS} or a PNG whose white pixels mark '
          'the region to regenerate.'
        )
      if self.t_start is not None:
        raise errors.UserError('--t_start applies to --mode sdedit only; inpainting always starts from noise.')
      try:
        editing.repaint_path(num_timesteps, jump_length=self.jump_length, jump_n_sample=self.jump_n_sample)
      except ValueError as e:
        raise errors.UserError(str(e)) from None
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


def load_mask(spec: str, image_size: int) -> np.ndarray:
  """The region to regenerate, [S, S, 1] bool: a preset name or a PNG/JPEG whose white (>= 128) pixels mark it.

  A mask image must have the model's size S x S, pixel for pixel: one of another size is refused (with both sizes),
  never stretched, since no resize can know which pixels the user meant.

  Raises:
    errors.UserError: not a preset nor a file; a file PIL cannot read; a mask of another size.
  """
  if spec in editing.MASK_PRESETS:
    return editing.preset_mask(spec, image_size)
  if not os.path.isfile(spec):
    raise errors.UserError(f'--mask {spec!r} is neither a preset {editing.MASK_PRESETS} nor an existing image file.')
  try:
    with Image.open(spec) as im:
      im.load()
      width, height = im.size
      m = np.asarray(im.convert('L')) >= 128
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise errors.UserError(f'--mask {spec!r} is not an image PIL can read ({type(e).__name__}: {e}).') from None
  if (width, height) != (image_size, image_size):
    raise errors.UserError(
      f'--mask {spec!r} is {width}x{height} pixels but the images are {image_size}x{image_size}; '
      f'give a {image_size}x{image_size} mask (white = regenerate) or a preset {editing.MASK_PRESETS}.'
    )
  return m[..., None]


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
  layers: str | None = None,
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
  progress: bool = True,
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
    workdir, pretrained, step, layers: the model, as for ``sample.py`` (exactly one of workdir and pretrained;
      see `ddpm_jax.loading.load_model`).
    mask, jump_length, jump_n_sample, t_start, num_samples, class_label, guidance_scale: see :class:`EditSpec`.
    seed: PRNG seed.
    source_name: where the images came from, recorded in ``edit.json``.
    loaded: an already loaded model (a ``loading.LoadedModel``) instead of ``workdir``/``pretrained``.
    progress: show a bar of the chain's network calls, moved from inside the compiled chain
      (`ddpm_jax.progress`); all images and results run at once, so the total is one chain's calls.

  Returns:
    A summary dict: ``out_dir``, ``grid``, ``num_images``, ``num_samples``, ``network_calls_per_result`` and,
    for inpainting, ``known_pixels_max_abs_error`` (0 unless something is wrong).
  """
  paths.check_output_dir(out_dir, '--out')
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8 or not len(images):
    raise errors.UserError(f'images must be uint8 [N, S, S, C] with N >= 1, got {images.dtype} {images.shape}.')
  if loaded is None:
    loaded = loading.load_model(workdir=workdir, pretrained=pretrained, step=step, layers=layers)
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

  def edit_one(params, key, x):
    """One result for image x [S, S, C] and what the grid shows beside the input (the masked input, or x_t)."""
    denoise_fn = guidance.denoise_fn(loaded.model, params, class_label=label, guidance_scale=guidance_scale)
    if mode == 'inpaint':
      result = editing.inpaint(
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
    res = editing.sdedit(loaded.schedule, denoise_fn, x[None], int(t_start), key, **sample_kwargs)
    return res.x_edit[0], res.x_t[0]

  if mode == 'inpaint':
    path = editing.repaint_path(big_t, jump_length=jump_length, jump_n_sample=jump_n_sample)
    calls = int(np.sum(np.diff(path) < 0))
  else:
    calls = int(t_start) + 1
  logging.info('%s: %d images x %d results with %s, %d network calls each.', mode, n, s, loaded.source, calls)
  # Result j of image i is index i * s + j.
  bar = progress_lib.Progress() if progress else None
  edit_all = data_parallel.IndexedMap(edit_one, loaded.params, key=seed, progress=bar)
  with bar.job(calls, mode) if bar is not None else contextlib.nullcontext():
    out, shown = edit_all(np.arange(n * s), np.repeat(input_pipeline.to_model_range(images), s, axis=0))
  results = input_pipeline.to_uint8(out).reshape((n, s) + want)
  shown = input_pipeline.to_uint8(shown).reshape((n, s) + want)[:, 0]  # of each image's first result

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
  summary = dict(out_dir=out_dir, grid=grid, num_images=n, num_samples=s, network_calls_per_result=calls)
  if mode == 'inpaint':
    keep = np.broadcast_to(~regenerate, want)
    err = np.abs(results.astype(np.int16) - images[:, None].astype(np.int16))
    summary['known_pixels_max_abs_error'] = int(err[:, :, keep].max()) if keep.any() else 0
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
