"""The text-to-image diffusion task (mmjax.train.diffusion) through the engine: it learns, reports, refuses bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.cli import main
from mmjax.keypath import set_path
from mmjax.train import make_task, prepare_config, restore_run, train_and_evaluate


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
        "diffusion": {
            "num_sampling_steps": 4,
            "num_prompts": 2,
            "samples_per_prompt": 2,
            "num_eval_samples": 6,
            "judge_steps": 5,
        },
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
    metrics = jax.jit(task.eval_metrics)  # compiled as the engine runs it (op by op: 13 s)
    sums = [jax.device_get(metrics(params, jax.tree.map(jnp.asarray, b))) for b in task.eval_batches()]
    return float(sum(s["loss"] for s in sums) / sum(s["count"] for s in sums))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 40-step run (checkpointed at its end) and its final result, shared by the tests that read a trained run."""
    workdir = str(tmp_path_factory.mktemp("diffusion") / "run")
    return workdir, train_and_evaluate(_config(image_every=20, tensorboard=True), workdir)


def test_training_lowers_the_loss_and_the_report_reads_the_samples(tiny_run):
    workdir, result = tiny_run
    task = make_task(prepare_config(_config()), workdir=workdir)
    first = next(task.train_batches(0))
    initial = task.init_params(jax.random.fold_in(jax.random.key(0), 0), first)
    # adaLN-Zero: the untrained DiT predicts zero noise, so its epsilon loss is E[noise^2] = 1 (up to sampling)
    assert 0.9 < _eval_loss(task, initial) < 1.1
    assert result["eval_loss"] < 0.8, result  # 0.66 after 40 steps
    for split in ("", "heldout_"):
        for attr in ("item", "colour", "size", "position", "both"):
            assert 0.0 <= result[f"eval_generated_{split}{attr}_accuracy"] <= 1.0
        assert result[f"eval_{split}fid"] > 0.0
    assert 0.0 <= result["eval_judge_accuracy"] <= 1.0 and result["eval_fid_floor"] >= 0.0
    with open(os.path.join(workdir, "report.json")) as f:
        assert json.load(f)["generated_both_accuracy"] == result["eval_generated_both_accuracy"]
    for name in ("samples_test_grid.png", "samples_heldout_grid.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 1000
    assert os.path.exists(os.path.join(workdir, "vocab.json"))  # the run is self-contained


def test_the_run_saves_sample_grids_as_it_trains(tiny_run):
    from PIL import Image

    workdir, _ = tiny_run
    assert sorted(os.listdir(os.path.join(workdir, "images"))) == ["samples_0000020.png", "samples_0000040.png"]
    grids = [np.asarray(Image.open(os.path.join(workdir, "images", f"samples_00000{s}.png"))) for s in (20, 40)]
    # 2 test + 2 held-out prompts x 2 samples of 16 px, 1 px apart; the same noise, other parameters
    assert grids[0].shape == (4 * 17 - 1, 2 * 17 - 1, 3) and not np.array_equal(grids[0], grids[1])
    assert os.listdir(os.path.join(workdir, "tensorboard"))  # and the images went to TensorBoard


@pytest.fixture(scope="module")
def restored(tiny_run):
    return restore_run(tiny_run[0])


def test_a_restored_run_generates_what_the_trained_params_generate(restored):
    config, task, params, step = restored
    assert step == 40 and config.task == "diffusion"
    a = task.generate(params, ["a small red bag in the center"] * 3, jax.random.key(0))
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(task.generate(params, ["a small red bag in the center"] * 3, jax.random.key(0)), a)
    # chunks of 2 (the last one padded) draw chunk i's noise from fold_in(rng, i)
    many = task.generate_many(params, ["a small red bag in the center"] * 3, jax.random.key(0), chunk=2)
    np.testing.assert_array_equal(
        many[:2], task.generate(params, ["a small red bag in the center"] * 2, jax.random.fold_in(jax.random.key(0), 0))
    )
    # DDIM with eta > 0 is stochastic, seeded by the rng argument; eta = 0 is not
    ddim = dict(sampler="ddim", num_steps=3)
    x0 = task.generate(params, ["a large blue bag in the center"] * 2, jax.random.key(1), **ddim)
    x1 = task.generate(params, ["a large blue bag in the center"] * 2, jax.random.key(1), eta=1.0, **ddim)
    assert not np.array_equal(x0, x1)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"sampler": "euler"}, "sampler='euler' is not valid"),
        ({"num_steps": 0}, r"num_steps=0 is not valid; expected an int in \[1, 1000\]"),
        ({"num_steps": 1001}, "num_steps=1001"),
        ({"guidance_scale": -0.5}, "guidance_scale=-0.5"),
        ({"etaa": 0.5, "sampler": "ddim"}, "'etaa' is not an option of sampler='ddim'. Did you mean eta"),
        ({"prediction_type": "epsilon"}, "prediction_type='epsilon' is fixed by the training run"),
    ],
)
def test_generate_refuses_bad_settings_with_the_value(restored, kw, match):
    _, task, params, _ = restored
    with pytest.raises(ValueError, match=match):
        task.generate(params, ["a red bag"], jax.random.key(0), **kw)


def test_mmjax_generate_writes_a_grid_and_refuses_bad_input(tiny_run, tmp_path, capsys):
    workdir, _ = tiny_run
    out, npy = str(tmp_path / "grid.png"), str(tmp_path / "images.npy")
    argv = [
        "generate",
        "--workdir",
        workdir,
        "--prompt",
        "a small red bag in the center",
        "--prompt",
        "a large blue sneaker in the top left",
        "--num",
        "3",
        "--out",
        out,
        "--npy",
        npy,
        "--steps",
        "3",
    ]
    assert main(argv) == 0
    assert "2 prompt(s) x 3 samples of step 40" in capsys.readouterr().out
    assert os.path.getsize(out) > 1000 and np.load(npy).shape == (6, 16, 16, 3)
    for extra, message in [
        (["--prompt", " "], "non-empty strings"),
        (["--prompt", "a small red sneaker in the top left and a bag too"], "context_length - 2 = 10"),
        (["--steps", "0"], "num_steps=0"),
        (["--guidance", "-1"], "guidance_scale=-1.0"),
        (["--sampler", "heun"], "sampler='heun'"),
        (["--option", "eta"], "expected KEY=VALUE"),
        (["--num", "0"], "--num=0"),
    ]:
        assert main([*argv[:3], "--out", out, "--prompt", "a red bag", *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra


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


def test_a_frozen_clip_text_tower_drives_the_generator(tmp_path, tiny_run):
    import optax

    from tests.jobs.contrastive_job import tiny_config

    clip_dir = str(tmp_path / "clip")
    train_and_evaluate(tiny_config(task="contrastive"), clip_dir)
    _, clip_task, clip_params, _ = restore_run(clip_dir)
    task = make_task(prepare_config(_config(**{"model.text_encoder_from": clip_dir})), workdir=str(tmp_path / "dit"))
    assert task.tokenizer.vocab_size == clip_task.tokenizer.vocab_size and task.context_length == 16
    batch = next(task.train_batches(0))
    params = task.init_params(jax.random.key(0), batch)
    # the CLIP run's trained text tower, and an optimizer that leaves it alone while the DiT learns
    jax.tree.map(np.testing.assert_array_equal, params["text"], jax.device_get(clip_params["text"]))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)  # adaLN-Zero
    tx = task.wrap_optimizer(optax.adam(1e-2), params)
    grads = jax.jit(jax.grad(lambda p, b: task.loss(p, b, jax.random.key(2))[0]))(params, batch)  # compiled
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["text"]))  # the text does get gradients
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["text"]))
    assert any(float(jnp.abs(u).max()) > 0.0 for u in jax.tree.leaves(updates["dit"]))
    with pytest.raises(ValueError, match="is a 'diffusion' run; it must be a CLIP run"):
        make_task(prepare_config(_config(**{"model.text_encoder_from": tiny_run[0]})))
    with pytest.raises(ValueError, match="text_encoder_from=.*no config.json"):
        make_task(prepare_config(_config(**{"model.text_encoder_from": str(tmp_path / "none")})))
