"""What ``figures.py`` runs: the paper's figures of a model as PNG files.

The computations are `ddpm_jax.figures` (pure functions over a schedule and a ``denoise_fn``). This module maps
them over the figure's images on the local devices (`ddpm_jax.data_parallel.IndexedMap`: image ``i`` draws its
noise from ``fold_in(key, i)``), draws the grids and the rate-distortion plot, and (:func:`run`) loads the model
and the real images the command names.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import data_parallel, diffusion, errors, figures, guidance, image_grid, input_pipeline, loading, paths
from ddpm_jax import progress as progress_lib
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.schedule import Schedule

FIGURES = ('forward', 'progressive', 'reconstruct', 'interpolate', 'rate_distortion')


def _grid_png(path: str, rows: np.ndarray, *, scale: int) -> str:
  """Saves [R, C, H, W, ch] images in [-1, 1] as a grid with R rows and C columns."""
  r, c = rows.shape[:2]
  images = input_pipeline.to_uint8(np.asarray(rows).reshape((r * c,) + rows.shape[2:]))
  return image_grid.save_png(path, images, ncols=c, scale=scale)


def make_figure(
  name: str,
  *,
  model: Any,
  params: Any,
  schedule: Schedule,
  images: np.ndarray,
  out: str,
  key: jax.Array,
  sample_kwargs: dict,
  num_images: int = 8,
  progress: bool = True,
) -> dict:
  """Computes one of :data:`FIGURES` for a model and writes it as PNG to ``out``.

  Args:
    name: which figure.
    model, params: the network (a class-conditional one draws with its null class, i.e. unconditionally).
    schedule: its training schedule.
    images: real images uint8 [N, H, W, C] (used by forward, reconstruct, interpolate, rate_distortion).
    out: PNG path.
    key: PRNG key; row ``i`` of the figure draws its noise from ``fold_in(key, i)``.
    sample_kwargs: mean_type / var_type / clip_denoised for the sampler.
    num_images: rows of the figure.
    progress: show a bar of the figure's network calls (per row; all rows run at once), moved from inside the
      compiled chains (`ddpm_jax.progress`).

  Returns:
    A dict of numbers shown in the figure (e.g. the reconstruction distances), plus ``path``.
  """
  if name not in FIGURES:
    raise ValueError(f'Unknown figure {name!r}; choose one of {FIGURES}.')
  null = model.null_label() if getattr(model, 'num_classes', 0) else None

  def net(p):
    return guidance.denoise_fn(model, p, class_label=null)

  x0 = input_pipeline.to_model_range(np.asarray(images[:num_images]))
  n, size = x0.shape[0], x0.shape[1]
  scale = max(1, 64 // size)
  big_t = schedule.num_timesteps
  bar = progress_lib.Progress() if progress else None

  def per_image(fn, calls):
    """Row i of the figure from fold_in(key, i); ``calls``: network calls per row, the bar's total."""
    run = data_parallel.IndexedMap(fn, params, key=key, progress=bar)
    if bar is None:
      return run

    def with_bar(*args):
      with bar.job(calls, name):
        return run(*args)

    return with_bar

  info: dict[str, Any] = {}
  if name == 'forward':
    ts = sorted(set(list(range(0, big_t, max(1, big_t // 5))) + [big_t - 1]))
    rows = jnp.swapaxes(figures.forward_noising(schedule, jnp.asarray(x0), key, ts), 0, 1)
    info['timesteps'] = ts
    path = _grid_png(out, np.asarray(rows), scale=scale)
  elif name == 'progressive':

    def chain(p, k):
      trace = figures.progressive_generation(
        schedule, net(p), (1,) + x0.shape[1:], k, num_snapshots=10, **sample_kwargs
      )
      return trace.t, trace.x[:, 0], trace.pred_xstart[:, 0]

    ts, xs, preds = per_image(chain, big_t)(np.arange(n))
    # Top half: x_t along the chain; bottom half: the network's x0 estimate at the same steps (paper Fig. 6).
    info['timesteps'] = ts[0].tolist()
    path = _grid_png(out, np.concatenate([xs, preds]), scale=scale)
  elif name == 'reconstruct':
    ts = [t for t in (big_t * 3 // 10 - 1, big_t // 2 - 1, big_t - 1) if t >= 0]

    def rec(p, k, x):
      return [figures.reconstruct(schedule, net(p), x[None], t, k, **sample_kwargs) for t in ts]

    recs = per_image(rec, sum(t + 1 for t in ts))(np.arange(n), x0)
    columns, distances = [x0], {}
    for t, r in zip(ts, recs):
      columns += [r.x_t[:, 0], r.x_rec[:, 0]]
      distances[f't={t + 1}'] = dict(l2_mean=float(np.mean(r.l2)), rmse_255_mean=float(np.mean(r.rmse_255)))
    info['distances'] = distances
    path = _grid_png(out, np.stack(columns, axis=1), scale=scale)
  elif name == 'interpolate':
    half = max(1, n // 2)
    a, b = x0[:half], x0[half : 2 * half]
    if b.shape[0] != a.shape[0]:
      raise ValueError('interpolate needs at least 2 images.')
    lambdas = np.linspace(0, 1, 9)
    t = big_t // 2 - 1

    def mix(p, k, xa, xb):
      return figures.interpolate(schedule, net(p), xa[None], xb[None], t, k, lambdas=lambdas, **sample_kwargs)[:, 0]

    mixed = per_image(mix, len(lambdas) * (t + 1))(np.arange(half), a, b)  # [half, len(lambdas), H, W, C]
    rows = np.concatenate([a[:, None], mixed, b[:, None]], axis=1)
    info.update(t=t + 1, lambdas=lambdas.tolist())
    path = _grid_png(out, rows, scale=scale)
  else:  # rate_distortion

    def bound(p, k, x):
      res = diffusion.calc_bpd_loop(
        schedule,
        net(p),
        x[None],
        k,
        mean_type=sample_kwargs.get('mean_type', 'eps'),
        var_type=sample_kwargs.get('var_type', 'fixedlarge'),
      )
      return jax.tree.map(lambda v: v[0], res)

    res = per_image(bound, big_t)(np.arange(n), x0)
    rd = figures.rate_distortion(res)
    info.update(
      total_bpd=float(np.mean(res.total_bpd)),
      rate_bpd=float(rd.rate_bpd[0]),
      distortion_rmse_t0=float(rd.distortion_rmse[0]),
    )
    path = _plot_rate_distortion(out, rd, num_images=n)
  info['path'] = path
  return info


def _plot_rate_distortion(path: str, rd: figures.RateDistortion, *, num_images: int) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top  # heavy: only this figure plots

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  big_t = len(rd.rate_bpd)
  steps = big_t - np.arange(big_t)  # reverse-process steps taken to reach t
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  axes[0].plot(steps, rd.distortion_rmse)
  axes[0].set(xlabel='reverse process steps (T - t)', ylabel='distortion (RMSE, [0, 255])')
  axes[1].plot(steps, rd.rate_bpd)
  axes[1].set(xlabel='reverse process steps (T - t)', ylabel='rate (bits/dim)')
  axes[2].plot(rd.rate_bpd, rd.distortion_rmse)
  axes[2].set(xlabel='rate (bits/dim)', ylabel='distortion (RMSE, [0, 255])')
  fig.suptitle(f'Rate-distortion over {num_images} images (paper Fig. 5)')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def run(
  *,
  figure: str,
  out: str,
  workdir: str | None = None,
  pretrained: str | None = None,
  step: int | None = None,
  layers: str | None = None,
  dataset: str | None = None,
  split: str = 'test',
  folder: str = '',
  data_dir: str = '',
  num_images: int = 8,
  seed: int = 0,
) -> dict:
  """What ``figures.py`` does: check the request, load the model and the real images, draw the figure.

  Args:
    figure: one of :data:`FIGURES`.
    out: the PNG to write.
    workdir, pretrained, step, layers: the model (`ddpm_jax.loading.load_model`).
    dataset, split, folder, data_dir: the real images (default: the workdir's own data, CIFAR-10 for a released
      CIFAR-10 model; `ddpm_jax.workdir.resolve_data_source`); progressive generation needs none.
    num_images: rows of the figure.
    seed: PRNG seed.

  Returns:
    What :func:`make_figure` returns.
  """
  if figure not in FIGURES:
    raise errors.UserError(f'Unknown --figure {figure!r}; choose one of {FIGURES}.')
  out = paths.check_output_file(out, '--out', extensions=('.png',))
  if num_images < 1:
    raise errors.UserError(f'--num_images={num_images} must be positive (the rows of the figure).')
  if figure == 'interpolate' and num_images < 2:
    raise errors.UserError(f'--figure interpolate mixes pairs of images: --num_images must be >= 2, got {num_images}.')
  data = None
  if figure != 'progressive':  # the real images: this model's own data unless --dataset says otherwise
    data = workdir_lib.resolve_data_source(
      workdir=workdir, pretrained=pretrained, dataset=dataset, folder=folder, data_dir=data_dir
    )
  loaded = loading.load_model(workdir=workdir, pretrained=pretrained, step=step, layers=layers)
  shape = (loaded.image_size, loaded.image_size, loaded.in_channels)
  if data is not None:
    images = next(
      input_pipeline.eval_images(
        data['dataset'],
        split=split,
        image_size=loaded.image_size,
        channels=loaded.in_channels,
        batch_size=num_images,
        folder=data['folder'],
        data_dir=data['data_dir'],
        num_images=num_images,
      )
    )
  else:  # progressive generation starts from noise; no real images needed
    images = np.zeros((num_images,) + shape, np.uint8)
  return make_figure(
    figure,
    model=loaded.model,
    params=loaded.params,
    schedule=loaded.schedule,
    images=images,
    out=out,
    key=jax.random.key(seed),
    sample_kwargs=loaded.sample_kwargs(),
    num_images=num_images,
  )
