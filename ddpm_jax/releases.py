"""The paper's released models: what we expect of each (image size, architecture, sampling settings).

Used by :mod:`ddpm_jax.loading` to fill in what a release's files do not say (a diffusers folder without a
scheduler config, a TF checkpoint, which has no sampling settings at all) and to warn when a file's settings
differ from the release's. Data only: no file or network access here.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class ReleaseInfo:
  """What we expect of one of the paper's released models (used to validate and as fallbacks).

  Attributes:
    repo_id: Hugging Face repository.
    image_size: image side.
    var_type: sampling variance (the TF code: fixedlarge for CIFAR-10, the posterior variance for the
      LSUN/CelebA-HQ code path; the hub scheduler configs say fixed_large / fixed_small accordingly).
    clip_denoised: x_0 clipping (TF default True; hub ``clip_sample: true``).
    ch_mult: architecture levels (ch = 128, 2 blocks per level, attention at 16x16).
    tf_checkpoint: name of the released TF checkpoint (pesser/pytorch_diffusion scripts/convert.py), if any.
    paper_fid: FID reported in the paper (CIFAR-10: vs the training set).
    ema: True for the repos that hold the EMA weights; None where the model card does not say (the
      google/ddpm-*-256 repos have "ema" twins, so they presumably hold the raw weights; for CIFAR-10
      there is no twin and whether google/ddpm-cifar10-32 is EMA is not documented).
  """

  repo_id: str
  image_size: int
  var_type: str
  clip_denoised: bool
  ch_mult: tuple[int, ...]
  tf_checkpoint: str | None
  paper_fid: float | None
  ema: bool | None = None


def _lsun_like(repo_id: str, tf_checkpoint: str | None, paper_fid: float | None, ema: bool | None):
  return ReleaseInfo(repo_id, 256, 'fixedsmall', True, (1, 1, 2, 2, 4, 4), tf_checkpoint, paper_fid, ema)


RELEASES: dict[str, ReleaseInfo] = {
  r.repo_id: r
  for r in (
    ReleaseInfo('google/ddpm-cifar10-32', 32, 'fixedlarge', True, (1, 2, 2, 2), 'model.ckpt-790000', 3.17, None),
    _lsun_like('google/ddpm-celebahq-256', None, None, None),
    _lsun_like('google/ddpm-church-256', 'model.ckpt-4432000', 7.89, None),
    _lsun_like('google/ddpm-bedroom-256', 'model.ckpt-2388000', 6.36, None),
    _lsun_like('google/ddpm-cat-256', 'model.ckpt-1761000', 19.75, None),
    # Separate repos named "ema" hold the EMA weights of the 256x256 models (what the paper sampled).
    _lsun_like('google/ddpm-ema-celebahq-256', None, None, True),
    _lsun_like('google/ddpm-ema-church-256', 'model.ckpt-4432000', 7.89, True),
    _lsun_like('google/ddpm-ema-bedroom-256', 'model.ckpt-2388000', 6.36, True),
    _lsun_like('google/ddpm-ema-cat-256', 'model.ckpt-1761000', 19.75, True),
  )
}


def release_for_architecture(image_size: int, ch_mult: tuple[int, ...]) -> ReleaseInfo | None:
  """The first of :data:`RELEASES` with this resolution and channel multipliers (None if no release has them)."""
  for info in RELEASES.values():
    if info.image_size == image_size and tuple(info.ch_mult) == tuple(ch_mult):
      return info
  return None


def match_release(path_or_repo_id: str) -> ReleaseInfo | None:
  """The release a repo id or a local folder stands for: the repo id itself, or a folder named like one
  (``/data/ddpm-cifar10-32``); None when it matches none or several."""
  key = path_or_repo_id.rstrip('/')
  if key in RELEASES:
    return RELEASES[key]
  base = os.path.basename(key)
  matches = [r for r in RELEASES.values() if r.repo_id.split('/')[1] == base]
  return matches[0] if len(matches) == 1 else None
