r"""Scores a model the way the paper did: FID and Inception Score of samples, and bits/dim of a data split.

  # FID (50k samples vs all 50k CIFAR-10 training images) and IS (10 splits) of a sample.py folder:
  python evaluate.py --metric fid --samples samples/cifar10 \
      --inception_weights pt_inception-2015-12-05-6726825d.pth --ref_stats stats/cifar10_train.npz
  # Negative log-likelihood bound (bits/dim) of the CIFAR-10 test set under a run's EMA weights:
  python evaluate.py --metric bpd --workdir runs/cifar10 --dataset cifar10 --split test
  # Class-conditional digits: how often an SVM trained on the real digits sees the requested class, per guidance w:
  python evaluate.py --metric class_accuracy --workdir runs/digits_cond --guidance_scales 0,1,3

Reference statistics are computed once from --ref_dataset/--ref_split (or --ref_folder) and cached at
--ref_stats. Results are printed and written as JSON to --out (default: beside the input).
"""

import json
import os

from absl import app, flags

from ddpm_jax import cli, cpu_tuning, evaluate_lib, paths, solvers
from ddpm_jax import workdir as workdir_lib

_METRIC = flags.DEFINE_enum(
  'metric',
  'fid',
  ['fid', 'bpd', 'class_accuracy'],
  'fid: FID + IS of samples; bpd: bits/dim of data; class_accuracy: class-conditional digits scored by a classifier.',
)
_SAMPLES = flags.DEFINE_string('samples', None, '[fid] sample.py output folder.')
_WEIGHTS = flags.DEFINE_string(
  'inception_weights',
  None,
  "[fid] FID Inception weights (.npz or pytorch-fid's .pth; "
  'default: download pt_inception-2015-12-05-6726825d.pth once into the cache).',
)
_REF_STATS = flags.DEFINE_string('ref_stats', None, '[fid] Reference statistics .npz (computed if missing).')
_REF_DATASET = flags.DEFINE_string('ref_dataset', 'cifar10', '[fid] tfds dataset of the reference images.')
_REF_SPLIT = flags.DEFINE_string('ref_split', 'train', '[fid] Split of the reference images (paper: train).')
_REF_FOLDER = flags.DEFINE_string('ref_folder', '', '[fid] Image folder as reference instead of tfds.')
_WORKDIR = flags.DEFINE_string('workdir', None, '[bpd, class_accuracy] Training workdir (EMA parameters).')
_PRETRAINED = flags.DEFINE_string('pretrained', None, '[bpd] Released model instead of --workdir.')
_STEP = flags.DEFINE_integer('step', None, '[bpd, class_accuracy] Checkpoint step (default newest).')
_LAYERS = cli.define_layers_flag('[bpd, class_accuracy] ')
_DATASET = flags.DEFINE_string(
  'dataset',
  None,
  "[bpd] Dataset (tfds name, digits or folder; default: the workdir's own data, cifar10 for a released CIFAR-10 "
  'model).',
)
_SPLIT = flags.DEFINE_string('split', 'test', '[bpd] Split.')
_FOLDER = flags.DEFINE_string('folder', '', '[bpd] Image folder for --dataset folder.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', None, '[bpd] Evaluate only the first N images.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'tfds data_dir.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 200, 'Images per device call.')
_SEED = flags.DEFINE_integer('seed', 0, '[bpd, class_accuracy] Noise seed.')
_SCALES = flags.DEFINE_list('guidance_scales', ['0', '1', '3'], '[class_accuracy] Guidance scales w to compare.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 500, '[class_accuracy] Samples per guidance scale.')
_SAMPLER = flags.DEFINE_enum(
  'sampler', 'ancestral', list(solvers.SAMPLERS), '[class_accuracy] Sampler (see sample.py --help).'
)
_STEPS = flags.DEFINE_integer('steps', None, "[class_accuracy] Steps (default: the sampler's own).")
_OUT = flags.DEFINE_string('out', None, 'JSON file for the results.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cpu_tuning.tune_cpu('inference')  # faster XLA:CPU kernels for sampling; no effect on GPU/TPU
  if _OUT.value:
    paths.check_output_file(_OUT.value, '--out', extensions=('.json',))
  if _METRIC.value == 'fid':
    missing = [n for n, f in (('--samples', _SAMPLES), ('--ref_stats', _REF_STATS)) if not f.value]
    if missing:
      raise app.UsageError(f'--metric fid needs {", ".join(missing)}.')
    result = evaluate_lib.run_fid(
      samples_dir=_SAMPLES.value,
      inception_weights=_WEIGHTS.value,
      ref_stats=_REF_STATS.value,
      ref_dataset=_REF_DATASET.value,
      ref_split=_REF_SPLIT.value,
      ref_folder=_REF_FOLDER.value,
      data_dir=_DATA_DIR.value,
      batch_size=_BATCH_SIZE.value,
    )
    out = _OUT.value or os.path.join(_SAMPLES.value, 'fid.json')
  elif _METRIC.value == 'class_accuracy':
    if not _WORKDIR.value:
      raise app.UsageError('--metric class_accuracy needs --workdir (a class-conditional digits run).')
    try:
      scales = [float(w) for w in _SCALES.value]
    except ValueError as e:
      raise app.UsageError(f'--guidance_scales must be numbers, got {_SCALES.value}') from e
    result = evaluate_lib.run_class_accuracy(
      workdir=_WORKDIR.value,
      guidance_scales=scales,
      num_samples=_NUM_SAMPLES.value,
      sampler=_SAMPLER.value,
      steps=_STEPS.value,
      seed=_SEED.value,
      step=_STEP.value,
      layers=_LAYERS.value,
    )
    out = _OUT.value or os.path.join(_WORKDIR.value, 'class_accuracy.json')
    for r in result['results']:
      print(f'guidance_scale {r["guidance_scale"]:g}: accuracy {r["accuracy"]:.3f}')
  else:
    data = workdir_lib.resolve_data_source(
      workdir=_WORKDIR.value,
      pretrained=_PRETRAINED.value,
      dataset=_DATASET.value,
      folder=_FOLDER.value,
      data_dir=_DATA_DIR.value,
    )
    result = evaluate_lib.run_bpd(
      workdir=_WORKDIR.value,
      pretrained=_PRETRAINED.value,
      step=_STEP.value,
      layers=_LAYERS.value,
      split=_SPLIT.value,
      batch_size=_BATCH_SIZE.value,
      num_images=_NUM_IMAGES.value,
      seed=_SEED.value,
      **data,
    )
    out = _OUT.value or os.path.join(
      _WORKDIR.value or '.', f'bpd_{data["dataset"].replace("/", "_")}_{_SPLIT.value}.json'
    )
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))
  print(f'Wrote {out}')


if __name__ == '__main__':
  cli.run(main)  # user errors as one `error:` line, exit status 2 (ddpm_jax.cli)
