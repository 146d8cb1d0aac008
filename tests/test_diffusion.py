"""mmjax.diffusion by its closed forms (float64 NumPy oracles, no diffusers): schedules, the forward process, the
training targets and their inverses, min-SNR weights, exact landing of the samplers with a perfect denoiser, the
documented noise of the stochastic samplers, classifier-free guidance, jit, and the errors on bad input.

diffusers parity (timesteps, trajectories) is in tests/parity/test_diffusion_diffusers.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import diffusion
from mmjax.diffusion import (
    default_options,
    diffusion_loss,
    guided_denoise_fn,
    inference_timesteps,
    loss_weight,
    make_schedule,
    predicted_x0,
    q_sample,
    sample,
    snr,
    training_target,
)
from mmjax.errors import UserError
from tests.tolerances import assert_float64_equal, float64

# ---------------------------------------------------------------------------------------------- schedules


def _oracle_betas(beta_schedule, T, beta_start, beta_end):
    if beta_schedule == "linear":
        return [beta_start + (beta_end - beta_start) * i / (T - 1) for i in range(T)]
    root_start, root_end = math.sqrt(beta_start), math.sqrt(beta_end)
    return [(root_start + (root_end - root_start) * i / (T - 1)) ** 2 for i in range(T)]


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("T,beta_start,beta_end", [(1000, 0.0001, 0.02), (10, 0.00085, 0.012)])
def test_linear_schedules_match_the_closed_form(beta_schedule, T, beta_start, beta_end):
    with float64():
        s = make_schedule(beta_schedule, T, beta_start, beta_end)
    betas = _oracle_betas(beta_schedule, T, beta_start, beta_end)
    abar = [math.prod(1.0 - b for b in betas[: t + 1]) for t in range(T)]
    assert s.betas.dtype == jnp.float64 and s.alphas_cumprod.shape == (T,)
    assert_float64_equal(s.betas, np.array(betas))
    assert_float64_equal(s.alphas, 1.0 - np.array(betas))
    assert_float64_equal(s.alphas_cumprod, np.array(abar))


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_schedule_telescopes_to_f_ratio_until_the_cap(T):
    with float64():
        s = make_schedule("squaredcos_cap_v2", T)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    betas, abar = np.asarray(s.betas), np.asarray(s.alphas_cumprod)
    capped = np.flatnonzero(betas == 0.999)
    assert capped.size >= 1 and capped[-1] == T - 1 and np.all(np.diff(capped) == 1)  # a suffix, the last beta too
    first = capped[0]
    assert np.all(betas[:first] < 0.999)
    # Without the cap, prod_{s<=t} f((s+1)/T) / f(s/T) = f((t+1)/T) / f(0).
    assert_float64_equal(abar[:first], np.array([f((t + 1) / T) / f(0.0) for t in range(first)]))
    assert_float64_equal(abar[first:], abar[first - 1] * 0.001 ** np.arange(1, T - first + 1), scale=abar[first - 1])


def test_schedule_dtype_follows_jax_default():
    assert make_schedule().alphas_cumprod.dtype == jnp.float32
    with float64():
        assert make_schedule().alphas_cumprod.dtype == jnp.float64
        assert make_schedule(dtype=jnp.float32).betas.dtype == jnp.float32
    flat, _ = jax.tree.flatten(make_schedule("linear", 8))  # a pytree: can be passed into jit
    assert len(flat) == 3


# ---------------------------------------------------------------------------------------- forward, targets


def _data(seed=0, shape=(5, 3, 2)):
    r = np.random.default_rng(seed)
    return r.uniform(-1, 1, size=shape), r.normal(size=shape), r.integers(0, 1000, size=shape[0])


def test_q_sample_is_the_closed_form_and_has_its_mean_and_variance():
    x0, noise, t = _data()
    with float64():
        s = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
        abar = np.asarray(s.alphas_cumprod)[t][:, None, None]
        assert_float64_equal(q_sample(s, x0, noise, t), np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise)
        scalar = q_sample(s, x0, noise, 7)
        a7 = float(s.alphas_cumprod[7])
        assert_float64_equal(scalar, math.sqrt(a7) * x0 + math.sqrt(1 - a7) * noise)

        # Statistics over many noise draws: mean sqrt(abar) x0, variance 1 - abar.
        M, point = 40000, np.array([0.7, -0.4])
        draws = jax.random.normal(jax.random.key(0), (M, 2), jnp.float64)
        for t_value in (0, 300, 999):
            x_t = np.asarray(q_sample(s, np.broadcast_to(point, (M, 2)), draws, np.full(M, t_value)))
            a = float(s.alphas_cumprod[t_value])
            var = 1 - a
            # 6 standard errors: mean error sd = sqrt(var / M), sample-variance error sd = var sqrt(2 / M).
            np.testing.assert_allclose(x_t.mean(0), math.sqrt(a) * point, atol=6 * math.sqrt(var / M))
            np.testing.assert_allclose(x_t.var(0), var, atol=6 * var * math.sqrt(2 / M))


@pytest.mark.parametrize("prediction_type", diffusion.PREDICTION_TYPES)
def test_targets_invert_to_x0(prediction_type):
    x0, noise, t = _data(1)
    with float64():
        s = make_schedule("linear", 1000)
        abar = np.asarray(s.alphas_cumprod)[t][:, None, None]
        target = training_target(s, x0, noise, t, prediction_type)
        oracle = {"epsilon": noise, "sample": x0, "v_prediction": np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0}
        assert_float64_equal(target, oracle[prediction_type])
        x_t = q_sample(s, x0, noise, t)
        assert_float64_equal(predicted_x0(s, x_t, t, target, prediction_type), x0)


def test_min_snr_weights_and_loss():
    t = np.array([0, 10, 100, 400, 999])
    with float64():
        s = make_schedule("linear", 1000)
        abar = np.asarray(s.alphas_cumprod)[t]
        ratio = abar / (1 - abar)
        assert_float64_equal(snr(s, t), ratio)
        gamma = 5.0
        clipped = np.minimum(ratio, gamma)
        oracle = {"epsilon": clipped / ratio, "v_prediction": clipped / (ratio + 1), "sample": clipped}
        assert ratio.max() > gamma > ratio.min()  # both sides of the clip are tested
        for prediction_type, want in oracle.items():
            assert_float64_equal(loss_weight(s, t, prediction_type, snr_gamma=gamma), want)
            np.testing.assert_array_equal(loss_weight(s, t, prediction_type), np.ones(5))

        x0, noise, _ = _data(2)
        output = np.random.default_rng(3).normal(size=x0.shape)
        for prediction_type, weight in oracle.items():
            target = np.asarray(training_target(s, x0, noise, t, prediction_type))
            want = weight * ((output - target) ** 2).reshape(5, -1).mean(-1)
            got = diffusion_loss(s, output, x0, noise, t, prediction_type=prediction_type, snr_gamma=gamma)
            assert got.shape == (5,)
            assert_float64_equal(got, want)
            assert_float64_equal(diffusion_loss(s, target, x0, noise, t, prediction_type=prediction_type), np.zeros(5))


# --------------------------------------------------------------------------------------- perfect denoiser

X0 = np.array([[0.5, -0.25, 0.9], [-0.75, 0.1, 0.0]])  # a "dataset of one point" per example, inside [-1, 1]
_PERFECT = {}  # one function per kind, so that repeated sample() calls reuse the compiled loop


def _exact(x_t, t, x0, abar_all, prediction_type):
    """The exact model output for a dataset of one point x0: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    abar = jnp.asarray(abar_all, x_t.dtype)[t][:, None]
    x0 = jnp.asarray(x0, x_t.dtype)
    eps = (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return jnp.broadcast_to(x0, x_t.shape)
    return jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0


def _perfect(prediction_type, beta_schedule):
    key = (prediction_type, beta_schedule)
    if key not in _PERFECT:
        with float64():
            abar_all = np.asarray(make_schedule(beta_schedule, 1000).alphas_cumprod)
        _PERFECT[key] = lambda x_t, t: _exact(x_t, t, X0, abar_all, prediction_type)
    return _PERFECT[key]


CASES = [
    ("ddim", dict()),
    ("ddim", dict(timestep_spacing="trailing", prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2")),
    ("ddim", dict(timestep_spacing="linspace", prediction_type="sample", beta_schedule="scaled_linear")),
    ("dpm_solver++", dict()),
    ("dpm_solver++", dict(solver_order=1, prediction_type="v_prediction", timestep_spacing="trailing")),
    ("dpm_solver++", dict(prediction_type="sample", beta_schedule="squaredcos_cap_v2", timestep_spacing="leading")),
    ("ddpm", dict(rng=0)),
    ("ddpm", dict(rng=0, timestep_spacing="trailing", prediction_type="v_prediction")),
]


@pytest.mark.parametrize("sampler,options", CASES, ids=lambda c: c if isinstance(c, str) else ",".join(c))
@pytest.mark.parametrize("num_steps", [1, 10])
def test_perfect_denoiser_lands_on_x0(sampler, options, num_steps):
    with float64():
        options = dict(options)
        if "rng" in options:
            options["rng"] = jax.random.key(options["rng"])
        fn = _perfect(options.get("prediction_type", "epsilon"), options.get("beta_schedule", "linear"))
        noise = jax.random.normal(jax.random.key(1), X0.shape, jnp.float64)
        out = sample(fn, noise, sampler=sampler, num_steps=num_steps, **options)
        assert out.dtype == jnp.float64 and out.shape == X0.shape
        # Exact in real arithmetic; float64 round-off stays near 1e-13, and DDPM's last step adds sqrt(1e-20) z
        # (diffusers' variance floor) when it ends at t > 0.
        np.testing.assert_allclose(out, X0, rtol=0, atol=1e-9)


def test_sampling_under_jit_equals_eager():
    fn = _perfect("epsilon", "linear")
    noise = jax.random.normal(jax.random.key(2), X0.shape)
    for sampler, options in [("ddim", dict(eta=0.7)), ("dpm_solver++", dict()), ("ddpm", dict())]:
        run = lambda n, key: sample(fn, n, sampler=sampler, num_steps=6, rng=key, **options)
        eager = run(noise, jax.random.key(3))
        jitted = jax.jit(run)(noise, jax.random.key(3))
        np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6, err_msg=sampler)
        assert eager.dtype == jnp.float32


def test_ddpm_follows_the_posterior_with_the_documented_noise():
    """Two DDPM steps (trailing: t = 999, 499) against the DDPM paper's posterior (eq. 6-7) in NumPy, with the
    noise the module docstring documents: step i draws jax.random.normal(jax.random.fold_in(rng, i), ...)."""
    rng = jax.random.key(4)
    model = lambda x, t: 0.3 * jnp.tanh(x) + 1e-3 * t[:, None]
    with float64():
        s = make_schedule("linear", 1000)
        abar = np.asarray(s.alphas_cumprod)
        noise = np.asarray(jax.random.normal(jax.random.key(5), X0.shape, jnp.float64))
        got = sample(model, noise, sampler="ddpm", num_steps=2, timestep_spacing="trailing", clip_sample=False, rng=rng)
        z = [np.asarray(jax.random.normal(jax.random.fold_in(rng, i), X0.shape, jnp.float64)) for i in range(2)]
    x = noise
    for i, (t, t_prev) in enumerate([(999, 499), (499, -1)]):
        a, a_prev = abar[t], (abar[t_prev] if t_prev >= 0 else 1.0)
        eps = 0.3 * np.tanh(x) + 1e-3 * t
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        beta = 1 - a / a_prev
        mean = np.sqrt(a_prev) * beta / (1 - a) * x0 + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x
        var = max((1 - a_prev) / (1 - a) * beta, 1e-20)
        x = mean + np.sqrt(var) * z[i]
    assert_float64_equal(got, x)
    run = lambda key: sample(model, jnp.asarray(noise, jnp.float32), sampler="ddpm", num_steps=2, rng=key)
    np.testing.assert_array_equal(run(jax.random.key(6)), run(jax.random.key(6)))  # reproducible from rng
    assert np.max(np.abs(np.asarray(run(jax.random.key(6)) - run(jax.random.key(7))))) > 1e-2  # and rng matters


def test_explicit_default_options_are_accepted():
    fn = _perfect("epsilon", "linear")
    noise = jax.random.normal(jax.random.key(7), X0.shape)
    base = sample(fn, noise, sampler="dpm_solver++", num_steps=5)
    same = sample(
        fn,
        noise,
        sampler="dpm_solver++",
        num_steps=5,
        **default_options("dpm_solver++"),
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        use_karras_sigmas=False,
        thresholding=False,
        trained_betas=None,
        dynamic_thresholding_ratio=0.9,  # only used with thresholding: accepted, ignored
    )
    np.testing.assert_array_equal(base, same)
    assert default_options("ddim")["timestep_spacing"] == "leading"
    assert default_options("dpm_solver++")["timestep_spacing"] == "linspace"
    assert inference_timesteps("ddim", 4).tolist() == [750, 500, 250, 0]


# -------------------------------------------------------------------------------- classifier-free guidance


def test_guidance_runs_one_doubled_batch_and_mixes_the_halves():
    calls = []

    def model(x, t, cond):
        calls.append((x.shape, t.shape, cond["scale"].shape))
        return x * cond["scale"] + cond["shift"] + 0.01 * t[:, None]

    x = jnp.arange(6.0).reshape(3, 2)
    t = jnp.array([4, 4, 4])
    cond = {"scale": jnp.array([[2.0], [3.0], [4.0]]), "shift": jnp.ones((3, 2))}
    null = {"scale": jnp.ones((1, 1)), "shift": jnp.zeros(2)}  # broadcast to the batch
    expanded_null = {"scale": jnp.ones((3, 1)), "shift": jnp.zeros((3, 2))}
    c_out = model(x, t, cond)
    u_out = model(x, t, expanded_null)
    calls.clear()
    for scale in (0.0, 1.0, 7.5):
        got = guided_denoise_fn(model, cond, null, scale)(x, t)
        np.testing.assert_allclose(got, u_out + scale * (c_out - u_out), rtol=1e-6)
    assert calls == [((6, 2), (6,), (6, 1))] * 3  # one call per step, on the doubled batch
    np.testing.assert_allclose(guided_denoise_fn(model, cond, null, 1.0)(x, 4), c_out, rtol=1e-6)  # scalar t

    traced = jax.jit(lambda s, x: guided_denoise_fn(model, cond, null, s)(x, t))(3.0, x)
    np.testing.assert_allclose(traced, u_out + 3.0 * (c_out - u_out), rtol=1e-6)
    with pytest.raises(ValueError, match="structure"):
        guided_denoise_fn(model, cond, {"scale": null["scale"]}, 2.0)
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        guided_denoise_fn(model, cond, {"scale": jnp.ones((2, 1)), "shift": null["shift"]}, 2.0)(x, t)


def test_guided_sampling_works_in_sample():
    """The conditioning is the data point: scale 1 lands on the conditional point, 0 on the null one (zero)."""
    abar_all = np.asarray(make_schedule("linear", 1000).alphas_cumprod)
    model = lambda x, t, c: _exact(x, t, c, abar_all, "epsilon")
    noise = jax.random.normal(jax.random.key(8), X0.shape)
    for scale, want in ((1.0, X0), (0.0, np.zeros_like(X0))):
        fn = guided_denoise_fn(model, jnp.asarray(X0, jnp.float32), jnp.zeros((1, 3)), guidance_scale=scale)
        np.testing.assert_allclose(sample(fn, noise, sampler="ddim", num_steps=8), want, atol=1e-4)


# ------------------------------------------------------------------------------------------------- errors

_fn = lambda x, t: x
_noise = np.zeros((1, 2), np.float32)

BAD = {
    "unknown sampler": (lambda: sample(_fn, _noise, sampler="dpm", num_steps=4), ["'dpm'", "dpm_solver++"]),
    "unknown option": (lambda: sample(_fn, _noise, sampler="ddim", num_steps=4, etta=0.0), ["'etta'", "eta"]),
    "option of another sampler": (
        lambda: sample(_fn, _noise, sampler="ddim", num_steps=4, solver_order=2),
        ["'solver_order'", "dpm_solver++"],
    ),
    "misspelt dpm option": (
        lambda: sample(_fn, _noise, sampler="dpm_solver++", num_steps=4, solver_ordr=2),
        ["'solver_ordr'", "solver_order"],
    ),
    "beta_schedule": (
        lambda: sample(_fn, _noise, sampler="ddim", num_steps=4, beta_schedule="cosine"),
        ["'cosine'", "squaredcos_cap_v2"],
    ),
    "prediction_type": (
        lambda: sample(_fn, _noise, sampler="ddim", num_steps=4, prediction_type="v"),
        ["'v'", "v_prediction"],
    ),
    "timestep_spacing": (
        lambda: sample(_fn, _noise, sampler="dpm_solver++", num_steps=4, timestep_spacing="lead"),
        ["'lead'", "'leading'"],
    ),
    "num_steps 0": (lambda: sample(_fn, _noise, sampler="ddim", num_steps=0), ["num_steps=0", "[1, 1000]"]),
    "num_steps > T": (
        lambda: sample(_fn, _noise, sampler="ddim", num_steps=51, num_train_timesteps=50),
        ["num_steps=51", "[1, 50]"],
    ),
    "num_steps float": (lambda: sample(_fn, _noise, sampler="ddim", num_steps=2.5), ["num_steps=2.5", "int"]),
    "eta < 0": (lambda: sample(_fn, _noise, sampler="ddim", num_steps=4, eta=-0.1), ["eta=-0.1", ">= 0"]),
    "eta > 1": (lambda: sample(_fn, _noise, sampler="ddim", num_steps=4, eta=1.5, rng=jax.random.key(0)), ["eta=1.5"]),
    "solver_order 3": (
        lambda: sample(_fn, _noise, sampler="dpm_solver++", num_steps=4, solver_order=3),
        ["solver_order=3", "1 or 2"],
    ),
    "ddpm without rng": (lambda: sample(_fn, _noise, sampler="ddpm", num_steps=4), ["rng=None", "jax.random.key"]),
    "ddim eta without rng": (
        lambda: sample(_fn, _noise, sampler="ddim", num_steps=4, eta=0.5),
        ["rng=None", "eta=0.5"],
    ),
    "thresholding": (
        lambda: sample(_fn, _noise, sampler="ddim", num_steps=4, thresholding=True),
        ["thresholding=True", "not supported"],
    ),
    "karras sigmas": (
        lambda: sample(_fn, _noise, sampler="dpm_solver++", num_steps=4, use_karras_sigmas=True),
        ["use_karras_sigmas=True"],
    ),
    "final_sigmas_type": (
        lambda: sample(_fn, _noise, sampler="dpm_solver++", num_steps=4, final_sigmas_type="min"),
        ["'min'", "sigma_min"],
    ),
    "steps_offset past T": (
        lambda: sample(_fn, _noise, sampler="ddim", num_steps=1000, steps_offset=1),
        ["num_steps=1000", "steps_offset=1", "1000"],
    ),
    "dpm repeated timesteps": (
        lambda: inference_timesteps("dpm_solver++", 1000),
        ["num_steps=1000", "'linspace'"],
    ),
    "integer noise": (lambda: sample(_fn, np.zeros((1, 2), int), sampler="ddim", num_steps=4), ["noise", "int"]),
    "denoiser shape": (
        lambda: sample(lambda x, t: x[:, :1], _noise, sampler="ddim", num_steps=4),
        ["denoise_fn", "(1, 1)"],
    ),
    "float t": (lambda: q_sample(make_schedule(), _noise, _noise, 3.0), ["t must be integer", "float"]),
    "noise shape": (lambda: q_sample(make_schedule(), _noise, np.zeros((2, 2)), 3), ["(2, 2)"]),
    "schedule name": (lambda: make_schedule("cosine"), ["'cosine'"]),
    "beta_start 0": (lambda: make_schedule("linear", 1000, beta_start=0.0), ["beta_start=0.0", "0 < beta_start < 1"]),
    "snr_gamma 0": (lambda: loss_weight(make_schedule(), np.array([1]), snr_gamma=0.0), ["snr_gamma=0.0"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_a_user_error_naming_the_value(case):
    call, fragments = BAD[case]
    with pytest.raises(ValueError) as info:
        call()
    assert isinstance(info.value, UserError)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
