"""The one check of class labels and guidance, and the one denoise_fn builder (ddpm_jax.guidance)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import guidance
from ddpm_jax.models import UNet

ARCH = dict(ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4, out_ch=1)
K = 3


@pytest.mark.parametrize(
  'num_classes, label, scale, match',
  [
    (0, 1, 0.0, r'--class_label=1 given, but this model is unconditional .*class-conditional.*drop --class_label'),
    (0, None, 2.0, r'--guidance_scale=2.0 needs a class-conditional model .*use --guidance_scale=0'),
    (K, None, 0.0, r'class-conditional \(num_classes=3\): pass --class_label in 0\.\.2 \(or 3, the null class'),
    (K, 4, 0.0, r'--class_label must be ints in 0\.\.2 \(or 3, the null class\); got 4'),
    (K, -1, 0.0, r'--class_label must be ints in 0\.\.2'),
    (K, 1.5, 0.0, r'--class_label must be ints'),
    (K, 1, -1.0, r'--guidance_scale must be >= 0 \(0 = no guidance\), got -1.0'),
    (K, 1, float('nan'), r'--guidance_scale must be >= 0'),
    (K, 1, (1.0, 2.0), r'--guidance_scale must be a number'),
  ],
)
def test_check_conditioning_names_the_value_and_the_fix(num_classes, label, scale, match):
  with pytest.raises(ValueError, match=match):
    guidance.check_conditioning(num_classes, label, scale, label_name='--class_label', scale_name='--guidance_scale')


def test_check_conditioning_accepts_what_models_take():
  guidance.check_conditioning(0, None, 0.0)
  guidance.check_conditioning(K, 0, 0.0)
  guidance.check_conditioning(K, K, 5.0)  # the null class
  guidance.check_conditioning(K, np.array([0, 2, 3]), 1.0)
  # Traced labels and weights are not known before they run: only their presence is checked.
  jax.jit(lambda y, w: guidance.check_conditioning(K, y, w))(jnp.int32(7), jnp.float32(-1.0))
  with pytest.raises(ValueError, match='unconditional'):
    jax.jit(lambda y: guidance.check_conditioning(0, y, 0.0))(jnp.int32(0))


def test_denoise_fn_is_the_network_conditioned_as_asked():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  t = jnp.array([1, 5])
  plain = UNet(**ARCH)
  p = plain.init(jax.random.key(1), x, t, train=False)['params']
  np.testing.assert_array_equal(guidance.denoise_fn(plain, p)(x, t), plain.apply({'params': p}, x, t, train=False))
  cond = UNet(num_classes=K, **ARCH)
  pc = cond.init(jax.random.key(1), x, t, jnp.zeros(2, jnp.int32), train=False)['params']
  pc = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), pc)
  apply = lambda y: cond.apply({'params': pc}, x, t, jnp.asarray(y, jnp.int32), train=False)
  # An int is broadcast over the batch; w = 0 is the conditional model; w > 0 mixes in the null class.
  np.testing.assert_array_equal(guidance.denoise_fn(cond, pc, class_label=2)(x, t), apply([2, 2]))
  np.testing.assert_allclose(
    guidance.denoise_fn(cond, pc, class_label=np.array([0, 1]), guidance_scale=2.0)(x, t),
    3.0 * apply([0, 1]) - 2.0 * apply([K, K]),
    rtol=1e-5,
    atol=1e-6,
  )
  # The same under jit with a traced label and weight.
  traced = jax.jit(lambda y, w: guidance.denoise_fn(cond, pc, class_label=y, guidance_scale=w)(x, t))
  np.testing.assert_allclose(traced(jnp.int32(1), 2.0), 3.0 * apply([1, 1]) - 2.0 * apply([K, K]), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='class-conditional'):
    guidance.denoise_fn(cond, pc)
  with pytest.raises(ValueError, match='unconditional'):
    guidance.denoise_fn(plain, p, class_label=0)
