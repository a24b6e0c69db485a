"""CIFAR-10, the paper's recipe (Ho et al. 2020, App. B; REFERENCE.md §6).

Command:
  python train.py --config configs/cifar10.py --workdir runs/cifar10

Hardware: a Cloud TPU v3-8 / v4-8 or a host with 8 GPUs (batch 128 = 16 per device); any device count that divides 128.
Expected time: the paper reports 21 steps/s on a TPU v3-8, i.e. about 10.6 h for 800k steps (not measured here).
Expected result: the paper's FID 3.17 (vs the training set) and IS 9.46 with 50k EMA samples of the best checkpoint
(not reproduced here: this machine cannot download CIFAR-10).
Data order is exact on resume (the split is held in host RAM, ~150 MB).
"""

from configs import default


def get_config():
  """Returns the CIFAR-10 config: everything in default.py is already the paper's CIFAR-10 recipe."""
  config = default.get_config()
  config.data.dataset = 'cifar10'
  config.data.image_size = 32
  config.data.random_flip = True
  return config
