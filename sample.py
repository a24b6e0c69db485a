r"""Samples images from a trained or released DDPM into .npz shards and a PNG grid.

  # EMA weights of the newest checkpoint of a training run, the paper's 1000-step sampler:
  python sample.py --workdir runs/cifar10 --num_samples 50000 --out samples/cifar10
  # A released model (diffusers folder or hub id, or an original TF checkpoint prefix):
  python sample.py --pretrained google/ddpm-cifar10-32 --num_samples 50000 --out samples/cifar10_official
  # Faster samplers: DDIM with 100 steps, or the ancestral sampler on 250 respaced steps:
  python sample.py --workdir runs/cifar10 --sampler ddim --steps 100 --eta 0 --out samples/ddim100
  # A class-conditional model: class 3 with classifier-free guidance w = 2 (any sampler):
  python sample.py --workdir runs/digits_cond --class_label 3 --guidance_scale 2 --out samples/threes

Image i depends only on (--seed, i): the same command gives the same images on any number of devices and
with any --batch_size. Rerunning an interrupted command resumes: finished shards are kept and skipped.
"""

from absl import app, flags, logging

from ddpm_jax import cli, cpu_tuning, sample_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir to sample from (its EMA parameters).')
_PRETRAINED = flags.DEFINE_string(
  'pretrained',
  None,
  'Released model instead of a workdir: a diffusers folder or hub id '
  '(google/ddpm-cifar10-32, ...) or a TF checkpoint prefix (model.ckpt-790000).',
)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step of --workdir (default: the newest readable one).')
_OUT = flags.DEFINE_string('out', None, 'Output folder for samples_*.npz, grid.png and sampling.json.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 64, 'Exactly how many images to write (paper FID: 50000).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 256, 'Images per shard and per compiled call, over all devices.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_SAMPLER = flags.DEFINE_enum(
  'sampler',
  'ancestral',
  sample_lib.SAMPLERS,
  'ancestral: the paper (T steps); respaced: ancestral on --steps strided steps; ddim: --steps DDIM steps with --eta.',
)
_STEPS = flags.DEFINE_integer('steps', None, 'Steps for --sampler respaced/ddim (default T).')
_ETA = flags.DEFINE_float('eta', 0.0, 'DDIM eta (0 deterministic, 1 ancestral-like).')
_VAR_TYPE = flags.DEFINE_enum(
  'var_type', None, ['fixedlarge', 'fixedsmall'], "Reverse variance (default: the model's own setting)."
)
_CLIP = flags.DEFINE_bool('clip_denoised', None, "Clip x0 estimates to [-1, 1] (default: the model's setting).")
_GRID = flags.DEFINE_integer('grid', 64, 'Images in grid.png (0 for none).')
_CLASS = flags.DEFINE_integer(
  'class_label',
  None,
  'Class-conditional models: the class of every image (default: '
  'image i gets class i mod K; K itself, the null class, samples unconditionally).',
)
_GUIDANCE = flags.DEFINE_float(
  'guidance_scale',
  0.0,
  'Class-conditional models: classifier-free guidance w (eps = (1+w) eps(x, c) - w eps(x, null); 0 = none).',
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cpu_tuning.tune_cpu('inference')  # faster XLA:CPU kernels for sampling; no effect on GPU/TPU
  summary = sample_lib.run(
    workdir=_WORKDIR.value,
    pretrained=_PRETRAINED.value,
    step=_STEP.value,
    out_dir=_OUT.value,
    num_samples=_NUM_SAMPLES.value,
    batch_size=_BATCH_SIZE.value,
    seed=_SEED.value,
    sampler=_SAMPLER.value,
    steps=_STEPS.value,
    eta=_ETA.value,
    var_type=_VAR_TYPE.value,
    clip_denoised=_CLIP.value,
    grid_size=_GRID.value,
    class_label=_CLASS.value,
    guidance_scale=_GUIDANCE.value,
  )
  logging.info('Done: %s', summary)
  print(
    f'Wrote {summary["num_samples"]} samples to {summary["out_dir"]} '
    f'({summary["skipped_shards"]} of {summary["num_shards"]} shards were already there).'
  )


if __name__ == '__main__':
  cli.run(main)  # user errors as one `error:` line, exit status 2 (ddpm_jax.cli)
