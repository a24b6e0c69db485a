"""Offline demo: scikit-learn's bundled 8x8 digits (1,797 images) on a CPU.

Command:
  python train.py            # same as: python train.py --config configs/digits.py --workdir runs/digits

Hardware: a 2-core CPU (no accelerator, no network).
Expected time: a few minutes for the 5,000 steps, compilation and the final 64 samples included; the measured time,
with its command and machine, is in README.md ("The digits demo") and docs/training.md.
Expected result: loss about 0.08 and recognisable digits in runs/digits/samples/step_00005000.png, like
assets/digits_samples.png.
Deviations from the paper, for a CPU run of minutes: a small U-Net, EMA 0.995 (0.9999 would still show the
initial weights after a few thousand steps), no flips (digits are not mirror-symmetric), T = 1000 kept.
"""

from configs import default


def get_config():
  """Returns the digits demo config."""
  config = default.get_config()
  config.data.dataset = 'digits'
  config.data.image_size = 8
  config.data.channels = 1
  config.data.random_flip = False
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.0
  config.model.num_groups = 8
  config.optim.batch_size = 32
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 200
  config.optim.ema_decay = 0.995
  config.train.num_steps = 5000
  config.train.log_every = 250
  config.train.checkpoint_every = 1000
  config.train.sample_every = 0
  config.train.num_samples = 64
  return config
