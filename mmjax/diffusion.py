"""Denoising diffusion: noise schedules, the forward process, training targets and losses, and three samplers.

Pure functions of arrays; the samplers take the denoiser as a function, so any model (a Flax ``apply`` closed over
its parameters, a guided pair from :func:`guided_denoise_fn`) plugs in. Schedules, timesteps and the samplers'
update rules follow Hugging Face ``diffusers`` (``DDPMScheduler``, ``DDIMScheduler``, ``DPMSolverMultistepScheduler``
with their default options); ``tests/parity/test_diffusion_diffusers.py`` checks them against diffusers in float64.

Notation. ``T = num_train_timesteps``; training timesteps are integers ``t in {0, ..., T-1}``; ``beta_t`` the
schedule, ``alpha_t = 1 - beta_t``, ``abar_t = prod_{s<=t} alpha_s`` (``alphas_cumprod``). Arrays are batched on
the first axis: ``x0, noise, x_t: [B, ...]`` (any trailing shape, e.g. ``[B, C, H, W]`` or ``[B, H, W, C]``),
``t: [B]`` integers (or a scalar, the same for every example).

Schedules (:func:`make_schedule`)::

    linear             beta_t = beta_start + (beta_end - beta_start) * t / (T - 1)
    scaled_linear      beta_t = (sqrt(beta_start) + (sqrt(beta_end) - sqrt(beta_start)) * t / (T - 1))**2
    squaredcos_cap_v2  beta_t = min(1 - f((t + 1) / T) / f(t / T), 0.999),  f(u) = cos((u + 0.008) / 1.008 * pi / 2)**2

Forward process and training (:func:`q_sample`, :func:`training_target`, :func:`loss_weight`,
:func:`diffusion_loss`)::

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise
    target:  epsilon -> noise;  sample -> x0;  v_prediction -> v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0
    SNR_t = abar_t / (1 - abar_t);  min-SNR-gamma weight (Hang et al. 2023):
        epsilon: min(SNR, gamma) / SNR;  v_prediction: min(SNR, gamma) / (SNR + 1);  sample: min(SNR, gamma)
    loss_i = weight(t_i) * mean over the non-batch axes of (model_output_i - target_i)**2        # [B]

Every sampler first turns the model output into ``x0_hat`` (:func:`predicted_x0`): ``epsilon``:
``(x_t - sqrt(1 - abar_t) m) / sqrt(abar_t)``; ``sample``: ``m``; ``v_prediction``:
``sqrt(abar_t) x_t - sqrt(1 - abar_t) m``. With inference timesteps ``t_0 > t_1 > ... > t_{N-1}``
(:func:`inference_timesteps`), step ``i`` maps ``x_{t_i}`` to the next sample:

* ``ddpm`` (ancestral, variance "fixed_small"), with ``a = abar_{t_i}``, ``a' = abar_{t_{i+1}}`` (1 after the last
  step), ``beta = 1 - a / a'``: ``x' = sqrt(a') beta / (1 - a) * x0_hat + sqrt(a / a') (1 - a') / (1 - a) * x_t
  + [t_i > 0] * sqrt(max((1 - a') / (1 - a) * beta, 1e-20)) * z``.
* ``ddim``: ``a' = abar_{t_i - T // N}`` (``final_alpha_cumprod`` = 1, or ``abar_0`` when ``set_alpha_to_one`` is
  false, for a negative index), ``sigma = eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))``:
  ``x' = sqrt(a') x0_hat + sqrt(1 - a' - sigma**2) eps_hat + sigma * z``.
* ``dpm_solver++`` (multistep, midpoint): ``s_i = sqrt((1 - abar) / abar)`` at ``t_i`` plus a final 0
  (``final_sigmas_type="zero"``) or ``s`` at ``t = 0``; ``alpha_i = 1 / sqrt(s_i**2 + 1)``, ``sigma_i = s_i
  alpha_i``, ``lambda_i = log(alpha_i / sigma_i)``, ``h = lambda_{i+1} - lambda_i``. First order:
  ``x' = sigma_{i+1} / sigma_i x + alpha_{i+1} (1 - e^-h) D0``; second order the same with
  ``D0 + (D0 - D_prev) / (2 r)``, ``r = (lambda_i - lambda_{i-1}) / h``, ``D = x0_hat``. The first step is first
  order, and so is the last with ``final_sigmas_type="zero"``, ``euler_at_final``, or ``lower_order_final`` and
  fewer than 15 steps.

``z`` is standard normal noise, drawn for step ``i`` as ``jax.random.normal(jax.random.fold_in(rng, i), x.shape,
x.dtype)`` (so a run is reproducible from ``rng``). ``clip_sample`` clamps ``x0_hat`` to
``[-clip_sample_range, clip_sample_range]`` (ddpm, ddim).

Where mmjax departs from diffusers, on purpose:

* everything static (betas, timesteps, step coefficients) is computed in float64 and cast to the sample's dtype;
  diffusers computes the schedule in float32 (it agrees within float32 round-off);
* ``timestep_spacing="trailing"``: diffusers' ``np.arange(T, 0, -T / N)`` has ``N + 1`` points for some ``N``
  (61, 103, ... with ``T = 1000``), the extra one being timestep ``-1``; mmjax keeps the first ``N``;
* timesteps diffusers would produce repeated or out of ``[0, T)`` (DPM-Solver++ with ``num_steps`` close to ``T``,
  ``steps_offset`` pushing past ``T - 1``) raise a :class:`~mmjax.errors.UserError` instead;
* the noise comes from ``jax.random`` (see above), not from a torch generator; given the same noise the steps are
  diffusers' (DDIM's ``a'`` at ``t - T // N`` included, even where that is not the next timestep);
* not implemented (refused unless at diffusers' default): dynamic ``thresholding``, ``rescale_betas_zero_snr``,
  ``trained_betas``, DDPM variance types other than ``"fixed_small"``, DPM-Solver order 3, the ``sde-`` and
  ``dpmsolver`` algorithms, the ``heun`` solver type, Karras / exponential / beta / Lu / flow sigmas.

Example: a dataset of one point ``x0``, whose exact noise prediction is ``(x_t - sqrt(abar_t) x0) /
sqrt(1 - abar_t)``; DDIM and DPM-Solver++ land on ``x0``.

>>> import jax, jax.numpy as jnp
>>> schedule = make_schedule("linear", 1000)
>>> x0 = jnp.array([[0.5, -0.25]])
>>> def eps(x_t, t):  # t: int32 [B]
...     abar = schedule.alphas_cumprod[t][:, None]
...     return (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
>>> noise = jax.random.normal(jax.random.key(0), (1, 2))
>>> out = sample(eps, noise, sampler="ddim", num_steps=10)
>>> bool(jnp.allclose(out, x0, atol=1e-4))
True
>>> out = sample(eps, noise, sampler="dpm_solver++", num_steps=10)
>>> bool(jnp.allclose(out, x0, atol=1e-4))
True
"""

from __future__ import annotations

import difflib
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mmjax.errors import UserError

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "TIMESTEP_SPACINGS",
    "Schedule",
    "make_schedule",
    "q_sample",
    "training_target",
    "predicted_x0",
    "snr",
    "loss_weight",
    "diffusion_loss",
    "default_options",
    "inference_timesteps",
    "guided_denoise_fn",
    "sample",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddpm", "ddim", "dpm_solver++")

_COSINE_MAX_BETA = 0.999  # diffusers' betas_for_alpha_bar cap
_DDPM_MIN_VARIANCE = 1e-20  # DDPMScheduler clamps the posterior variance to this before the square root


# ------------------------------------------------------------------------------------------------ checks


def _choice(what, value, allowed, fix=""):
    if isinstance(value, str) and value in allowed:
        return value
    close = difflib.get_close_matches(str(value), allowed, n=2, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    raise UserError(f"{what}={value!r} is not known; expected one of {', '.join(map(repr, allowed))}{hint}{fix}")


def _int(what, value, low, high=None, fix=""):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise UserError(f"{what}={value!r} must be an int; pass a whole number.")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise UserError(f"{what}={value!r} is out of range; expected an int {bound}.{fix}")
    return int(value)


def _bool(what, value):
    if not isinstance(value, (bool, np.bool_)):
        raise UserError(f"{what}={value!r} must be True or False.")
    return bool(value)


def _float(what, value, low=None, low_open=False, fix=""):
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what}={value!r} must be a number.") from None
    if math.isnan(out):
        raise UserError(f"{what}={value!r} must be a number, not NaN.")
    if low is not None and (out <= low if low_open else out < low):
        raise UserError(f"{what}={value!r} is out of range; expected a number {'>' if low_open else '>='} {low}.{fix}")
    return out


def _floating(name, x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise UserError(f"{name} must be a floating-point array, got dtype {x.dtype}; cast it, e.g. x.astype(float).")
    if x.ndim < 1:
        raise UserError(f"{name} must have a batch axis [B, ...], got shape {x.shape}; add one with x[None].")
    return x


def _timestep_array(t, batch):
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise UserError(
            f"t must be integer timesteps in [0, T), got dtype {t.dtype}; round and cast with .astype(int)."
        )
    if t.shape not in ((), (batch,)):
        raise UserError(f"t must be a scalar or have shape [B] = ({batch},), got shape {t.shape}.")
    return t


def _per_example(values, x):
    """``values`` of shape ``[B]`` or ``()`` reshaped to broadcast against ``x: [B, ...]``."""
    return jnp.reshape(values, jnp.shape(values) + (1,) * (x.ndim - jnp.ndim(values)))


# --------------------------------------------------------------------------------------------- schedules


class Schedule(NamedTuple):
    """A noise schedule over ``T`` training timesteps: ``betas``, ``alphas = 1 - betas`` and ``alphas_cumprod``
    (``abar_t = prod_{s<=t} alpha_s``), each ``[T]``. A pytree (NamedTuple), so it can be passed into ``jit``.

    >>> s = make_schedule("linear", 4, beta_start=0.1, beta_end=0.4)
    >>> [round(float(v), 4) for v in s.alphas_cumprod]
    [0.9, 0.72, 0.504, 0.3024]
    """

    betas: Any
    alphas: Any
    alphas_cumprod: Any


def _betas_np(beta_schedule, num_train_timesteps, beta_start, beta_end):
    """float64 NumPy betas (the static schedule every sampler precomputes its coefficients from)."""
    beta_schedule = _choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    T = _int("num_train_timesteps", num_train_timesteps, 1)
    if beta_schedule == "squaredcos_cap_v2":
        f = np.cos((np.arange(T + 1, dtype=np.float64) / T + 0.008) / 1.008 * np.pi / 2) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], _COSINE_MAX_BETA)
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        v = _float(name, value)
        if not 0.0 < v < 1.0:
            raise UserError(f"{name}={value!r} is out of range; expected 0 < {name} < 1 (e.g. 0.0001 and 0.02).")
    if beta_schedule == "linear":
        return np.linspace(float(beta_start), float(beta_end), T, dtype=np.float64)
    return np.linspace(float(beta_start) ** 0.5, float(beta_end) ** 0.5, T, dtype=np.float64) ** 2


def _alphas_cumprod_np(betas):
    return np.cumprod(1.0 - betas)


def make_schedule(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    *,
    dtype=None,
) -> Schedule:
    """The noise schedule ``beta_schedule`` over ``num_train_timesteps`` steps, as diffusers' schedulers build it.

    The formulas are in the module docstring; ``beta_start`` and ``beta_end`` are ignored by
    ``"squaredcos_cap_v2"``. Computed in float64 with NumPy and returned as ``dtype`` arrays (default: JAX's
    default float, float64 under ``jax.enable_x64(True)``, else float32). diffusers computes in float32; the
    float64 values here are the exact ones it rounds.

    Args:
      beta_schedule: ``"linear"``, ``"scaled_linear"`` (latent diffusion) or ``"squaredcos_cap_v2"`` (cosine).
      num_train_timesteps: ``T``.
      beta_start, beta_end: the first and last beta of the linear schedules, in ``(0, 1)``.
      dtype: dtype of the arrays.

    Returns:
      :class:`Schedule` with ``[T]`` arrays.

    >>> s = make_schedule("squaredcos_cap_v2", 1000)
    >>> s.betas.shape, round(float(s.betas[-1]), 3)  # the last beta is capped at 0.999
    ((1000,), 0.999)
    """
    betas = _betas_np(beta_schedule, num_train_timesteps, beta_start, beta_end)
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)
    return Schedule(
        betas=jnp.asarray(betas, dtype),
        alphas=jnp.asarray(1.0 - betas, dtype),
        alphas_cumprod=jnp.asarray(_alphas_cumprod_np(betas), dtype),
    )


def _abar(schedule, t, x):
    return jnp.asarray(schedule.alphas_cumprod, x.dtype)[t]


# ------------------------------------------------------------------------------------- forward, training


def q_sample(schedule: Schedule, x0, noise, t):
    """The forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (diffusers' ``add_noise``).

    Args:
      schedule: a :class:`Schedule`.
      x0: ``[B, ...]`` clean data (floating).
      noise: ``[B, ...]`` standard normal noise, the shape of ``x0``.
      t: ``[B]`` (or scalar) integer timesteps in ``[0, T)``.

    Returns:
      ``x_t``, ``[B, ...]`` in ``x0``'s dtype.

    >>> import jax.numpy as jnp
    >>> s = make_schedule("linear", 4, beta_start=0.1, beta_end=0.4)
    >>> x_t = q_sample(s, jnp.ones((2, 1)), jnp.zeros((2, 1)), jnp.array([0, 3]))  # sqrt(0.9), sqrt(0.3024)
    >>> [round(float(v), 5) for v in x_t[:, 0]]
    [0.94868, 0.54991]
    """
    x0 = _floating("x0", x0)
    noise = jnp.asarray(noise, x0.dtype)
    if noise.shape != x0.shape:
        raise UserError(f"noise must have the shape of x0 {x0.shape}, got {noise.shape}.")
    abar = _per_example(_abar(schedule, _timestep_array(t, x0.shape[0]), x0), x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise


def training_target(schedule: Schedule, x0, noise, t, prediction_type: str = "epsilon"):
    """What the model learns to predict from ``x_t = q_sample(schedule, x0, noise, t)``.

    ``"epsilon"``: ``noise``; ``"sample"``: ``x0``; ``"v_prediction"``: ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0``
    (diffusers' ``get_velocity``).

    Args:
      schedule: a :class:`Schedule`.
      x0, noise: ``[B, ...]``.
      t: ``[B]`` (or scalar) integer timesteps.
      prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.

    Returns:
      ``[B, ...]`` target in ``x0``'s dtype.

    >>> import jax.numpy as jnp
    >>> s = make_schedule("linear", 4, beta_start=0.1, beta_end=0.4)
    >>> v = training_target(s, jnp.ones((1, 1)), jnp.zeros((1, 1)), 0, "v_prediction")  # -sqrt(0.1)
    >>> round(float(v[0, 0]), 5)
    -0.31623
    """
    prediction_type = _choice("prediction_type", prediction_type, PREDICTION_TYPES)
    x0 = _floating("x0", x0)
    noise = jnp.asarray(noise, x0.dtype)
    if noise.shape != x0.shape:
        raise UserError(f"noise must have the shape of x0 {x0.shape}, got {noise.shape}.")
    t = _timestep_array(t, x0.shape[0])
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    abar = _per_example(_abar(schedule, t, x0), x0)
    return jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0


def _x0_and_eps(prediction_type, x_t, out, sqrt_abar, sqrt_one_minus):
    """(x0_hat, eps_hat) from the model output, as diffusers' DDIM step derives them (before any clipping)."""
    if prediction_type == "epsilon":
        return (x_t - sqrt_one_minus * out) / sqrt_abar, out
    if prediction_type == "sample":
        return out, (x_t - sqrt_abar * out) / sqrt_one_minus
    return sqrt_abar * x_t - sqrt_one_minus * out, sqrt_abar * out + sqrt_one_minus * x_t


def predicted_x0(schedule: Schedule, x_t, t, model_output, prediction_type: str = "epsilon"):
    """The clean sample implied by a model output at ``x_t`` (the samplers' ``pred_original_sample``).

    ``"epsilon"``: ``(x_t - sqrt(1 - abar_t) m) / sqrt(abar_t)``; ``"sample"``: ``m``; ``"v_prediction"``:
    ``sqrt(abar_t) x_t - sqrt(1 - abar_t) m``. It inverts :func:`training_target`: the target of ``x0`` gives back
    ``x0``.

    Args:
      schedule: a :class:`Schedule`.
      x_t: ``[B, ...]`` noisy sample.
      t: ``[B]`` (or scalar) integer timesteps.
      model_output: ``[B, ...]``.
      prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.

    Returns:
      ``[B, ...]``.

    >>> import jax.numpy as jnp
    >>> s = make_schedule("linear", 4, beta_start=0.1, beta_end=0.4)
    >>> x0, noise, t = jnp.ones((1, 2)), jnp.full((1, 2), 0.5), jnp.array([2])
    >>> x_t = q_sample(s, x0, noise, t)
    >>> predicted_x0(s, x_t, t, training_target(s, x0, noise, t, "v_prediction"), "v_prediction")
    Array([[1., 1.]], dtype=float32)
    """
    prediction_type = _choice("prediction_type", prediction_type, PREDICTION_TYPES)
    x_t = _floating("x_t", x_t)
    model_output = jnp.asarray(model_output, x_t.dtype)
    if model_output.shape != x_t.shape:
        raise UserError(f"model_output must have the shape of x_t {x_t.shape}, got {model_output.shape}.")
    abar = _per_example(_abar(schedule, _timestep_array(t, x_t.shape[0]), x_t), x_t)
    return _x0_and_eps(prediction_type, x_t, model_output, jnp.sqrt(abar), jnp.sqrt(1 - abar))[0]


def snr(schedule: Schedule, t):
    """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` at integer timesteps ``t`` (any shape).

    >>> s = make_schedule("linear", 4, beta_start=0.1, beta_end=0.4)
    >>> round(float(snr(s, 0)), 4)  # 0.9 / 0.1
    9.0
    """
    abar = jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(t)]
    return abar / (1 - abar)


def loss_weight(schedule: Schedule, t, prediction_type: str = "epsilon", snr_gamma: float | None = None):
    """Per-example loss weights: 1 (``snr_gamma=None``), or min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion
    Training via Min-SNR Weighting Strategy"), which weights every prediction type as the clipped-SNR ``x0`` loss:

    ``epsilon``: ``min(SNR, gamma) / SNR``; ``v_prediction``: ``min(SNR, gamma) / (SNR + 1)``; ``sample``:
    ``min(SNR, gamma)``; ``SNR = abar_t / (1 - abar_t)``. ``gamma = 5`` is the paper's choice.

    Args:
      schedule: a :class:`Schedule`.
      t: ``[B]`` integer timesteps.
      prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
      snr_gamma: ``gamma > 0``, or ``None`` for uniform weights.

    Returns:
      ``[B]`` weights in the schedule's dtype.

    >>> s = make_schedule("linear", 4, beta_start=0.1, beta_end=0.4)
    >>> w = loss_weight(s, jnp.array([0, 3]), "epsilon", snr_gamma=1.0)  # SNR 9 -> 1/9; SNR 0.43 -> 1
    >>> [round(float(v), 5) for v in w]
    [0.11111, 1.0]
    """
    prediction_type = _choice("prediction_type", prediction_type, PREDICTION_TYPES)
    ratio = snr(schedule, t)
    if snr_gamma is None:
        return jnp.ones_like(ratio)
    gamma = _float("snr_gamma", snr_gamma, 0.0, low_open=True)
    clipped = jnp.minimum(ratio, gamma)
    if prediction_type == "epsilon":
        return clipped / ratio
    if prediction_type == "v_prediction":
        return clipped / (ratio + 1)
    return clipped


def diffusion_loss(
    schedule: Schedule,
    model_output,
    x0,
    noise,
    t,
    *,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
):
    """Weighted mean squared error per example: ``loss_weight(t) * mean((model_output - target)**2)`` over the
    non-batch axes, with ``target = training_target(schedule, x0, noise, t, prediction_type)``.

    The model output is that of ``x_t = q_sample(schedule, x0, noise, t)``. Average the result (or weight it with a
    mask) for the batch loss.

    Args:
      schedule: a :class:`Schedule`.
      model_output: ``[B, ...]``, the model's prediction at ``(x_t, t)``.
      x0, noise: ``[B, ...]``.
      t: ``[B]`` integer timesteps.
      prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
      snr_gamma: min-SNR-gamma weighting, ``None`` for uniform (see :func:`loss_weight`).

    Returns:
      ``[B]`` per-example losses (float32 or wider).

    >>> import jax, jax.numpy as jnp
    >>> s = make_schedule("linear", 1000)
    >>> x0, noise = jnp.ones((2, 3)), jnp.zeros((2, 3))
    >>> t = jnp.array([10, 500])
    >>> x_t = q_sample(s, x0, noise, t)  # a model sees (x_t, t); a perfect one returns the noise
    >>> diffusion_loss(s, noise, x0, noise, t, snr_gamma=5.0)
    Array([0., 0.], dtype=float32)
    >>> diffusion_loss(s, noise + 1.0, x0, noise, t)  # uniform weights: mean squared error 1
    Array([1., 1.], dtype=float32)
    """
    x0 = _floating("x0", x0)
    dtype = jnp.promote_types(x0.dtype, jnp.float32)
    x0 = x0.astype(dtype)
    t = _timestep_array(t, x0.shape[0])
    model_output = jnp.asarray(model_output, dtype)
    if model_output.shape != x0.shape:
        raise UserError(f"model_output must have the shape of x0 {x0.shape}, got {model_output.shape}.")
    target = training_target(schedule, x0, noise, t, prediction_type)
    mse = jnp.mean(jnp.reshape((model_output - target) ** 2, (x0.shape[0], -1)), axis=-1)
    weight = jnp.broadcast_to(loss_weight(schedule, t, prediction_type, snr_gamma), mse.shape)
    return weight.astype(dtype) * mse


# --------------------------------------------------------------------------------------------- options

_ANY = object()  # a diffusers option accepted with any value (it only matters for a feature mmjax refuses)

_SCHEDULE_DEFAULTS = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon"}

# Each sampler's options, with diffusers' default for each (note the different timestep_spacing defaults).
_DEFAULTS = {
    "ddpm": {
        **_SCHEDULE_DEFAULTS,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "rng": None,
    },
    "ddim": {
        **_SCHEDULE_DEFAULTS,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "eta": 0.0,
        "use_clipped_model_output": False,
        "rng": None,
    },
    "dpm_solver++": {
        **_SCHEDULE_DEFAULTS,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "solver_order": 2,
        "lower_order_final": True,
        "euler_at_final": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "rng": None,
    },
}

# diffusers options that mmjax accepts only at one value (diffusers' default), or with any value (_ANY).
_COMMON_FIXED = {
    "thresholding": False,
    "dynamic_thresholding_ratio": _ANY,
    "sample_max_value": _ANY,
    "rescale_betas_zero_snr": False,
    "trained_betas": None,
}
_FIXED = {
    "ddpm": {**_COMMON_FIXED, "variance_type": "fixed_small"},
    "ddim": dict(_COMMON_FIXED),
    "dpm_solver++": {
        **_COMMON_FIXED,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "variance_type": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": _ANY,
        "use_dynamic_shifting": False,
        "time_shift_type": _ANY,
    },
}


def _resolve(sampler, num_steps, num_train_timesteps, options):
    """Validated options of ``sampler``: diffusers' defaults for those not given."""
    sampler = _choice("sampler", sampler, SAMPLERS, " Pass sampler='ddpm', 'ddim' or 'dpm_solver++'.")
    T = _int("num_train_timesteps", num_train_timesteps, 1)
    _int("num_steps", num_steps, 1, T, " Use at most num_train_timesteps denoising steps (often 20 to 50).")
    defaults, fixed = _DEFAULTS[sampler], _FIXED[sampler]
    for name, value in options.items():
        if name in defaults:
            continue
        if name in fixed:
            allowed = fixed[name]
            if allowed is not _ANY and not (value is allowed or (allowed is not None and value == allowed)):
                raise UserError(
                    f"{name}={value!r} is not supported by the {sampler!r} sampler: only {name}={allowed!r} "
                    f"(diffusers' default) is implemented; drop the option or set it to {allowed!r}."
                )
            continue
        known = sorted(defaults)
        close = difflib.get_close_matches(name, known + sorted(fixed), n=3, cutoff=0.6)
        elsewhere = [s for s in SAMPLERS if s != sampler and name in _DEFAULTS[s]]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        if elsewhere:
            hint += f" {name!r} is an option of sampler={elsewhere[0]!r}."
        raise UserError(f"{name!r} is not an option of sampler={sampler!r}.{hint} Its options are: {', '.join(known)}.")
    opts = {**defaults, **{k: v for k, v in options.items() if k in defaults}}
    _choice("beta_schedule", opts["beta_schedule"], BETA_SCHEDULES)
    _choice("prediction_type", opts["prediction_type"], PREDICTION_TYPES)
    _choice("timestep_spacing", opts["timestep_spacing"], TIMESTEP_SPACINGS)
    _int("steps_offset", opts["steps_offset"], 0)
    for name in ("clip_sample", "set_alpha_to_one", "use_clipped_model_output", "lower_order_final", "euler_at_final"):
        if name in opts:
            _bool(name, opts[name])
    if "clip_sample_range" in opts:
        opts["clip_sample_range"] = _float("clip_sample_range", opts["clip_sample_range"], 0.0, low_open=True)
    if "eta" in opts:
        opts["eta"] = _float("eta", opts["eta"], 0.0, fix=" Use 0 for deterministic DDIM, 1 for DDPM-like noise.")
    if "solver_order" in opts and (
        isinstance(opts["solver_order"], (bool, np.bool_)) or opts["solver_order"] not in (1, 2)
    ):
        raise UserError(
            f"solver_order={opts['solver_order']!r} is not supported; expected 1 or 2 (DPM-Solver++ 2M is order 2)."
        )
    if "final_sigmas_type" in opts:
        _choice("final_sigmas_type", opts["final_sigmas_type"], ("zero", "sigma_min"))
    if "lambda_min_clipped" in opts:  # a number; -inf (the default) clips nothing
        opts["lambda_min_clipped"] = _float("lambda_min_clipped", opts["lambda_min_clipped"])
    return sampler, opts


def default_options(sampler: str) -> dict:
    """The options :func:`sample` takes for ``sampler``, each with its default (the diffusers scheduler's default;
    ``rng`` is mmjax's, ``eta`` and ``use_clipped_model_output`` are ``DDIMScheduler.step``'s).

    >>> opts = default_options("dpm_solver++")
    >>> opts["timestep_spacing"], opts["solver_order"], default_options("ddim")["timestep_spacing"]
    ('linspace', 2, 'leading')
    """
    return dict(_DEFAULTS[_choice("sampler", sampler, SAMPLERS)])


# -------------------------------------------------------------------------------------------- timesteps


def _spaced(spacing, num_steps, T, last, offset, extra):
    """diffusers' spacing formulas. ``extra=1``: over ``num_steps + 1`` points with the last dropped (DPM-Solver);
    ``last``: the largest usable timestep + 1 (``T`` unless DPM-Solver's ``lambda_min_clipped`` cuts it)."""
    n = num_steps + extra
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(n) * (last // n)).round()[::-1] + offset
    else:
        # np.arange can return one point too many (T / num_steps rounded down); diffusers keeps that point, which
        # rounds to timestep -1; the first num_steps are the trailing spacing.
        ts = np.round(np.arange(last, 0, -T / num_steps))[:num_steps] - 1
        extra = 0
    ts = ts.astype(np.int64)
    return ts[: len(ts) - extra] if extra else ts


def _check_timesteps(ts, sampler, num_steps, T, opts):
    bad = len(ts) == 0 or ts.min() < 0 or ts.max() > T - 1 or np.any(np.diff(ts) >= 0)
    if bad:
        raise UserError(
            f"num_steps={num_steps} with timestep_spacing={opts['timestep_spacing']!r} and "
            f"steps_offset={opts['steps_offset']} gives the timesteps {ts.tolist()[:8]}{'...' if len(ts) > 8 else ''}"
            f" for sampler={sampler!r}, which are not distinct decreasing integers in [0, {T - 1}]; use fewer steps, "
            "a smaller steps_offset or another timestep_spacing."
        )
    return ts


def _dpm_lambda_np(alphas_cumprod):
    return np.log(np.sqrt(alphas_cumprod)) - np.log(np.sqrt(1 - alphas_cumprod))


def _timesteps(sampler, num_steps, T, opts, alphas_cumprod):
    if sampler == "dpm_solver++":
        clipped = np.searchsorted(np.flip(_dpm_lambda_np(alphas_cumprod)), opts["lambda_min_clipped"])
        ts = _spaced(opts["timestep_spacing"], num_steps, T, T - int(clipped), opts["steps_offset"], 1)
    else:
        ts = _spaced(opts["timestep_spacing"], num_steps, T, T, opts["steps_offset"], 0)
    return _check_timesteps(ts, sampler, num_steps, T, opts)


def inference_timesteps(sampler: str, num_steps: int, num_train_timesteps: int = 1000, **options) -> np.ndarray:
    """The decreasing integer timesteps ``sample`` visits, as the diffusers scheduler's ``set_timesteps`` gives them.

    Spacings (``timestep_spacing``; ``T`` training steps, ``N = num_steps``):

    * ``ddpm``, ``ddim`` (default ``"leading"``): ``leading``: ``k * (T // N) + steps_offset``; ``trailing``:
      ``round(T - k T / N) - 1``; ``linspace``: ``round(linspace(0, T - 1, N))``, reversed.
    * ``dpm_solver++`` (default ``"linspace"``): the same over ``N + 1`` points with the last (smallest) dropped:
      ``round(linspace(0, L - 1, N + 1))``, ``k * (L // (N + 1)) + steps_offset``; ``trailing`` as above from ``L``;
      ``L = T`` unless ``lambda_min_clipped`` removes the last timesteps.

    Args:
      sampler: ``"ddpm"``, ``"ddim"`` or ``"dpm_solver++"``.
      num_steps: ``N``, in ``[1, T]``.
      num_train_timesteps: ``T``.
      **options: the sampler's options (see :func:`sample`).

    Returns:
      ``int64 [N]`` NumPy array, decreasing (fewer than ``N`` only where DPM-Solver's ``lambda_min_clipped`` cuts
      the range of ``"trailing"``).

    >>> inference_timesteps("ddim", 5)
    array([800, 600, 400, 200,   0])
    >>> inference_timesteps("ddim", 5, timestep_spacing="trailing")
    array([999, 799, 599, 399, 199])
    >>> inference_timesteps("dpm_solver++", 5)
    array([999, 799, 599, 400, 200])
    """
    sampler, opts = _resolve(sampler, num_steps, num_train_timesteps, options)
    betas = _betas_np(opts["beta_schedule"], num_train_timesteps, opts["beta_start"], opts["beta_end"])
    return _timesteps(sampler, num_steps, num_train_timesteps, opts, _alphas_cumprod_np(betas))


# ---------------------------------------------------------------------------------------------- samplers


# Every sampler step is one linear update, with per-step coefficients computed on the host (float64 NumPy):
#
#   x0  = clip(px * x + pm * m, -r, r)                 m = denoise_fn(x, t): the model output
#   eps = ex * x + em * m + e0 * x0                    the noise it implies (DDIM)
#   x'  = cx * x + c0 * x0 + ce * eps + cm * x0_prev + std * z
#
# so one compiled program serves every sampler, prediction type and option (only `stochastic` changes it).


def _prediction_coefs(prediction_type, sqrt_abar, sqrt_one_minus):
    """(px, pm, ex, em): ``x0_hat = px x + pm m`` and ``eps_hat = ex x + em m`` for each prediction type."""
    sa, s1 = sqrt_abar, sqrt_one_minus
    zero, one = np.zeros_like(sa), np.ones_like(sa)
    if prediction_type == "epsilon":  # x0 = (x - s1 m) / sa, eps = m
        return one / sa, -s1 / sa, zero, one
    if prediction_type == "sample":  # x0 = m, eps = (x - sa m) / s1
        return zero, one, one / s1, -sa / s1
    return sa, -s1, s1, sa  # v: x0 = sa x - s1 m, eps = sa m + s1 x


def _plan(sampler, ts, abar, opts, num_steps, T):
    """The per-step coefficients (``[N]`` float64 arrays, see above) of ``sampler`` at timesteps ``ts``."""
    n = len(ts)
    zero = np.zeros(n)
    plan = dict.fromkeys(("e0", "cx", "c0", "ce", "cm", "std"), zero)
    if sampler == "dpm_solver++":
        ve = np.sqrt((1.0 - abar) / abar)  # diffusers' sigmas (the variance-exploding form)
        last = ve[0] if opts["final_sigmas_type"] == "sigma_min" else 0.0
        s = np.concatenate([np.interp(ts, np.arange(len(abar)), ve), [last]])
        alpha = 1.0 / np.sqrt(s**2 + 1.0)
        sigma = s * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf at a final sigma of 0
        lower_final = (
            opts["euler_at_final"] or (opts["lower_order_final"] and n < 15) or opts["final_sigmas_type"] == "zero"
        )
        cx, c0, cm = np.zeros(n), np.zeros(n), np.zeros(n)
        for i in range(n):
            h = lam[i + 1] - lam[i]
            cx[i] = sigma[i + 1] / sigma[i]
            b = -alpha[i + 1] * np.expm1(-h)  # alpha_{i+1} (1 - e^-h)
            if opts["solver_order"] == 2 and i >= 1 and not (i == n - 1 and lower_final):
                inv_r = h / (lam[i] - lam[i - 1])  # 1 / r0
                c0[i], cm[i] = b * (1.0 + 0.5 * inv_r), -0.5 * b * inv_r
            else:
                c0[i] = b
        px, pm, _, _ = _prediction_coefs(opts["prediction_type"], alpha[:n], sigma[:n])
        return {**plan, "px": px, "pm": pm, "ex": zero, "em": zero, "cx": cx, "c0": c0, "cm": cm, "clip": np.inf}

    a = abar[ts]
    sa, s1 = np.sqrt(a), np.sqrt(1.0 - a)
    px, pm, ex, em = _prediction_coefs(opts["prediction_type"], sa, s1)
    plan.update(px=px, pm=pm, ex=ex, em=em, clip=opts["clip_sample_range"] if opts["clip_sample"] else np.inf)
    if sampler == "ddpm":
        a_prev = np.concatenate([abar[ts[1:]], [1.0]])
        beta = 1.0 - a / a_prev
        variance = np.maximum((1.0 - a_prev) / (1.0 - a) * beta, _DDPM_MIN_VARIANCE)
        plan.update(
            c0=np.sqrt(a_prev) * beta / (1.0 - a),
            cx=np.sqrt(a / a_prev) * (1.0 - a_prev) / (1.0 - a),
            std=np.where(ts > 0, np.sqrt(variance), 0.0),  # no noise at t = 0
        )
        return plan
    prev = ts - T // num_steps  # diffusers' DDIM steps back by T // N whatever the spacing
    final = 1.0 if opts["set_alpha_to_one"] else abar[0]
    a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
    std = opts["eta"] * np.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
    direction = 1.0 - a_prev - std**2
    if np.any(direction < 0):
        if opts["eta"] > 1.0:
            raise UserError(
                f"eta={opts['eta']!r} makes the DDIM noise variance exceed 1 - abar_prev (a negative square root); "
                "use eta in [0, 1] (0: deterministic DDIM, 1: DDPM-like)."
            )
        direction = np.maximum(direction, 0.0)  # round-off at eta = 1
    if opts["use_clipped_model_output"]:  # eps from the clipped x0: (x - sa x0) / s1
        plan.update(ex=1.0 / s1, em=zero, e0=-sa / s1)
    plan.update(c0=np.sqrt(a_prev), ce=np.sqrt(direction), std=std)
    return plan


class _Static:
    """Hashable holder of the denoiser for ``jit``'s static arguments (by the function's own hash, else by id), so
    repeated calls with the same function reuse the compiled program."""

    def __init__(self, fn):
        self.fn = fn
        try:
            self._key = ("hash", hash(fn))
        except TypeError:
            self._key = ("id", id(fn))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        if not isinstance(other, _Static):
            return NotImplemented
        if self._key[0] == "id" or other._key[0] == "id":
            return self.fn is other.fn
        return self._key == other._key and self.fn == other.fn


def _call(denoise, x, t):
    out = denoise.fn(x, jnp.full((x.shape[0],), t, jnp.int32))
    if jnp.shape(out) != x.shape:
        raise UserError(f"denoise_fn(x_t, t) must return the shape of x_t {x.shape}, got {jnp.shape(out)}.")
    return jnp.asarray(out).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("denoise", "stochastic"))
def _run(denoise, x, plan, rng, *, stochastic):
    """One program: ``lax.scan`` over the steps, step ``i`` reading its coefficients from ``plan`` (``[N]`` arrays)."""
    clip, steps = plan["clip"], {k: v for k, v in plan.items() if k != "clip"}

    def step(carry, xs):
        x_t, x0_prev = carry
        i, p = xs
        m = _call(denoise, x_t, p["t"])
        x0 = jnp.clip(p["px"] * x_t + p["pm"] * m, -clip, clip)
        eps = p["ex"] * x_t + p["em"] * m + p["e0"] * x0
        x_next = p["cx"] * x_t + p["c0"] * x0 + p["ce"] * eps + p["cm"] * x0_prev
        if stochastic:
            x_next = x_next + p["std"] * jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
        return (x_next, x0), None

    (x, _), _ = lax.scan(step, (x, jnp.zeros_like(x)), (jnp.arange(steps["t"].shape[0]), steps))
    return x


def sample(denoise_fn, noise, *, sampler: str, num_steps: int, num_train_timesteps: int = 1000, **options):
    """Draw samples by running ``sampler`` for ``num_steps`` steps from ``noise``, as a diffusers scheduler loop does.

    The whole loop is one jitted ``lax.scan``; the schedule, timesteps and per-step coefficients are computed once
    in float64 on the host and cast to ``noise.dtype``. It works inside ``jax.jit`` (``denoise_fn`` closed over, the
    options static). ``denoise_fn`` is a static argument of the compiled loop: calling again with the same function
    (and shapes and options of the same kind) reuses the compiled program.

    Args:
      denoise_fn: ``denoise_fn(x_t, t) -> model_output``, ``x_t: [B, ...]`` in ``noise.dtype``, ``t: int32 [B]``
        (the same timestep for every example); returns ``[B, ...]`` (noise, ``v`` or ``x0``, per
        ``prediction_type``).
      noise: ``[B, ...]`` standard normal starting sample ``x_T`` (floating; sets the dtype of the computation).
      sampler: ``"ddpm"``, ``"ddim"`` or ``"dpm_solver++"``.
      num_steps: number of denoising steps (model calls), in ``[1, num_train_timesteps]``.
      num_train_timesteps: ``T`` of the schedule the model was trained with.
      **options: named as in diffusers, each defaulting to that scheduler's default:

        * all: ``beta_schedule`` (``"linear"``), ``beta_start`` (0.0001), ``beta_end`` (0.02), ``prediction_type``
          (``"epsilon"``), ``timestep_spacing`` (``"leading"`` for ddpm and ddim, ``"linspace"`` for
          dpm_solver++), ``steps_offset`` (0; only ``"leading"`` uses it), ``rng`` (a ``jax.random`` key).
        * ddpm: ``clip_sample`` (True), ``clip_sample_range`` (1.0). Always stochastic: needs ``rng``.
        * ddim: ``clip_sample`` (True), ``clip_sample_range`` (1.0), ``set_alpha_to_one`` (True), ``eta`` (0.0;
          ``> 0`` needs ``rng``), ``use_clipped_model_output`` (False).
        * dpm_solver++: ``solver_order`` (2; 1 or 2), ``lower_order_final`` (True), ``euler_at_final`` (False),
          ``final_sigmas_type`` (``"zero"`` or ``"sigma_min"``), ``lambda_min_clipped`` (-inf).

        diffusers options for features not implemented here (``thresholding``, ``use_karras_sigmas``,
        ``algorithm_type`` other than ``"dpmsolver++"``, ``variance_type`` other than ``"fixed_small"``, ...) are
        accepted only at their default value.

    Returns:
      ``[B, ...]`` the final sample ``x_0``, in ``noise.dtype``.

    Raises:
      UserError (a ``ValueError``): an unknown sampler or option, a value out of range, or a stochastic sampler
      without ``rng``.

    >>> import jax, jax.numpy as jnp
    >>> noise = jax.random.normal(jax.random.key(0), (2, 3))
    >>> x = sample(lambda x_t, t: jnp.zeros_like(x_t), noise, sampler="ddpm", num_steps=4, rng=jax.random.key(1))
    >>> x.shape
    (2, 3)
    >>> sample(lambda x_t, t: x_t, noise, sampler="ddim", num_steps=10, etta=0.5)
    Traceback (most recent call last):
    ...
    mmjax.errors.UserError: 'etta' is not an option of sampler='ddim'. Did you mean eta? Its options are: beta_end, beta_schedule, beta_start, clip_sample, clip_sample_range, eta, prediction_type, rng, set_alpha_to_one, steps_offset, timestep_spacing, use_clipped_model_output.
    """
    sampler, opts = _resolve(sampler, num_steps, num_train_timesteps, options)
    x = _floating("noise", noise)
    T = num_train_timesteps
    stochastic = sampler == "ddpm" or (sampler == "ddim" and opts["eta"] > 0)
    rng = opts["rng"]
    if stochastic and rng is None:
        why = "ddpm adds noise at every step" if sampler == "ddpm" else f"eta={opts['eta']!r} > 0 adds noise"
        raise UserError(
            f"sampler={sampler!r} is stochastic ({why}) but rng=None; pass rng=jax.random.key(seed)"
            + (" or eta=0.0 for deterministic DDIM." if sampler == "ddim" else ".")
        )
    betas = _betas_np(opts["beta_schedule"], T, opts["beta_start"], opts["beta_end"])
    abar = _alphas_cumprod_np(betas)
    ts = _timesteps(sampler, num_steps, T, opts, abar)
    plan = {k: np.asarray(v, x.dtype) for k, v in _plan(sampler, ts, abar, opts, num_steps, T).items()}
    plan["t"] = ts.astype(np.int32)
    return _run(_Static(denoise_fn), x, plan, rng if stochastic else None, stochastic=stochastic)


# ------------------------------------------------------------------------------------ classifier-free guidance


def guided_denoise_fn(model_fn, cond, null_cond, guidance_scale):
    """Classifier-free guidance: a ``denoise_fn(x_t, t)`` that runs the conditional and the null halves as ONE
    doubled batch and returns ``uncond + guidance_scale * (cond - uncond)``.

    ``guidance_scale = 1`` is the conditional model, ``0`` the unconditional one; diffusion pipelines use 3 to 10.

    Args:
      model_fn: ``model_fn(x: [2B, ...], t: [2B], cond: pytree of [2B, ...]) -> [2B, ...]``.
      cond: pytree of ``[B, ...]`` arrays, the conditioning of each example.
      null_cond: pytree of the structure of ``cond`` (the "empty" conditioning), each leaf broadcastable to the
        matching ``cond`` leaf (e.g. one ``[1, ...]`` null embedding for the whole batch).
      guidance_scale: scalar ``s`` (a float or a traced scalar).

    Returns:
      ``denoise_fn(x_t: [B, ...], t: [B] or scalar) -> [B, ...]``, for :func:`sample`.

    >>> import jax.numpy as jnp
    >>> model = lambda x, t, c: x * c  # conditioning scales the input
    >>> fn = guided_denoise_fn(model, jnp.full((2, 1), 3.0), jnp.ones((1, 1)), guidance_scale=2.0)
    >>> fn(jnp.ones((2, 1)), jnp.array([5, 5]))[:, 0]  # 1 + 2 * (3 - 1)
    Array([5., 5.], dtype=float32)
    """
    cond_leaves, cond_tree = jax.tree.flatten(cond)
    null_leaves, null_tree = jax.tree.flatten(null_cond)
    if cond_tree != null_tree:
        raise UserError(
            f"null_cond must have the structure of cond: {cond_tree} vs {null_tree}; pass a null value per leaf."
        )

    def denoise_fn(x_t, t):
        b = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        doubled = []
        for c, n in zip(cond_leaves, null_leaves):
            c = jnp.asarray(c)
            if c.ndim < 1 or c.shape[0] != b:
                raise UserError(f"each cond leaf must have the batch size {b} of x_t on axis 0, got shape {c.shape}.")
            try:
                n = jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)
            except ValueError:
                raise UserError(
                    f"a null_cond leaf of shape {jnp.shape(n)} does not broadcast to its cond leaf {c.shape}."
                ) from None
            doubled.append(jnp.concatenate([c, n]))
        out = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), jax.tree.unflatten(cond_tree, doubled))
        out_cond, out_null = out[:b], out[b:]
        return out_null + guidance_scale * (out_cond - out_null)

    return denoise_fn
