"""Class-conditional offline demo: scikit-learn's digits with classifier-free guidance, on a CPU.

Command:
  python train.py --config configs/digits_cond.py          # writes runs/digits_cond
  python evaluate.py --metric class_accuracy --workdir runs/digits_cond --guidance_scales 0,1,3

Hardware: a 2-core CPU (no accelerator, no network).
Expected time: a few minutes (5,000 steps, like configs/digits.py, plus an 80-image class grid); the measured
time, with its command and machine, is in README.md ("Class-conditional generation, inpainting and image-to-image").
Expected result: runs/digits_cond/samples/step_00005000.png shows one row per digit 0..9 (like
assets/digits_cond_samples.png); a classifier trained on the real digits recognises the requested class in most
guided samples (README, "Class-conditional generation, inpainting and image-to-image", for the measured accuracies).
The recipe is configs/digits.py plus labels: num_classes 10, each label dropped to the null class with
probability 0.1 (Ho & Salimans 2022), sample grids with guidance w = 1.
"""

from configs import digits


def get_config():
  """Returns the class-conditional digits config."""
  config = digits.get_config()
  config.model.num_classes = 10
  config.model.class_dropout = 0.1
  config.sample.guidance_scale = 1.0
  config.train.num_samples = 80  # 8 per class: one row per digit (divisible by 8 devices too)
  return config
