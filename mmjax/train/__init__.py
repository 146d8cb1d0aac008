"""The training engine: one loop for every task (classification now; graphs and CLIP plug in as tasks).

* :mod:`mmjax.train.task`: the Task interface (read its docstring first) and the task registry.
* :mod:`mmjax.train.classification`: image classification task.
* :mod:`mmjax.train.optimizer`: AdamW with weight-decay rules, warmup + cosine, clipping.
* :mod:`mmjax.train.state`: the train state pytree.
* :mod:`mmjax.train.parallel`: "single" / "pmap" / "sharded" (+ FSDP) layouts and compilation.
* :mod:`mmjax.train.checkpoint`: orbax checkpoints (atomic, keep last K, loud failures).
* :mod:`mmjax.train.metrics`: JSON lines, TensorBoard, progress bar, curve plot.
* :mod:`mmjax.train.config`: defaults and validation.
* :mod:`mmjax.train.loop`: ``train_and_evaluate(config, workdir)`` and ``evaluate(workdir)``.
"""

from mmjax.train.checkpoint import Checkpointer
from mmjax.train.config import default_config, prepare_config, validate_config
from mmjax.train.loop import evaluate, make_train_step, train_and_evaluate
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
    "train_and_evaluate",
    "validate_config",
]
