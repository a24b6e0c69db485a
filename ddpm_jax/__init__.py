"""ddpm-jax: the DDPM of Ho, Jain & Abbeel (2020) in JAX and Flax.

Modules (import what you need; importing the package itself loads nothing heavy):
  * ``ddpm_jax.schedule``: beta schedules and the float64-computed ``Schedule`` tables.
  * ``ddpm_jax.diffusion``: forward process, posterior, parameterizations, losses, variational bound.
  * ``ddpm_jax.sampling``: samplers as one ``lax.scan`` over the reverse steps.
  * ``ddpm_jax.solvers``: fast samplers (DPM-Solver++, UniPC, Euler/Heun, PLMS/PNDM) and the registry of all.
  * ``ddpm_jax.guidance``: the network as a ``denoise_fn``: unconditional, class-conditional or guided.
  * ``ddpm_jax.models``: the paper's Flax U-Net.
  * ``ddpm_jax.loading``: a training run or a released model as one ``LoadedModel`` to sample from.
  * ``ddpm_jax.batch_sampler``: the one data-parallel sampler (images by global index over the devices).
  * ``ddpm_jax.progress``: progress from inside the compiled chains, compiled in only when asked for.

The commands' drivers are the ``*_lib`` modules (``train_lib``, ``sample_lib``, ``evaluate_lib``, ``figures_lib``,
``edit_lib``, ``export_lib``); the README's layout table lists every module.
"""

__version__ = '0.1.0'
