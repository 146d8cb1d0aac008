"""Tiny models the engine tests train (importable as "tests.test_train_models:TinyMLP"), and their sanity checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.keypath import set_path


class TinyMLP(nn.Module):
    """Flatten -> Dense(hidden) -> gelu -> (dropout) -> LayerNorm -> Dense(num_classes); returns (logits, aux)."""

    num_classes: int = 10
    hidden: int = 16
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        x = images.reshape(images.shape[0], -1)
        x = nn.gelu(nn.Dense(self.hidden)(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.LayerNorm()(x)
        logits = nn.Dense(self.num_classes)(x)
        return logits, {"hidden": x}


class TinyCNN(nn.Module):
    """Conv(4, 3x3, stride 2) -> relu -> global mean -> Dense(num_classes); returns logits only."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2)(images))
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def test_tiny_models_shapes():
    x = jnp.zeros((3, 8, 8, 1))
    for model, want in [(TinyMLP(num_classes=5), (3, 5)), (TinyCNN(num_classes=4), (3, 4))]:
        params = model.init(jax.random.key(0), x)["params"]
        out = model.apply({"params": params}, x)
        logits = out[0] if isinstance(out, tuple) else out
        assert logits.shape == want


def test_tiny_mlp_dropout_uses_rng():
    model = TinyMLP(dropout_rate=0.5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    a, _ = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
    b, _ = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})
    c, _ = model.apply({"params": params}, x, train=False)
    assert not np.allclose(a, b)
    assert np.allclose(model.apply({"params": params}, x, train=False)[0], c)


def write_tiny_fashion_mnist(directory, n_train=64, n_test=20, size=8, seed=0):
    """Writes the four Fashion-MNIST IDX files (gzipped) with ``size x size`` images whose brightness encodes the
    label (learnable in a few steps); returns ``directory``."""
    import os

    from mmjax.data.fashion_mnist import write_idx

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.integers(0, 60, (n, size, size)) + labels[:, None, None] * 19).astype(np.uint8)
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return str(directory)


def tiny_config(data_dir, **overrides):
    """A config dict for a seconds-long run of TinyMLP on the tiny IDX data (no progress bar/TensorBoard/plot)."""
    config = {
        "model": {"name": "tests.test_train_models:TinyMLP"},
        "data": {"data_dir": str(data_dir)},
        "batch_size": 16,
        "eval_batch_size": 8,
        "num_steps": 4,
        "log_every": 2,
        "checkpoint_every": 2,
        "progress": False,
        "tensorboard": False,
        "plot": False,
        "optimizer": {"lr": 1e-2, "warmup_steps": 1},
    }
    for key, value in overrides.items():
        set_path(config, key, value)
    return config


class SlowClassificationTask:
    """ClassificationTask whose training batches take ``MMJAX_TEST_BATCH_DELAY`` seconds each (default 0.05), so a
    test can kill or signal a run between checkpoints. Same data, model and results as "classification"."""

    @staticmethod
    def default_config():
        """The classification task's keys and defaults (this task takes the same config)."""
        from mmjax.train.classification import ClassificationTask

        return ClassificationTask.default_config()

    def __new__(cls, config):
        import os
        import time

        from mmjax.train.classification import ClassificationTask

        task = ClassificationTask(config)
        delay = float(os.environ.get("MMJAX_TEST_BATCH_DELAY", "0.05"))
        original = task.train_batches

        def slow_batches(start_step):
            for batch in original(start_step):
                time.sleep(delay)
                yield batch

        task.train_batches = slow_batches
        return task
