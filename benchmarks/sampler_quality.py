"""Sample quality against network calls: every sampler of `ddpm_jax.solvers` on one trained model.

For each sampler and each budget of network calls it samples ``--num_images`` images with the largest number of
steps whose ``solvers.network_calls`` fits the budget (Heun's N steps cost 2N - 1 calls, PNDM's N + 9, the paper's
ancestral sampler always T), scores them, and records the wall time:

* 8x8 grey digits (the digits demo): the Fréchet distance to the real digits in the feature space of an MLP
  trained on them (``fd_digits``, `evaluation.digits_feature_fn`; reference statistics: the MLP's training
  split), and the SVM judge of `evaluation.digits_classifier`: for a class-conditional model the share of images
  showing the class they asked for (``class_accuracy``; image i asks for class i mod K), for an unconditional one
  the normalized entropy of the predicted classes (``class_entropy``: 1 when every digit is equally frequent, as
  in the data; lower when the samples favour some digits).
* RGB models: FID (`evaluation.fid_from_samples`, the FID Inception port) when ``--inception_weights`` and
  ``--ref_stats`` are given.

Image i starts from the same noise for every sampler (its key is ``fold_in(key(seed), i)``), so samplers are
compared on the same initial noise; a class-conditional model samples with classifier-free guidance
``--guidance_scale`` (default: its config's ``sample.guidance_scale``). The model's own settings (parameterization,
reverse variance, x0 clipping for the paper's three samplers) are used; the solvers keep their own defaults
(spacing, order, no clipping, as diffusers), recorded in each row. ``--clip_denoised on`` clips x0-hat at every
step of every sampler instead (for the solvers, diffusers' ``thresholding`` at 1), ``off`` nowhere.

Output in ``--out``: ``results.json`` (one row per sampler and step count: calls, scores, seconds, settings),
``quality_vs_calls.png`` (each score against network calls, log x, one line per sampler; dashed lines for the
paper's 1000-step ancestral sampler and DDIM with T steps when measured), a table on stdout and, once those two
references are measured, at how few calls each sampler stays within ``--tolerance`` of them. ``results.json``
is also the cache: rerunning with the same ``--out`` skips the combinations already measured with the same
settings (model and parameters, number of images, seed, guidance, metrics, and the row's own clipping), so an
interrupted sweep resumes, further samplers or budgets add to the same table and plot, and a run with
``--clip_denoised on`` reuses the rows of the samplers that clip anyway (its plot is
``quality_vs_calls_clip_on.png``).

Example (the README's digits result; BENCHMARKS.md has the table, the timings and how to read them)::

  python benchmarks/sampler_quality.py --workdir runs/digits --samplers all --calls 5,10,15,20,25,50,100 \\
      --num_images 1000 --out results/sampler_quality
  python benchmarks/sampler_quality.py --workdir runs/digits --samplers ancestral,ddim --calls 1000 \\
      --num_images 1000 --out results/sampler_quality
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import matplotlib
import numpy as np
import scipy.linalg

matplotlib.use('Agg')  # files only, no display
from matplotlib import pyplot as plt  # pylint: disable=wrong-import-position
from matplotlib import ticker  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from ddpm_jax import batch_sampler, cpu_tuning, errors, evaluation, input_pipeline, loading, solvers
from ddpm_jax import guidance as guidance_lib
from ddpm_jax import inception as inception_lib

FORMAT = 'ddpm_jax sampler_quality 1'
"""Written into results.json; a file without it is not this benchmark's and is never overwritten."""

SCORER_VERSION = 1
"""Part of the cache key: bump it when a score's definition changes, so old rows are not reused."""

METRICS = ('fd_digits', 'fid', 'class_accuracy', 'class_entropy')
"""Every score a row can carry, in the order of the table and the plot's panels."""

_LOWER_IS_BETTER = {'fd_digits': True, 'fid': True, 'class_accuracy': False, 'class_entropy': False}
_DIGITS_SHAPE = (8, 8, 1)


# ------------------------------------------------------------------------------------------------ arguments


def parse_samplers(text: str) -> list[str]:
  """Sampler names from 'a,b,c' ('all': every sampler of the registry), each checked by `solvers.validate`."""
  names = [s.strip() for s in text.split(',') if s.strip()]
  if names == ['all']:
    return list(solvers.SAMPLERS)
  if not names:
    raise errors.UserError(f'--samplers={text!r} names no sampler; choose from {tuple(solvers.SAMPLERS)} or all.')
  for name in names:
    try:
      # Only the name matters here (T is not known before the model is loaded); the budgets are checked later.
      solvers.validate(name, 1000)
    except ValueError as e:
      raise errors.UserError(f'--samplers: {e}') from e
  if len(set(names)) != len(names):
    raise errors.UserError(f'--samplers={text!r} names a sampler twice.')
  return names


def parse_calls(text: str) -> list[int]:
  """Budgets of network calls from '5,10,20' (positive integers, each once), sorted."""
  budgets = []
  for part in text.split(','):
    try:
      budgets.append(int(part))
    except ValueError:
      raise errors.UserError(
        f'--calls={text!r}: {part.strip()!r} is not an integer; give network-call budgets such as 5,10,25,1000.'
      ) from None
  if min(budgets) < 1:
    raise errors.UserError(f'--calls={text!r}: budgets must be positive integers.')
  if len(set(budgets)) != len(budgets):
    raise errors.UserError(f'--calls={text!r} lists a budget twice.')
  return sorted(budgets)


def steps_for_budget(name: str, budget: int, num_timesteps: int) -> tuple[int, int] | str:
  """The most steps sampler ``name`` can take within ``budget`` network calls.

  Args:
    name: a key of ``solvers.SAMPLERS``.
    budget: network calls at most.
    num_timesteps: T of the model's schedule.

  Returns:
    ``(steps, network_calls)`` with ``network_calls <= budget`` as large as the sampler allows (the nearest
    count not above the budget), or a sentence saying why the sampler cannot run within it.
  """
  info = solvers.SAMPLERS[name]
  if not info.spacings:  # the paper's sampler: all T steps or nothing
    calls = solvers.network_calls(name, None, num_timesteps)
    if calls > budget:
      return f'runs all T = {num_timesteps} steps ({calls} calls)'
    return num_timesteps, calls
  lo, hi = info.min_steps, num_timesteps
  fewest = info.calls(lo, num_timesteps)
  if fewest > budget:
    return f'needs at least {fewest} calls ({lo} steps)'
  while lo < hi:  # the calls grow with the steps: the largest steps within the budget
    mid = (lo + hi + 1) // 2
    if info.calls(mid, num_timesteps) <= budget:
      lo = mid
    else:
      hi = mid - 1
  try:
    return lo, solvers.network_calls(name, lo, num_timesteps)
  except ValueError as e:  # e.g. a spacing that repeats a timestep at this many steps
    return str(e)


class Run(NamedTuple):
  """One combination to measure: a sampler at a number of steps, and the budgets it answers."""

  sampler: str
  steps: int
  calls: int
  budgets: tuple[int, ...]


def plan_runs(names: Sequence[str], budgets: Sequence[int], num_timesteps: int) -> tuple[list[Run], list[dict]]:
  """The (sampler, steps) combinations for the budgets, each once, and the combinations skipped with why."""
  runs: dict[tuple[str, int], Run] = {}
  skipped = []
  for name in names:
    for budget in budgets:
      found = steps_for_budget(name, budget, num_timesteps)
      if isinstance(found, str):
        skipped.append(dict(sampler=name, budget=budget, reason=found))
        continue
      steps, calls = found
      prev = runs.get((name, steps))
      runs[(name, steps)] = Run(name, steps, calls, (prev.budgets if prev else ()) + (budget,))
  return list(runs.values()), skipped


# -------------------------------------------------------------------------------------------------- sampling


def sample_images(
  loaded: loading.LoadedModel,
  name: str,
  steps: int,
  indices: Sequence[int],
  seed: int,
  *,
  guidance_scale: float = 0.0,
  clip_denoised: bool | None = None,
  batch_size: int = 256,
  timings: dict | None = None,
) -> np.ndarray:
  """uint8 images [N, H, W, C] of sampler ``name`` with ``steps`` steps; image i's noise from (seed, i) alone.

  The project's one data-parallel sampler (`ddpm_jax.batch_sampler.BatchSampler`, as sample.py): image i depends
  on (seed, i) alone, not on the batch or the other indices; a class-conditional model's image i asks for class
  i mod K. One program is compiled per (sampler, steps, batch size); a short last batch is padded to the same size.

  Args:
    loaded: the model (`loading.load_model`), sampled with its own mean_type and var_type.
    name: a key of ``solvers.SAMPLERS``.
    steps: its number of steps.
    indices: global image indices [N].
    seed: the sampling seed.
    guidance_scale: classifier-free guidance weight (class-conditional models only).
    clip_denoised: clip x0-hat to [-1, 1] (None: the sampler's default).
    batch_size: images per compiled call.
    timings: if given, gets 'first_batch_seconds' (compilation and the first batch) and 'sample_seconds' (all).

  Returns:
    uint8 [N, H, W, C] (`input_pipeline.to_uint8` of the samples).
  """
  indices = np.asarray(indices, np.int64)
  spec = batch_sampler.SamplerSpec(
    name=name,
    steps=steps,
    var_type=loaded.var_type,
    mean_type=loaded.mean_type,
    clip_denoised=clip_denoised,
    guidance_scale=guidance_scale,
  )
  shape = (loaded.image_size, loaded.image_size, loaded.in_channels)
  sampler = batch_sampler.BatchSampler(loaded.model, loaded.params, loaded.schedule, spec, shape, seed=seed)
  batch = max(1, min(batch_size, len(indices)))
  padded = np.concatenate([indices, np.full(-len(indices) % batch, indices[-1])])
  t0 = time.perf_counter()
  out, first = [], None
  for s in range(0, len(padded), batch):
    out.append(sampler(padded[s : s + batch]))
    first = first or time.perf_counter() - t0
  if timings is not None:
    timings.update(first_batch_seconds=first, sample_seconds=time.perf_counter() - t0)
  return np.concatenate(out)[: len(indices)]


# --------------------------------------------------------------------------------------------------- scoring


class DigitsJudge(NamedTuple):
  """What scores digits: the MLP features with their reference statistics, and the SVM classifier."""

  features: Any
  ref_mu: np.ndarray
  ref_sigma: np.ndarray
  classifier: Any
  info: dict


@functools.lru_cache(maxsize=2)
def digits_judge(seed: int = 0) -> DigitsJudge:
  """The digits judge: MLP features (reference: the MLP's training split) and the SVM of the class scores.

  Cached: it is a function of ``seed`` alone, and training the MLP takes a few seconds.
  """
  features, held_out, mlp_acc = evaluation.digits_feature_fn(seed)
  images = input_pipeline.load_digits(8)
  train = np.setdiff1d(np.arange(len(images)), held_out)
  mu, sigma = evaluation.compute_statistics(features(images[train]))
  classifier, svm_acc = evaluation.digits_classifier(seed)
  with warnings.catch_warnings():  # a unit silent on the held-out digits: see digits_scores
    warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
    floor = evaluation.frechet_distance(*evaluation.compute_statistics(features(images[held_out])), mu, sigma)
  info = dict(
    feature='hidden layer of an MLP (evaluation.digits_feature_fn)',
    feature_dim=int(mu.shape[0]),
    reference_images=int(len(train)),
    mlp_held_out_accuracy=mlp_acc,
    svm_held_out_accuracy=svm_acc,
    fd_real_held_out=floor,
    real_held_out_images=int(len(held_out)),
  )
  return DigitsJudge(features, mu, sigma, classifier, info)


def class_entropy(predicted: np.ndarray, num_classes: int) -> float:
  """Entropy of the predicted classes' frequencies over log(num_classes): 1 for balanced classes, 0 for one."""
  p = np.bincount(np.asarray(predicted, np.int64), minlength=num_classes) / len(predicted)
  p = p[p > 0]
  return float(-(p * np.log(p)).sum() / math.log(num_classes))


def digits_scores(images: np.ndarray, labels: np.ndarray | None, judge: DigitsJudge) -> dict[str, float]:
  """``fd_digits`` and ``class_accuracy`` (with labels: class-conditional) or ``class_entropy`` (without)."""
  mu, sigma = evaluation.compute_statistics(judge.features(images))
  with warnings.catch_warnings():
    # Units that no image of a poor sample set activates make its covariance singular: expected here, and
    # frechet_distance copes (its eps fallback); scipy's warning would only clutter the sweep's output.
    warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
    scores = dict(fd_digits=evaluation.frechet_distance(mu, sigma, judge.ref_mu, judge.ref_sigma))
  if labels is not None:
    scores['class_accuracy'], _ = evaluation.class_accuracy(images, labels, judge.classifier)
  else:
    predicted = judge.classifier.predict(images.reshape(len(images), -1).astype(np.float64) / 255.0)
    scores['class_entropy'] = class_entropy(predicted, 10)
  return scores


def fid_score(images: np.ndarray, feature_fn: Any, reference: evaluation.ReferenceStats) -> dict[str, float]:
  """``fid`` of uint8 RGB images against reference statistics (pool features only: no Inception Score)."""
  result = evaluation.fid_from_samples(images, lambda x: feature_fn(x).pool, reference, progress=False)
  return dict(fid=result['fid'])


# ---------------------------------------------------------------------------------------------- results file


def params_fingerprint(params: Any) -> str:
  """sha256 (16 hex digits) of every parameter's path, dtype, shape and bytes: which weights were sampled."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{jax.tree_util.keystr(path)} {a.dtype} {a.shape}'.encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def file_fingerprint(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()[:16]


def load_results(path: str) -> dict:
  """results.json's contents (a fresh table if there is none); anything else there is an error, never lost."""
  if not os.path.exists(path):
    return dict(format=FORMAT, rows=[])
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError(f'{path} exists but is not readable JSON ({e}); move it away or choose another --out.')
  if not isinstance(data, dict) or data.get('format') != FORMAT or not isinstance(data.get('rows'), list):
    raise errors.UserError(f'{path} is not a results file of this benchmark; move it away or choose another --out.')
  return data


def save_results(path: str, data: dict) -> None:
  """Writes results.json atomically (a temporary file renamed), so an interrupted sweep keeps its finished rows."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


def resolve_clip(flag: str, sampler: str, model_clip: bool) -> bool:
  """Whether ``sampler`` clips x0-hat under ``--clip_denoised flag``: 'auto' is the model's setting for the
  paper's three samplers (whose default is to clip, as the paper's code) and no clipping for the solvers."""
  if flag != 'auto':
    return flag == 'on'
  return model_clip if solvers.SAMPLERS[sampler].default_clip else False


def find_row(rows: Sequence[dict], settings: dict, sampler: str, steps: int, clip: bool) -> dict | None:
  """The cached row of ``sampler`` at ``steps`` with clipping ``clip``, measured with these settings, if any."""
  for row in rows:
    if (row.get('settings'), row.get('sampler'), row.get('steps')) == (settings, sampler, steps) and row.get(
      'options', {}
    ).get('clip_denoised') == clip:
      return row
  return None


# --------------------------------------------------------------------------------------------- table and plot


def _order(rows: Sequence[dict]) -> list[dict]:
  rank = {name: i for i, name in enumerate(solvers.SAMPLERS)}
  return sorted(rows, key=lambda r: (rank.get(r['sampler'], len(rank)), r['network_calls']))


def format_table(rows: Sequence[dict]) -> str:
  """A compact text table of the rows (sampler order of the registry, then network calls)."""
  metrics = [m for m in METRICS if any(m in r['scores'] for r in rows)]
  head = f'{"sampler":<16}{"steps":>6}{"calls":>7}' + ''.join(f'{m:>16}' for m in metrics) + f'{"seconds":>10}'
  lines = [head, '-' * len(head)]
  for r in _order(rows):
    cells = ''.join(f'{r["scores"][m]:>16.4f}' if m in r['scores'] else f'{"-":>16}' for m in metrics)
    lines.append(f'{r["sampler"]:<16}{r["steps"]:>6}{r["network_calls"]:>7}{cells}{r["seconds"]:>10.1f}')
  return '\n'.join(lines)


def calls_to_reach(rows: Sequence[dict], metric: str, target: float, tolerance: float, below: int) -> dict:
  """Per sampler, the fewest network calls from which on its ``metric`` stays within ``tolerance`` of ``target``.

  "From which on": the score at that budget and at every larger one measured (below ``below`` calls, i.e. without
  the T-step reference rows themselves) is at most ``target * (1 + tolerance)`` for a distance, at least
  ``target * (1 - tolerance)`` for an accuracy or entropy, so that one lucky point does not count.

  Returns:
    {sampler: calls, or None if it never gets there within the budgets measured}, in registry order.
  """
  lower = _LOWER_IS_BETTER[metric]
  ok = lambda v: v <= target * (1 + tolerance) if lower else v >= target * (1 - tolerance)
  reached: dict[str, int | None] = {}
  for r in _order(rows):
    if r['network_calls'] >= below or metric not in r['scores']:
      continue
    name = r['sampler']
    if not ok(r['scores'][metric]):
      reached[name] = None  # a later budget that is within resets it
    elif reached.get(name) is None:
      reached[name] = r['network_calls']
  return reached


def reach_summary(rows: Sequence[dict], num_timesteps: int, tolerance: float) -> list[str]:
  """Lines saying at how few calls each sampler reaches the T-step references' first score (when measured)."""
  lines = []
  for ref_name, label in (('ancestral', f'ancestral-{num_timesteps}'), ('ddim', f'DDIM-{num_timesteps}')):
    ref = next((r for r in rows if r['sampler'] == ref_name and r['steps'] == num_timesteps), None)
    metric = next((m for m in METRICS if ref is not None and m in ref['scores']), None)
    if metric is None:
      continue
    target = ref['scores'][metric]
    reached = calls_to_reach(rows, metric, target, tolerance, num_timesteps)
    parts = [
      f'{name} {calls}' if calls is not None else f'{name} not within the budgets' for name, calls in reached.items()
    ]
    lines.append(f'{label} {metric} {target:.4f} (within {tolerance:.0%}) reached at: ' + ', '.join(parts))
  return lines


def plot(rows: Sequence[dict], path: str, num_timesteps: int, title: str) -> None:
  """quality_vs_calls.png: one panel per score, x = network calls (log), one line per sampler.

  The paper's ancestral sampler (T calls) and DDIM at T steps, when measured, are also drawn as dashed horizontal
  lines across each panel: the qualities the fast samplers are meant to reach.
  """
  metrics = [m for m in METRICS if any(m in r['scores'] for r in rows)]
  fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
  by_sampler: dict[str, list[dict]] = {}
  for r in _order(rows):
    by_sampler.setdefault(r['sampler'], []).append(r)
  references = [
    (r, label)
    for r in rows
    for name, label in (('ancestral', f'ancestral, {num_timesteps} calls'), ('ddim', f'DDIM, {num_timesteps} steps'))
    if r['sampler'] == name and r['steps'] == num_timesteps
  ]
  for ax, metric in zip(axes[0], metrics):
    for k, (name, rs) in enumerate(by_sampler.items()):
      rs = [r for r in rs if metric in r['scores']]
      if name == 'ancestral' or not rs:
        continue
      style = '-' if k < 10 else '--'
      ax.plot([r['network_calls'] for r in rs], [r['scores'][metric] for r in rs], 'o' + style, label=name, ms=4)
    for j, (r, label) in enumerate(references):
      if metric in r['scores']:
        ax.axhline(r['scores'][metric], color=('black', 'grey')[j % 2], ls='--', lw=1, label=label)
    ax.set_xscale('log')
    ax.set_xticks(sorted({b for r in rows for b in r['budgets']}))  # the budgets asked for
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter('%d'))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.tick_params(axis='x', labelsize=7)  # 15, 20 and 25 lie close on a log axis
    values = [r['scores'][metric] for r in rows if metric in r['scores']]
    if _LOWER_IS_BETTER[metric] and min(values) > 0 and max(values) > 10 * min(values):
      ax.set_yscale('log')  # distances spanning decades: from noise-like samples down to the real data's level
      ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
      ax.yaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
      ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel('network calls')
    ax.set_ylabel(metric + (' (lower is better)' if _LOWER_IS_BETTER[metric] else ' (higher is better)'))
    ax.grid(True, which='both', alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main


def _check_files(a: argparse.Namespace) -> None:
  """The paths the user named, checked before the model is loaded."""
  if (a.workdir is None) == (a.pretrained is None):
    raise errors.UserError('Pass exactly one of --workdir (a training run) and --pretrained (a released model).')
  if a.workdir is not None and not os.path.isdir(a.workdir):
    raise errors.MissingFileError(
      f'--workdir {a.workdir!r} does not exist; train one first (python train.py writes runs/digits).'
    )
  if (a.inception_weights is None) != (a.ref_stats is None):
    raise errors.UserError('FID needs both --inception_weights and --ref_stats (or neither).')
  for flag, path in (('--inception_weights', a.inception_weights), ('--ref_stats', a.ref_stats)):
    if path is not None and not os.path.isfile(path):
      raise errors.MissingFileError(
        f'{flag} {path!r} not found (reference statistics: python evaluate.py --metric fid writes them).'
      )


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', help='a train.py workdir (its EMA parameters), e.g. runs/digits')
  p.add_argument('--pretrained', help='a released model instead (diffusers folder or hub id, TF checkpoint prefix)')
  p.add_argument('--step', type=int, help='checkpoint step of --workdir (default: the newest)')
  p.add_argument('--samplers', default='all', help=f'comma-separated, or all: {", ".join(solvers.SAMPLERS)}')
  p.add_argument('--calls', default='5,10,15,20,25,50,100', help='budgets of network calls, comma-separated')
  p.add_argument('--num_images', type=int, default=1000, help='images per combination')
  p.add_argument('--batch_size', type=int, default=500, help='images per compiled call')
  p.add_argument('--seed', type=int, default=0, help="sampling seed: image i's noise comes from (seed, i)")
  p.add_argument('--guidance_scale', type=float, help="class-conditional models: CFG weight (default: the config's)")
  p.add_argument(
    '--clip_denoised',
    choices=('auto', 'on', 'off'),
    default='auto',
    help="clip x0-hat at every step: auto = the model's setting for ancestral/respaced/ddim, not for the solvers; "
    'on/off: every sampler',
  )
  p.add_argument('--inception_weights', help='FID Inception weights (.npz or pytorch-fid .pth), RGB models')
  p.add_argument('--ref_stats', help='FID reference statistics .npz (evaluation.save_reference_stats), RGB models')
  p.add_argument(
    '--tolerance',
    type=float,
    default=0.1,
    help='relative margin for "reaches the T-step references\' quality" in the summary (not part of the cache key)',
  )
  p.add_argument('--out', required=True, help='folder for results.json and quality_vs_calls.png (also the cache)')
  return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
  """Runs the sweep; returns the rows of this run's settings (cached and new)."""
  a = build_parser().parse_args(argv)
  names = parse_samplers(a.samplers)
  budgets = parse_calls(a.calls)
  if a.num_images < 2:
    raise errors.UserError(f'--num_images={a.num_images}: a Fréchet distance needs at least 2 images (use ~1000).')
  if a.batch_size < 1:
    raise errors.UserError(f'--batch_size={a.batch_size} must be positive.')
  if not 0 <= a.tolerance < 1:
    raise errors.UserError(f'--tolerance={a.tolerance} must lie in [0, 1) (a relative margin, e.g. 0.05).')
  _check_files(a)
  os.makedirs(a.out, exist_ok=True)
  results_path = os.path.join(a.out, 'results.json')
  data = load_results(results_path)
  cpu_tuning.tune_cpu('inference')  # sampling's XLA:CPU setting; nothing on GPU/TPU or once JAX has started

  loaded = loading.load_model(workdir=a.workdir, pretrained=a.pretrained, step=a.step)
  T = loaded.schedule.num_timesteps
  num_classes = int(getattr(loaded.model, 'num_classes', 0))
  image_shape = (loaded.image_size, loaded.image_size, loaded.in_channels)
  digits = image_shape == _DIGITS_SHAPE
  fid = a.inception_weights is not None
  if fid and loaded.in_channels != 3:
    raise errors.UserError(f'FID needs an RGB model; this one makes {image_shape} images. Drop --inception_weights.')
  if not digits and not fid:
    raise errors.UserError(
      f'Nothing to score {image_shape} images with: the digits scores need an 8x8 grey model, FID needs '
      '--inception_weights and --ref_stats.'
    )
  guidance = a.guidance_scale
  if guidance is None:
    config_sample = loaded.config.sample if loaded.config is not None else {}
    guidance = float(config_sample.get('guidance_scale', 0.0)) if num_classes else 0.0
  labels_check = np.arange(a.num_images) % num_classes if num_classes else None
  try:
    guidance_lib.check_conditioning(num_classes, labels_check, guidance, scale_name='--guidance_scale')
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  runs, skipped = plan_runs(names, budgets, T)
  for s in skipped:
    print(f'skipped: {s["sampler"]} within {s["budget"]} calls: {s["reason"]}')

  metrics = (['fd_digits', 'class_accuracy' if num_classes else 'class_entropy'] if digits else []) + (
    ['fid'] if fid else []
  )
  settings = dict(
    model=loaded.source,
    params_sha256=params_fingerprint(loaded.params),
    num_images=a.num_images,
    seed=a.seed,
    guidance_scale=guidance,
    metrics=metrics,
    scorer_version=SCORER_VERSION,
  )
  if fid:
    settings['fid_ref_stats_sha256'] = file_fingerprint(a.ref_stats)
  clip_of = lambda name: resolve_clip(a.clip_denoised, name, loaded.clip_denoised)
  todo = [r for r in runs if find_row(data['rows'], settings, r.sampler, r.steps, clip_of(r.sampler)) is None]
  print(f'{loaded.source}: T = {T}, {len(runs)} combinations, {len(runs) - len(todo)} already in {results_path}')

  judge = digits_judge() if digits and todo else None
  if judge is not None:
    data['digits_reference'] = judge.info
    print(
      f'digits judge: MLP features ({judge.info["feature_dim"]} units, {judge.info["mlp_held_out_accuracy"]:.3f} '
      f'held-out accuracy), SVM {judge.info["svm_held_out_accuracy"]:.3f}; real held-out digits '
      f'(n={judge.info["real_held_out_images"]}) score fd_digits {judge.info["fd_real_held_out"]:.3f}'
    )
  feature_fn = reference = None
  if fid and todo:
    feature_fn = evaluation.make_feature_fn(inception_lib.load_inception_params(a.inception_weights))
    reference = evaluation.load_reference_stats(a.ref_stats)
  data['skipped'] = skipped
  device = jax.devices()[0]
  machine = f'{device.platform} {device.device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs, {platform.node()}'
  indices = np.arange(a.num_images)
  labels = (indices % num_classes) if num_classes else None
  sweep_start = time.perf_counter()
  for k, r in enumerate(todo):
    info = solvers.SAMPLERS[r.sampler]
    clip = clip_of(r.sampler)
    timings: dict = {}
    t0 = time.perf_counter()
    images = sample_images(
      loaded,
      r.sampler,
      r.steps,
      indices,
      a.seed,
      guidance_scale=guidance,
      clip_denoised=clip,
      batch_size=a.batch_size,
      timings=timings,
    )
    t1 = time.perf_counter()
    scores = digits_scores(images, labels, judge) if digits else {}
    if fid:
      scores.update(fid_score(images, feature_fn, reference))
    row = dict(
      settings=settings,
      sampler=r.sampler,
      steps=r.steps,
      network_calls=r.calls,
      budgets=list(r.budgets),
      options=dict(
        spacing=info.default_spacing,
        order=info.default_order,
        variant=info.default_variant,
        eta=info.eta,
        clip_denoised=clip,
      ),
      scores=scores,
      seconds=t1 - t0,
      first_batch_seconds=timings['first_batch_seconds'],
      sample_seconds=timings['sample_seconds'],
      score_seconds=time.perf_counter() - t1,
      batch_size=a.batch_size,
      machine=machine,
    )
    data['rows'].append(row)
    save_results(results_path, data)
    shown = ' '.join(f'{m}={v:.4f}' for m, v in scores.items())
    print(f'[{k + 1}/{len(todo)}] {r.sampler} steps={r.steps} calls={r.calls}: {shown} ({row["seconds"]:.1f} s)')
  if todo:
    print(f'sweep: {time.perf_counter() - sweep_start:.1f} s for {len(todo)} combinations')
  save_results(results_path, data)

  # This run's table: the rows of these settings whose clipping is what --clip_denoised gives their sampler.
  rows = [
    r for r in data['rows'] if r.get('settings') == settings and r['options']['clip_denoised'] == clip_of(r['sampler'])
  ]
  print(format_table(rows))
  for line in reach_summary(rows, T, a.tolerance):
    print(line)
  title = f'{loaded.source}, {a.num_images} images, seed {a.seed}' + (f', w = {guidance:g}' if num_classes else '')
  title += '' if a.clip_denoised == 'auto' else f', x0 clipping {a.clip_denoised} for every sampler'
  png = os.path.join(
    a.out, 'quality_vs_calls.png' if a.clip_denoised == 'auto' else f'quality_vs_calls_clip_{a.clip_denoised}.png'
  )
  plot(rows, png, T, title)
  print(f'wrote {results_path} and {png}')
  return rows


if __name__ == '__main__':
  cpu_tuning.restart_with_malloc_tuning()  # glibc malloc with huge pages on CPU hosts, as the commands
  try:
    main()
  except Exception as e:  # pylint: disable=broad-except  # user errors as one line; anything else re-raised
    if not errors.is_user_error(e):
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
