"""Runs a contrastive training job in this process: ``python -m tests.jobs.contrastive_job CONFIG_JSON WORKDIR OUT``.

* ``jax.distributed`` is initialised from ``config.distributed`` / ``MMJAX_*`` variables (:mod:`mmjax.train.distributed`)
  before anything touches a device.
* ``config.task = "tests.jobs.contrastive_job:TestContrastiveTask"`` adds two test knobs read from the environment:
  ``MMJAX_TEST_STEP_DELAY`` (seconds slept per training batch, so a test can kill the job between checkpoints) and
  ``MMJAX_TEST_EMULATE_HOSTS=n`` (one process yields the concatenation of the ``n`` per-host shards, i.e. exactly the
  global batch that ``n`` processes assemble).
* After training, process 0 restores the final checkpoint (replicated) and writes its params and the result to
  ``OUT`` (``.npz`` with flattened parameter paths, plus ``OUT.json``).
"""

import json
import os
import sys
import time


def tiny_config(**overrides) -> dict:
    """A seconds-long contrastive job: the "tiny" CLIP on 16x16 Fashion-MNIST captions; ``overrides`` use dotted keys."""
    config = {
        "task": "tests.jobs.contrastive_job:TestContrastiveTask",
        "seed": 0,
        "model": {"name": "clip", "preset": "tiny", "context_length": 16, "vision_depth": 1, "text_depth": 1},
        "data": {
            "name": "fashion_mnist_captions",
            "image_size": 16,
            "num_train": 96,
            "num_test": 16,
            "num_heldout": 16,
        },
        "batch_size": 16,
        "eval_batch_size": 16,
        "num_steps": 3,
        # Adam eps 1e-6: the attention key bias has an identically zero gradient (softmax is shift invariant); with a
        # tiny eps Adam would turn its float round-off into full +-lr steps that differ between parallel layouts.
        "optimizer": {"lr": 3e-3, "warmup_steps": 0, "grad_clip": 1.0, "eps": 1e-6},
        "contrastive": {"final_report": False},
        "log_every": 1,
        "checkpoint_every": 1,
        "progress": False,
        "tensorboard": False,
        "plot": False,
    }
    from mmjax.keypath import set_path

    for key, value in overrides.items():
        set_path(config, key, value)
    return config


def _main(argv):
    config_json, workdir, out = argv
    from mmjax.train import distributed

    config = json.loads(config_json)
    distributed.initialize(config)

    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mmjax.train import Checkpointer, TrainState, make_optimizer, make_task, prepare_config, train_and_evaluate
    from mmjax.train.optimizer import param_path

    result = train_and_evaluate(config, workdir)
    print(json.dumps(result, default=str), flush=True)
    if result.get("preempted"):
        return
    cfg = prepare_config(config)
    task = make_task(cfg)
    first = next(iter(task.train_batches(0)))
    abstract = jax.eval_shape(
        lambda: (lambda p: TrainState.create(p, make_optimizer(cfg.optimizer, p, 1)[0]))(
            task.init_params(jax.random.key(0), first)
        )
    )
    mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), abstract)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    state = ckpt.restore(target)
    ckpt.close()
    if jax.process_index() == 0:
        flat = {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
        np.savez(out, **flat)
        with open(out + ".json", "w") as f:
            json.dump(result, f, default=str)


def __getattr__(name):  # lazy: the task class needs jax, which must not be imported before distributed.initialize
    if name == "TestContrastiveTask":
        return _task_class()
    raise AttributeError(name)


def _task_class():
    from mmjax.data import image_text
    from mmjax.train.contrastive import ContrastiveTask

    class TestContrastiveTask(ContrastiveTask):
        """ContrastiveTask with a per-batch delay and optional host emulation (see the module docstring)."""

        def train_batches(self, start_step):
            delay = float(os.environ.get("MMJAX_TEST_STEP_DELAY", "0"))
            hosts = int(os.environ.get("MMJAX_TEST_EMULATE_HOSTS", "0"))
            if hosts:
                import numpy as np

                streams = [
                    image_text.train_batches(
                        self.train_source, self.batch_size, self.seed, start_step, process_index=i, process_count=hosts
                    )
                    for i in range(hosts)
                ]
                while True:
                    parts = [next(s) for s in streams]
                    captions = [c for p in parts for c in p["caption"]]
                    yield {
                        "image": np.concatenate([p["image"] for p in parts]),
                        "ids": self.tokenizer(captions, context_length=self.context_length),
                    }
            else:
                for batch in super().train_batches(start_step):
                    if delay:
                        time.sleep(delay)
                    yield batch

    return TestContrastiveTask


if __name__ == "__main__":
    _main(sys.argv[1:])
