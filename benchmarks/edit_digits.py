"""How well inpainting and SDEdit keep what a digit is: the digits demo model, scored by the digits classifier.

For held-out real digits (the SVM of ``evaluation.digits_classifier`` never trained on them) this edits each image
with ``edit_lib.run`` and reports the fraction of results that the SVM still assigns to the input's class:

* inpainting (RePaint) of the ``--mask`` region, without resampling and with ``--jump_length`` x
  ``--jump_n_sample`` resampling jumps (RePaint's 10 x 10 by default);
* SDEdit from several ``--t_starts``: low t_start keeps the digit, high t_start forgets it.

It needs a digits run (``python train.py`` writes runs/digits). Example (the numbers in the README)::

  python benchmarks/edit_digits.py --workdir runs/digits --num_images 100 --out /tmp/edit_digits
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_jax import edit_lib, evaluation, input_pipeline, loading  # pylint: disable=wrong-import-position


def held_out_digits(num_images: int, seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
  """The first ``num_images`` digits that ``evaluation.digits_classifier(seed, test_fraction)`` holds out."""
  images, labels = input_pipeline.load_digits(8), input_pipeline.load_digits_labels()
  order = np.random.default_rng(seed).permutation(len(images))
  test = order[: int(round(test_fraction * len(images)))][:num_images]
  return images[test], labels[test]


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', default='runs/digits')
  p.add_argument('--num_images', type=int, default=100)
  p.add_argument('--mask', default='right')
  p.add_argument('--jump_length', type=int, default=10)
  p.add_argument('--jump_n_sample', type=int, default=10)
  p.add_argument('--t_starts', default='100,200,300,500,700')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', required=True, help="folder for each setting's results (grids, npz)")
  a = p.parse_args(argv)

  loaded = loading.load_model(workdir=a.workdir)
  if (loaded.image_size, loaded.in_channels) != (8, 1):
    raise SystemExit(f'{a.workdir} is not a digits model (8x8 grey); train one with `python train.py`.')
  clf, clf_acc = evaluation.digits_classifier()
  images, labels = held_out_digits(a.num_images)
  real_acc, _ = evaluation.class_accuracy(images, labels, clf)
  settings = [
    ('inpaint', dict(mask=a.mask)),
    ('inpaint', dict(mask=a.mask, jump_length=a.jump_length, jump_n_sample=a.jump_n_sample)),
  ]
  settings += [('sdedit', dict(t_start=int(t))) for t in a.t_starts.split(',')]
  rows = []
  print(f'classifier: {clf_acc:.3f} on its held-out digits; {real_acc:.3f} on the {len(images)} inputs')
  for mode, kwargs in settings:
    name = mode + ''.join(f'_{k}{v}' for k, v in kwargs.items())
    t0 = time.time()
    summary = edit_lib.run(
      mode=mode,
      out_dir=os.path.join(a.out, name),
      images=images,
      loaded=loaded,
      num_samples=1,
      seed=a.seed,
      source_name='held-out digits',
      **kwargs,
    )
    with np.load(os.path.join(a.out, name, 'results.npz')) as f:
      results = f['results'][:, 0]
    acc, _ = evaluation.class_accuracy(results, labels, clf)
    row = dict(
      mode=mode, **kwargs, class_kept=acc, network_calls=summary['network_calls_per_result'], seconds=time.time() - t0
    )
    rows.append(row)
    print(json.dumps(row))
  with open(os.path.join(a.out, 'edit_digits.json'), 'w') as f:
    json.dump(
      dict(classifier_held_out=clf_acc, inputs_classified=real_acc, num_images=len(images), rows=rows), f, indent=2
    )
  return rows


if __name__ == '__main__':
  main()
