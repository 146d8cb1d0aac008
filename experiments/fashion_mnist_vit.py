"""ViT on Fashion-MNIST, sized for a 2-core CPU and a 15-minute budget.

Run:

    mmjax train --config experiments/fashion_mnist_vit.py --workdir /tmp/fashion_mnist_vit

(``python -m mmjax`` works the same; rerunning the command resumes from the last checkpoint.) Data: the Debian package
``dataset-fashion-mnist`` (or ``--config.data.data_dir=DIR`` with the four IDX files). It prints the final metrics
(``eval_accuracy`` on the 10k test images), the wall time and the workdir, which holds ``metrics.jsonl``, TensorBoard
events and the training curve ``curves.png``.

Target: test accuracy >= 0.91 within 15 minutes on 2 CPU cores. NOT reached. Measured on the 2-core machine shared
with 4 other jobs (load average 10-16; this job got 40% of one core on average), `/usr/bin/time` around the command:

* this config (4 epochs): test accuracy 0.8711 (0.8122 / 0.8427 / 0.8626 after epochs 1-3), 10 min 48 s wall
  (196 s user + 66 s system CPU, i.e. about 2.5 minutes on two idle cores);
* the same with ``--config.num_epochs=10 --config.data.crop_padding=2``: 0.8729, 21 min 23 s wall (598 s CPU).

A patch-7 ViT this small plateaus near 0.87-0.88 in short schedules; reaching 0.91 likely needs patch 4 (49 tokens,
about 3x the compute per image) for 10+ epochs, which fits 15 minutes only on an idle machine.

Model: ViT with patch 7 (4x4 = 16 tokens), width 96, depth 4, 4 heads, MLP 192, mean pooling, no class token. On this
CPU a 16-token model trains as fast per image as a width-64 patch-4 (49-token) one and learns faster per step
(epoch-1 test accuracy 0.815 vs 0.797 in our trials). Schedule: AdamW (peak lr 2e-3 after 200 warmup steps, cosine to
0; weight decay 0.05 on kernels only), batch 128, 4 epochs, label smoothing 0.1, horizontal flips.
"""

import ml_collections

from mmjax.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
    """The job's configuration (see the module docstring for the command and the expected result)."""
    config = default_config()
    config.seed = 0
    config.model = ml_collections.ConfigDict(dict(
        name="vit", variant=None, width=96, depth=4, num_heads=4, mlp_dim=192, patch_size=7,
        pool_type="gap", class_token=False, posemb="learn",
    ))
    config.data.name = "fashion_mnist"
    config.data.crop_padding = 0  # random crops (padding 2) measured worse here: 0.8729 after 10 epochs
    config.data.flip = True
    config.data.mean = 0.286  # Fashion-MNIST pixel mean and std (train split)
    config.data.std = 0.353
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 4.0
    config.label_smoothing = 0.1
    config.optimizer.lr = 2e-3
    config.optimizer.weight_decay = 0.05
    config.optimizer.warmup_steps = 200
    config.optimizer.grad_clip = 1.0
    config.log_every = 50
    config.eval_every = 469  # once per epoch (469 steps of 128)
    config.checkpoint_every = 469
    return config
