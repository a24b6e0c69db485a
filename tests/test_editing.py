"""Inpainting (RePaint) and SDEdit: the jump schedule, the noise level of the known pixels at every network call,
exact preservation of the known pixels, and the editing run on a tiny model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import edit_lib, editing, errors, figures, loading, sampling
from ddpm_jax import schedule as sched_lib
from ddpm_jax.models import UNet

SCHED = sched_lib.get_schedule('linear', beta_end=0.2, num_timesteps=20)


def _images(n=2, size=4, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, (n, size, size, channels)) / 127.5 - 1, jnp.float32)


# ------------------------------------------------------------------------------------------------ repaint_path


def test_repaint_path_without_jumps_is_the_plain_chain():
  np.testing.assert_array_equal(editing.repaint_path(20), np.arange(20, -1, -1))
  np.testing.assert_array_equal(editing.repaint_path(20, jump_length=5, jump_n_sample=1), np.arange(20, -1, -1))


@pytest.mark.parametrize('big_t,jump_length,jump_n_sample', [(20, 5, 3), (20, 3, 2), (1000, 10, 10), (7, 2, 4)])
def test_repaint_path_jumps(big_t, jump_length, jump_n_sample):
  path = editing.repaint_path(big_t, jump_length=jump_length, jump_n_sample=jump_n_sample)
  steps = np.diff(path)
  assert path[0] == big_t and path[-1] == 0 and set(np.unique(steps)) <= {-1, 1}
  assert path.min() == 0 and path.max() == big_t
  points = len(range(jump_length, big_t - jump_length + 1, jump_length))
  downs = int(np.sum(steps < 0))
  assert downs == big_t + (jump_n_sample - 1) * jump_length * points
  assert int(np.sum(steps > 0)) == (jump_n_sample - 1) * jump_length * points
  # Each resampling point is reached going down exactly jump_n_sample times; the jumps start there.
  arrivals = path[1:][steps < 0]
  for n in range(jump_length, big_t - jump_length + 1, jump_length):
    assert np.sum(arrivals == n) == jump_n_sample
  ups_from = path[:-1][steps > 0]
  starts = ups_from[np.r_[True, np.diff(np.flatnonzero(steps > 0)) > 1]]  # first state of each jump
  assert set(starts.tolist()) <= set(range(jump_length, big_t, jump_length))


def test_repaint_path_small_case_by_hand():
  # T = 4, jumps of 2 at n = 2, traversed twice: 4 3 2 | 3 4 | 3 2 1 0.
  np.testing.assert_array_equal(editing.repaint_path(4, jump_length=2, jump_n_sample=2), [4, 3, 2, 3, 4, 3, 2, 1, 0])


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(jump_length=0), 'jump_length'),
    (dict(jump_n_sample=0), 'jump_n_sample'),
    (dict(jump_length=2.5), 'jump_length'),
    (dict(jump_length=20, jump_n_sample=2), 'resampling point'),
  ],
)
def test_repaint_path_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    editing.repaint_path(20, **kwargs)


# ------------------------------------------------------------------------------------------------ inpaint


def _recording_denoiser(calls):
  """An eps-network that records (t, x_t) of every call and predicts eps = 0.1 x_t."""

  def record(t, x):
    calls.append((np.asarray(t).copy(), np.asarray(x).copy()))

  def denoise_fn(x, t):
    jax.debug.callback(record, t, x, ordered=True)
    return 0.1 * x

  return denoise_fn


@pytest.mark.parametrize('jump_length,jump_n_sample', [(1, 1), (3, 3)])
def test_known_pixels_reach_the_network_noised_to_its_timestep(jump_length, jump_n_sample):
  """At every call with code timestep t the known pixels are a sample of q(x_t | x0): standardized they are N(0, 1).

  One step off (x_{t-1} or x_{t+1}'s noise level), or a jump drawn with the wrong beta, changes the variance by
  10% or more at small t with this schedule; 6,000 known pixels estimate it to about 2%.
  """
  x0 = _images(n=2, size=50, channels=3, seed=1)
  known = np.zeros((1, 50, 50, 1), bool)
  known[:, :, 10:] = True  # 6,000 of the 7,500 pixels are given
  calls = []
  out = editing.inpaint(
    SCHED,
    _recording_denoiser(calls),
    x0,
    known,
    jax.random.key(0),
    jump_length=jump_length,
    jump_n_sample=jump_n_sample,
  )
  jax.effects_barrier()
  path = editing.repaint_path(20, jump_length=jump_length, jump_n_sample=jump_n_sample)
  assert [int(t[0]) for t, _ in calls] == [int(n) - 1 for n in path[:-1][np.diff(path) < 0]]
  abar = np.asarray(sched_lib.schedule_tables(np.asarray(SCHED.betas, np.float64))['alphas_cumprod'])
  kmask = np.broadcast_to(known, x0.shape)
  for t, x in calls:
    t = int(t[0])
    z = (x - np.sqrt(abar[t]) * np.asarray(x0)) / np.sqrt(1 - abar[t])
    z = z[kmask]
    assert abs(z.mean()) < 0.05, (t, z.mean())
    assert abs(z.var() - 1) < 0.06, (t, z.var())
  # The result keeps the known pixels exactly and generates the others.
  np.testing.assert_array_equal(np.asarray(out)[kmask], np.asarray(x0)[kmask])
  assert not np.allclose(np.asarray(out)[~kmask], np.asarray(x0)[~kmask], atol=0.1)


def test_inpaint_with_an_exact_x0_network_recovers_the_image_and_accepts_per_image_masks():
  x0 = _images(n=3, size=4)
  known = np.zeros((3, 4, 4, 3), bool)
  known[0, :2] = True
  known[1, :, :, 0] = True  # per-channel masks work too
  out = editing.inpaint(
    SCHED, lambda x_t, t: x0, x0, known, jax.random.key(1), mean_type='xstart', jump_length=2, jump_n_sample=2
  )
  np.testing.assert_allclose(out, x0, atol=1e-5)


def test_inpaint_under_jit_and_vmap_with_a_real_unet():
  model = UNet(ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4, out_ch=1)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,), jnp.int32), train=False)['params']
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape), params)
  x0 = _images(n=3, size=4, channels=1, seed=2)
  known = jnp.asarray(np.arange(16).reshape(1, 4, 4, 1) % 2 == 0)

  @jax.jit
  def one(params, x, key):
    denoise_fn = lambda x_t, t: model.apply({'params': params}, x_t, t, train=False)
    return editing.inpaint(SCHED, denoise_fn, x[None], known, key, jump_length=4, jump_n_sample=2)[0]

  keys = jax.random.split(jax.random.key(5), 3)
  out = jax.vmap(one, in_axes=(None, 0, 0))(params, x0, keys)
  kmask = np.broadcast_to(np.asarray(known), x0.shape)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(np.asarray(out)[kmask], np.asarray(x0)[kmask])
  np.testing.assert_array_equal(out[1], one(params, x0[1], keys[1]))  # vmapped == one at a time


def test_inpaint_rejects_bad_input_before_compiling():
  x0 = _images(n=2, size=4)
  with pytest.raises(ValueError, match='broadcast'):
    editing.inpaint(SCHED, lambda x, t: x, x0, np.ones((3, 4, 4, 1)), jax.random.key(0))
  with pytest.raises(ValueError, match=r'\[B, H, W, C\]'):
    editing.inpaint(SCHED, lambda x, t: x, x0[0], np.ones((4, 4, 1)), jax.random.key(0))
  with pytest.raises(ValueError, match='var_type'):
    editing.inpaint(SCHED, lambda x, t: x, x0, np.ones((4, 4, 1)), jax.random.key(0), var_type='large')


# ------------------------------------------------------------------------------------------------ sdedit


def test_sdedit_is_the_reconstruction_chain_and_validates_t_start():
  x0 = _images(n=2, size=4)
  denoise_fn = lambda x, t: 0.3 * x
  res = editing.sdedit(SCHED, denoise_fn, x0, 9, jax.random.key(4))
  rec = figures.reconstruct(SCHED, denoise_fn, x0, 9, jax.random.key(4))
  np.testing.assert_array_equal(res.x_edit, rec.x_rec)
  np.testing.assert_array_equal(res.x_t, rec.x_t)
  # x_t is q(x_9 | x0) drawn with the first half of the key; the chain runs from t = 9 with the second half.
  noise_key, sample_key = jax.random.split(jax.random.key(4))
  t9 = jnp.full((2,), 9)
  want_xt = sampling.diffusion.q_sample(SCHED, x0, t9, jax.random.normal(noise_key, x0.shape))
  np.testing.assert_allclose(res.x_t, want_xt, rtol=1e-6)
  want = sampling.p_sample_loop(SCHED, denoise_fn, x0.shape, sample_key, x_init=want_xt, start_t=9)
  np.testing.assert_allclose(res.x_edit, want, rtol=1e-6)
  for bad in (-1, 20, 2.0):
    with pytest.raises(ValueError, match='t_start'):
      editing.sdedit(SCHED, denoise_fn, x0, bad, jax.random.key(0))


# ------------------------------------------------------------------------------------------------ masks and run


def test_preset_and_png_masks(tmp_path):
  m = editing.preset_mask('right', 8)
  assert m.shape == (8, 8, 1) and m[:, 4:].all() and not m[:, :4].any()
  c = editing.preset_mask('center', 8)
  assert c.sum() == 16 and c[2:6, 2:6].all()
  assert editing.preset_mask('top', 8)[:4].all() and editing.preset_mask('bottom', 8)[4:].all()
  png = np.zeros((8, 8), np.uint8)
  png[:, :4] = 255  # white = regenerate
  Image.fromarray(png).save(tmp_path / 'm.png')
  np.testing.assert_array_equal(edit_lib.load_mask(str(tmp_path / 'm.png'), 8), editing.preset_mask('left', 8))
  with pytest.raises(ValueError, match='neither a preset'):
    edit_lib.load_mask(str(tmp_path / 'missing.png'), 8)
  # Another size is refused with both sizes (never stretched): 7 wide, 5 high.
  Image.fromarray(np.zeros((5, 7), np.uint8)).save(tmp_path / 'small.png')
  with pytest.raises(errors.UserError, match=r"'.*small.png' is 7x5 pixels but the images are 8x8"):
    edit_lib.load_mask(str(tmp_path / 'small.png'), 8)
  (tmp_path / 'fake.png').write_bytes(b'not a png')
  with pytest.raises(errors.UserError, match='fake.png.* not an image'):
    edit_lib.load_mask(str(tmp_path / 'fake.png'), 8)


@pytest.fixture(scope='module')
def tiny_model():
  model = UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_groups=8, out_ch=1)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), train=False)['params']
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  return loading.LoadedModel(
    model=model,
    params=params,
    schedule=SCHED,
    var_type='fixedlarge',
    clip_denoised=True,
    mean_type='eps',
    image_size=8,
    in_channels=1,
    source='tiny test',
  )


def test_run_inpaint_writes_results_and_keeps_known_pixels(tiny_model, tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1)).astype(np.uint8)
  out = str(tmp_path / 'inpaint')
  summary = edit_lib.run(
    mode='inpaint',
    out_dir=out,
    images=images,
    loaded=tiny_model,
    mask='right',
    num_samples=3,
    jump_length=5,
    jump_n_sample=2,
    seed=3,
  )
  assert summary['known_pixels_max_abs_error'] == 0
  assert summary['network_calls_per_result'] == 20 + 5 * 3  # points 5, 10, 15
  with np.load(os.path.join(out, 'results.npz')) as f:
    results, inputs, regen = f['results'], f['inputs'], f['regenerate']
  assert results.shape == (2, 3, 8, 8, 1)
  np.testing.assert_array_equal(inputs, images)
  np.testing.assert_array_equal(results[:, :, :, :4], np.broadcast_to(images[:, None, :, :4], (2, 3, 8, 4, 1)))
  assert regen[:, 4:].all() and not regen[:, :4].any()
  assert len({results[0, j].tobytes() for j in range(3)}) == 3  # each result its own noise
  with Image.open(os.path.join(out, 'result_001_02.png')) as im:
    np.testing.assert_array_equal(np.asarray(im), results[1, 2, ..., 0])
  with Image.open(os.path.join(out, 'grid.png')) as im:
    assert im.size[0] > im.size[1]  # 2 rows of 5 cells (input, masked input, 3 results)
  with open(os.path.join(out, 'edit.json')) as f:
    assert json.load(f)['spec']['mask'] == 'right'
  # Deterministic: the same command again gives the same files; result (i, j) does not depend on the others.
  again = edit_lib.run(
    mode='inpaint',
    out_dir=out,
    images=images,
    loaded=tiny_model,
    mask='right',
    num_samples=3,
    jump_length=5,
    jump_n_sample=2,
    seed=3,
  )
  assert again['known_pixels_max_abs_error'] == 0
  with np.load(os.path.join(out, 'results.npz')) as f:
    np.testing.assert_array_equal(f['results'], results)
  one = edit_lib.run(
    mode='inpaint',
    out_dir=str(tmp_path / 'one'),
    images=images[:1],
    loaded=tiny_model,
    mask='right',
    num_samples=3,
    jump_length=5,
    jump_n_sample=2,
    seed=3,
  )
  with np.load(os.path.join(one['out_dir'], 'results.npz')) as f:
    np.testing.assert_array_equal(f['results'][0], results[0])


def test_run_refuses_a_folder_of_other_results_and_bad_arguments(tiny_model, tmp_path):
  images = np.zeros((1, 8, 8, 1), np.uint8)
  out = str(tmp_path / 'sd')
  summary = edit_lib.run(mode='sdedit', out_dir=out, images=images, loaded=tiny_model, t_start=10, num_samples=2)
  assert summary['network_calls_per_result'] == 11
  before = {p: os.path.getmtime(os.path.join(out, p)) for p in os.listdir(out)}
  with pytest.raises(ValueError, match='other settings'):
    edit_lib.run(mode='sdedit', out_dir=out, images=images, loaded=tiny_model, t_start=12, num_samples=2)
  assert {p: os.path.getmtime(os.path.join(out, p)) for p in os.listdir(out)} == before  # nothing overwritten
  bad = [
    (dict(mode='inpaint'), '--mask'),
    (dict(mode='inpaint', mask='diagonal'), 'neither a preset'),
    (dict(mode='inpaint', mask='left', t_start=3), 'sdedit only'),
    (dict(mode='inpaint', mask='left', jump_length=20, jump_n_sample=2), 'resampling point'),
    (dict(mode='sdedit'), '--t_start'),
    (dict(mode='sdedit', t_start=20), r'\[0, 19\]'),
    (dict(mode='sdedit', t_start=5, mask='left'), 'inpaint only'),
    (dict(mode='paint', t_start=5), 'Unknown --mode'),
    (dict(mode='sdedit', t_start=5, num_samples=0), '--num_samples'),
    (dict(mode='sdedit', t_start=5, class_label=1), 'unconditional'),
  ]
  for kwargs, match in bad:
    with pytest.raises(ValueError, match=match):
      edit_lib.run(out_dir=str(tmp_path / 'bad'), images=images, loaded=tiny_model, **kwargs)
  with pytest.raises(ValueError, match=r'the model takes \(8, 8, 1\)'):
    edit_lib.run(
      mode='sdedit',
      t_start=5,
      out_dir=str(tmp_path / 'bad'),
      images=np.zeros((1, 4, 4, 1), np.uint8),
      loaded=tiny_model,
    )
  assert not os.path.exists(tmp_path / 'bad' / 'results.npz')


def test_load_images_from_a_file_or_a_dataset(tmp_path):
  Image.fromarray(np.full((16, 12, 3), 200, np.uint8)).save(tmp_path / 'a.png')
  images, source = edit_lib.load_images(
    image=str(tmp_path / 'a.png'), dataset=None, image_size=8, channels=1, num_images=1
  )
  assert images.shape == (1, 8, 8, 1) and images.dtype == np.uint8 and source.endswith('a.png')
  digits, source = edit_lib.load_images(image=None, dataset='digits', image_size=8, channels=1, num_images=3)
  assert digits.shape == (3, 8, 8, 1) and 'digits' in source
  with pytest.raises(ValueError, match='exactly one'):
    edit_lib.load_images(image=None, dataset=None, image_size=8, channels=1, num_images=1)
  with pytest.raises(ValueError, match='not a file'):
    edit_lib.load_images(image=str(tmp_path / 'no.png'), dataset=None, image_size=8, channels=1, num_images=1)
