"""The diffusion math of the paper as pure functions over a :class:`~ddpm_jax.schedule.Schedule`.

Forward process, posterior, the three parameterizations of the reverse process, the training losses
(L_simple and the variational bound term) and the full variational bound in bits/dim, following the
original code (diffusion_tf/diffusion_utils_2.py, ``GaussianDiffusion2``) function by function.

The network never lives here: it enters as ``denoise_fn(x_t, t) -> output`` with ``x_t`` [B, H, W, C]
float32 and ``t`` [B] int32 code timesteps (0..T-1), returning [B, H, W, C] (or [B, H, W, 2C] for the
``learned`` variance type). Wrap a Flax model as
``denoise_fn = lambda x, t: model.apply({'params': params}, x, t, train=False)``.

Every function is jit-, vmap- and pmap-friendly; shapes are checked at trace time (in Python, before XLA
compiles anything), and bad names raise ``ValueError`` naming the value and the valid choices.

Names:
  * mean types: ``eps`` (network predicts the noise), ``xstart`` (predicts x_0), ``xprev`` (predicts the
    posterior mean of x_{t-1}).
  * variance types: ``fixedlarge`` (sigma_t^2 = beta_t), ``fixedsmall`` (sigma_t^2 = beta-tilde_t),
    ``learned`` (network emits a second set of C channels used as the log-variance, as in the original
    code; no interpolation).
  * loss types: ``mse`` (L_simple for the chosen parameterization: mean over pixels of the squared error
    to eps / x_0 / the posterior mean) and ``kl`` (the variational bound term L_{t-1} in bits/dim, or the
    decoder NLL L_0 at t = 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from ddpm_jax import progress
from ddpm_jax.schedule import Schedule

MeanType = Literal['eps', 'xstart', 'xprev']
VarType = Literal['fixedlarge', 'fixedsmall', 'learned']
LossType = Literal['mse', 'kl']
MEAN_TYPES: tuple[str, ...] = ('eps', 'xstart', 'xprev')
VAR_TYPES: tuple[str, ...] = ('fixedlarge', 'fixedsmall', 'learned')
LOSS_TYPES: tuple[str, ...] = ('mse', 'kl')

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def check_types(mean_type: str | None = None, var_type: str | None = None, loss_type: str | None = None) -> None:
  """Raises ``ValueError`` for an unknown mean/variance/loss name or an unsupported combination.

  Arguments left as None are not checked.
  """
  for value, valid, what in (
    (mean_type, MEAN_TYPES, 'mean_type'),
    (var_type, VAR_TYPES, 'var_type'),
    (loss_type, LOSS_TYPES, 'loss_type'),
  ):
    if value is not None and value not in valid:
      raise ValueError(f'Unknown {what} {value!r}; choose one of {valid}.')
  if loss_type == 'mse' and var_type == 'learned':
    raise ValueError(
      "loss_type='mse' cannot train a learned variance (var_type='learned'); use "
      "loss_type='kl' or a fixed variance ('fixedlarge' or 'fixedsmall')."
    )


def _check_batch(x: jax.Array, t: jax.Array, what: str = 'x') -> None:
  if x.ndim < 2:
    raise ValueError(f'{what} must have a leading batch axis, got shape {x.shape}.')
  if t.shape != (x.shape[0],):
    raise ValueError(f't must have shape [B] = ({x.shape[0]},) matching {what}, got shape {t.shape}.')
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise ValueError(f't must hold integer timestep indices 0..T-1, got dtype {t.dtype}.')


def _check_same_shape(a: jax.Array, b: jax.Array, name_a: str, name_b: str) -> None:
  if a.shape != b.shape:
    raise ValueError(f'{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}.')


def extract(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """Gathers ``table[t]`` and reshapes it to [B, 1, ..., 1] (``ndim`` axes) for broadcasting."""
  return jnp.take(jnp.asarray(table), t).reshape(t.shape + (1,) * (ndim - 1))


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all axes but the first: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------- forward process


def q_mean_variance(schedule: Schedule, x_start: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

  Args:
    schedule: the forward process.
    x_start: x_0, [B, ...].
    t: [B] int timesteps.

  Returns:
    ``(mean [B, ...], variance [B, 1, ...], log_variance [B, 1, ...])``.
  """
  _check_batch(x_start, t, 'x_start')
  mean = extract(schedule.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
  log_variance = extract(schedule.log_one_minus_alphas_cumprod, t, x_start.ndim)
  # From the float64-computed log: 1 - alpha_bar in float32 cancels catastrophically at small t.
  variance = jnp.exp(log_variance)
  return mean, variance, log_variance


def q_sample(schedule: Schedule, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Draws x_t ~ q(x_t | x_0) as ``sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``.

  Args:
    schedule: the forward process.
    x_start: x_0, [B, ...].
    t: [B] int timesteps (t = 0 means diffused for one step).
    noise: standard normal noise, same shape as ``x_start``.

  Returns:
    x_t, same shape as ``x_start``.
  """
  _check_batch(x_start, t, 'x_start')
  _check_same_shape(x_start, noise, 'x_start', 'noise')
  return (
    extract(schedule.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
    + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise
  )


def q_posterior_mean_variance(
  schedule: Schedule, x_start: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0).

  Args:
    schedule: the forward process.
    x_start: x_0, [B, ...].
    x_t: [B, ...].
    t: [B] int timesteps.

  Returns:
    ``(mean [B, ...], variance [B, 1, ...], log_variance_clipped [B, 1, ...])``. At t = 0 the variance
    is 0 and the log-variance is log beta-tilde_1 (``posterior_log_variance_clipped``).
  """
  _check_batch(x_t, t, 'x_t')
  _check_same_shape(x_start, x_t, 'x_start', 'x_t')
  nd = x_t.ndim
  mean = extract(schedule.posterior_mean_coef1, t, nd) * x_start + extract(schedule.posterior_mean_coef2, t, nd) * x_t
  return (mean, extract(schedule.posterior_variance, t, nd), extract(schedule.posterior_log_variance_clipped, t, nd))


# -------------------------------------------------------------------------------------- parameterizations


def predict_xstart_from_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps."""
  _check_batch(x_t, t, 'x_t')
  _check_same_shape(x_t, eps, 'x_t', 'eps')
  return (
    extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
    - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
  )


def predict_eps_from_xstart(schedule: Schedule, x_t: jax.Array, t: jax.Array, x_start: jax.Array) -> jax.Array:
  """eps = (sqrt(1/abar_t) x_t - x_0) / sqrt(1/abar_t - 1); the inverse of ``predict_xstart_from_eps``."""
  _check_batch(x_t, t, 'x_t')
  _check_same_shape(x_t, x_start, 'x_t', 'x_start')
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x_start) / extract(
    schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
  )


def predict_xstart_from_xprev(schedule: Schedule, x_t: jax.Array, t: jax.Array, xprev: jax.Array) -> jax.Array:
  """x_0 = (xprev - coef2_t x_t) / coef1_t; the inverse of the posterior mean."""
  _check_batch(x_t, t, 'x_t')
  _check_same_shape(x_t, xprev, 'x_t', 'xprev')
  return (
    extract(schedule.recip_posterior_mean_coef1, t, x_t.ndim) * xprev
    - extract(schedule.posterior_mean_coef2_over_coef1, t, x_t.ndim) * x_t
  )


def predict_xprev_from_xstart(schedule: Schedule, x_t: jax.Array, t: jax.Array, x_start: jax.Array) -> jax.Array:
  """The posterior mean of x_{t-1} given x_t and x_0 (the 'xprev' parameterization's target)."""
  return q_posterior_mean_variance(schedule, x_start, x_t, t)[0]


class PMeanVariance(NamedTuple):
  """The reverse-process Gaussian p(x_{t-1} | x_t) and the x_0 prediction behind it.

  Attributes:
    mean: [B, H, W, C].
    variance: [B, 1, 1, 1] (fixed types) or [B, H, W, C] (learned).
    log_variance: same shape as ``variance``.
    pred_xstart: x_0 prediction [B, H, W, C] (clipped to [-1, 1] if asked).
  """

  mean: jax.Array
  variance: jax.Array
  log_variance: jax.Array
  pred_xstart: jax.Array


def p_mean_variance_from_output(
  schedule: Schedule,
  model_output: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  *,
  mean_type: MeanType = 'eps',
  var_type: VarType = 'fixedlarge',
  clip_denoised: bool = True,
) -> PMeanVariance:
  """:func:`p_mean_variance` for an already computed network output.

  Useful when the output is transformed first (e.g. classifier-free guidance) or reused.
  """
  check_types(mean_type=mean_type, var_type=var_type)
  _check_batch(x_t, t, 'x_t')
  nd = x_t.ndim
  expected_channels = x_t.shape[-1] * (2 if var_type == 'learned' else 1)
  if model_output.shape != x_t.shape[:-1] + (expected_channels,):
    raise ValueError(
      f'denoise_fn output has shape {model_output.shape}; with var_type={var_type!r} it must be '
      f'{x_t.shape[:-1] + (expected_channels,)} for x_t of shape {x_t.shape}.'
    )

  if var_type == 'learned':
    model_output, log_variance = jnp.split(model_output, 2, axis=-1)
    variance = jnp.exp(log_variance)
  elif var_type == 'fixedlarge':
    variance = extract(schedule.fixedlarge_variance, t, nd)
    log_variance = extract(schedule.fixedlarge_log_variance, t, nd)
  else:  # fixedsmall
    variance = extract(schedule.posterior_variance, t, nd)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, nd)

  def maybe_clip(x):
    return jnp.clip(x, -1.0, 1.0) if clip_denoised else x

  if mean_type == 'xprev':
    # The network predicts the mean itself; only the derived x_0 is clipped (as in the original).
    pred_xstart = maybe_clip(predict_xstart_from_xprev(schedule, x_t, t, model_output))
    mean = model_output
  else:
    if mean_type == 'xstart':
      pred_xstart = maybe_clip(model_output)
    else:  # eps
      pred_xstart = maybe_clip(predict_xstart_from_eps(schedule, x_t, t, model_output))
    mean = q_posterior_mean_variance(schedule, pred_xstart, x_t, t)[0]
  return PMeanVariance(mean, variance, log_variance, pred_xstart)


def p_mean_variance(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  x_t: jax.Array,
  t: jax.Array,
  *,
  mean_type: MeanType = 'eps',
  var_type: VarType = 'fixedlarge',
  clip_denoised: bool = True,
) -> PMeanVariance:
  """The reverse-process Gaussian p_theta(x_{t-1} | x_t).

  For ``eps`` and ``xstart`` the network's x_0 estimate is (optionally) clipped to [-1, 1] before it forms
  the posterior mean; for ``xprev`` the network's mean is used as is. The fixed variances use the tables
  of the original code, whose log-variance at t = 0 is log beta-tilde_1 for both types.

  Args:
    schedule: the forward process.
    denoise_fn: ``denoise_fn(x_t, t) -> output``.
    x_t: [B, H, W, C].
    t: [B] int timesteps.
    mean_type: what the network predicts: 'eps', 'xstart' or 'xprev'.
    var_type: 'fixedlarge', 'fixedsmall' or 'learned'.
    clip_denoised: clip the x_0 estimate to [-1, 1] (the original's default for sampling and bpd).

  Returns:
    A :class:`PMeanVariance`.
  """
  check_types(mean_type=mean_type, var_type=var_type)
  _check_batch(x_t, t, 'x_t')
  return p_mean_variance_from_output(
    schedule, denoise_fn(x_t, t), x_t, t, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised
  )


# ------------------------------------------------------------------------------------- likelihood pieces


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
  """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasting)."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """The tanh approximation of the standard normal CDF used by the original code (max error ~2e-4)."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(x: jax.Array, *, means: jax.Array, log_scales: jax.Array) -> jax.Array:
  """Log-likelihood of images discretized to 256 levels under a Gaussian, elementwise, in nats.

  Data x in [-1, 1] are the 256 values ``k/127.5 - 1``; each owns the bin ``x +- 1/255`` and the two end
  bins extend to -inf / +inf, so the probabilities of the 256 values sum to one.

  Args:
    x: data, [B, ...] in [-1, 1].
    means: Gaussian means, broadcastable to x.
    log_scales: log standard deviations, broadcastable to x.

  Returns:
    log-probabilities with x's shape.
  """
  if x.shape != jnp.broadcast_shapes(x.shape, jnp.shape(means), jnp.shape(log_scales)):
    raise ValueError(f'means {jnp.shape(means)} and log_scales {jnp.shape(log_scales)} must broadcast to x {x.shape}.')
  centered_x = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def prior_bpd(schedule: Schedule, x_start: jax.Array) -> jax.Array:
  """The prior term L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example [B].

  It has no parameters (about 1e-5 bits/dim for the paper's schedule) and is left out of training.
  """
  t = jnp.full((x_start.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
  mean, _, log_variance = q_mean_variance(schedule, x_start, t)
  return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


def vb_terms_bpd(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  x_start: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  *,
  mean_type: MeanType = 'eps',
  var_type: VarType = 'fixedlarge',
  clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """One term of the variational bound in bits/dim, per example.

  For t > 0 it is L_{t} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); for t = 0 it is the decoder
  negative log-likelihood L_0 = -log p(x_0 | x_1) with the discretized Gaussian. Both are averaged over
  all dimensions and converted from nats to bits.

  Args:
    schedule: the forward process.
    denoise_fn: ``denoise_fn(x_t, t) -> output``.
    x_start: x_0 [B, H, W, C] in [-1, 1].
    x_t: [B, H, W, C], a sample of q(x_t | x_0).
    t: [B] int timesteps.
    mean_type: network parameterization.
    var_type: reverse variance type.
    clip_denoised: clip the x_0 estimate (True for evaluation, False for the training loss).

  Returns:
    ``(bpd [B], pred_xstart [B, H, W, C])``.
  """
  true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x_start, x_t, t)
  out = p_mean_variance(
    schedule, denoise_fn, x_t, t, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised
  )
  kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / math.log(2.0)
  decoder_nll = -mean_flat(
    discretized_gaussian_log_likelihood(x_start, means=out.mean, log_scales=0.5 * out.log_variance)
  ) / math.log(2.0)
  return jnp.where(t == 0, decoder_nll, kl), out.pred_xstart


# ------------------------------------------------------------------------------------------------ training


def training_losses(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  x_start: jax.Array,
  t: jax.Array,
  noise: jax.Array,
  *,
  mean_type: MeanType = 'eps',
  var_type: VarType = 'fixedlarge',
  loss_type: LossType = 'mse',
) -> jax.Array:
  """Per-example training losses at timesteps t.

  ``mse`` with ``eps`` is the paper's L_simple (Eq. 14): mean over pixels of ||eps - eps_theta(x_t, t)||^2.
  With ``xstart`` / ``xprev`` the target is x_0 / the posterior mean. ``kl`` is the true variational
  bound term (Table 2's "L") in bits/dim, computed without clipping. Take the batch mean yourself.

  Args:
    schedule: the forward process.
    denoise_fn: ``denoise_fn(x_t, t) -> output``.
    x_start: x_0, [B, H, W, C] in [-1, 1].
    t: [B] int timesteps, e.g. ``jax.random.randint(key, (B,), 0, T)``.
    noise: standard normal, same shape as ``x_start``.
    mean_type: network parameterization.
    var_type: reverse variance type (only used by ``kl``).
    loss_type: 'mse' or 'kl'.

  Returns:
    [B] float32 losses.
  """
  check_types(mean_type=mean_type, var_type=var_type, loss_type=loss_type)
  x_t = q_sample(schedule, x_start, t, noise)
  if loss_type == 'kl':
    return vb_terms_bpd(
      schedule, denoise_fn, x_start, x_t, t, mean_type=mean_type, var_type=var_type, clip_denoised=False
    )[0]
  if mean_type == 'eps':
    target = noise
  elif mean_type == 'xstart':
    target = x_start
  else:
    target = predict_xprev_from_xstart(schedule, x_t, t, x_start)
  model_output = denoise_fn(x_t, t)
  _check_same_shape(model_output, target, 'denoise_fn output', 'the mse target')
  return mean_flat(jnp.square(target - model_output))


# ------------------------------------------------------------------------------------ the variational bound


class BpdResult(NamedTuple):
  """The variational bound of each example, in bits/dim.

  Attributes:
    total_bpd: [B] the whole bound: sum of ``terms_bpd`` over t plus ``prior_bpd``.
    terms_bpd: [B, T] per-timestep terms; column 0 is the decoder NLL L_0, column t the KL term.
    prior_bpd: [B] the prior term L_T.
    mse: [B, T] mean squared error of the x_0 prediction at each t (for rate-distortion plots).
  """

  total_bpd: jax.Array
  terms_bpd: jax.Array
  prior_bpd: jax.Array
  mse: jax.Array


def calc_bpd_loop(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  x_start: jax.Array,
  key: jax.Array,
  *,
  mean_type: MeanType = 'eps',
  var_type: VarType = 'fixedlarge',
  clip_denoised: bool = True,
) -> BpdResult:
  """The full variational bound (negative log-likelihood upper bound) in bits/dim.

  One ``lax.scan`` over t = T-1 .. 0 with fresh noise per t (T network evaluations per image), as the
  original ``calc_bpd_loop``. The paper's NLL (Table 1) is the dataset mean of ``total_bpd`` with EMA
  parameters, no dropout and ``clip_denoised=True``.

  Args:
    schedule: the forward process.
    denoise_fn: ``denoise_fn(x_t, t) -> output``.
    x_start: x_0 [B, H, W, C], data in [-1, 1] (not dequantized).
    key: PRNG key for the noise.
    mean_type: network parameterization.
    var_type: reverse variance type.
    clip_denoised: clip the x_0 estimates.

  Returns:
    A :class:`BpdResult`.
  """
  check_types(mean_type=mean_type, var_type=var_type)
  batch = x_start.shape[0]
  num_timesteps = schedule.num_timesteps
  keys = jax.random.split(key, num_timesteps)

  def step(carry, inputs):
    i, step_key = inputs
    t = jnp.full((batch,), i, dtype=jnp.int32)
    x_t = q_sample(schedule, x_start, t, jax.random.normal(step_key, x_start.shape, x_start.dtype))
    bpd, pred_xstart = vb_terms_bpd(
      schedule, denoise_fn, x_start, x_t, t, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised
    )
    return carry, (bpd, mean_flat(jnp.square(pred_xstart - x_start)))

  # reverse=True runs t = T-1 first, like the original, and stacks outputs at index t.
  # progress.scan: jax.lax.scan, reporting the network calls only inside a progress.reporting context.
  _, (terms, mse) = progress.scan(step, None, (jnp.arange(num_timesteps), keys), reverse=True)
  terms, mse = terms.T, mse.T
  prior = prior_bpd(schedule, x_start)
  return BpdResult(total_bpd=jnp.sum(terms, axis=1) + prior, terms_bpd=terms, prior_bpd=prior, mse=mse)
