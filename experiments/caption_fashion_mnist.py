"""An image captioner on Fashion-MNIST captions, sized for a 2-core CPU in at most 10 minutes.

Run:

    mmjax train --config experiments/caption_fashion_mnist.py --workdir runs/caption
    mmjax caption --workdir runs/caption IMAGE.png ...      # captions of image files from the trained run

Data: :mod:`mmjax.data.captions`, as the CLIP job (``experiments/clip_fashion_mnist.py``): the 60 000 Fashion-MNIST
training items, tinted with one of 8 colours, at one of 2 sizes and 5 positions on a 48x48 canvas, each with its
caption ("a small red sneaker in the top left"); 10 (colour, item) combinations never occur in training and are
evaluated apart ("held-out"). Needs the Debian package ``dataset-fashion-mnist``.

Model (:class:`mmjax.captioner.Captioner`): the CLIP job's image tower (a hybrid ViT: four 3x3 stride-2 convs of
32/64/128/128 channels as im2col matmuls take the HSV canvas to 3x3 tokens, class token, 2 blocks of width 128) whose
10 tokens a 2-block causal decoder of width 128 cross-attends (12 positions, tied embeddings, exact GELU) on the
file-free word tokenizer. Loss: token cross-entropy; CapPa's parallel prediction for 3 of every 4 rows (they read
[MASK] at every position, with no causal mask), teacher forcing for the rest. AdamW (peak lr 2e-3 after 200 warmup
steps, cosine to 0, weight decay 0.1), 2000 steps of batch 256.

Printed and saved at the end (``report.json``, ``captions.jsonl``, ``caption_grid.png``): greedy captions of the 2000
test images and the 2000 held-out-combination images: exact caption match, per-attribute accuracy parsed from the
generated caption (item, colour, size, position), BLEU-4 and CIDEr-D, and CapPa's scoring classifier's zero-shot item
accuracy (log-likelihood of the 80 prompts per item, on 500 test images). Targets: item >= 0.88, colour, size and
position >= 0.98, exact match >= 0.80 on test images; exact match >= 0.70 on the held-out combinations.

Measured over seeds 0, 1, 2 (2026-12-07, ``mmjax train --config experiments/caption_fashion_mnist.py --workdir DIR
--config.seed=0,1,2``; mean (min-max)). Test images: exact caption 0.8383 (0.8355-0.84), item 0.8385 (0.8355-0.84),
colour 0.9998, size 1.000, position 1.000, BLEU-4 0.9283, CIDEr-D 8.848; the scoring classifier's zero-shot item
accuracy 0.8447 (0.836-0.85; CLIP's zero-shot item accuracy in experiments/clip_fashion_mnist.py: 0.8472). Held-out
combinations: exact 0.3593 (0.339-0.379), item 0.3617, colour 0.9973, size 0.9998, position 0.9997. Targets: test
exact, colour, size and position met; item (0.88) and held-out exact (0.70) NOT met. Seed 2 took 8 min 2 s on the
idle machine (2000 steps at about 1150 images/s, then the evaluation and report); seeds 0 and 1 shared the machine.

What moved it (seed 0, runs sharing the machine, so no wall times): teacher forcing alone, 1500 steps: test exact
0.828 / held-out 0.2395 (the decoder conditions the item word on the colour word before it, and a colour never seen
with an item makes that item improbable); CapPa parallel prediction for 3 of 4 rows, 2000 steps: 0.84 / 0.379
greedy, 0.831 / 0.3885 with CapPa's parallel decoding (``--config.captioning.decode=parallel``), so the held-out
gap is in the image features too, not only in the language prior. Held-out exact match falls as training goes on
(0.3875 at step 500, 0.379 at 2000) while test exact rises (0.7325 -> 0.84).
"""

import ml_collections

from mmjax.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
    """The job's configuration (see the module docstring for the command and the expected result)."""
    config = default_config("captioning")  # the engine's and the task's defaults
    config.seed = 0
    config.task = "captioning"
    config.model = ml_collections.ConfigDict(
        dict(
            name="captioner",
            dtype="float32",
            context_length=12,
            vision_width=128,
            vision_depth=2,
            vision_num_heads=4,
            vision_mlp_dim=256,
            vision_patch_size=1,
            vision_stem_features=(32, 64, 128, 128),
            vision_stem_impl="matmul",
            vision_posemb="learn",
            num_map_queries=0,
            decoder_width=128,
            decoder_depth=2,
            decoder_num_heads=4,
            decoder_mlp_dim=256,
            decoder_activation="gelu",
            tie_embeddings=True,
            dropout_rate=0.0,
        )
    )
    config.data = ml_collections.ConfigDict(
        dict(
            name="fashion_mnist_captions",
            data_dir="",
            image_size=48,
            num_train=0,
            num_test=2000,
            num_heldout=2000,
            data_seed=0,
            mean=0.25,
            std=0.35,
            colour_space="hsv",
        )
    )
    config.captioning = ml_collections.ConfigDict(
        dict(
            label_smoothing=0.0,
            masked_pred_prob=0.75,  # CapPa: 3 of 4 rows predict every token from the image alone
            decode="autoregressive",
            num_beams=1,
            length_penalty=1.0,
            scoring_examples=500,
        )
    )
    config.batch_size = 256
    config.eval_batch_size = 500
    config.num_steps = 2000
    config.optimizer.lr = 2e-3
    config.optimizer.weight_decay = 0.1
    config.optimizer.warmup_steps = 200
    config.optimizer.grad_clip = 1.0
    config.parallel.mode = "single"
    config.log_every = 50
    config.eval_every = 500
    config.checkpoint_every = 500
    config.progress = False
    config.tensorboard = False
    config.plot = True
    return config
