"""Checkpoint formats other than our own orbax workdirs, each with its importer and its exporter.

* :mod:`ddpm_jax.formats.diffusers`: diffusers folders (``UNet2DModel`` + ``DDPMScheduler``), local or on the
  Hugging Face hub: the google/ddpm-* releases, and what ``export.py --format diffusers`` writes.
* :mod:`ddpm_jax.formats.tf_checkpoint`: the original TensorFlow checkpoints of hojonathanho/diffusion, and
  what ``export.py --format tf`` writes.
* :mod:`ddpm_jax.formats.param_tree`: the parameter tree a U-Net expects, which both match files against.

The readers return plain pieces (a ``UNet``, a parameter tree, sampling settings); :mod:`ddpm_jax.loading`
assembles them into its ``LoadedModel``. The writers take a ``LoadedModel``. The formats never import
``loading`` at run time, so ``loading`` can import them.
"""
