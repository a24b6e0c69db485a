"""The FID InceptionV3 (2015-12-05 TF graph) as a Flax Linen module, and its weights.

FID and Inception Score are only comparable across papers when computed with one particular network: the
InceptionV3 graph released by TensorFlow on 2015-12-05 (`inception-2015-12-05.tgz`), used by the TTUR FID code and
the OpenAI Inception Score code. pytorch-fid ported it to PyTorch (`FIDInceptionV3`, weights
`pt_inception-2015-12-05-6726825d.pth`). This module mirrors that port layer for layer:

* torchvision's InceptionV3 trunk without the auxiliary head, every conv is `BasicConv2d` = conv (no bias) →
  BatchNorm (eps 1e-3, inference mode: running statistics) → ReLU;
* `Mixed_5b/5c/5d` (`FIDInceptionA`), `Mixed_6b..6e` (`FIDInceptionC`) and `Mixed_7b` (`FIDInceptionE_1`) use a
  3×3/stride-1 average pool whose padded zeros are excluded from the mean (TF 'SAME' avg-pool semantics,
  PyTorch `count_include_pad=False`);
* `Mixed_7c` (`FIDInceptionE_2`) uses a 3×3/stride-1 *max* pool in its pool branch (a quirk of the TF graph);
* global average pool over the final 8×8 map → `pool` [B, 2048] (TF `pool_3`), then `fc` 2048 → 1008
  (TF `softmax/logits`, 1008 classes incl. unused ones) → `logits` [B, 1008].

Parameter names mirror pytorch-fid's state-dict names (`Conv2d_1a_3x3.conv.weight` ↔
`params/Conv2d_1a_3x3/conv/kernel`, `Mixed_5b.branch1x1.bn.running_mean` ↔ `batch_stats/Mixed_5b/branch1x1/bn/mean`,
`fc.weight` ↔ `params/fc/kernel`), so weights convert by name (`convert_pytorch_state_dict`).

Input convention (pytorch-fid's): images [B, H, W, 3] NHWC, uint8 or float in [0, 255] → ÷255 → bilinear resize to
299×299 with half-pixel centres and edge clamping (PyTorch `F.interpolate(mode='bilinear', align_corners=False)`,
no antialiasing; here `jax.image.resize(method='bilinear', antialias=False)`, checked against an independent numpy
implementation in tests/test_inception.py) → 2x − 1 into [−1, 1]. The TF graph resizes inside itself with TF1's
`ResizeBilinear` (believed to be the legacy variant without half-pixel centres; not verified here, REFERENCE §12);
such resize differences are why pytorch-fid's FIDs differ slightly from TTUR's (REFERENCE §8). We follow pytorch-fid
because its port of the weights is the one we load.

Weights live in our own flat `.npz` format: keys are '/'-joined Flax variable paths (`params/fc/kernel`,
`batch_stats/Mixed_7c/branch_pool/bn/var`, ...), arrays in Flax layouts (conv kernels [kh, kw, in, out], dense
kernels [in, out]). `load_inception_params` also reads pytorch-fid's `.pth` directly (with `ddpm_jax.torch_files`,
no torch needed) and `convert_pytorch_fid_weights` turns it into our `.npz`; `fetch_inception_weights` downloads
the `.pth` when the network allows.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import torch_files

INCEPTION_SIZE = 299
NUM_POOL_FEATURES = 2048
NUM_LOGITS = 1008
BN_EPSILON = 1e-3

PYTORCH_FID_WEIGHTS_URL = (
  'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth'
)
PYTORCH_FID_WEIGHTS_FILENAME = 'pt_inception-2015-12-05-6726825d.pth'
# torch.hub convention: the 8 hex digits in the file name are the start of the file's sha256.
_PYTORCH_FID_SHA256_PREFIX = '6726825d'

Variables = Mapping[str, Any]  # {'params': ..., 'batch_stats': ...}


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing


def resize_bilinear(images: jax.Array, size: int = INCEPTION_SIZE) -> jax.Array:
  """Bilinear resize equal to PyTorch `F.interpolate(mode='bilinear', align_corners=False)`.

  Output pixel i samples the input at s = (i + 0.5)·(in/out) − 0.5 (half-pixel centres) and interpolates the two
  neighbouring input pixels, clamping s to the image at the borders. `jax.image.resize` with `antialias=False`
  computes exactly this (its triangle kernel has support 1 and out-of-image taps are dropped and the weights
  renormalised, which equals clamping); with `antialias=True` it would widen the kernel when *down*sampling and
  no longer match PyTorch, so it is switched off (for upsampling, e.g. CIFAR-10 32 → 299, the flag is moot).

  Args:
    images: [B, H, W, C] float.
    size: output height and width.

  Returns:
    [B, size, size, C] float32.
  """
  images = jnp.asarray(images, jnp.float32)
  b, _, _, c = images.shape
  return jax.image.resize(images, (b, size, size, c), method='bilinear', antialias=False)


def preprocess(images: jax.Array, resize: bool = True) -> jax.Array:
  """uint8 or float images in [0, 255], [B, H, W, 3] → float32 [B, 299, 299, 3] in [−1, 1] (pytorch-fid order)."""
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  if resize and x.shape[1:3] != (INCEPTION_SIZE, INCEPTION_SIZE):
    x = resize_bilinear(x, INCEPTION_SIZE)
  return 2.0 * x - 1.0


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
  """3×3 stride-1 average pool, 1-pixel padding not counted in the mean (TF 'SAME' / count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x: jax.Array, stride: int, pad: int) -> jax.Array:
  """3×3 max pool; padding (if any) behaves as −inf like PyTorch's."""
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


# ----------------------------------------------------------------------------------------------------------------
# Blocks (names follow torchvision/pytorch-fid attribute names)


class BasicConv2d(nn.Module):
  """Conv (no bias) → BatchNorm(eps 1e-3, running statistics) → ReLU.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)); symmetric like PyTorch's `padding=(ph, pw)`.
  """

  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(
      self.features, self.kernel_size, strides=self.strides, padding=self.padding, use_bias=False, name='conv'
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name='bn')(x)
    return nn.relu(x)


def _conv(features: int, k: int | tuple[int, int], stride: int = 1, pad: int | tuple[int, int] = 0, *, name: str):
  kh, kw = (k, k) if isinstance(k, int) else k
  ph, pw = (pad, pad) if isinstance(pad, int) else pad
  return BasicConv2d(features, (kh, kw), (stride, stride), ((ph, ph), (pw, pw)), name=name)


class FIDInceptionA(nn.Module):
  """35×35 block (Mixed_5b/5c/5d): 64 + 64 + 96 + pool_features channels."""

  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = _conv(64, 1, name='branch1x1')(x)
    b5 = _conv(48, 1, name='branch5x5_1')(x)
    b5 = _conv(64, 5, pad=2, name='branch5x5_2')(b5)
    b3 = _conv(64, 1, name='branch3x3dbl_1')(x)
    b3 = _conv(96, 3, pad=1, name='branch3x3dbl_2')(b3)
    b3 = _conv(96, 3, pad=1, name='branch3x3dbl_3')(b3)
    bp = _conv(self.pool_features, 1, name='branch_pool')(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35 → 17 reduction (Mixed_6a): 384 + 96 + C_in channels."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = _conv(384, 3, stride=2, name='branch3x3')(x)
    bd = _conv(64, 1, name='branch3x3dbl_1')(x)
    bd = _conv(96, 3, pad=1, name='branch3x3dbl_2')(bd)
    bd = _conv(96, 3, stride=2, name='branch3x3dbl_3')(bd)
    bp = max_pool_3x3(x, stride=2, pad=0)
    return jnp.concatenate([b3, bd, bp], axis=-1)


class FIDInceptionC(nn.Module):
  """17×17 block with factorised 7×7 convs (Mixed_6b..6e): 4 × 192 = 768 channels."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = _conv(192, 1, name='branch1x1')(x)
    b7 = _conv(c7, 1, name='branch7x7_1')(x)
    b7 = _conv(c7, (1, 7), pad=(0, 3), name='branch7x7_2')(b7)
    b7 = _conv(192, (7, 1), pad=(3, 0), name='branch7x7_3')(b7)
    bd = _conv(c7, 1, name='branch7x7dbl_1')(x)
    bd = _conv(c7, (7, 1), pad=(3, 0), name='branch7x7dbl_2')(bd)
    bd = _conv(c7, (1, 7), pad=(0, 3), name='branch7x7dbl_3')(bd)
    bd = _conv(c7, (7, 1), pad=(3, 0), name='branch7x7dbl_4')(bd)
    bd = _conv(192, (1, 7), pad=(0, 3), name='branch7x7dbl_5')(bd)
    bp = _conv(192, 1, name='branch_pool')(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17 → 8 reduction (Mixed_7a): 320 + 192 + C_in channels."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = _conv(192, 1, name='branch3x3_1')(x)
    b3 = _conv(320, 3, stride=2, name='branch3x3_2')(b3)
    b7 = _conv(192, 1, name='branch7x7x3_1')(x)
    b7 = _conv(192, (1, 7), pad=(0, 3), name='branch7x7x3_2')(b7)
    b7 = _conv(192, (7, 1), pad=(3, 0), name='branch7x7x3_3')(b7)
    b7 = _conv(192, 3, stride=2, name='branch7x7x3_4')(b7)
    bp = max_pool_3x3(x, stride=2, pad=0)
    return jnp.concatenate([b3, b7, bp], axis=-1)


class FIDInceptionE(nn.Module):
  """8×8 block (Mixed_7b: avg pool branch = FIDInceptionE_1; Mixed_7c: max pool branch = FIDInceptionE_2).

  Attributes:
    pool: 'avg' (padding excluded from the mean) or 'max', the pooling in front of `branch_pool`.
  """

  pool: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = _conv(320, 1, name='branch1x1')(x)
    b3 = _conv(384, 1, name='branch3x3_1')(x)
    b3a = _conv(384, (1, 3), pad=(0, 1), name='branch3x3_2a')(b3)
    b3b = _conv(384, (3, 1), pad=(1, 0), name='branch3x3_2b')(b3)
    b3 = jnp.concatenate([b3a, b3b], axis=-1)
    bd = _conv(448, 1, name='branch3x3dbl_1')(x)
    bd = _conv(384, 3, pad=1, name='branch3x3dbl_2')(bd)
    bda = _conv(384, (1, 3), pad=(0, 1), name='branch3x3dbl_3a')(bd)
    bdb = _conv(384, (3, 1), pad=(1, 0), name='branch3x3dbl_3b')(bd)
    bd = jnp.concatenate([bda, bdb], axis=-1)
    if self.pool == 'avg':
      pooled = avg_pool_3x3_exclude_pad(x)
    elif self.pool == 'max':
      pooled = max_pool_3x3(x, stride=1, pad=1)
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    bp = _conv(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """The FID InceptionV3 (pytorch-fid `fid_inception_v3()` with the pool features and the 1008-way fc).

  Attributes:
    resize_input: resize inputs to 299×299 (bilinear, see `resize_bilinear`). If False, inputs must already be
      299×299 (any other size would change the receptive-field arithmetic of the frozen graph).

  Call with images [B, H, W, 3], uint8 or float in [0, 255]. Returns a dict with
    `pool`: [B, 2048] float32, mean over the final 8×8 map (TF `pool_3`, the FID features);
    `logits`: [B, 1008] float32, `pool @ fc.kernel + fc.bias` (TF `softmax/logits`).
  Always inference mode (BatchNorm uses `batch_stats`); apply with
  `model.apply({'params': ..., 'batch_stats': ...}, images)`.
  """

  resize_input: bool = True

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [B, H, W, 3], got shape {images.shape}')
    x = preprocess(images, resize=self.resize_input)
    if x.shape[1:3] != (INCEPTION_SIZE, INCEPTION_SIZE):
      raise ValueError(f'expected 299x299 inputs when resize_input=False, got {images.shape}')
    x = _conv(32, 3, stride=2, name='Conv2d_1a_3x3')(x)  # 149×149×32
    x = _conv(32, 3, name='Conv2d_2a_3x3')(x)  # 147×147×32
    x = _conv(64, 3, pad=1, name='Conv2d_2b_3x3')(x)  # 147×147×64
    x = max_pool_3x3(x, stride=2, pad=0)  # 73×73×64
    x = _conv(80, 1, name='Conv2d_3b_1x1')(x)  # 73×73×80
    x = _conv(192, 3, name='Conv2d_4a_3x3')(x)  # 71×71×192
    x = max_pool_3x3(x, stride=2, pad=0)  # 35×35×192
    x = FIDInceptionA(32, name='Mixed_5b')(x)  # 35×35×256
    x = FIDInceptionA(64, name='Mixed_5c')(x)  # 35×35×288
    x = FIDInceptionA(64, name='Mixed_5d')(x)  # 35×35×288
    x = InceptionB(name='Mixed_6a')(x)  # 17×17×768
    x = FIDInceptionC(128, name='Mixed_6b')(x)
    x = FIDInceptionC(160, name='Mixed_6c')(x)
    x = FIDInceptionC(160, name='Mixed_6d')(x)
    x = FIDInceptionC(192, name='Mixed_6e')(x)  # 17×17×768
    x = InceptionD(name='Mixed_7a')(x)  # 8×8×1280
    x = FIDInceptionE('avg', name='Mixed_7b')(x)  # 8×8×2048
    x = FIDInceptionE('max', name='Mixed_7c')(x)  # 8×8×2048
    pool = jnp.mean(x, axis=(1, 2))  # [B, 2048]
    logits = nn.Dense(NUM_LOGITS, name='fc')(pool)  # [B, 1008]
    return {'pool': pool, 'logits': logits}


# ----------------------------------------------------------------------------------------------------------------
# Variables: shapes, flat (de)serialisation, loading


def variable_shapes(model: InceptionV3 | None = None) -> dict[str, tuple[int, ...]]:
  """Flat '/'-joined variable name → shape of the model's variables (no compute: `jax.eval_shape`)."""
  return dict(_variable_shapes(model or InceptionV3()))


@functools.lru_cache(maxsize=4)
def _variable_shapes(model: InceptionV3) -> tuple[tuple[str, tuple[int, ...]], ...]:
  abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
  return tuple((k, tuple(v.shape)) for k, v in flatten_variables(abstract).items())


def flatten_variables(variables: Variables) -> dict[str, Any]:
  """{'params': {'fc': {'kernel': a}}} → {'params/fc/kernel': a}."""
  flat = {}

  def visit(prefix: str, node: Any) -> None:
    if isinstance(node, Mapping):
      for key, child in node.items():
        visit(f'{prefix}/{key}' if prefix else str(key), child)
    else:
      flat[prefix] = node

  visit('', variables)
  return flat


def unflatten_variables(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten_variables`."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _check_flat(flat: Mapping[str, np.ndarray], source: str) -> None:
  expected = variable_shapes()
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise ValueError(
      f'{source}: variables do not match the FID InceptionV3: '
      f'{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})'
    )
  for name, shape in expected.items():
    if tuple(flat[name].shape) != shape:
      raise ValueError(f'{source}: {name} has shape {tuple(flat[name].shape)}, expected {shape}')


def save_inception_params(path: str | os.PathLike, variables: Variables) -> None:
  """Write `{'params', 'batch_stats'}` to our flat `.npz` format (float32, Flax layouts)."""
  flat = {k: np.asarray(v, np.float32) for k, v in flatten_variables(variables).items()}
  _check_flat(flat, str(path))
  with open(path, 'wb') as f:  # a file object keeps np.savez from appending '.npz' to the name
    np.savez(f, **flat)


def load_inception_params(path: str | os.PathLike) -> dict[str, Any]:
  """Load FID Inception variables for `InceptionV3().apply`.

  Args:
    path: our flat `.npz` (see module docstring; written by `convert_pytorch_fid_weights` or
      `save_inception_params`), or pytorch-fid's `.pth` itself (converted in memory, read without torch by
      `ddpm_jax.torch_files`).

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 jax arrays, checked name by name and shape by shape against
    the architecture.
  """
  path = os.fspath(path)
  if path.endswith('.pth'):
    flat = convert_pytorch_state_dict(torch_files.load_state_dict(path))
  else:
    with np.load(path) as data:
      flat = {k: data[k] for k in data.files}
  _check_flat(flat, path)
  return unflatten_variables({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


# ----------------------------------------------------------------------------------------------------------------
# pytorch-fid conversion and download

_BN_NAMES = {
  'weight': ('params', 'scale'),
  'bias': ('params', 'bias'),
  'running_mean': ('batch_stats', 'mean'),
  'running_var': ('batch_stats', 'var'),
}


def convert_pytorch_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """pytorch-fid `FIDInceptionV3` state dict (arrays in PyTorch layouts) → our flat Flax-layout dict.

  Conv weights (O, I, kh, kw) → kernels (kh, kw, I, O); fc weight (O, I) → kernel (I, O); BatchNorm
  weight/bias → params scale/bias and running_mean/var → batch_stats mean/var (nothing folded);
  `num_batches_tracked` is dropped. Unknown names raise ValueError.

  Args:
    state_dict: name → array-like (numpy arrays, or torch tensors converted by the caller).

  Returns:
    '/'-joined Flax variable name → float32 numpy array.
  """
  flat: dict[str, np.ndarray] = {}
  for name, value in state_dict.items():
    if name.endswith('num_batches_tracked'):
      continue
    a = np.asarray(value, dtype=np.float32)
    parts = name.split('.')
    module, kind, leaf = '/'.join(parts[:-2]), parts[-2], parts[-1]
    if name == 'fc.weight':
      flat['params/fc/kernel'] = a.T
    elif name == 'fc.bias':
      flat['params/fc/bias'] = a
    elif kind == 'conv' and leaf == 'weight' and a.ndim == 4:
      flat[f'params/{module}/conv/kernel'] = a.transpose(2, 3, 1, 0)
    elif kind == 'bn' and leaf in _BN_NAMES:
      collection, flax_leaf = _BN_NAMES[leaf]
      flat[f'{collection}/{module}/bn/{flax_leaf}'] = a
    else:
      raise ValueError(f'unexpected entry {name!r} (shape {a.shape}) in the pytorch-fid state dict')
  return flat


def convert_pytorch_fid_weights(pth_path: str | os.PathLike, npz_out: str | os.PathLike) -> str:
  """Convert pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` into our `.npz` (no torch needed).

  Returns:
    `npz_out` as a string. The result loads with `load_inception_params` without torch.
  """
  flat = convert_pytorch_state_dict(torch_files.load_state_dict(pth_path))
  _check_flat(flat, os.fspath(pth_path))
  save_inception_params(npz_out, unflatten_variables(flat))
  return os.fspath(npz_out)


def default_weights_dir() -> str:
  """`$DDPM_JAX_CACHE` or `~/.cache/ddpm_jax`."""
  return os.environ.get('DDPM_JAX_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'ddpm_jax'))


def fetch_inception_weights(dest: str | os.PathLike | None = None, url: str = PYTORCH_FID_WEIGHTS_URL) -> str:
  """Download pytorch-fid's FID Inception weights (`.pth`) unless already present; return the local path.

  The file's sha256 must start with 6726825d (the torch.hub name convention). Offline, this raises a
  RuntimeError explaining where to put the file by hand. Never called by the tests.

  Args:
    dest: target file path, or a directory (the release file name is appended); default `default_weights_dir()`.
    url: download address.
  """
  dest = os.fspath(dest) if dest is not None else default_weights_dir()
  if os.path.isdir(dest) or not dest.endswith('.pth'):
    dest = os.path.join(dest, PYTORCH_FID_WEIGHTS_FILENAME)
  if os.path.exists(dest):
    return dest
  os.makedirs(os.path.dirname(dest) or '.', exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest) or '.', suffix='.part')
  try:
    with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url, timeout=60) as response:
      shutil.copyfileobj(response, out)
    with open(tmp, 'rb') as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    if not digest.startswith(_PYTORCH_FID_SHA256_PREFIX):
      raise RuntimeError(f'downloaded {url} has sha256 {digest}, expected prefix {_PYTORCH_FID_SHA256_PREFIX}')
    os.replace(tmp, dest)
  except (urllib.error.URLError, OSError) as e:
    raise RuntimeError(
      f'Could not download the FID Inception weights from {url} ({e}). Without network access, copy '
      f'{PYTORCH_FID_WEIGHTS_FILENAME} (from that URL, on another machine) to {dest} and pass its path, or '
      'pass the .npz you already have.'
    ) from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return dest
