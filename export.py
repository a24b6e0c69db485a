r"""Exports a training run for diffusers, the Hugging Face hub, or the original TensorFlow code.

  # A diffusers folder (EMA weights of the newest checkpoint): UNet2DModel.from_pretrained and
  # DDPMPipeline.from_pretrained load it as it is.
  python export.py --workdir runs/cifar10 --out exported/cifar10
  # The same, uploaded to the hub afterwards (needs pip install -e ".[hub]", network and a token):
  python export.py --workdir runs/cifar10 --out exported/cifar10 --push_to_hub your-name/ddpm-cifar10
  # An original-layout TF checkpoint (raw weights + EMA shadows), readable with --pretrained <prefix>:
  python export.py --workdir runs/cifar10 --format tf --out exported/cifar10_tf

--out must be new or empty; nothing is overwritten, and a failed export leaves no folder behind.
"""

from absl import app, flags

from ddpm_jax import cli, export_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir to export.')
_OUT = flags.DEFINE_string('out', None, 'New or empty output folder.')
_FORMAT = flags.DEFINE_enum(
  'format',
  'diffusers',
  export_lib.FORMATS,
  'diffusers: config.json + diffusion_pytorch_model.safetensors + scheduler_config.json + model_index.json; '
  "tf: model.ckpt-<step> in the original code's layout.",
)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest readable one).')
_RAW = flags.DEFINE_bool('raw', False, '--format diffusers: the raw training weights instead of their EMA.')
_PUSH = flags.DEFINE_string('push_to_hub', None, 'Upload the exported folder to this Hugging Face repo (owner/name).')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  summary = export_lib.run(
    workdir=_WORKDIR.value,
    out_dir=_OUT.value,
    fmt=_FORMAT.value,
    step=_STEP.value,
    raw=_RAW.value,
    push_to_hub_repo=_PUSH.value,
  )
  print(
    f'Exported {_WORKDIR.value} step {summary["step"]} ({summary["weights"]} weights) to {summary["out_dir"]} '
    f'as {summary["format"]}; '
    f'sample from it with: python sample.py --pretrained {summary["pretrained"]} --out ...'
  )
  if summary['hub_url']:
    print(f'Uploaded: {summary["hub_url"]}')


if __name__ == '__main__':
  cli.run(main)  # user errors as one `error:` line, exit status 2 (ddpm_jax.cli)
