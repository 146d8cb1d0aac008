"""mmjax.diffusion against Hugging Face diffusers' DDPMScheduler, DDIMScheduler and DPMSolverMultistepScheduler.

Float64 at 1e-10 (relative to the largest magnitude): diffusers hard-codes float32 (``torch.linspace(...,
dtype=torch.float32)``, ``sigmas.astype(np.float32)``, ``sample.to(torch.float32)``), so the float64 tests run
diffusers' own code with ``torch.float32`` and ``np.float32`` widened to float64 inside the three scheduler modules
(the :func:`wide_diffusers` fixture; each test checks that the schedulers really hold float64). One test compares our
float32 schedule with unpatched diffusers within float32 round-off.

Both sides step the same denoiser, a fixed nonlinear function of ``x`` and ``t`` written once with torch and once
with jax (:func:`_denoise_torch`, :func:`_denoise_jax`), from the same float64 noise, and the diffusers loop is the
pipelines' ``for t in scheduler.timesteps: x = scheduler.step(model(x, t), t, x).prev_sample``. Stochastic steps get
the noise mmjax documents (step ``i``: ``jax.random.normal(jax.random.fold_in(rng, i), shape, dtype)``): DDIM through
``variance_noise=``, DDPM (which only takes a ``generator``) by replacing the ``randn_tensor`` it calls.
"""

import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm, scheduling_dpmsolver_multistep

from mmjax import diffusion
from mmjax.errors import UserError
from tests.tolerances import assert_float32_close, assert_float64_equal, float64

pytestmark = [
    pytest.mark.parity,
    # diffusers' DPMSolverMultistepScheduler.set_timesteps calls np.array(tensor) (numpy 2 warns; not ours)
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm_solver++": DPMSolverMultistepScheduler}
MODULES = (scheduling_ddpm, scheduling_ddim, scheduling_dpmsolver_multistep)
SHAPE = (2, 3, 4, 4)  # [B, C, H, W]


class _Widened:
    """A stand-in for a module (torch or numpy) whose ``float32`` is float64; everything else is the module's."""

    def __init__(self, module, wide):
        self._module = module
        self.float32 = wide

    def __getattr__(self, name):
        return getattr(self._module, name)


@pytest.fixture
def wide_diffusers(monkeypatch):
    """diffusers' schedulers computing in float64, and jax with x64 enabled."""
    for module in MODULES:
        monkeypatch.setattr(module, "torch", _Widened(torch, torch.float64))
        monkeypatch.setattr(module, "np", _Widened(np, np.float64))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torch.tensor(1.0): DDIM's final_alpha_cumprod, DDPM's `one`
    try:
        with float64():
            yield
    finally:
        torch.set_default_dtype(default)


def _make(sampler, T=1000, **config):
    scheduler = SCHEDULERS[sampler](num_train_timesteps=T, **config)
    assert scheduler.alphas_cumprod.dtype == torch.float64, "the float64 widening did not take"
    return scheduler


def _denoise_torch(x, t):
    t = float(t)
    return torch.tanh(0.8 * x + 0.3) * np.cos(t / 300.0) + 0.2 * x * np.sin(t / 170.0 + 0.5)


def _denoise_jax(x, t):  # t: int32 [B]
    t = t.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.tanh(0.8 * x + 0.3) * jnp.cos(t / 300.0) + 0.2 * x * jnp.sin(t / 170.0 + 0.5)


def _start(seed=0):
    return np.random.default_rng(seed).normal(size=SHAPE)


def _step_noise(rng, num_steps):
    """The noise mmjax's stochastic samplers add at each step (its documented rule), as float64 torch tensors."""
    return [
        torch.tensor(np.asarray(jax.random.normal(jax.random.fold_in(rng, i), SHAPE, jnp.float64)))
        for i in range(num_steps)
    ]


def _ours(sampler, x, num_steps, **options):
    out = diffusion.sample(_denoise_jax, jnp.asarray(x), sampler=sampler, num_steps=num_steps, **options)
    assert out.dtype == jnp.float64
    return np.asarray(out)


# ----------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_option_defaults_are_diffusers_defaults(sampler):
    scheduler = SCHEDULERS[sampler]
    init = inspect.signature(scheduler.__init__).parameters
    step = inspect.signature(scheduler.step).parameters  # DDIM's eta and use_clipped_model_output
    ours = diffusion.default_options(sampler)
    for name, value in ours.items():
        if name != "rng":
            assert (init[name] if name in init else step[name]).default == value, name
    # Every diffusers option, at its default, is accepted (the ones mmjax does not implement only at that value).
    given = {k: p.default for k, p in init.items() if k not in ("self", "num_train_timesteps")}
    assert set(ours) - {"rng", "eta", "use_clipped_model_output"} <= set(given)
    np.testing.assert_array_equal(
        diffusion.inference_timesteps(sampler, 7, **given), diffusion.inference_timesteps(sampler, 7)
    )


# ---------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("beta_schedule", diffusion.BETA_SCHEDULES)
def test_schedules_equal_diffusers_float64(wide_diffusers, beta_schedule):
    for sampler, T, (beta_start, beta_end) in itertools.product(
        SCHEDULERS, (1000, 50), ((0.0001, 0.02), (0.00085, 0.012))
    ):
        ref = _make(sampler, T, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end)
        ours = diffusion.make_schedule(beta_schedule, T, beta_start, beta_end)
        for name in ("betas", "alphas", "alphas_cumprod"):
            got = getattr(ours, name)
            assert got.dtype == jnp.float64 and got.shape == (T,)
            assert_float64_equal(got, getattr(ref, name).numpy(), err_msg=f"{sampler} {beta_schedule} T={T} {name}")


@pytest.mark.parametrize("beta_schedule", diffusion.BETA_SCHEDULES)
def test_float32_schedule_within_round_off_of_unpatched_diffusers(beta_schedule):
    ref = DDIMScheduler(beta_schedule=beta_schedule)
    assert ref.alphas_cumprod.dtype == torch.float32
    ours = diffusion.make_schedule(beta_schedule, 1000, dtype=jnp.float32)
    assert ours.alphas_cumprod.dtype == jnp.float32
    # diffusers' float32 cumprod rounds once per factor: a chain of 1000 roundings.
    assert_float32_close(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), terms=1000, err_msg=beta_schedule)
    assert_float32_close(ours.betas, ref.betas.numpy(), terms=4, err_msg=beta_schedule)


# ---------------------------------------------------------------------------------------------- timesteps


def _valid(ts, T):
    return len(ts) > 0 and ts.min() >= 0 and ts.max() <= T - 1 and bool(np.all(np.diff(ts) < 0))


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("spacing", diffusion.TIMESTEP_SPACINGS)
def test_timesteps_equal_diffusers(wide_diffusers, sampler, spacing):
    compared = 0
    for T, num_steps, offset in itertools.chain(
        itertools.product([1000], [1, 2, 3, 10, 50, 61, 250, 999, 1000], [0, 1]),
        itertools.product([37], [1, 5, 36, 37], [0, 2]),
    ):
        ref = _make(sampler, T, timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(num_steps)
        want = ref.timesteps.numpy()
        if spacing == "trailing" and len(want) == num_steps + 1:
            # np.arange(T, 0, -T / N) can give N + 1 points; the extra one rounds to timestep -1 (diffusers keeps it).
            assert want[-1] == -1
            want = want[:num_steps]
        call = lambda: diffusion.inference_timesteps(
            sampler, num_steps, T, timestep_spacing=spacing, steps_offset=offset
        )
        if _valid(want, T):
            np.testing.assert_array_equal(call(), want, err_msg=f"{sampler} {spacing} T={T} N={num_steps} +{offset}")
            compared += 1
        else:  # diffusers gives repeated or out-of-range timesteps here; mmjax refuses
            with pytest.raises(UserError, match=f"num_steps={num_steps}"):
                call()
    assert compared >= 20


def test_dpm_timesteps_with_lambda_min_clipped(wide_diffusers):
    for spacing, num_steps in itertools.product(diffusion.TIMESTEP_SPACINGS, (5, 20)):
        config = dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing=spacing)
        ref = _make("dpm_solver++", **config)
        ref.set_timesteps(num_steps)
        want = ref.timesteps.numpy()
        got = diffusion.inference_timesteps("dpm_solver++", num_steps, **config)
        np.testing.assert_array_equal(got, want, err_msg=f"{spacing} N={num_steps}")
        if spacing == "linspace":
            assert want[0] < 999  # the clipping removed the last timesteps


# -------------------------------------------------------------------------------------------- DDIM (eta=0)


def _ddim_reference(x, num_steps, eta=0.0, noises=None, use_clipped_model_output=False, **config):
    scheduler = _make("ddim", **config)
    scheduler.set_timesteps(num_steps)
    x = torch.tensor(x)
    for i, t in enumerate(scheduler.timesteps):
        out = _denoise_torch(x, t)
        noise = noises[i] if noises is not None else None
        x = scheduler.step(
            out, t, x, eta=eta, use_clipped_model_output=use_clipped_model_output, variance_noise=noise
        ).prev_sample
    return x.numpy()


GRID = list(itertools.product(diffusion.BETA_SCHEDULES, diffusion.PREDICTION_TYPES, diffusion.TIMESTEP_SPACINGS))


@pytest.mark.parametrize("beta_schedule,prediction_type,spacing", GRID)
def test_ddim_trajectory_equals_diffusers(wide_diffusers, beta_schedule, prediction_type, spacing):
    config = dict(beta_schedule=beta_schedule, prediction_type=prediction_type, timestep_spacing=spacing)
    x = _start()
    want = _ddim_reference(x, 10, **config)
    assert_float64_equal(_ours("ddim", x, 10, **config), want, err_msg=str(config))


DDIM_OPTIONS = [
    dict(set_alpha_to_one=False, steps_offset=1),
    dict(clip_sample=False, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(clip_sample_range=0.5, use_clipped_model_output=True, prediction_type="v_prediction"),
    dict(timestep_spacing="trailing", clip_sample=False),  # N=7: the next timestep is not t - T // N
    dict(timestep_spacing="linspace", set_alpha_to_one=False, prediction_type="sample"),
]


@pytest.mark.parametrize("config", DDIM_OPTIONS, ids=lambda c: ",".join(c))
@pytest.mark.parametrize("num_steps", [1, 7])
def test_ddim_options_equal_diffusers(wide_diffusers, config, num_steps):
    x = _start(1)
    use_clipped = config.get("use_clipped_model_output", False)
    scheduler_config = {k: v for k, v in config.items() if k != "use_clipped_model_output"}
    want = _ddim_reference(x, num_steps, use_clipped_model_output=use_clipped, **scheduler_config)
    assert_float64_equal(_ours("ddim", x, num_steps, **config), want, err_msg=f"{config} N={num_steps}")


@pytest.mark.parametrize(
    "beta_schedule,prediction_type", list(itertools.product(diffusion.BETA_SCHEDULES, diffusion.PREDICTION_TYPES))
)
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_equals_diffusers_given_the_same_noise(wide_diffusers, beta_schedule, prediction_type, eta):
    config = dict(beta_schedule=beta_schedule, prediction_type=prediction_type)
    x, rng = _start(2), jax.random.key(3)
    want = _ddim_reference(x, 6, eta=eta, noises=_step_noise(rng, 6), **config)
    got = _ours("ddim", x, 6, eta=eta, rng=rng, **config)
    assert_float64_equal(got, want, err_msg=f"{config} eta={eta}")
    deterministic = _ours("ddim", x, 6, **config)
    assert np.max(np.abs(got - deterministic)) > 1e-3  # the noise was really added


# --------------------------------------------------------------------------------------------------- DDPM


@pytest.mark.parametrize("beta_schedule,prediction_type,spacing", GRID)
def test_ddpm_trajectory_equals_diffusers_given_the_same_noise(
    wide_diffusers, monkeypatch, beta_schedule, prediction_type, spacing
):
    config = dict(beta_schedule=beta_schedule, prediction_type=prediction_type, timestep_spacing=spacing)
    if beta_schedule == "scaled_linear":
        config.update(clip_sample=False, steps_offset=1)
    num_steps, x, rng = 8, _start(4), jax.random.key(5)
    noises, current, drawn = _step_noise(rng, num_steps), {}, []

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == SHAPE and dtype == torch.float64
        drawn.append(current["i"])
        return noises[current["i"]]

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", randn_tensor)
    scheduler = _make("ddpm", **config)
    scheduler.set_timesteps(num_steps)
    want = torch.tensor(x)
    for i, t in enumerate(scheduler.timesteps):
        current["i"] = i
        want = scheduler.step(_denoise_torch(want, t), t, want).prev_sample
    assert drawn == [i for i, t in enumerate(scheduler.timesteps) if t > 0]  # noise at every step but t = 0

    got = _ours("ddpm", x, num_steps, rng=rng, **config)
    assert_float64_equal(got, want.numpy(), err_msg=str(config))


# ------------------------------------------------------------------------------------------ DPM-Solver++


def _dpm_reference(x, num_steps, **config):
    scheduler = _make("dpm_solver++", **config)
    scheduler.set_timesteps(num_steps)
    x = torch.tensor(x)
    for t in scheduler.timesteps:
        x = scheduler.step(_denoise_torch(x, t), t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("beta_schedule,prediction_type,spacing", GRID)
def test_dpm_solver_trajectories_equal_diffusers(wide_diffusers, beta_schedule, prediction_type, spacing):
    x = _start(6)
    for solver_order, lower_order_final in itertools.product((1, 2), (True, False)):
        config = dict(
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            timestep_spacing=spacing,
            solver_order=solver_order,
            lower_order_final=lower_order_final,
        )
        assert_float64_equal(
            _ours("dpm_solver++", x, 10, **config), _dpm_reference(x, 10, **config), err_msg=str(config)
        )


DPM_OPTIONS = [
    # With final_sigmas_type="zero" (the default) the last step is first order anyway; "sigma_min" makes
    # lower_order_final (and euler_at_final) decide it.
    (10, dict(final_sigmas_type="sigma_min", lower_order_final=True)),
    (10, dict(final_sigmas_type="sigma_min", lower_order_final=False)),
    (10, dict(final_sigmas_type="sigma_min", lower_order_final=False, euler_at_final=True)),
    (15, dict(final_sigmas_type="sigma_min", lower_order_final=True)),  # >= 15 steps: second order to the end
    (16, dict(solver_order=1, final_sigmas_type="sigma_min", prediction_type="v_prediction")),
    (1, dict()),
    (2, dict(prediction_type="sample")),
    (12, dict(timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear", beta_end=0.012)),
    (8, dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, prediction_type="v_prediction")),
    (20, dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", final_sigmas_type="sigma_min")),
]


@pytest.mark.parametrize("num_steps,config", DPM_OPTIONS, ids=lambda c: str(c) if isinstance(c, int) else ",".join(c))
def test_dpm_solver_options_equal_diffusers(wide_diffusers, num_steps, config):
    x = _start(7)
    assert_float64_equal(
        _ours("dpm_solver++", x, num_steps, **config), _dpm_reference(x, num_steps, **config), err_msg=str(config)
    )
