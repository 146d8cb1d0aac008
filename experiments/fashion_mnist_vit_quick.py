"""A seconds-long smoke version of ``fashion_mnist_vit.py`` (tiny ViT, a few steps) for tests and quick checks.

Run:

    mmjax train --config experiments/fashion_mnist_vit_quick.py --workdir /tmp/fm_quick

Expected result: it finishes in well under a minute and prints an ``eval_accuracy`` above chance (> 0.1 is not
guaranteed after 8 steps; the test only checks that the run completes, checkpoints and evaluates). Override
``--config.data.data_dir=DIR`` to read IDX files from ``DIR`` (the tests write tiny ones).
"""

import ml_collections

from mmjax.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
    """Tiny ViT (width 16, depth 1, patch 7), 8 steps of batch 32, then evaluation on the test split."""
    config = default_config("classification")  # the engine's and the task's defaults
    config.model = ml_collections.ConfigDict(
        dict(
            name="vit",
            variant=None,
            width=16,
            depth=1,
            num_heads=2,
            mlp_dim=32,
            patch_size=7,
            pool_type="gap",
            class_token=False,
        )
    )
    config.data.name = "fashion_mnist"
    config.data.crop_padding = 2
    config.data.flip = True
    config.batch_size = 32
    config.eval_batch_size = 32
    config.num_steps = 8
    config.label_smoothing = 0.1
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 2
    config.log_every = 4
    config.checkpoint_every = 4
    config.progress = False
    config.tensorboard = False
    config.plot = False
    return config
