r"""Inpaints or edits real images with a trained or released DDPM (no retraining): RePaint and SDEdit.

  # Inpainting: regenerate the right half of 8 test digits, 4 completions each, with RePaint's resampling:
  python edit.py --mode inpaint --workdir runs/digits --dataset digits --num_images 8 --mask right \
      --jump_length 10 --jump_n_sample 10 --out edits/digits_inpaint
  # Your own image and a mask at the model's size, 32x32 here (white pixels of the mask are regenerated):
  python edit.py --mode inpaint --pretrained google/ddpm-cifar10-32 --image photo.png --mask mask.png --out edits/a
  # SDEdit: noise to t_start (code timestep, 0..T-1), denoise back; lower keeps more of the input:
  python edit.py --mode sdedit --workdir runs/digits --dataset digits --num_images 8 --t_start 400 --out edits/b
  # A class-conditional model: steer the completion towards class 3 with guidance w = 2:
  python edit.py --mode sdedit --workdir runs/digits_cond --dataset digits --t_start 600 --class_label 3 \
      --guidance_scale 2 --out edits/c

Writes grid.png (one row per input: the input, the masked input or its noised x_t, then the results),
result_<i>_<j>.png, results.npz and edit.json into --out. Result j of input i depends only on (--seed, i, j).
"""

import json

from absl import app, flags

from ddpm_jax import cli, cpu_tuning, edit_lib, editing, loading, paths

_MODE = flags.DEFINE_enum('mode', None, edit_lib.MODES, 'inpaint (RePaint) or sdedit.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (its EMA parameters).')
_PRETRAINED = flags.DEFINE_string('pretrained', None, 'Released model instead of --workdir (see sample.py).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step of --workdir (default newest).')
_LAYERS = cli.define_layers_flag()
_IMAGE = flags.DEFINE_string('image', None, 'A PNG/JPEG to edit (center-cropped and resized to the model).')
_DATASET = flags.DEFINE_string(
  'dataset', None, 'Edit the first --num_images of a dataset instead (digits, cifar10, folder, ...).'
)
_SPLIT = flags.DEFINE_string('split', 'test', 'Split of --dataset.')
_FOLDER = flags.DEFINE_string('folder', '', 'Image folder for --dataset folder.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'tfds data_dir.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 8, 'Images of --dataset to edit.')
_MASK = flags.DEFINE_string(
  'mask', None, f'[inpaint] Region to regenerate: one of {editing.MASK_PRESETS} or a PNG whose white pixels mark it.'
)
_JUMP_LENGTH = flags.DEFINE_integer('jump_length', 1, '[inpaint] Forward steps per resampling jump (RePaint: 10).')
_JUMP_N_SAMPLE = flags.DEFINE_integer(
  'jump_n_sample', 1, '[inpaint] Passes over each resampled stretch (RePaint: 10; 1 = no resampling, T network calls).'
)
_T_START = flags.DEFINE_integer('t_start', None, '[sdedit] Code timestep to noise to, 0..T-1 (paper time t+1).')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 4, 'Results per input image.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed.')
_CLASS = flags.DEFINE_integer(
  'class_label',
  None,
  'Class-conditional models: the class to steer towards (default: the null class, i.e. unconditional).',
)
_GUIDANCE = flags.DEFINE_float('guidance_scale', 0.0, 'Class-conditional models: classifier-free guidance w.')
_OUT = flags.DEFINE_string('out', None, 'Output folder.')
flags.mark_flags_as_required(['mode', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cpu_tuning.tune_cpu('inference')  # faster XLA:CPU kernels for sampling; no effect on GPU/TPU
  paths.check_output_dir(_OUT.value, '--out')  # before the model is loaded
  loaded = loading.load_model(
    workdir=_WORKDIR.value, pretrained=_PRETRAINED.value, step=_STEP.value, layers=_LAYERS.value
  )
  images, source = edit_lib.load_images(
    image=_IMAGE.value,
    dataset=_DATASET.value,
    image_size=loaded.image_size,
    channels=loaded.in_channels,
    num_images=_NUM_IMAGES.value,
    split=_SPLIT.value,
    folder=_FOLDER.value,
    data_dir=_DATA_DIR.value,
  )
  summary = edit_lib.run(
    mode=_MODE.value,
    out_dir=_OUT.value,
    images=images,
    loaded=loaded,
    mask=_MASK.value,
    jump_length=_JUMP_LENGTH.value,
    jump_n_sample=_JUMP_N_SAMPLE.value,
    t_start=_T_START.value,
    num_samples=_NUM_SAMPLES.value,
    seed=_SEED.value,
    class_label=_CLASS.value,
    guidance_scale=_GUIDANCE.value,
    source_name=source,
  )
  print(json.dumps(summary, indent=2))


if __name__ == '__main__':
  cli.run(main)  # user errors as one `error:` line, exit status 2 (ddpm_jax.cli)
