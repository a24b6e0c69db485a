"""LSUN Cat 256x256, the paper's recipe (Ho et al. 2020, App. B; REFERENCE.md §6).

Command:
  python train.py --config configs/lsun_cat256.py --workdir runs/lsun_cat256

Hardware: a Cloud TPU v3-8 / v4-8 or 8 GPUs (batch 64 = 8 per device); any device count that divides 64.
Expected time: the paper reports 2.2 steps/s on a TPU v3-8 for the 256x256 model, i.e. about 227 h for
1.8M steps (not measured here).
Expected result: paper FID 19.75 (50k EMA samples, StyleGAN2 FID code). Not reproduced here.
The paper says the images were flipped; the TF docstring passes --randflip 0
(--config.data.random_flip=False follows the code).
The data is streamed with tf.data (data.in_memory=False): on resume the stream restarts with a shuffle seed
derived from (seed, step), so the order differs from an uninterrupted run (docs/training.md).
"""

from configs import default


def get_config():
  """Returns the LSUN Cat 256x256 config: the 114M-parameter 256x256 U-Net, lr 2e-5, batch 64, dropout 0."""
  config = default.get_config()
  config.data.dataset = 'lsun/cat'
  config.data.image_size = 256
  config.data.random_flip = True
  config.data.in_memory = False
  config.data.shuffle_buffer = 10_000
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.dropout = 0.0
  config.optim.batch_size = 64
  config.optim.lr = 2e-5
  config.train.num_steps = 1_800_000
  config.train.sample_every = 100_000
  config.sample.var_type = 'fixedsmall'
  return config
