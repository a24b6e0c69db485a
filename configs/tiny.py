"""A tiny config for tests: a 2-level U-Net on 8x8 digits, T=20, a few hundred steps at most.

Command (as the tests run it):
  python train.py --config configs/tiny.py --workdir /tmp/tiny --config.train.num_steps=20

Hardware: any CPU. Expected time: a few seconds after compilation. Expected result: none (it checks plumbing:
checkpoints, resume, logs, sample grids); the loss falls from about 1 but the samples are noise.
"""

from configs import default


def get_config():
  """Returns the tiny test config."""
  config = default.get_config()
  config.seed = 0
  config.data.dataset = 'digits'
  config.data.image_size = 8
  config.data.channels = 1
  config.data.random_flip = True
  config.data.prefetch = 1
  config.model.ch = 16
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.0
  config.model.num_groups = 8
  config.diffusion.num_timesteps = 20
  config.diffusion.beta_end = 0.2
  config.optim.batch_size = 16
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 2
  config.optim.ema_decay = 0.9
  config.train.num_steps = 6
  config.train.log_every = 2
  config.train.checkpoint_every = 3
  config.train.keep_checkpoints = 2
  config.train.sample_every = 0
  config.train.num_samples = 8
  return config
