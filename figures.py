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

from absl import app, flags

from ddpm_jax import cli, cpu_tuning, figures_lib

_FIGURE = flags.DEFINE_enum('figure', None, figures_lib.FIGURES, 'Which figure.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (EMA parameters).')
_PRETRAINED = flags.DEFINE_string('pretrained', None, 'Released model instead of --workdir.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default newest).')
_LAYERS = cli.define_layers_flag()
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
  info = figures_lib.run(
    figure=_FIGURE.value,
    out=_OUT.value,
    workdir=_WORKDIR.value,
    pretrained=_PRETRAINED.value,
    step=_STEP.value,
    layers=_LAYERS.value,
    dataset=_DATASET.value,
    split=_SPLIT.value,
    folder=_FOLDER.value,
    data_dir=_DATA_DIR.value,
    num_images=_NUM_IMAGES.value,
    seed=_SEED.value,
  )
  print(json.dumps(info, indent=2))


if __name__ == '__main__':
  cli.run(main)  # user errors as one `error:` line, exit status 2 (ddpm_jax.cli)
