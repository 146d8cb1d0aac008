"""Config validation (bad values name key, value and choices), the optimizer (decay rules, schedule, AdamW), the
task registry and the metrics outputs."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax.errors import ConfigError, UserError
from mmjax.train import (
    DEFAULT_DECAY_RULES,
    decay_multipliers,
    make_optimizer,
    make_schedule,
    prepare_config,
    train_and_evaluate,
)
from mmjax.train.config import default_config, from_json, to_json
from mmjax.train.metrics import MetricLogger, read_metrics
from mmjax.train.task import Task, make_task, resolve_task_class
from tests.test_train_models import tiny_config, write_tiny_fashion_mnist


@pytest.mark.parametrize(
    "override,pattern",
    [
        (
            {"parallel": {"mode": "tpu"}},
            r"config.parallel.mode='tpu' is not valid; valid choices: \['single', 'pmap', 'sharded'\]",
        ),
        ({"optimizer": {"lr": -0.1}}, r"config.optimizer.lr=-0.1 is not valid; expected a number >= 0"),
        ({"batch_size": 0}, r"config.batch_size=0 is not valid; expected an int > 0"),
        ({"batch_size": 12.5}, r"config.batch_size=12.5"),
        ({"optimizer": {"grad_accum_steps": 0}}, r"config.optimizer.grad_accum_steps=0"),
        (
            {"optimizer": {"lrr": 0.1}},
            r"config.optimizer.lrr is not a known setting of config.optimizer; did you mean lr\?",
        ),
        ({"label_smoothing": 1.0}, r"config.label_smoothing=1.0 .*\[0, 1\)"),
        ({"num_steps": 0, "num_epochs": 0}, r"config.num_steps=0 and config.num_epochs=0"),
        ({"keep_checkpoints": 0}, r"config.keep_checkpoints=0"),
        ({"optimizer": {"b2": 1.0}}, r"config.optimizer.b2=1.0"),
    ],
)
def test_bad_config_values(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        prepare_config(override)


@pytest.mark.parametrize(
    "config,pattern",
    [
        ({"num_step": 5}, r"^config.num_step is not a known setting of the config's top level; did you mean num_steps"),
        ({"batchsize": 3}, r"^config.batchsize is not a known setting .*did you mean batch_size or eval_batch_size"),
        ({"data": {"crop_paddding": 4}}, r"^config.data.crop_paddding .* of config.data; did you mean crop_padding"),
        ({"model": {"widht": 8}}, r"^config.model.widht .* of config.model; did you mean width"),  # ViT's fields
        ({"parallel": {"mdoe": "pmap"}}, r"^config.parallel.mdoe .* of config.parallel; did you mean mode"),
        ({"distributed": {"num_process": 2}}, r"^config.distributed.num_process .*did you mean num_processes"),
        ({"task": "contrastive", "contrastive": {"los": "sigmoid"}}, r"^config.contrastive.los .*did you mean loss"),
        ({"task": "contrastive", "model": {"vision_widht": 8}}, r"^config.model.vision_widht .*mean vision_width"),
        ({"task": "contrastive", "data": {"crop_padding": 2}}, r"^config.data.crop_padding is not a known setting"),
        ({"task": "contrastive", "label_smoothing": 0.1}, r"^config.label_smoothing is not a known setting"),
        ({"task": "node_classification", "model": {"hiden": 4}}, r"^config.model.hiden .*did you mean hidden"),
        ({"task": "node_classification", "data": {"train_node": [0]}}, r"did you mean train_nodes"),
    ],
)
def test_unknown_keys_are_errors_with_the_closest_valid_keys(config, pattern):
    with pytest.raises(ConfigError, match=pattern):
        prepare_config(config)


def test_a_typo_fails_before_anything_is_read_or_compiled(tmp_path):
    workdir = tmp_path / "w"
    with pytest.raises(ConfigError, match="did you mean num_steps"):
        train_and_evaluate(tiny_config(tmp_path / "no_data_here", num_step=5), str(workdir))
    assert not workdir.exists()  # failed in prepare_config: no workdir, no data read, nothing compiled


def test_engine_defaults_hold_only_engine_keys_and_tasks_declare_theirs():
    engine = default_config()
    for key in ("model", "data", "label_smoothing", "contrastive"):
        assert key not in engine
    classification = default_config("classification")
    assert classification.model.name == "vit" and classification.data.crop_padding == 0
    assert classification.label_smoothing == 0.0 and classification.task == "classification"
    contrastive = prepare_config({"task": "contrastive"})
    assert contrastive.model.name == "clip" and contrastive.data.name == "fashion_mnist_captions"
    assert "crop_padding" not in contrastive.data and "label_smoothing" not in contrastive
    assert contrastive.contrastive.loss == "softmax"
    assert contrastive.optimizer.to_dict() == engine.optimizer.to_dict()
    nodes = prepare_config({"task": "node_classification"})
    assert nodes.model.name == "gcn" and nodes.batch_size == 1 and "flip" not in nodes.data


def test_config_errors_are_user_errors_and_value_errors():
    with pytest.raises(ConfigError) as info:
        prepare_config({"batch_size": 0})
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_bad_names_fail_before_training(tmp_path):
    d = write_tiny_fashion_mnist(tmp_path / "fm", n_train=16, n_test=8)
    cases = [
        ({"data.name": "no_such_dataset_xyz"}, r"config.data.name='no_such_dataset_xyz'.*valid choices.*fashion_mnist"),
        ({"task": "regression"}, r"config.task='regression' is not a known task; valid choices: \[.*'classification'"),
        ({"model.name": "resnet"}, r"config.model.name='resnet' is not valid; valid choices: \['vit'\]"),
        ({"model.name": "tests.test_train_models:NoSuchModel"}, r"has no attribute 'NoSuchModel'"),
        (
            {"model.bogus_arg": 3},
            r"config.model.bogus_arg is not a known setting of config.model; .*valid keys: dropout_rate",
        ),
    ]
    for override, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            train_and_evaluate(tiny_config(d, **override), str(tmp_path / "w"))


def test_config_json_roundtrip():
    config = default_config()
    assert from_json(to_json(config)).to_dict() == config.to_dict()


def test_decay_rules_skip_biases_norms_and_embeddings():
    params = {
        "embedding": {"kernel": 1, "bias": 1},
        "cls": 1,
        "pos_embedding": 1,
        "encoder": {
            "encoderblock_0": {
                "LayerNorm_0": {"scale": 1, "bias": 1},
                "MlpBlock_0": {"Dense_0": {"kernel": 1, "bias": 1}},
            }
        },
        "Embed_0": {"embedding": 1},
        "head": {"kernel": 1, "bias": 1},
    }
    mults = decay_multipliers(params, DEFAULT_DECAY_RULES)
    decayed = sorted(p for p, m in _flat(mults).items() if m == 1.0)
    assert decayed == ["embedding/kernel", "encoder/encoderblock_0/MlpBlock_0/Dense_0/kernel", "head/kernel"]
    with pytest.raises(ValueError, match=r"parameter 'head/bias' matches no rule"):
        decay_multipliers({"head": {"bias": 1}}, [(".*kernel", 1.0)])


def _flat(tree):
    return {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_schedule_warmup_then_cosine():
    s = make_schedule(2.0, warmup_steps=4, total_steps=24, end_lr_ratio=0.1)
    np.testing.assert_allclose([float(s(t)) for t in (0, 2, 4)], [0.0, 1.0, 2.0], rtol=1e-6)
    t = 14  # halfway through the cosine: end + (peak - end) * (1 + cos(pi/2)) / 2
    np.testing.assert_allclose(float(s(t)), 0.2 + 1.8 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(float(s(24)), 0.2, rtol=1e-5)


def test_optimizer_matches_optax_adamw_with_mask():
    rng = np.random.default_rng(0)
    params = {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=2), jnp.float32),
        }
    }
    cfg = ml_collections.ConfigDict(
        dict(
            lr=0.01,
            weight_decay=0.1,
            b1=0.9,
            b2=0.99,
            eps=1e-8,
            warmup_steps=0,
            end_lr_ratio=1.0,
            grad_clip=0.0,
            decay_rules=DEFAULT_DECAY_RULES,
        )
    )
    tx, _ = make_optimizer(cfg, params, total_steps=10)
    ref = optax.adamw(
        0.01, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, mask={"dense": {"kernel": True, "bias": False}}
    )
    p1, p2, s1, s2 = params, params, tx.init(params), ref.init(params)
    for i in range(3):
        g = jax.tree.map(lambda x: jnp.sin(x * (i + 1)), p1)
        u1, s1 = tx.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p1, p2)


def test_gradient_clipping_bounds_the_update():
    params = {"kernel": jnp.zeros(4)}
    cfg = ml_collections.ConfigDict(
        dict(
            lr=1.0,
            weight_decay=0.0,
            b1=0.0,
            b2=0.0,
            eps=0.0,
            warmup_steps=0,
            end_lr_ratio=1.0,
            grad_clip=0.5,
            decay_rules=DEFAULT_DECAY_RULES,
        )
    )
    tx, _ = make_optimizer(cfg, params, 10)
    # b1 = b2 = 0: the Adam update is g / |g| elementwise, independent of clipping; so check clipping alone
    clip = tx.init(params)
    g = {"kernel": jnp.full(4, 3.0)}
    clipped, _ = optax.clip_by_global_norm(0.5).update(g, optax.EmptyState())
    np.testing.assert_allclose(float(jnp.linalg.norm(clipped["kernel"])), 0.5, rtol=1e-6)
    updates, _ = tx.update(g, clip, params)
    np.testing.assert_allclose(updates["kernel"], -np.ones(4), rtol=1e-5)


def test_task_registry_and_protocol(tmp_path):
    assert resolve_task_class("classification").__name__ == "ClassificationTask"
    d = write_tiny_fashion_mnist(tmp_path, n_train=16, n_test=8)
    task = make_task(prepare_config(tiny_config(d)))
    assert isinstance(task, Task)
    assert task.num_train_examples == 16 and task.num_classes == 10


def test_metrics_jsonl_tensorboard_and_plot(tmp_path):
    d = write_tiny_fashion_mnist(tmp_path / "fm", n_train=32, n_test=8)
    workdir = tmp_path / "w"
    result = train_and_evaluate(tiny_config(d, tensorboard=True, plot=True, eval_every=2), str(workdir))
    records = read_metrics(str(workdir / "metrics.jsonl"))
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    assert {"loss", "accuracy", "grad_norm", "lr", "examples_per_s"} <= set(train[0])
    assert evals[-1]["accuracy"] == result["eval_accuracy"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    png = (workdir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["batch_size"] == 16 and saved["model"]["name"] == "tests.test_train_models:TinyMLP"


def test_metric_logger_appends_across_runs(tmp_path):
    for step in (1, 2):
        log = MetricLogger(str(tmp_path), total_steps=2, start_step=step - 1, progress=False, tensorboard=False)
        log.write(step, "train", {"loss": float(step)})
        log.close(plot=False)
    assert [r["loss"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1.0, 2.0]


def test_configs_saved_before_tasks_declared_their_keys_still_load():
    # What older versions wrote to config.json for a contrastive run: the engine's old classification keys too.
    old = prepare_config({"task": "contrastive"}).to_dict()
    old["label_smoothing"] = 0.0
    old["data"].update(crop_padding=0, flip=False)
    config = prepare_config(from_json(json.dumps(old)))
    assert "label_smoothing" not in config and "flip" not in config.data and config.data.mean == 0.5
    with pytest.raises(ConfigError, match="did you mean label_smoothing"):  # a key the task declares stays checked
        prepare_config({"label_smothing": 0.1})


def test_train_docstrings_name_every_built_in_task():
    import mmjax.train
    import mmjax.train.task

    for name, path in mmjax.train.task.TASKS.items():
        module, cls = path.split(":")
        assert f":mod:`{module}`" in mmjax.train.__doc__, name
        assert f"{module}.{cls}" in mmjax.train.task.__doc__, name
    assert "plug in" not in mmjax.train.__doc__ + mmjax.train.task.__doc__  # no longer a promise
