r"""Samples images from a trained or released DDPM into .npz shards and a PNG grid.

  # EMA weights of the newest checkpoint of a training run, the paper's 1000-step sampler:
  python sample.py --workdir runs/cifar10 --num_samples 50000 --out samples/cifar10
  # A released model (diffusers folder or hub id, or an original TF checkpoint prefix):
  python sample.py --pretrained google/ddpm-cifar10-32 --num_samples 50000 --out samples/cifar10_official
  # Faster samplers: DDIM with 100 steps, DPM-Solver++ (2M) with 20, UniPC order 3 with 10 (--help lists all):
  python sample.py --workdir runs/cifar10 --sampler ddim --steps 100 --out samples/ddim100
  python sample.py --workdir runs/cifar10 --sampler dpmpp --steps 20 --out samples/dpmpp20
  python sample.py --workdir runs/cifar10 --sampler unipc --steps 10 --order 3 --out samples/unipc10
  # A class-conditional model: class 3 with classifier-free guidance w = 2 (any sampler):
  python sample.py --workdir runs/digits_cond --class_label 3 --guidance_scale 2 --out samples/threes

Image i depends only on (--seed, i): the same command gives the same images on any number of devices and
with any --batch_size. Rerunning an interrupted command resumes: finished shards are kept and skipped.
"""

from absl import app, flags, logging

from ddpm_jax import cli, cpu_tuning, sample_lib, solvers

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir to sample from (its EMA parameters).')
_PRETRAINED = flags.DEFINE_string(
  'pretrained',
  None,
  'Released model instead of a workdir: a diffusers folder or hub id '
  '(google/ddpm-cifar10-32, ...) or a TF checkpoint prefix (model.ckpt-790000).',
)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step of --workdir (default: the newest readable one).')
_LAYERS = cli.define_layers_flag()
_OUT = flags.DEFINE_string('out', None, 'Output folder for samples_*.npz, grid.png and sampling.json.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 64, 'Exactly how many images to write (paper FID: 50000).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 256, 'Images per shard and per compiled call, over all devices.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_SAMPLER = flags.DEFINE_enum(
  'sampler',
  'ancestral',
  list(solvers.SAMPLERS),
  'The sampler (defaults of --steps, --spacing, --order, --variant, --eta are its own):\n  '
  + '\n  '.join(solvers.help_lines()),
)
_STEPS = flags.DEFINE_integer(
  'steps', None, 'Steps (network calls: see --sampler); default T for the paper samplers, 25 else.'
)
_SPACING = flags.DEFINE_enum('spacing', None, list(solvers.SPACINGS), "Step spacing (default: the sampler's own).")
_ORDER = flags.DEFINE_integer('order', None, 'Solver order (dpmpp, dpmpp_sde, unipc; default 2).')
_VARIANT = flags.DEFINE_string('variant', None, 'dpmpp/dpmpp_sde: midpoint or heun; unipc: bh1 or bh2 (default bh2).')
_ETA = flags.DEFINE_float('eta', None, 'Share of fresh noise: ddim (default 0, deterministic), euler_ancestral (1).')
_STEPS_OFFSET = flags.DEFINE_integer('steps_offset', 0, "Offset of the 'leading' spacing (diffusers' steps_offset).")
_VAR_TYPE = flags.DEFINE_enum(
  'var_type', None, ['fixedlarge', 'fixedsmall'], "Reverse variance (default: the model's own setting)."
)
_CLIP = flags.DEFINE_bool(
  'clip_denoised',
  None,
  "Clip x0 estimates to [-1, 1] (default: the model's setting for ancestral/respaced/ddim, off for the solvers).",
)
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
    spacing=_SPACING.value,
    order=_ORDER.value,
    variant=_VARIANT.value,
    eta=_ETA.value,
    steps_offset=_STEPS_OFFSET.value,
    var_type=_VAR_TYPE.value,
    clip_denoised=_CLIP.value,
    grid_size=_GRID.value,
    class_label=_CLASS.value,
    guidance_scale=_GUIDANCE.value,
    layers=_LAYERS.value,
  )
  logging.info('Done: %s', summary)
  print(
    f'Wrote {summary["num_samples"]} samples to {summary["out_dir"]} '
    f'({summary["skipped_shards"]} of {summary["num_shards"]} shards were already there).'
  )


if __name__ == '__main__':
  cli.run(main)  # user errors as one `error:` line, exit status 2 (ddpm_jax.cli)
