"""CLIP on Fashion-MNIST captions, sized for a 2-core CPU in at most 10 minutes (training + evaluation).

Run:

    make demo                      # = the command below in runs/demo
    mmjax train --config experiments/clip_fashion_mnist.py --workdir runs/clip

(``python -m mmjax`` works the same. ``mmjax train`` runs with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >=
2.35: XLA:CPU's large per-step buffers on transparent huge pages) unless ``GLIBC_TUNABLES`` is set; without it this
job runs about 1.17x slower, 1095 instead of 1280 pairs/s.) Data: :mod:`mmjax.data.captions` - the 60 000 Fashion-MNIST training items,
tinted with one of 8 colours, at one of 2 sizes and 5 positions on a 48x48 canvas (items of 16 and 26 px), each with
its caption ("a small red sneaker in the top left"); 10 (colour, item) combinations never occur in training. Needs
the Debian package ``dataset-fashion-mnist`` (or ``--config.data.data_dir=DIR`` with the IDX files).

Model: CLIP with a hybrid ViT image tower (four 3x3 stride-2 convs of 32/64/128/128 channels, computed as im2col
matmuls, take the 48x48 canvas to 3x3 tokens; 1x1 patch embedding, class token, 2 encoder blocks of width 128, 4
heads, MLP 256) and a causal text tower (width 128, 1 block, 16 positions) on the file-free word tokenizer; embeddings
of width 128. The image tower sees HSV, not RGB (``data.colour_space="hsv"``). Loss: CLIP's softmax contrastive loss
over batches of 256 pairs, learned temperature (initial 30, clamped at 100). Each batch is 8 (size, position) places
x 2 colours x 16 captions (``data.groups_per_batch`` / ``group_by`` / ``subgroup_by``): in-batch hard negatives for
the item and for the colour. Schedule: AdamW (peak lr 4e-3 after 400 warmup steps, cosine to 0, weight decay 0.4 on
kernels), 2250 steps (9.6 epochs of the 60 000 captions).

What each choice bought (``eval_item_accuracy`` / ``eval_heldout_combo_accuracy``, runs on the idle 2-core CPU):

* the starting point, 64x64 canvas, RGB, uniform batches of 256, 900 steps: 0.7525 / 0.6565 in 8 min 17 s;
* HSV input: the value channel ``max(R, G, B)`` draws an item the same in every colour. A supervised probe of the
  tower (600 steps) showed the effect on the held-out combinations: 0.558 with RGB, 0.747 with HSV, at equal test
  accuracy (0.823 / 0.818). With RGB a red pullover or a blue shirt (never seen) was recognised 13% / 6% of the time;
* the 48x48 canvas: the image tower's forward + backward on 256 images takes 262 instead of 512 ms; in the
  supervised probe 600 steps at 48 px (170 s) reached 0.823, 300 steps at 64 px (162 s) 0.760;
* grouped batches: uniform batches of 256 hold about 3 captions of the same colour, size and position per example, so
  the loss rarely has to tell items apart. 300 steps: 0.528 / 0.442 uniform, 0.543 / 0.505 grouped by
  (colour, size, position). That grouping alone left few colour-only negatives and zero-shot colour accuracy
  collapsed in two runs (0.23, 0.24); grouping by place then colour keeps both: 2000 steps, 0.8265 / 0.720 by
  (colour, size, position), 0.8295 / 0.750 by place x colour;
* im2col stem convs: XLA's CPU convolution is slow for few channels; the same convs as matmuls make a training
  step 1.2x faster (1060 instead of 900 pairs/s);
* batch 128 for 3400 steps (same time) gave a better probe (0.829) but a worse zero-shot (0.7835 / 0.7065);
* huge pages for malloc (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, which ``make demo`` sets): XLA:CPU allocates its
  step's large temporaries afresh each step, and with 4 KiB pages the kernel faulted them in again every time (16.4
  million minor faults and 29 s of system time in 200 steps; 0.33 million and 16 s with huge pages). 1095 -> 1280
  pairs/s; the 2250 steps and evaluation take 8 min 33 s (9 min 38 s without it at the previous settings);
* a higher peak lr with a longer warmup, and strong weight decay. The training images overfit: with lr 4e-3 and
  weight decay 0.05 zero-shot item accuracy was 0.944 on 4000 training images and 0.849 on the test images (2550
  steps); with weight decay 0.4, 0.915 and 0.8595. Runs of 2250 steps, item / held-out: lr 2e-3, 50 warmup steps,
  decay 0.05: 0.841 / 0.748; lr 3e-3: zero-shot colour collapsed (0.275): the text tower ignored the colour word
  (captions that differ only in colour had cosine similarity 1.0) and training loss stayed at 1.34 instead of 1.02;
  lr 3e-3 with 250 warmup steps: 0.848 / 0.7505; lr 4e-3 with 400: 0.845 / 0.773; then weight decay 0.2:
  0.8525 / 0.783; 0.4: 0.8595 / 0.795; 0.8: 0.8435 / 0.8095;
* what did not help: 2550 steps (lr 2e-3: 0.834 / 0.7535; lr 4e-3, decay 0.05: 0.849 / 0.756), a third encoder
  block in the image tower (0.8465 / 0.7505), mean text pooling (lr 3e-3: 0.823 / 0.714), and two caption-keeping
  augmentations, which slowed learning more than they regularised in this budget: items mirrored inside their box
  plus 1-pixel crops (0.827 / 0.7305), whole-image flips with "left" and "right" swapped in the caption
  (0.8315 / 0.745). Each row is one run of seed 0 (a rerun gives the same numbers); settings that should matter
  little (2250 or 2550 steps) moved item accuracy by up to 0.007, so differences of that size are noise.
* tried for the 0.85 mean on the AMD EPYC machine (2026-12-02, accuracy is the same under load): 2750 steps, seed 0:
  0.8505 / 0.798 (2250 steps: 0.8545 / 0.7965); a wider last stem conv, ``--config.model.vision_stem_features=(32,
  64,128,192)``, seeds 0, 1, 2: 0.8465 / 0.854 / 0.847 (mean 0.8492; held-out 0.7965 / 0.798 / 0.784), +0.002 over
  this config's mean, not enough to adopt.
* tried for it on 2026-12-07: an EMA of the weights for every evaluation (``--config.optimizer.ema_decay=0.999
  --config.optimizer.ema_warmup=True``), seeds 1 and 2: 0.843 / 0.8455 (held-out 0.7955 / 0.7895), sum 1.6885 against
  1.687 for this config's seeds 1 and 2 (0.8415 and 0.8455): no gain, not adopted (seed 0 was not run). Captions
  repeat inside a batch (16 captions of one place and colour name 10 items), so the loss also pushes an image away
  from its own sentence when another image carries it; a loss that counts every pair with the same sentence as a
  positive (``-log`` of the summed softmax over them, both directions; a one-off patch, not in the code), seed 0:
  item 0.846 (this config: 0.8545), held-out combinations 0.834 (0.7965): better on unseen combinations, not on items.

Zero-shot prompts are in the caption grammar and ensembled over the other attributes
(:data:`mmjax.data.captions.ZERO_SHOT_TEMPLATES`: the class "sneaker" averages the 80 prompts "a small red sneaker in
the top left", ...), as CLIP ensembles its 80 ImageNet templates; the earlier four generic prompts ("a {}", "a small
{}", ...) gave 0.661 instead of 0.716 item accuracy on the same lr-1e-3 checkpoint.

Printed and saved at the end (``eval_*`` in the printed JSON, ``metrics.jsonl``, ``report.json``):

* zero-shot item accuracy on the test images (``eval_item_accuracy``; target >= 0.85), colour accuracy
  (``eval_colour_accuracy``), accuracy on the held-out (colour, item) combinations (``eval_heldout_combo_accuracy``:
  80-way colour+item; target >= 0.75; also ``eval_heldout_item_accuracy`` / ``eval_heldout_colour_accuracy``);
* with the engine's final-report hook (``task.final_report``): retrieval recall R@1/5/10, a linear probe, the plots
  ``confusion_item.png`` and ``retrieval_grid.png``; the training curve is ``curves.png``; checkpoints are in
  ``runs/clip/checkpoints/<step>``.

Measured over seeds 0, 1, 2 (2026-12-02, the idle 2-core AMD EPYC machine, one job at a time, ``mmjax train
--config experiments/clip_fashion_mnist.py --workdir DIR --config.seed=0,1,2`` with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``; mean (min-max)): zero-shot item accuracy **0.8472** (0.8415-0.8545): the
0.85 target is **not** met by the mean (seed 0 alone: 0.8545); colour 1.000 on every seed; colour+item 0.8505
(0.8455-0.859); held-out combinations **0.7893** (0.781-0.7965; target 0.75 met; item 0.8043, colour 1.000);
retrieval image->text R@1/5/10 0.8254/0.9306/0.9698, text->image 0.1732/0.5641/0.7327 (the 4000 test captions hold
about 800 distinct sentences, so text->image R@1 cannot exceed about 0.2); linear probe (item, ridge on 5000
training images) 0.846 (0.8395-0.8495). 2250 steps, 6 min 43 s and 7 min 7 s wall for seeds 1 and 2 (1533 and 1440
pairs/s; seed 0: 8 min 2 s, while a test shared the machine for about a minute). On the earlier 2-core machine
(2026-11-29, about 2/3 of this one's matmul speed) seed 0 gave 0.8595 / 0.795 in 8 min 33 s (1225 pairs/s). The
tuning runs above are seed 0 on that machine; the seeds here span 0.013 in item accuracy, more than most of the
differences between those settings.

The same command on the 2-core Intel Xeon VM (2026-12-08; the wall times are not quoted: tests shared the machine,
which slows a run but does not change its numbers): zero-shot item accuracy 0.8495 (0.8415-0.8595; seeds 0, 1, 2:
0.8595, 0.8415, 0.8475), again just short of 0.85; colour 1.000; held-out combinations 0.7935 (0.7815-0.804);
retrieval image->text R@1 0.8265; linear probe 0.8518 (0.843-0.8585). Seed 0 gives 0.8595 / 0.795 here, as on the
earlier machine, and 0.8545 / 0.7965 on the AMD EPYC: the processor changes the numbers of a seed, not their spread.
On this machine, resampling colour, size and position for every pass over the items (``--config.data.num_train=300000``:
five renders of each of the 60 000 items, drawn with replacement), seed 0: item 0.8545, held-out 0.827 (this config:
0.8595 / 0.795): better on unseen combinations, not on items; not adopted. The wider last stem conv
(``--config.model.vision_stem_features=(32,64,128,192)``), seeds 0, 1, 2 on this machine, idle: item 0.8482
(0.841-0.852), held-out 0.7852 (0.776-0.7955), 9 min 5 s to 9 min 19 s a run: +0.002 on the AMD, -0.001 here; the
seed, not the setting, decides differences of this size.
"""

import ml_collections

from mmjax.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
    """The job's configuration (see the module docstring for the command and the expected result)."""
    config = default_config("contrastive")  # the engine's and the task's defaults
    config.seed = 0
    config.task = "contrastive"
    config.model = ml_collections.ConfigDict(
        dict(
            name="clip",
            dtype="float32",
            tokenizer="word",
            embed_dim=128,
            image_size=48,
            patch_size=1,
            vision_stem_features=(32, 64, 128, 128),
            vision_stem_impl="matmul",
            vision_width=128,
            vision_depth=2,
            vision_heads=4,
            vision_mlp_dim=256,
            context_length=16,
            text_width=128,
            text_depth=1,
            text_heads=4,
            text_mlp_dim=256,
            logit_scale_init=3.4012,
            remat=False,  # log(30)
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
            groups_per_batch=8,
            group_by=("size", "position"),
            subgroup_by=("colour",),
            subgroups_per_group=2,
        )
    )
    config.contrastive = ml_collections.ConfigDict(
        dict(
            loss="softmax",
            freeze_image_tower=False,
            micro_batches=1,
            sigmoid_chunk_size=0,
        )
    )
    config.batch_size = 256
    config.eval_batch_size = 500
    config.num_steps = 2250
    config.optimizer.lr = 4e-3
    config.optimizer.weight_decay = 0.4
    config.optimizer.warmup_steps = 400
    config.optimizer.grad_clip = 1.0
    config.parallel.mode = "single"
    config.log_every = 25
    config.eval_every = 0
    config.checkpoint_every = 1000
    config.progress = False
    config.tensorboard = False
    config.plot = True
    return config
