"""The detection task (mmjax.train.detection) through the engine: queries and targets as documented, the loss is
mmjax.detection.detection_loss of the model's outputs, parallel modes agree (float64 proof, float32 bound), a
preempted run resumes bit-exactly, the report's AP is coco_ap of the saved predictions, a CLIP run drops in
(--config.init_from), bad settings are refused."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import detection as dd
from mmjax.detection import detection_loss
from mmjax.errors import ConfigError, UserError
from mmjax.evaluate import coco_ap
from mmjax.keypath import set_path
from mmjax.train import make_task, prepare_config, train_and_evaluate
from mmjax.train.detection import VOCABULARY, DetectionTask
from tests.task_helpers import SIGTERM_ENV, SigtermAtStep, assert_modes_agree_after_one_step, saved_state
from tests.tolerances import assert_float64_equal, float64, to_float64

MODEL = {
    "embed_dim": 8,
    "patch_size": 4,
    "vision_width": 16,
    "vision_depth": 1,
    "vision_heads": 2,
    "vision_mlp_dim": 32,
    "vision_stem_features": (),
    "text_width": 16,
    "text_depth": 1,
    "text_heads": 2,
    "text_mlp_dim": 32,
    "attention_implementation": "reference",
}


def _config(**overrides) -> dict:
    config = {
        "task": "detection",
        "seed": 0,
        "model": dict(MODEL),
        "data": {"image_size": 16, "max_items": 2, "num_test": 8, "num_heldout": 8},
        "detection": {"num_queries": 6, "plot_examples": 3},
        "batch_size": 16,
        "eval_batch_size": 8,
        "num_steps": 4,
        "optimizer": {"lr": 3e-3, "warmup_steps": 0},
        "log_every": 2,
        "checkpoint_every": 2,
        "progress": False,
        "tensorboard": False,
        "plot": False,
    }
    for key, value in overrides.items():
        set_path(config, key, value)
    return config


class SigtermDetectionTask(SigtermAtStep, DetectionTask):
    """The detection task, preempting itself at step ``$MMJAX_TEST_SIGTERM_AT_STEP``."""


@pytest.fixture(scope="module")
def task():
    return make_task(prepare_config(_config()))


def test_queries_are_the_images_phrases_then_training_negatives(task):
    batch = next(task.train_batches(0))
    again = next(task.train_batches(0))
    for key in batch:
        np.testing.assert_array_equal(batch[key], again[key])  # a function of the seed and the step
    held = set(dd.heldout_labels().tolist())
    for b in range(len(batch["image"])):
        valid = batch["valid"][b]
        combos = set((batch["item"][b][valid] * 8 + batch["colour"][b][valid]).tolist())
        items = set((80 + batch["item"][b][valid]).tolist())
        query = batch["query"][b][batch["query_mask"][b]].tolist()
        assert len(query) == 6 == len(set(query))
        positives = [q for q in query if q in combos | items]
        assert query[: len(positives)] == positives and set(positives) == (combos | items)
        assert not held & set(query)
        # half the negatives (config.detection.hard_negatives = 0.5) share an item or a colour with a positive
        negatives = query[len(positives) :]
        hard = [
            q for q in negatives if q < 80 and (q // 8 in {c // 8 for c in combos} or q % 8 in {c % 8 for c in combos})
        ]
        assert len(hard) >= round(0.5 * len(negatives)), (query, combos)
    targets = np.asarray(task._targets(*(jnp.asarray(batch[k]) for k in ("item", "colour", "valid", "query"))))
    for b, k, q in zip(*np.nonzero(targets)):  # a box answers its combination and its item phrase, nothing else
        assert VOCABULARY[batch["query"][b, q]] in (
            dd.phrase(batch["item"][b, k], batch["colour"][b, k]),
            dd.ITEM_PHRASES[batch["item"][b, k]],
        )
    assert targets.sum() == 2 * batch["valid"].sum()


def test_the_loss_is_detection_loss_of_the_model_outputs(task):
    """The task's loss and the loss recomputed from the model's outputs are two compiled programs: their equality is
    proven in float64."""
    host_batch = next(task.train_batches(0))
    params = task.init_params(jax.random.key(0), host_batch)

    def recomputed(params, batch):
        q = task.model.apply({"params": params}, jnp.asarray(task.vocab_ids)[batch["query"]], method="embed_queries")
        out = task.model.apply({"params": params}, task._images(batch["image"]), query_embeds=q)
        targets = task._targets(batch["item"], batch["colour"], batch["valid"], batch["query"])
        return detection_loss(out.logits, out.boxes, targets, batch["boxes"], batch["valid"], batch["query_mask"])

    with float64():
        params, batch = to_float64(params), to_float64(jax.tree.map(jnp.asarray, host_batch))
        loss, metrics = jax.jit(lambda p, b: task.loss(p, b, jax.random.key(1), train=False))(params, batch)
        want, aux = jax.jit(recomputed)(params, batch)
        assert loss.dtype == np.float64
        assert_float64_equal(loss, want)
        assert_float64_equal(metrics["giou_loss"], aux["giou_loss"].mean())


def test_parallel_modes_agree_in_float64_and_float32():
    """single / pmap (8 devices) / sharded: one optimizer step from the same params (the loss is a mean of per-image
    losses). Adam eps 1e-2 as the other task tests: parameters with identically-zero gradients stay put."""
    config = prepare_config(_config())
    # clipped gradients: means over 16 images x 16 tokens x 6 queries
    assert_modes_agree_after_one_step(lambda: make_task(config), gradient_terms=16 * 16 * 6)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("detection") / "run")
    return workdir, train_and_evaluate(_config(), workdir)


def test_a_preempted_run_resumes_bit_exactly(tiny_run, tmp_path, monkeypatch):
    reference_dir, reference = tiny_run
    config = _config(task="tests.test_train_detection:SigtermDetectionTask", **{"detection.final_report": False})
    workdir = str(tmp_path / "interrupted")
    monkeypatch.setenv(SIGTERM_ENV, "3")  # stops after step 3, between the checkpoints of steps 2 and 4
    first = train_and_evaluate(config, workdir)
    assert first["preempted"] is True and first["step"] == 3
    monkeypatch.delenv(SIGTERM_ENV)
    resumed = train_and_evaluate(config, workdir)
    assert resumed["step"] == 4
    got, want = saved_state(workdir), saved_state(reference_dir)
    for tree in ("params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, got[tree], want[tree])
    assert resumed["eval_grounding_recall"] == reference["eval_grounding_recall"]


def test_the_report_is_coco_ap_of_the_predictions(tiny_run):
    workdir, result = tiny_run
    task = make_task(prepare_config(_config()), workdir=workdir)
    params = saved_state(workdir)["params"]
    held = task._eval_canvases("heldout")
    detections = task.predict(params, held.images, np.arange(80))
    assert all(len(d["scores"]) == 100 and np.all(np.diff(d["scores"]) <= 0) for d in detections)
    assert all((d["boxes"] >= 0).all() and (d["boxes"] <= 16).all() for d in detections)
    truth = [{"boxes": b[v], "labels": lb[v]} for b, lb, v in zip(held.boxes, held.label, held.valid)]
    want = coco_ap(truth, detections)
    for key in ("AP", "AP50", "AP75"):
        assert result[f"eval_heldout_{key}"] == pytest.approx(want[key], abs=1e-12)
        for name in ("seen", "item"):
            assert 0.0 <= result[f"eval_{name}_{key}"] <= 1.0
    assert (
        0.0 <= result["eval_grounding_recall"] <= 1.0
        and result["eval_count"] == task._eval_canvases("test").valid.sum()
    )
    assert open(result["eval_detections_png"], "rb").read(4) == b"\x89PNG"
    with open(os.path.join(workdir, "report.json")) as f:
        assert json.load(f)["heldout_AP50"] == result["eval_heldout_AP50"]


def test_a_clip_run_drops_in_with_its_tokenizer(tmp_path):
    clip_dir = str(tmp_path / "clip")
    clip = {
        "task": "contrastive",
        "model": {**MODEL},
        "data": {"image_size": 16, "num_train": 32, "num_test": 8, "num_heldout": 8},
        "contrastive": {"final_report": False},
        "batch_size": 16,
        "eval_batch_size": 8,
        "num_steps": 1,
        "progress": False,
        "tensorboard": False,
        "plot": False,
    }
    train_and_evaluate(clip, clip_dir)
    clip_params = saved_state(clip_dir)["params"]
    workdir = str(tmp_path / "detect")
    config = prepare_config(_config(init_from=clip_dir, **{"data.colour_space": "hsv"}))
    task = make_task(config, workdir=workdir)
    assert task.data_cfg.colour_space == "rgb"  # the CLIP run's normalisation replaces the config's
    params = task.init_params(jax.random.key(0), next(task.train_batches(0)))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params["clip"]), clip_params)
    with open(os.path.join(clip_dir, "vocab.json")) as a, open(os.path.join(workdir, "vocab.json")) as b:
        assert a.read() == b.read()
    with pytest.raises(ConfigError, match="image_size=32 differs from the model's image size 16"):
        make_task(prepare_config(_config(init_from=clip_dir, **{"data.image_size": 32})))
    with pytest.raises(ConfigError, match="is not a CLIP run to start from"):
        make_task(prepare_config(_config(init_from=str(tmp_path / "missing"))))


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("detection.focal_alpha", 1.5, "focal_alpha=1.5 must be a number in"),
        ("detection.num_queries", 0, "num_queries=0 must be an int >= 1"),
        ("detection.hard_negatives", 2.5, "hard_negatives=2.5 must be a number in"),
        ("detection.matcher", "greedy", "valid choices"),
        ("detection.giou_weight", -1.0, "giou_weight=-1.0 must be a number >= 0"),
        ("data.max_overlap", 2.0, "max_overlap must lie in"),
        ("data.mosaic_sizes", (1, 2), "mosaic cells of 8 px"),
        ("model.name", "clip", "not valid for the detection task"),
        ("model.vision_width", 15, "divisible"),
    ],
)
def test_bad_settings_are_refused_with_the_value(key, value, match):
    with pytest.raises(UserError, match=match):
        make_task(prepare_config(_config(**{key: value})))


def test_a_typo_in_the_model_section_names_the_closest_key():
    with pytest.raises(ConfigError, match="vision_width"):
        prepare_config(_config(**{"model.vision_widht": 16}))
