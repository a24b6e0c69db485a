"""ddpm-jax: the DDPM of Ho, Jain & Abbeel (2020) in JAX and Flax.

Modules (import what you need; importing the package itself loads nothing heavy):
  * ``ddpm_jax.schedule``: beta schedules and the float64-computed ``Schedule`` tables.
  * ``ddpm_jax.diffusion``: forward process, posterior, parameterizations, losses, variational bound.
  * ``ddpm_jax.sampling``: samplers as one ``lax.scan`` over the reverse steps.
  * ``ddpm_jax.solvers``: fast samplers (DPM-Solver++, UniPC, Euler/Heun, PLMS/PNDM) and the registry of all.
  * ``ddpm_jax.models``: the paper's Flax U-Net.
  * ``ddpm_jax.loading``: a training run or a released model as one ``LoadedModel`` to sample from.
"""

__version__ = '0.1.0'
