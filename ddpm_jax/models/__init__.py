"""Network architectures for ddpm-jax."""

from ddpm_jax.models.unet import (
  UNet,
  count_params,
  get_timestep_embedding,
  unet_256,
  unet_cifar10,
  validate_unet_config,
  validate_unet_input,
)

__all__ = [
  'UNet',
  'unet_cifar10',
  'unet_256',
  'get_timestep_embedding',
  'count_params',
  'validate_unet_config',
  'validate_unet_input',
]
