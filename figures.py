r"""Draws the paper's figures as PNG from a training run or a released model.

  python figures.py --figure forward --workdir runs/digits --dataset digits --out figures/forward.png
  python figures.py --figure progressive --workdir runs/cifar10 --out figures/progressive.png   # Fig. 6
  python figures.py --figure reconstruct --workdir runs/cifar10 --out figures/reconstruct.png   # Sec. 4.3
  python figures.py --figure interpolate --workdir runs/celebahq --dataset celeb_a_hq/256 --out figures/interp.png
  python figures.py --figure rate_distortion --workdir runs/cifar10 --split test --out figures/rd.png  # Fig. 5

forward: x_t of real images at t = 0, T/5, ..., T-1. progressive: the chain's x_t (top rows) and its x0
estimate (bottom rows) at 10 steps. reconstruct: originals, then x_t and the reconstruction for t = 300,
500, 1000, with the mean L2 distances printed. interpolate: pairs of images mixed in x_500 with 9 weights.
rate_distortion: the bound's per-step terms on --num_images images (T network calls per image).
"""

import json

import jax
import numpy as np
from absl import app, flags

from ddpm_jax import cli, cpu_tuning, figures, input_pipeline, loading, paths
from ddpm_jax import workdir as workdir_lib

_FIGURE = flags.DEFINE_enum('figure', None, figures.FIGURES, 'Which figure.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (EMA parameters).')
_PRETRAINED = flags.DEFINE_string('pretrained', None, 'Released model instead of --workdir.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default newest).')
_DATASET = flags.DEFINE_string(
  'dataset',
  None,
  "Real images for forward/reconstruct/interpolate/rate_distortion (default: the workdir's own data; cifar10 "
  'for a released CIFAR-10 model).',
)
_SPLIT = flags.DEFINE_string('split', 'test', 'Split of the real images.')
_FOLDER = flags.DEFINE_string('folder', '', 'Image folder for --dataset folder.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'tfds data_dir.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 8, 'Rows (images) in the figure.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed.')
_OUT = flags.DEFINE_string('out', None, 'PNG path.')
flags.mark_flags_as_required(['figure', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cpu_tuning.tune_cpu('inference')  # faster XLA:CPU kernels for sampling; no effect on GPU/TPU
  out = paths.check_output_file(_OUT.value, '--out', extensions=('.png',))
  if _NUM_IMAGES.value < 1:
    raise app.UsageError(f'--num_images={_NUM_IMAGES.value} must be positive (the rows of the figure).')
  if _FIGURE.value == 'interpolate' and _NUM_IMAGES.value < 2:
    raise app.UsageError(
      f'--figure interpolate mixes pairs of images: --num_images must be >= 2, got {_NUM_IMAGES.value}.'
    )
  if _FIGURE.value != 'progressive':  # the real images: this model's own data unless --dataset says otherwise
    data = workdir_lib.resolve_data_source(
      workdir=_WORKDIR.value,
      pretrained=_PRETRAINED.value,
      dataset=_DATASET.value,
      folder=_FOLDER.value,
      data_dir=_DATA_DIR.value,
    )
  loaded = loading.load_model(workdir=_WORKDIR.value, pretrained=_PRETRAINED.value, step=_STEP.value)
  if _FIGURE.value != 'progressive':
    images = next(
      input_pipeline.eval_images(
        data['dataset'],
        split=_SPLIT.value,
        image_size=loaded.image_size,
        channels=loaded.in_channels,
        batch_size=_NUM_IMAGES.value,
        folder=data['folder'],
        data_dir=data['data_dir'],
        num_images=_NUM_IMAGES.value,
      )
    )
  else:  # progressive generation starts from noise; no real images needed
    images = np.zeros((_NUM_IMAGES.value, loaded.image_size, loaded.image_size, loaded.in_channels), np.uint8)
  info = figures.make_figure(
    _FIGURE.value,
    model=loaded.model,
    params=loaded.params,
    schedule=loaded.schedule,
    images=images,
    out=out,
    key=jax.random.key(_SEED.value),
    sample_kwargs=loaded.sample_kwargs(),
    num_images=_NUM_IMAGES.value,
  )
  print(json.dumps(info, indent=2))


if __name__ == '__main__':
  cli.run(main)  # user errors as one `error:` line, exit status 2 (ddpm_jax.cli)
