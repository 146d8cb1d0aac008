"""CLIP ViT-B/16 at accelerator scale (TPU pod slice or multi-GPU hosts): the Fashion-MNIST job's recipe, grown up.

Not run here at full size (it needs accelerators and a prepared image-text dataset);
``tests/test_remote_workdir.py`` runs this command for one step on CPU at a tiny size (widths, depths, batch and
image size overridden), with a local stand-in for the bucket.

Once, before the first run: put OpenAI's BPE vocabulary in the bucket (it ships in the ``open_clip_torch`` wheel) and
install the Google Cloud filesystem packages on every host (``gcsfs`` for checkpoints, config and metrics through
``etils.epath``; ``google-cloud-storage`` for TensorBoard's event files)::

    pip download open_clip_torch --no-deps -d /tmp/oc
    unzip -p /tmp/oc/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz > bpe_simple_vocab_16e6.txt.gz
    gsutil cp bpe_simple_vocab_16e6.txt.gz gs://BUCKET/
    pip install gcsfs google-cloud-storage    # on every host

Run, on every host of the slice (TPU pods, Slurm and Open MPI are detected automatically; elsewhere set
``MMJAX_COORDINATOR_ADDRESS=host0:port MMJAX_NUM_PROCESSES=N MMJAX_PROCESS_ID=i`` on each host, see
:mod:`mmjax.train.distributed`)::

    mmjax train --config experiments/clip_b16_tpu.py --workdir gs://BUCKET/clip_b16 \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets \\
        --config.model.bpe_path=gs://BUCKET/bpe_simple_vocab_16e6.txt.gz

Everything the run writes goes to the ``--workdir`` bucket path (checkpoints through orbax, ``config.json``,
``metrics.jsonl``, ``curves.png``, ``tensorboard/``); rerunning the same command resumes from its latest checkpoint.

Data: ``coco_captions`` prepared as ArrayRecord (``tfds build coco_captions --file_format=array_record``), read with
``as_data_source`` (no TensorFlow at training time); each host reads its own ``1 / num_hosts`` share
(``jax.process_index()``); a random one of the ~5 captions per image each step; CLIP's BPE tokenizer
(``config.model.bpe_path``, required: OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, or a Hugging Face CLIP tokenizer
directory with ``vocab.json`` and ``merges.txt``; local or ``gs://``).
Swap in a larger image-text set (e.g. a LAION/DataComp subset as a folder of images + captions.jsonl, data name
``"folder"``) for more than a demonstration: COCO's 118k images are far too few for ViT-B/16 from scratch.

Model: OpenAI's ViT-B/16 sizes (``preset="ViT-B/16"``: 224 px, patch 16, width 768, depth 12; text width 512,
depth 12, 77 positions, embeddings 512), bfloat16 compute with float32 parameters and loss, every block
rematerialised (``remat=True``) and scanned over depth (``scan=True``, one compiled block).

Parallelism: ``"sharded"`` over every device of every host (``jax.devices()``), FSDP (large parameter and Adam
leaves split over the devices; XLA all-gathers them for the forward/backward and reduce-scatters the gradients),
global batch 32768 (OpenAI CLIP's), negatives from the whole global batch. ``contrastive.micro_batches`` is the
exact (GradCache) accumulation knob when a batch does not fit: embeddings of all micro-batches first, then the
full-batch loss, then one backward pass per micro-batch with the cached embedding gradients.

Schedule: AdamW (lr 5e-4, b2 0.98, eps 1e-6, weight decay 0.2 on kernels), 2 000 warmup steps, cosine to zero over
32 epochs-equivalent of the chosen data; logit scale initialised at log(1/0.07), clamped at log(100).

Expected: on COCO alone, a ViT-B/16 from scratch overfits; the intended use is a large data set or LiT
(``contrastive.freeze_image_tower=True`` with an image tower converted from a pretrained checkpoint,
:mod:`mmjax.convert`), where COCO retrieval R@1 reaches the tens of percent within a few thousand steps.
"""

import ml_collections

from mmjax.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
    """The job's configuration (see the module docstring)."""
    config = default_config("contrastive")  # the engine's and the task's defaults
    config.seed = 0
    config.task = "contrastive"
    config.model = ml_collections.ConfigDict(
        dict(
            name="clip",
            preset="ViT-B/16",
            dtype="bfloat16",
            tokenizer="bpe",
            bpe_path="",  # required: --config.model.bpe_path=gs://BUCKET/bpe_simple_vocab_16e6.txt.gz (see above)
            image_size=224,
            context_length=77,
            remat=True,
            scan=True,
        )
    )
    config.data = ml_collections.ConfigDict(
        dict(
            name="tfds",
            tfds_name="coco_captions",
            data_dir="",
            train_split="train",
            eval_split="val",
            image_key="image",
            caption_key="captions/text",
            image_size=224,
            mean=(0.48145466, 0.4578275, 0.40821073),
            std=(0.26862954, 0.26130258, 0.27577711),
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
    config.batch_size = 32768
    config.eval_batch_size = 4096
    config.num_steps = 0
    config.num_epochs = 32.0
    config.optimizer.lr = 5e-4
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-6
    config.optimizer.weight_decay = 0.2
    config.optimizer.warmup_steps = 2000
    config.optimizer.grad_clip = 1.0
    config.parallel.mode = "sharded"
    config.parallel.fsdp = True
    config.parallel.fsdp_min_size = 2**16
    config.log_every = 50
    config.eval_every = 2000
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.progress = False
    config.tensorboard = True
    config.plot = True
    return config
