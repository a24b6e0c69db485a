"""Default configuration: every knob of `train.py`, each with a one-line comment.

Dataset configs (`cifar10.py`, `celebahq256.py`, ...) start from `get_config()` here and override what differs.
Values here are the paper's CIFAR-10 recipe (Ho et al. 2020, App. B) unless a comment says otherwise.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config (the paper's CIFAR-10 recipe on tfds `cifar10`)."""
  config = ml_collections.ConfigDict()
  config.seed = 42  # Root PRNG seed; every random number of a run derives from it (and the step).
  config.multihost = False  # Call jax.distributed.initialize() first (Cloud TPU pods, multi-node GPU).

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'cifar10'  # cifar10 | celeb_a_hq/256 | lsun/church_outdoor | lsun/bedroom | lsun/cat | digits | folder
  data.split = 'train'  # tfds split to train on.
  data.folder = ''  # Path to a folder of PNG/JPEG images (data.dataset='folder'), searched recursively.
  data.data_dir = ''  # tfds data_dir ('' = tfds default, ~/tensorflow_datasets or $TFDS_DATA_DIR).
  data.image_size = 32  # Training resolution; images are center-cropped and resized to it if needed.
  data.channels = 3  # 3 for RGB, 1 for greyscale (digits).
  data.random_flip = True  # Per-example random horizontal flips (paper: all but LSUN bedroom).
  data.in_memory = True  # Decode the whole split into host RAM: exact, resumable order (fine for CIFAR-10).
  data.shuffle_buffer = 50_000  # Shuffle buffer of the streaming (in_memory=False) tf.data path.
  data.prefetch = 2  # Batches prefetched onto each device.

  config.model = model = ml_collections.ConfigDict()
  model.ch = 128  # Base channel count.
  model.ch_mult = (1, 2, 2, 2)  # Channel multiplier per resolution level.
  model.num_res_blocks = 2  # Residual blocks per level (the up path has one more).
  model.attn_resolutions = (16,)  # Resolutions (pixels) with self-attention.
  model.dropout = 0.1  # Dropout in residual blocks (training only).
  model.resamp_with_conv = True  # Convolutional up/downsampling instead of nearest/avg-pool only.
  model.num_groups = 32  # GroupNorm groups.
  model.dtype = 'float32'  # Compute dtype (float32 as the paper; bfloat16 is faster on TPU/H100).
  model.remat = False  # Recompute each block's activations in the backward pass: less memory, ~1 more forward.
  model.num_classes = 0  # 0: unconditional (the paper). K > 0: class-conditional on the dataset's K labels.
  model.class_dropout = 0.1  # Class-conditional only: P(label -> null class) in training, for classifier-free guidance.
  model.layers = 'auto'  # auto (cpu on XLA:CPU, else reference) | reference (the paper's, plain Flax) | cpu.

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.beta_schedule = 'linear'  # Beta schedule name (see ddpm_jax.schedule.BETA_SCHEDULES).
  diffusion.beta_start = 1e-4  # beta_1.
  diffusion.beta_end = 0.02  # beta_T.
  diffusion.num_timesteps = 1000  # T.
  diffusion.mean_type = 'eps'  # What the network predicts: eps | xstart | xprev.
  diffusion.var_type = 'fixedlarge'  # Reverse-process variance: fixedlarge | fixedsmall | learned.
  diffusion.loss_type = 'mse'  # mse (L_simple with eps) | kl (the true bound).

  config.optim = optim = ml_collections.ConfigDict()
  optim.batch_size = 128  # Global batch size, over all devices and hosts.
  optim.lr = 2e-4  # Adam learning rate after warmup.
  optim.beta1 = 0.9  # Adam beta1.
  optim.beta2 = 0.999  # Adam beta2.
  optim.eps = 1e-8  # Adam epsilon.
  optim.warmup_steps = 5000  # Linear warmup lr * min(step / warmup, 1) from step 0 (0 = none).
  optim.grad_clip = 1.0  # Clip to this global gradient norm (0 = no clipping).
  optim.clip_groups = 0  # 0: clip the batch-mean gradient; G > 0: clip G example groups, then average (TF: 8).
  optim.ema_decay = 0.9999  # EMA of the parameters, updated every step; sampling uses the EMA.

  config.train = train = ml_collections.ConfigDict()
  train.num_steps = 800_000  # Total optimizer steps.
  train.log_every = 100  # Steps between progress lines / TensorBoard scalars (also the non-finite check).
  train.checkpoint_every = 5_000  # Steps between checkpoints (one is always written at the end).
  train.keep_checkpoints = 3  # Checkpoints kept on disk (older ones are deleted by orbax).
  train.sample_every = 50_000  # Steps between PNG grids of EMA samples (0 = only at the end).
  train.num_samples = 64  # Images per sample grid (0 = no sampling); must divide by the device count.
  train.progress_bar = False  # A tqdm bar instead of progress lines.

  config.sample = sample = ml_collections.ConfigDict()
  sample.var_type = 'fixedlarge'  # Variance used when sampling (paper: fixedlarge CIFAR, fixedsmall LSUN/CelebA-HQ).
  sample.clip_denoised = True  # Clip predicted x0 to [-1, 1] at every step (TF default).
  sample.guidance_scale = 0.0  # Class-conditional only: classifier-free guidance w of the training-time sample grids.
  return config
