"""The captioning task (mmjax.train.captioning) through the engine: the loss is the token cross-entropy of the
global batch, parallel modes agree (float64 proof, float32 bound), a preempted run resumes bit-exactly, greedy
evaluation agrees with mmjax.generate, the final report parses its captions, bad settings are refused."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.data.captions import parse_caption
from mmjax.errors import ConfigError, UserError
from mmjax.keypath import set_path
from mmjax.train import make_task, prepare_config, train_and_evaluate
from mmjax.train.captioning import CaptioningTask
from tests.task_helpers import SIGTERM_ENV, SigtermAtStep, assert_modes_agree_after_one_step, saved_state
from tests.tolerances import assert_float64_equal, float64, to_float64


def _config(**overrides) -> dict:
    config = {
        "task": "captioning",
        "seed": 0,
        "model": {
            "vision_width": 16,
            "vision_depth": 1,
            "vision_num_heads": 2,
            "vision_mlp_dim": 32,
            "vision_stem_features": (8, 16),
            "decoder_width": 16,
            "decoder_depth": 1,
            "decoder_num_heads": 2,
            "decoder_mlp_dim": 32,
            "attention_implementation": "reference",  # compiles fastest; every implementation is tested elsewhere
        },
        "data": {"image_size": 16, "num_train": 64, "num_test": 8, "num_heldout": 8},
        "captioning": {"scoring_examples": 4},
        "batch_size": 16,
        "eval_batch_size": 8,
        "num_steps": 6,
        "optimizer": {"lr": 3e-3, "warmup_steps": 0},
        "log_every": 3,
        "checkpoint_every": 2,
        "progress": False,
        "tensorboard": False,
        "plot": False,
    }
    for key, value in overrides.items():
        set_path(config, key, value)
    return config


class SigtermCaptioningTask(SigtermAtStep, CaptioningTask):
    """The captioning task, preempting itself at step ``$MMJAX_TEST_SIGTERM_AT_STEP``."""


def test_the_loss_is_the_token_cross_entropy_over_non_pad_targets():
    """The task's loss and the cross-entropy recomputed from the model's logits are two compiled programs: their
    equality is proven in float64."""
    task = make_task(prepare_config(_config()))
    host_batch = next(task.train_batches(0))
    params = task.init_params(jax.random.key(0), host_batch)
    ids = host_batch["ids"]
    weights = ids[:, 1:] != task.tokenizer.pad_id
    assert weights.sum() < weights.size  # padding exists and is excluded; the end-of-text token counts
    assert np.all(weights.sum(1) == (ids != 0).sum(1) - 1)

    def recomputed(params, batch):
        ids = batch["ids"]
        logits, _ = task.model.apply({"params": params}, task._images(batch["image"]), ids[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
        return jnp.sum(ce * weights) / jnp.sum(weights)

    with float64():
        params, batch = to_float64(params), to_float64(jax.tree.map(jnp.asarray, host_batch))
        loss, metrics = jax.jit(lambda p, b: task.loss(p, b, jax.random.key(1), train=False))(params, batch)
        assert loss.dtype == np.float64
        assert_float64_equal(loss, jax.jit(recomputed)(params, batch))
    assert 0.0 <= float(metrics["token_accuracy"]) <= 1.0


def test_cappa_rows_read_only_mask_tokens_and_see_every_position():
    task = make_task(prepare_config(_config(**{"captioning.masked_pred_prob": 1.0})))
    cfg = task.model.decoder
    assert cfg.mask_id == task.tokenizer.vocab_size and cfg.vocab_size == task.tokenizer.vocab_size + 1
    host_batch = next(task.train_batches(0))
    params = task.init_params(jax.random.key(0), host_batch)

    def recomputed(params, batch):  # every row: all-[MASK] inputs, no causal mask
        inputs = jnp.full_like(batch["ids"][:, :-1], cfg.mask_id)
        parallel = jnp.ones((inputs.shape[0],), bool)
        logits, _ = task.model.apply({"params": params}, task._images(batch["image"]), inputs, parallel=parallel)
        targets = batch["ids"][:, 1:]
        weights = (targets != cfg.pad_id).astype(logits.dtype)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * weights) / jnp.sum(weights)

    def task_loss(train):
        return jax.jit(lambda p, b: task.loss(p, b, jax.random.key(1), train=train))

    with float64():  # two compiled programs: their equality proven in float64
        params, batch = to_float64(params), to_float64(jax.tree.map(jnp.asarray, host_batch))
        loss, metrics = task_loss(True)(params, batch)
        assert float(metrics["parallel_fraction"]) == 1.0 and loss.dtype == np.float64
        assert_float64_equal(loss, jax.jit(recomputed)(params, batch))
        no_cappa, _ = task_loss(False)(params, batch)  # evaluation is always autoregressive
    assert abs(float(no_cappa) - float(loss)) > 1e-4


def test_parallel_modes_agree_in_float64_and_float32():
    """single / pmap (8 devices, each device's loss weighted by its share of the global tokens) / sharded: one
    optimizer step from the same params. Adam eps 1e-2 (as tests/test_multihost.py): the attention key biases have
    identically-zero gradients, and with a tiny eps Adam would turn their round-off into steps of up to lr."""
    config = prepare_config(_config(batch_size=16))
    # clipped gradients: sums over the batch's 16 x 11 tokens
    assert_modes_agree_after_one_step(lambda: make_task(config), gradient_terms=16 * 11)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("captioning") / "run")
    return workdir, train_and_evaluate(_config(), workdir)


def test_a_preempted_run_resumes_bit_exactly(tiny_run, tmp_path, monkeypatch):
    reference_dir, reference = tiny_run
    config = _config(task="tests.test_train_captioning:SigtermCaptioningTask", **{"captioning.final_report": False})
    workdir = str(tmp_path / "interrupted")
    monkeypatch.setenv(SIGTERM_ENV, "3")  # stops after step 3, between the checkpoints of steps 2 and 4
    first = train_and_evaluate(config, workdir)
    assert first["preempted"] is True and first["step"] == 3
    monkeypatch.delenv(SIGTERM_ENV)
    resumed = train_and_evaluate(config, workdir)
    assert resumed["step"] == 6
    got, want = saved_state(workdir), saved_state(reference_dir)
    for tree in ("params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, got[tree], want[tree])
    assert resumed["eval_loss"] == reference["eval_loss"]


def test_the_report_scores_the_generated_captions(tiny_run):
    workdir, result = tiny_run
    for prefix in ("", "heldout_"):
        for key in ("exact_match", "bleu4", "cider_d", "item_accuracy", "colour_accuracy", "size_accuracy"):
            assert 0.0 <= result[f"eval_{prefix}{key}"] <= (10.0 if key == "cider_d" else 1.0), key
    assert result["eval_scoring_classifier_examples"] == 4
    with open(os.path.join(workdir, "captions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 16 and {r["group"] for r in rows} == {0, 1}
    # the report's item accuracy is the parsed captions' (recomputed here from the saved file)
    task = make_task(prepare_config(_config()), workdir=workdir)
    items = task.eval_source.extras["item"]
    test_rows = [r for r in rows if r["group"] == 0]
    want = np.mean([parse_caption(r["generated"])["item"] == items[r["index"]] for r in test_rows])
    assert result["eval_item_accuracy"] == pytest.approx(want)
    assert open(result["eval_caption_grid_png"], "rb").read(4) == b"\x89PNG"


def test_greedy_evaluation_equals_mmjax_generate(tiny_run):
    from mmjax.generate import generate

    workdir, _ = tiny_run
    task = make_task(prepare_config(_config()), workdir=workdir)
    params = saved_state(workdir)["params"]
    batch = jax.tree.map(jnp.asarray, next(iter(task.eval_batches())))
    images = task._images(batch["image"])
    ours = np.asarray(jax.jit(task._greedy_ids)(params, images))
    out = generate(task.model, params, images, max_new_tokens=task.context_length - 1)
    seqs = np.asarray(out.sequences)[:, 1:]  # drop the start token; generate trims to the longest caption
    np.testing.assert_array_equal(ours[:, : seqs.shape[1]], seqs)
    assert np.all(ours[:, seqs.shape[1] :] == task.tokenizer.pad_id)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("captioning.masked_pred_prob", 1.5, "masked_pred_prob=1.5 must be in"),
        ("captioning.num_beams", 0, "num_beams=0 must be an int >= 1"),
        ("captioning.label_smoothing", 1.0, "label_smoothing=1.0 must be in"),
        ("model.decoder_width", 15, "not divisible by num_heads"),
        ("model.name", "clip", "not valid for the captioning task"),
        ("captioning.decode", "parallel", "masked_pred_prob > 0"),
        ("captioning.decode", "beam", "valid choices"),
    ],
)
def test_bad_settings_are_refused_with_the_value(key, value, match):
    with pytest.raises(UserError, match=match):
        make_task(prepare_config(_config(**{key: value})))


def test_a_typo_in_the_model_section_names_the_closest_key():
    with pytest.raises(ConfigError, match="decoder_width"):
        prepare_config(_config(**{"model.decoder_widht": 16}))
