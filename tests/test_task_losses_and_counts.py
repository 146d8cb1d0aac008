"""The classification tasks' details: per-channel normalisation, their losses (one cross-entropy,
``mmjax.losses``, bit-identical to the optax formulas they used before) and the throughput count
(``Task.example_count``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.errors import ConfigError
from mmjax.losses import softmax_cross_entropy, softmax_cross_entropy_sum
from mmjax.train import loop, make_task, prepare_config, train_and_evaluate
from mmjax.train.classification import ClassificationTask
from tests.test_train_models import tiny_config, write_tiny_fashion_mnist


class CountsHalfTask(ClassificationTask):
    """Classification whose batches count half their rows as real examples (as a padded graph batch would)."""

    def example_count(self, batch) -> int:
        return int(np.shape(batch["label"])[0]) // 2


def _tiny_task(tmp_path, **overrides):
    data = write_tiny_fashion_mnist(tmp_path / "fm", n_train=32, n_test=8)
    return make_task(prepare_config(tiny_config(data, **overrides)))


def test_per_channel_mean_and_std_are_accepted(tmp_path):
    scalar = _tiny_task(tmp_path)
    per_channel = _tiny_task(tmp_path, **{"data.mean": (0.5,), "data.std": [0.5]})
    batch = next(scalar.train_batches(0))
    np.testing.assert_array_equal(np.asarray(scalar._images(batch)), np.asarray(per_channel._images(batch)))
    for key, value, pattern in [
        ("data.mean", (0.1, 0.2, 0.3), r"config.data.mean=\(0.1, 0.2, 0.3\) is not valid; expected one number or 1"),
        ("data.mean", "0.5", r"config.data.mean='0.5' is not valid"),
        ("data.std", 0.0, r"config.data.std=0.0 is not valid; expected numbers > 0"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            _tiny_task(tmp_path, **{key: value})


def test_classification_losses_are_mmjax_losses_bit_for_bit(tmp_path):
    task = _tiny_task(tmp_path, label_smoothing=0.1)
    batch = next(task.train_batches(0))
    params = task.init_params(jax.random.key(0), batch)
    loss, _ = jax.jit(lambda p, b: task.loss(p, b, jax.random.key(1), train=False))(params, batch)

    def before(p, b):  # the task's formula before it used mmjax.losses
        logits = task.model.apply({"params": p}, task._images(b), train=False)[0].astype(jnp.float32)
        targets = optax.smooth_labels(jax.nn.one_hot(b["label"], logits.shape[-1]), 0.1)
        return optax.softmax_cross_entropy(logits, targets).mean()

    assert np.asarray(loss).tobytes() == np.asarray(jax.jit(before)(params, batch)).tobytes()
    eval_batch = next(iter(task.eval_batches()))
    ours = jax.jit(task.eval_metrics)(params, eval_batch)["loss"]

    def eval_before(p, b):
        logits = task.model.apply({"params": p}, task._images(b), train=False)[0].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["label"])
        return jnp.sum(ce * b["mask"])

    assert np.asarray(ours).tobytes() == np.asarray(jax.jit(eval_before)(params, eval_batch)).tobytes()


def test_node_classification_loss_is_mmjax_losses_bit_for_bit():
    config = prepare_config({"task": "node_classification", "model": {"hidden": 4}, "label_smoothing": 0.2})
    task = make_task(config)
    batch = next(task.train_batches(0))
    params = task.init_params(jax.random.key(0), batch)
    loss, _ = jax.jit(lambda p, b: task.loss(p, b, None, train=False))(params, batch)

    def before(p, b):
        logits = task._logits(p, b, train=False)
        targets = optax.smooth_labels(jax.nn.one_hot(b["labels"], logits.shape[-1]), 0.2)
        ce, m = optax.softmax_cross_entropy(logits, targets), b["train_mask"]
        return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)

    assert np.asarray(loss).tobytes() == np.asarray(jax.jit(before)(params, batch)).tobytes()


def test_weighted_and_summed_cross_entropy_match_numpy_in_float64():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(6, 5)) * 3, rng.integers(0, 5, 6)
    where = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    log_p = logits - logits.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    eps = 0.1
    targets = (1 - eps) * np.eye(5)[labels] + eps / 5
    per_example = -(targets * log_p).sum(-1)
    plain = -log_p[np.arange(6), labels]
    with jax.enable_x64(True):
        got = softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), eps, where=jnp.asarray(where))
        np.testing.assert_allclose(float(got), (per_example * where).sum() / where.sum(), rtol=0, atol=1e-10)
        got_sum = softmax_cross_entropy_sum(jnp.asarray(logits), jnp.asarray(labels), where=jnp.asarray(where))
        np.testing.assert_allclose(float(got_sum), (plain * where).sum(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(
            float(softmax_cross_entropy_sum(jnp.asarray(logits), jnp.asarray(labels))), plain.sum(), atol=1e-10
        )
    with pytest.raises(ValueError, match=r"where must have the shape of labels \(6,\)"):
        softmax_cross_entropy(logits, labels, where=where[:3])


def test_throughput_counts_the_tasks_examples(tmp_path, monkeypatch):
    seen = []

    class RecordingLogger(loop.MetricLogger):
        def __init__(self, workdir, total_steps, start_step, examples_per_step, **kwargs):
            seen.append(examples_per_step)
            super().__init__(workdir, total_steps, start_step, examples_per_step, **kwargs)

    monkeypatch.setattr(loop, "MetricLogger", RecordingLogger)
    data = write_tiny_fashion_mnist(tmp_path / "fm", n_train=32, n_test=8)
    task = "tests.test_task_losses_and_counts:CountsHalfTask"
    train_and_evaluate(tiny_config(data, task=task, num_steps=2), str(tmp_path / "w"))
    assert seen == [8]  # batch_size 16, of which the task counts 8 examples per step
