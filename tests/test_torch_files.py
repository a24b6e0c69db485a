"""The torch-free reader of torch.save files, against files torch itself writes (both formats)."""

import os
import pickle

import numpy as np
import pytest

from ddpm_jax import torch_files

torch = pytest.importorskip('torch')  # the reference extra: only to write the files


def _state_dict():
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  return {
    'dense': torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
    'transposed': base.t(),  # non-contiguous strides
    'slice': base[1:, 2:5],  # a view at an offset into a storage shared with 'transposed'
    'half': torch.linspace(-2, 2, 5).half(),
    'bfloat16': torch.linspace(-3, 3, 6).reshape(2, 3).bfloat16(),
    'int64': torch.arange(7),
    'bool': torch.tensor([True, False]),
    'scalar': torch.tensor(3.5),
    'empty': torch.zeros(0, 3),
    'parameter': torch.nn.Parameter(torch.ones(2)),
  }


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_reads_what_torch_save_writes(tmp_path, zip_format):
  sd = _state_dict()
  path = tmp_path / 'weights.pth'
  torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
  got = torch_files.load_state_dict(path)
  assert list(got) == list(sd)
  for name, tensor in sd.items():
    want = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()
    g = got[name].astype(np.float32) if tensor.dtype == torch.bfloat16 else got[name]
    assert g.shape == want.shape and g.dtype == want.dtype, name
    np.testing.assert_array_equal(g, want, err_msg=name)
    assert got[name].flags['C_CONTIGUOUS']
  assert str(got['bfloat16'].dtype) == 'bfloat16'


def test_module_state_dict_and_nested_objects(tmp_path):
  layer = torch.nn.Conv2d(3, 5, 3)
  path = tmp_path / 'model.bin'
  torch.save(layer.state_dict(), path)
  got = torch_files.load_state_dict(path)
  np.testing.assert_array_equal(got['weight'], layer.weight.detach().numpy())
  torch.save({'epoch': 3, 'weights': [torch.ones(2)], 'name': 'x'}, path)
  obj = torch_files.load(path)
  assert obj['epoch'] == 3 and obj['name'] == 'x'
  np.testing.assert_array_equal(obj['weights'][0], [1.0, 1.0])
  with pytest.raises(ValueError, match='state dict of tensors'):
    torch_files.load_state_dict(path)


class _Evil:
  def __reduce__(self):
    return (os.system, ('echo should-not-run',))


def test_refuses_code_and_damaged_files(tmp_path):
  path = tmp_path / 'evil.pth'
  torch.save({'x': _Evil()}, path)
  with pytest.raises(pickle.UnpicklingError, match='refusing'):
    torch_files.load(path)
  path.write_bytes(b'not a torch file at all')
  with pytest.raises(ValueError, match='not a torch.save file|neither a zip'):
    torch_files.load(path)
  torch.save({'w': torch.randn(100)}, path, _use_new_zipfile_serialization=False)
  path.write_bytes(path.read_bytes()[:-40])  # cut the storage short
  with pytest.raises(ValueError, match='truncated'):
    torch_files.load(path)
