"""Reads the tensors of a ``torch.save`` file (a ``.pth`` / ``.bin`` state dict) with numpy alone.

PyTorch is a test-only reference here, yet two files users need are PyTorch pickles: pytorch-fid's FID Inception
weights (``pt_inception-2015-12-05-6726825d.pth``) and diffusers' older ``diffusion_pytorch_model.bin``. This module
reads both formats ``torch.save`` writes, without importing torch:

* the zip format (torch >= 1.6): ``<root>/data.pkl`` holds the pickled object, each storage is the raw record
  ``<root>/data/<key>``, and ``<root>/byteorder`` says the byte order (little-endian when absent);
* the legacy format: pickles of a magic number, a protocol version and system info, then the object, then the list
  of storage keys, then each storage as an 8-byte element count followed by its raw little-endian bytes.

Like ``torch.load(weights_only=True)`` it refuses every pickled global but the handful a state dict needs (ordered
dicts, storage types, the tensor and parameter rebuild functions), so a malicious file cannot run code.
Tensors come back as numpy arrays (bfloat16 as ``ml_dtypes.bfloat16``, which JAX already depends on).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
  'FloatStorage': np.float32,
  'DoubleStorage': np.float64,
  'HalfStorage': np.float16,
  'BFloat16Storage': ml_dtypes.bfloat16,
  'LongStorage': np.int64,
  'IntStorage': np.int32,
  'ShortStorage': np.int16,
  'CharStorage': np.int8,
  'ByteStorage': np.uint8,
  'BoolStorage': np.bool_,
  'UntypedStorage': np.uint8,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
  """Stands in for ``torch.FloatStorage`` etc. in the pickle: just the element dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *unused: Any) -> np.ndarray:
  """``torch._utils._rebuild_tensor_v2``: a strided view of a 1-D storage, copied to a contiguous array."""
  del unused  # requires_grad, backward hooks, metadata
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if not size:
    return storage[offset : offset + 1].reshape(()).copy()
  extent = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset
  if extent > storage.size:
    raise ValueError(
      f'tensor of size {size} and stride {stride} at offset {offset} runs past its storage of '
      f'{storage.size} elements: the file is damaged.'
    )
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=tuple(s * item for s in stride))
  return np.ascontiguousarray(view)


def _rebuild_parameter(data: np.ndarray, *unused: Any) -> np.ndarray:
  del unused
  return data


class _Deferred:
  """A tensor of a legacy file, whose storage is only read after the object pickle: rebuilt by `_resolve`."""

  def __init__(self, *args: Any):
    self.args = args


def _resolve(obj: Any) -> Any:
  if isinstance(obj, _Deferred):
    return _rebuild_tensor(*obj.args)
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v) for v in obj)
  return obj


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals of a plain state dict; the storages come from ``load_storage``."""

  def __init__(self, file, load_storage, rebuild_tensor=_rebuild_tensor):
    super().__init__(file)
    self._load_storage = load_storage
    self._allowed = {
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('torch._utils', '_rebuild_tensor_v2'): rebuild_tensor,
      ('torch._utils', '_rebuild_tensor'): rebuild_tensor,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
      ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    }

  def find_class(self, module, name):
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in self._allowed:
      return self._allowed[(module, name)]
    raise pickle.UnpicklingError(
      f'{module}.{name} is not part of a plain tensor state dict; refusing to unpickle it (this reader, like '
      'torch.load(weights_only=True), loads tensors only). Load the file with torch and re-save its state_dict().'
    )

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] not in ('storage', b'storage'):
      raise pickle.UnpicklingError(f'unknown persistent id {pid!r} in a torch file')
    return self._load_storage(*pid[1:])


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pkl) != 1:
      raise ValueError(f'{path!r} is a zip file but not a torch.save archive (no single data.pkl in it).')
    root = pkl[0][: -len('data.pkl')]
    order = '<'
    if root + 'byteorder' in names:
      order = '<' if zf.read(root + 'byteorder').decode().strip() == 'little' else '>'
    storages: dict[str, np.ndarray] = {}

    def load_storage(storage_type, key, location, numel, *unused):
      del location, unused
      key = key.decode() if isinstance(key, bytes) else str(key)
      if key not in storages:
        raw = zf.read(f'{root}data/{key}')
        dtype = storage_type.dtype.newbyteorder(order) if storage_type.dtype.itemsize > 1 else storage_type.dtype
        if len(raw) < int(numel) * dtype.itemsize:
          raise ValueError(f'{path!r}: storage {key} holds {len(raw)} bytes, expected {int(numel) * dtype.itemsize}.')
        storages[key] = np.frombuffer(raw, dtype, count=int(numel)).astype(storage_type.dtype)
      return storages[key]

    return _Unpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()


def _load_legacy(path: str) -> Any:
  with open(path, 'rb') as f:
    try:
      magic = pickle.load(f)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{path!r} is neither a zip nor a legacy torch.save file.') from e
    if magic != _LEGACY_MAGIC or pickle.load(f) != _LEGACY_PROTOCOL:
      raise ValueError(f'{path!r} is not a torch.save file (wrong magic number or protocol).')
    sys_info = pickle.load(f)
    if not sys_info.get('little_endian', True):
      raise ValueError(f'{path!r} was saved on a big-endian machine; not supported.')
    arrays: dict[str, np.ndarray] = {}  # storage key -> array filled in after the object pickle

    def load_storage(storage_type, key, location, numel, view_metadata=None, *unused):
      del location, unused
      if view_metadata is not None:
        raise ValueError(f'{path!r} uses storage views (a pre-1.0 torch file); re-save it with a current torch.')
      # The data follows the object pickle: hand out an array that is filled in below.
      return arrays.setdefault(str(key), np.empty(int(numel), storage_type.dtype))

    obj = _Unpickler(f, load_storage, rebuild_tensor=_Deferred).load()
    for key in pickle.load(f):
      array = arrays[str(key)]
      dtype, numel = array.dtype, array.size
      (count,) = struct.unpack('<q', f.read(8))
      if count != numel:
        raise ValueError(f'{path!r}: storage {key} has {count} elements on disk, {numel} in the pickle.')
      raw = f.read(numel * dtype.itemsize)
      if len(raw) != numel * dtype.itemsize:
        raise ValueError(f'{path!r} is truncated (storage {key}).')
      array[...] = np.frombuffer(raw, dtype.newbyteorder('<') if dtype.itemsize > 1 else dtype)
  return _resolve(obj)


def load(path: str | os.PathLike) -> Any:
  """The object ``torch.save`` wrote to ``path`` (zip or legacy format), with every tensor as a numpy array.

  Raises:
    ValueError: a file that is not a ``torch.save`` file, or a damaged one.
    pickle.UnpicklingError: a pickle that holds anything but tensors, dicts, lists and numbers.
  """
  path = os.fspath(path)
  return _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A ``torch.save``-d state dict (name -> tensor) as name -> numpy array; see :func:`load`."""
  obj = load(path)
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise ValueError(f'{os.fspath(path)!r} does not hold a state dict of tensors (got {type(obj).__name__}).')
  return dict(obj)
