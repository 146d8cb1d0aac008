"""The text-to-image diffusion task (mmjax.train.diffusion) through the engine: it learns, reports, refuses bad input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.keypath import set_path
from mmjax.train import make_task, prepare_config, train_and_evaluate


def _config(**overrides) -> dict:
    config = {
        "task": "diffusion",
        "seed": 0,
        "model": {
            "width": 32,
            "depth": 1,
            "num_heads": 2,
            "patch_size": 4,
            "text_width": 32,
            "text_heads": 2,
            "text_mlp_dim": 32,
            "context_length": 12,
        },
        "data": {"image_size": 16, "num_train": 64, "num_test": 8, "num_heldout": 8},
        "diffusion": {"num_sampling_steps": 4, "num_prompts": 2, "samples_per_prompt": 2},
        "batch_size": 16,
        "eval_batch_size": 8,
        "num_steps": 40,
        "optimizer": {"lr": 3e-3, "warmup_steps": 0},
        "log_every": 10,
        "checkpoint_every": 0,
        "progress": False,
        "tensorboard": False,
        "plot": False,
    }
    for key, value in overrides.items():
        set_path(config, key, value)
    return config


def _eval_loss(task, params) -> float:
    sums = [jax.device_get(task.eval_metrics(params, jax.tree.map(jnp.asarray, b))) for b in task.eval_batches()]
    return float(sum(s["loss"] for s in sums) / sum(s["count"] for s in sums))


def test_training_lowers_the_loss_and_the_report_reads_the_samples(tmp_path):
    workdir = str(tmp_path / "run")
    result = train_and_evaluate(_config(), workdir)
    task = make_task(prepare_config(_config()), workdir=workdir)
    first = next(task.train_batches(0))
    initial = task.init_params(jax.random.fold_in(jax.random.key(0), 0), first)
    # adaLN-Zero: the untrained DiT predicts zero noise, so its epsilon loss is E[noise^2] = 1 (up to sampling)
    assert 0.9 < _eval_loss(task, initial) < 1.1
    assert result["eval_loss"] < 0.8, result  # 0.66 after 40 steps
    for split in ("", "heldout_"):
        for attr in ("colour", "size", "position"):
            assert 0.0 <= result[f"eval_generated_{split}{attr}_accuracy"] <= 1.0
    for name in ("samples_test_grid.png", "samples_heldout_grid.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 1000
    assert os.path.exists(os.path.join(workdir, "vocab.json"))  # the run is self-contained


def test_the_evaluation_loss_is_deterministic_and_sees_every_example():
    task = make_task(prepare_config(_config(**{"data.num_test": 5, "data.num_heldout": 6})))
    batches = list(task.eval_batches())
    assert sum(int(b["mask"].sum()) for b in batches) == 11
    again = list(task.eval_batches())
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["noise"], b["noise"])
        np.testing.assert_array_equal(a["t"], b["t"])
    assert len({int(t) for b in batches for t in b["t"]}) > 5  # timesteps spread over the schedule


@pytest.mark.parametrize("conditioning", ["pooled", "tokens", "both"])
def test_every_conditioning_mode_builds_and_uses_the_caption(conditioning):
    task = make_task(prepare_config(_config(**{"model.conditioning": conditioning})))
    batch = next(task.train_batches(0))
    params = task.init_params(jax.random.key(0), batch)
    # zero-initialised adaLN: perturb the DiT's params so the output depends on the condition at all
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
    x = task.to_model_space(batch["image"][:2])
    t = jnp.array([100, 100])
    ids = jnp.asarray(task._ids(["a small red sneaker in the top left", "a large blue bag in the center"]))
    out, _ = task.model.apply({"params": params}, x[:1].repeat(2, 0), t, ids)
    assert out.shape == x.shape
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-4  # two captions, two predictions
    null, _ = task.model.apply({"params": params}, x[:1].repeat(2, 0), t, ids, drop=True)
    np.testing.assert_allclose(null[0], null[1], rtol=1e-5, atol=1e-6)  # the null condition ignores the caption


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("model.conditioning", "words", "conditioning='words'"),
        ("model.name", "unet", "model.name='unet'"),
        ("diffusion.sampler", "euler", "sampler='euler'"),
        ("diffusion.guidance_scale", -1.0, "guidance_scale=-1.0"),
        ("diffusion.num_sampling_steps", 0, "num_sampling_steps=0"),
        ("diffusion.num_sampling_steps", 1001, "num_sampling_steps=1001"),
        ("diffusion.beta_schedule", "cosine", "cosine"),
        ("diffusion.prediction_type", "noise", "noise"),
        ("model.patch_sise", 4, "patch_sise"),
    ],
)
def test_bad_settings_are_refused_with_the_value(key, value, match):
    with pytest.raises(ValueError, match=match):
        make_task(prepare_config(_config(**{key: value})))


def test_generate_refuses_empty_or_too_long_captions():
    task = make_task(prepare_config(_config()))
    params = task.init_params(jax.random.key(0), next(task.train_batches(0)))
    with pytest.raises(ValueError, match="non-empty strings"):
        task.generate(params, ["a red bag", " "], jax.random.key(0))
    with pytest.raises(ValueError, match="context_length - 2 = 10"):
        task.generate(params, ["a small red sneaker in the top left and a bag too"], jax.random.key(0))
