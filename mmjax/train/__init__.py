"""The training engine: one loop for every task (image and image-graph classification, contrastive image-text
training, node classification, text-to-image diffusion, captioning, detection, image-text matching), which joins a model, its loss, metrics and data.

* :mod:`mmjax.train.task`: the Task interface (read its docstring first) and the task registry.
* :mod:`mmjax.train.classification`: image classification task (any image model: ViT, a GCN over patches).
* :mod:`mmjax.train.contrastive`: contrastive image-text task (CLIP, SigLIP, LiT).
* :mod:`mmjax.train.node_classification`: transductive node classification task (a GCN on one graph).
* :mod:`mmjax.train.diffusion`: text-to-image diffusion task (a DiT conditioned on a caption's text tower).
* :mod:`mmjax.train.captioning`: image captioning task (a ViT + text decoder; teacher forcing, CapPa).
* :mod:`mmjax.train.coca`: CoCa task (CLIP + a captioning decoder on the image tokens, both losses).
* :mod:`mmjax.train.detection`: open-vocabulary detection task (OWL-ViT: CLIP + box and class heads, COCO AP).
* :mod:`mmjax.train.graph_matching`: image-text matching task (graph fusion of patches and words, cross-attention,
  CLIP) against hard negatives, with CLIP retrieval re-ranked by the matching model.
* :mod:`mmjax.train.optimizer`: AdamW with weight-decay rules, warmup + cosine, clipping.
* :mod:`mmjax.train.state`: the train state pytree.
* :mod:`mmjax.train.parallel`: "single" / "pmap" / "sharded" (+ FSDP) layouts and compilation.
* :mod:`mmjax.train.checkpoint`: orbax checkpoints (atomic, keep last K, loud failures).
* :mod:`mmjax.train.metrics`: JSON lines, TensorBoard, progress bar, curve plot.
* :mod:`mmjax.train.config`: the engine's defaults (each task declares its own), merging and strict validation.
* :mod:`mmjax.train.sweep`: seed sweeps (``--config.seed=0,1,2``), the mean and min-max of each final metric.
* :mod:`mmjax.train.loop`: ``train_and_evaluate(config, workdir)``, ``evaluate(workdir)`` and
  ``restore_run(workdir)`` (the task and parameters of a run's latest checkpoint).
"""

from mmjax.train.checkpoint import Checkpointer
from mmjax.train.config import default_config, prepare_config, validate_config
from mmjax.train.loop import evaluate, make_train_step, restore_run, train_and_evaluate
from mmjax.train.optimizer import DEFAULT_DECAY_RULES, decay_multipliers, make_optimizer, make_schedule
from mmjax.train.parallel import MODES, Plan, make_plan
from mmjax.train.state import TrainState
from mmjax.train.task import TASKS, Task, make_task

__all__ = [
    "Checkpointer",
    "DEFAULT_DECAY_RULES",
    "MODES",
    "Plan",
    "TASKS",
    "Task",
    "TrainState",
    "decay_multipliers",
    "default_config",
    "evaluate",
    "make_optimizer",
    "make_plan",
    "make_schedule",
    "make_task",
    "make_train_step",
    "prepare_config",
    "restore_run",
    "train_and_evaluate",
    "validate_config",
]
