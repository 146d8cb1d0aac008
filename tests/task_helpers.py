"""Scaffolding the engine-task tests share (tests/test_train_captioning.py, test_train_detection.py, test_coca.py):
a task that preempts itself at a given step, a task on float64 data, the last checkpoint of a run, and the one-step
agreement of the parallel modes (proven in float64, bounded in float32)."""

import os
import signal

import jax
import numpy as np

from mmjax.train.checkpoint import Checkpointer
from tests.test_train_task import RUN_LR, run
from tests.tolerances import adam_params_atol, assert_trees_float64_equal, float32_atol, float64, to_float64

SIGTERM_ENV = "MMJAX_TEST_SIGTERM_AT_STEP"
MODE_TEST_ADAM = {"eps": 1e-2, "grad_clip": 1.0}  # eps 1e-2: identically-zero gradients stay put (see below)


class SigtermAtStep:
    """Mixin for a task (``class X(SigtermAtStep, SomeTask)``): sends itself SIGTERM while loading the batch of step
    ``$MMJAX_TEST_SIGTERM_AT_STEP`` (1-based), so the run stops after that step as a preempted job does."""

    def train_batches(self, start_step):
        stop = int(os.environ.get(SIGTERM_ENV, "0"))
        for step, batch in enumerate(super().train_batches(start_step), start=start_step + 1):
            if step == stop:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


def in_float64(task):
    """The same task on float64 batches and params (instance attributes shadow the methods)."""
    batches, init = task.train_batches, task.init_params
    task.train_batches = lambda start: (to_float64(b) for b in batches(start))
    task.init_params = lambda rng, batch: to_float64(init(rng, batch))
    return task


def saved_state(workdir: str) -> dict:
    """The last checkpoint of the run in ``workdir`` (``params``, ``opt_state``, ...) as host arrays."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    tree = ckpt._manager.restore(ckpt.latest_step())
    ckpt.close()
    return jax.device_get(tree)


def assert_modes_agree_after_one_step(new_task, gradient_terms: float, opt: dict = MODE_TEST_ADAM) -> None:
    """single / pmap (8 devices) / sharded: one optimizer step of ``new_task()`` from the same params.

    The equality of all three is proven in float64 (``in_float64``, to the tree's scale). In float32, sharded (the
    mode of TPU and GPU jobs) is compared with single, each parameter bounded by Adam's response to gradient
    round-off: gradients clipped to global norm 1, their entries sums of about ``gradient_terms`` terms of both signs
    through a few layers (``4 sqrt(gradient_terms)`` ulps); pmap's float32 run is left out, as it would only bound
    round-off again (each engine run compiles the task's whole train step). Adam's eps is 1e-2: with a tiny eps,
    parameters whose gradient is identically zero (e.g. attention key biases) would turn round-off into steps of up
    to lr.
    """
    with float64():
        reference64 = run(in_float64(new_task()), "single", steps=1, **opt)
        assert all(x.dtype == np.float64 for x in jax.tree.leaves(reference64))
        for mode in ("pmap", "sharded"):
            got = run(in_float64(new_task()), mode, steps=1, **opt)
            assert_trees_float64_equal(got, reference64, scale="tree", err_msg=mode)
    reference = run(new_task(), "single", steps=1, **opt)
    dg = float32_atol(1.0, terms=4 * np.sqrt(gradient_terms))
    got = run(new_task(), "sharded", steps=1, **opt)
    for (path, want), have in zip(jax.tree_util.tree_flatten_with_path(reference)[0], jax.tree.leaves(got)):
        atol = adam_params_atol(steps=1, lr=RUN_LR, adam_eps=opt["eps"], grad_atol=dg, param_scale=np.abs(want).max())
        np.testing.assert_allclose(have, want, rtol=0, atol=atol, err_msg=f"sharded {jax.tree_util.keystr(path)}")
