"""The training loop: ``train_and_evaluate(config, workdir)`` and ``evaluate(workdir)``; reads top to bottom.

1. merge the config over the defaults and validate it; write ``workdir/config.json``;
2. build the parallel plan (checks the batch divides the devices before anything compiles) and the task;
3. initialise parameters from the seed, build the optimizer and the train state (with ``ema_params``, a copy of the
   initial parameters, when ``config.optimizer.ema_decay > 0``);
4. restore the latest checkpoint of ``workdir/checkpoints`` if there is one (an unreadable or mismatching one is an
   error) - the data order, dropout keys and schedule all derive from the step, so the run continues exactly;
5. run the steps: log train metrics every ``log_every``, evaluate every ``eval_every``, checkpoint every
   ``checkpoint_every`` and at the end, save the images a task draws (``task.sample_images(params)``, optional)
   every ``image_every`` to ``workdir/images/`` and TensorBoard; SIGTERM finishes the current step, saves and returns (one that comes
   during steps 1-4, before training began, stops the run after its first step; with several processes, a SIGTERM to any of them stops all of them after the same step: the next one, see
   :class:`mmjax.train.distributed.StopAgreement`);
6. evaluate, save the curve plot and return the final metrics.

With ``config.optimizer.ema_decay > 0`` every step also updates the exponential moving average of the parameters
(:func:`mmjax.train.optimizer.update_ema`, inside the compiled step, in every parallel mode), checkpoints hold it
and a resumed run continues it exactly; every evaluation - during training, at the end, :func:`evaluate` and the
task's ``final_report`` - then uses the EMA parameters (:attr:`mmjax.train.state.TrainState.eval_params`) instead of
the raw ones, which only the optimizer sees.

Outputs in ``workdir``: ``config.json``, ``checkpoints/<step>/``, ``metrics.jsonl``, ``tensorboard/``,
``curves.png``, and what the task saves with the run (the contrastive task's word vocabulary, ``vocab.json``).
``workdir`` is a local path or a URI that orbax and ``etils.epath`` write to (``gs://bucket/run``;
see :mod:`mmjax.train.storage`).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.errors import UserError
from mmjax.train import storage
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.config import from_json, prepare_config, to_json
from mmjax.train.distributed import StopAgreement
from mmjax.train.metrics import MetricLogger, Stopwatch
from mmjax.train.optimizer import ema_decay_at, global_norm, make_optimizer, update_ema
from mmjax.train.parallel import MESH_AXIS, Plan, make_plan, split_micro_batches
from mmjax.train.state import TrainState
from mmjax.train.task import make_task

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def make_train_step(
    task, tx, schedule, plan: Plan, accum: int, seed: int, *, ema_decay: float = 0.0, ema_warmup: bool = False
):
    """Returns ``step_fn(state, batch) -> (state, metrics)`` (not yet compiled) for ``plan``.

    The dropout key of step ``t`` is ``fold_in(fold_in(key(seed), 1), t)`` (and the device index under pmap).
    With ``accum > 1`` the batch is split into ``accum`` micro-batches (see
    :func:`mmjax.train.parallel.split_micro_batches`) whose gradients are averaged with a ``lax.scan``.

    Metrics of a step: the task's, plus ``loss``, ``grad_norm`` (global L2 norm of the averaged gradient) and ``lr``.

    With ``ema_decay > 0`` (``config.optimizer.ema_decay``; the state must carry ``ema_params``, see
    :meth:`TrainState.create`) the step ends with ``ema = d ema + (1 - d) params`` on the updated parameters, where
    ``d = ema_decay_at(ema_decay, step, ema_warmup)`` (:func:`mmjax.train.optimizer.update_ema`). The EMA never
    feeds back: the parameters follow exactly the trajectory they follow without it.

    A least-squares "task" with ``w = 0``: the gradient of ``mean((x w - y)^2)`` is ``-2`` per weight, so SGD with
    learning rate 0.1 moves ``w`` to 0.2:

    >>> class LeastSquares:
    ...     def loss(self, params, batch, rng, *, train, axis_name):
    ...         return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}
    >>> tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
    >>> step = jax.jit(make_train_step(LeastSquares(), tx, schedule, make_plan("single"), accum=2, seed=0))
    >>> state = TrainState.create({"w": jnp.zeros(2)}, tx)
    >>> state, metrics = step(state, {"x": jnp.ones((4, 2)), "y": jnp.ones(4)})
    >>> int(state.step), [round(float(w), 4) for w in state.params["w"]], round(float(metrics["loss"]), 4)
    (1, [0.2, 0.2], 1.0)
    >>> sorted(metrics), round(float(metrics["grad_norm"]), 4)
    (['grad_norm', 'loss', 'lr'], 2.8284)
    >>> ema_step = jax.jit(make_train_step(LeastSquares(), tx, schedule, make_plan("single"), 1, 0, ema_decay=0.5))
    >>> state, _ = ema_step(TrainState.create({"w": jnp.zeros(2)}, tx, ema=True), {"x": jnp.ones((4, 2)),
    ...                                                                             "y": jnp.ones(4)})
    >>> state.params["w"].tolist(), state.ema_params["w"].tolist()  # ema = 0.5 * 0 + 0.5 * 0.2
    ([0.20000000298023224, 0.20000000298023224], [0.10000000149011612, 0.10000000149011612])
    """
    axis_name = plan.axis_name
    groups = plan.num_devices if plan.mode == "sharded" else 1
    base_rng = jax.random.fold_in(jax.random.key(seed), 1)

    def loss_fn(params, batch, rng):
        return task.loss(params, batch, rng, train=True, axis_name=axis_name)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step_fn(state: TrainState, batch):
        if (state.ema_params is not None) != (ema_decay > 0):
            raise ValueError(
                f"make_train_step(ema_decay={ema_decay!r}) needs a state "
                + ("with ema_params: TrainState.create(..., ema=True)" if ema_decay > 0 else "without ema_params")
            )
        rng = jax.random.fold_in(base_rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        if accum == 1:
            (loss, metrics), grads = grad_fn(state.params, batch, rng)
        else:
            micro = split_micro_batches(batch, accum, groups)
            if plan.mode == "sharded":
                micro = jax.lax.with_sharding_constraint(micro, NamedSharding(plan.mesh, P(None, MESH_AXIS)))
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, state.params, first, rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

            def body(carry, xs):
                i, mb = xs
                out = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, out), None

            summed, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            (loss, metrics), grads = jax.tree.map(lambda x: x / accum, summed)
        if axis_name is not None:
            grads, loss, metrics = jax.lax.pmean((grads, loss, metrics), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema_params is not None:
            ema_params = update_ema(ema_params, params, ema_decay_at(ema_decay, state.step, ema_warmup))
        metrics = {**metrics, "loss": loss, "grad_norm": global_norm(grads), "lr": schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
        return new_state, metrics

    return step_fn


def _total_steps(config, task) -> int:
    if config.num_steps > 0:
        return int(config.num_steps)
    return max(1, math.ceil(config.num_epochs * task.num_train_examples / config.batch_size))


class _Preemption:
    """Sets a flag on SIGTERM (main thread only) so the loop can save and return; restores the old handler."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _setup(config, workdir: str):
    """Plan, task, optimizer and the initial (or restored) canonical state."""
    plan = make_plan(
        config.parallel.mode, config.parallel.num_devices, config.parallel.fsdp, config.parallel.fsdp_min_size
    )
    accum = config.optimizer.grad_accum_steps
    plan.check_batch_size(config.batch_size, accum)
    plan.check_batch_size(config.eval_batch_size, 1, "config.eval_batch_size")
    task = make_task(config, workdir)  # a task may keep files with the run (e.g. a vocabulary)
    total_steps = _total_steps(config, task)
    first = next(iter(task.train_batches(0)))
    init_rng = jax.random.fold_in(jax.random.key(config.seed), 0)
    params = task.init_params(init_rng, first)
    tx, schedule = make_optimizer(config.optimizer, params, total_steps)
    if hasattr(task, "wrap_optimizer"):  # optional hook, e.g. freezing a tower
        tx = task.wrap_optimizer(tx, params)
    state = TrainState.create(params, tx, ema=config.optimizer.ema_decay > 0)
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), config.keep_checkpoints)
    if ckpt.latest_step() is not None:
        _check_checkpoint_ema(ckpt, config.optimizer.ema_decay)
        shardings = plan.state_shardings(state)
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
        state = ckpt.restore(target)
    return plan, task, tx, schedule, state, ckpt, total_steps


def _check_checkpoint_ema(ckpt: Checkpointer, ema_decay: float) -> None:
    """A checkpoint with EMA parameters resumes only with ``ema_decay > 0``, one without them only with 0."""
    step = ckpt.latest_step()
    saved = ckpt.saved_keys(step)
    if ("ema_params" in saved) == (ema_decay > 0):
        return
    if ema_decay > 0:
        what = f"was written without an EMA of the parameters, but config.optimizer.ema_decay={ema_decay!r} needs one"
        fix = "resume with config.optimizer.ema_decay=0 (the setting the run started with)"
    else:
        what = "holds an EMA of the parameters, but config.optimizer.ema_decay=0 (off)"
        fix = "resume (or evaluate) with the config.optimizer.ema_decay the run was trained with (see its config.json)"
    raise UserError(f"checkpoint {ckpt.step_dir(step)} {what}; {fix}, or use a fresh --workdir")


def _evaluate(task, plan: Plan, eval_step, placed_params) -> dict[str, float]:
    sums = None
    for batch in task.eval_batches():
        out = eval_step(placed_params, plan.place_batch(batch))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    if sums is None:
        raise UserError("the evaluation data is empty")
    sums = jax.device_get(sums)
    count = float(sums.pop("count"))
    return {k: float(v) / max(count, 1.0) for k, v in sums.items()} | {"count": count}


def _write_config(config, workdir: str) -> None:
    # atomic, with a temporary name unique to the process: several processes of a multi-host run share the workdir
    storage.write_text(storage.join(workdir, CONFIG_FILE), to_json(config))


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and returns the final metrics.

    Returns a dict with ``step``, ``eval_<metric>`` (e.g. ``eval_accuracy``; of the EMA parameters when
    ``config.optimizer.ema_decay > 0``), ``train_loss``, ``wall_time_s``, ``examples_per_s`` (steady state, after the
    first step), ``workdir`` and ``preempted`` (True when SIGTERM stopped the run early; the checkpoint is saved and
    rerunning the same command resumes).

    Raises:
      ValueError: bad config values (naming key, value and valid choices), a batch that does not divide the devices,
        or an unreadable / mismatching checkpoint (naming its directory).

    Example (a 2-step run of a tiny ViT on 8x8 images written as IDX files; then the saved run is evaluated):

    >>> import os, tempfile, numpy as np
    >>> from mmjax.data import write_idx
    >>> data, workdir = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> rng = np.random.default_rng(0)
    >>> for prefix, n in [("train", 16), ("t10k", 8)]:
    ...     write_idx(os.path.join(data, f"{prefix}-images-idx3-ubyte"), rng.integers(0, 255, (n, 8, 8), np.uint8))
    ...     write_idx(os.path.join(data, f"{prefix}-labels-idx1-ubyte"), rng.integers(0, 10, n).astype(np.uint8))
    >>> config = {"model": {"name": "vit", "variant": None, "width": 8, "depth": 1, "num_heads": 1, "mlp_dim": 8,
    ...                     "patch_size": 4}, "data": {"data_dir": data}, "batch_size": 8, "eval_batch_size": 8,
    ...           "num_steps": 2, "progress": False, "tensorboard": False, "plot": False}
    >>> result = train_and_evaluate(config, workdir)
    >>> result["step"], result["eval_count"], sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    (2, 8.0, ['2'])
    >>> evaluate(workdir)["eval_accuracy"] == result["eval_accuracy"]
    True
    """
    watch = Stopwatch()
    # the SIGTERM handler is in place from the start: a SIGTERM during set-up or compilation stops the run after its
    # first step, as one during training does, instead of killing the process before anything is saved
    with _Preemption() as preemption:
        return _train(config, workdir, watch, preemption)


def _train(config, workdir: str, watch: Stopwatch, preemption: _Preemption) -> dict[str, Any]:
    config = prepare_config(config)
    workdir = storage.resolve(workdir)  # a URI (gs://bucket/run) as given, a local path made absolute
    storage.path(workdir).mkdir(parents=True, exist_ok=True)
    _write_config(config, workdir)
    plan, task, tx, schedule, state, ckpt, total_steps = _setup(config, workdir)
    start_step = int(state.step)
    accum = config.optimizer.grad_accum_steps
    abstract = jax.eval_shape(lambda s: s, state)
    opt = config.optimizer
    step_fn = make_train_step(
        task, tx, schedule, plan, accum, config.seed, ema_decay=opt.ema_decay, ema_warmup=opt.ema_warmup
    )
    step_fn = plan.compile_train_step(step_fn, abstract)
    eval_step = plan.compile_eval_step(lambda p, b: task.eval_metrics(p, b, axis_name=plan.axis_name))
    placed = plan.from_canonical(state)
    del state
    examples_per_step = task.example_count(next(iter(task.train_batches(start_step)))) * jax.process_count()
    logger = MetricLogger(
        workdir,
        total_steps,
        start_step,
        examples_per_step,
        progress=config.progress,
        tensorboard=config.tensorboard,
        unit=getattr(task, "unit", "ex"),
    )
    pending: list = []
    train_time, timed_steps, interval_start = 0.0, 0, 0
    last_train: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    step = start_step
    preempted = False

    def host_metrics(ms):
        ms = jax.device_get(ms)
        if plan.mode == "pmap":
            ms = [jax.tree.map(lambda x: x[0], m) for m in ms]
        return {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}

    try:
        agreement = StopAgreement()  # a SIGTERM reaches one process; all must stop after the same step
        noticed = False
        batches = iter(task.train_batches(start_step))
        lap = time.perf_counter()
        while step < total_steps:
            batch = next(batches)
            placed, metrics = step_fn(placed, plan.place_batch(batch))
            if preemption.requested and not noticed:
                noticed = True
                print(
                    f"mmjax: process {jax.process_index()}/{jax.process_count()} received SIGTERM during step "
                    f"{step + 1}; saving a checkpoint and stopping (every process stops after the same step)",
                    file=sys.stderr,
                    flush=True,
                )
            stop = agreement.vote(preemption.requested)  # once per step on every process: it is a collective
            if pending:  # keep at most one step in flight: honest progress/ETA, prompt SIGTERM handling
                jax.block_until_ready(pending[-1])
            pending.append(metrics)
            step += 1
            logger.advance()
            if step == start_step + 1:  # the first step includes compilation: time from its end
                jax.block_until_ready(metrics)
                lap, train_time, timed_steps, interval_start = time.perf_counter(), 0.0, 0, 0
            else:
                timed_steps += 1
            if step % config.log_every == 0 or step == total_steps:
                last_train = host_metrics(pending)
                pending = []
                now = time.perf_counter()
                interval, lap = now - lap, now
                train_time += interval
                steps_in_interval, interval_start = timed_steps - interval_start, timed_steps
                rate = steps_in_interval * examples_per_step / interval if interval > 0 else float("nan")
                logger.write(step, "train", {**last_train, "examples_per_s": rate})  # over this interval
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                ckpt.save(step, plan.to_canonical(placed))
            if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                t0 = time.perf_counter()
                eval_metrics = _evaluate(task, plan, eval_step, plan.params_for_eval(placed))
                logger.write(step, "eval", eval_metrics)
                lap += time.perf_counter() - t0  # evaluation time does not count as training time
            if config.image_every and step % config.image_every == 0 and hasattr(task, "sample_images"):
                t0 = time.perf_counter()  # optional hook: images drawn by the model as it trains (process 0 draws)
                if jax.process_count() == 1:
                    logger.write_images(step, task.sample_images(plan.to_canonical(placed).eval_params))
                lap += time.perf_counter() - t0  # drawing time does not count as training time
            if stop:
                preempted = step < total_steps
                break
        ckpt.save(step, plan.to_canonical(placed))
        if not preempted:
            eval_metrics = _evaluate(task, plan, eval_step, plan.params_for_eval(placed))
            logger.write(step, "eval", eval_metrics)
            if hasattr(task, "final_report"):  # optional hook: full-set evaluation and plots after training
                params = plan.to_canonical(placed).eval_params  # the EMA parameters when the run keeps them
                if jax.process_count() > 1:  # every process takes part in the gather; process 0 alone reports
                    from jax.experimental import multihost_utils

                    params = multihost_utils.process_allgather(params, tiled=True)
                if jax.process_index() == 0:
                    # the task writes with local file APIs: staged locally and copied up when workdir is remote
                    eval_metrics.update(storage.call_staged(lambda local: task.final_report(params, local), workdir))
    finally:
        logger.close(plot=config.plot)
        ckpt.close()
    if timed_steps and train_time > 0:
        rate = timed_steps * examples_per_step / train_time
    else:
        rate = float("nan")
    result = {
        "step": step,
        "total_steps": total_steps,
        "preempted": preempted,
        "workdir": workdir,
        "wall_time_s": watch.elapsed(),
        "examples_per_s": rate,
    }
    result.update({f"train_{k}": v for k, v in last_train.items()})
    result.update({f"eval_{k}": v for k, v in eval_metrics.items()})
    return result


def load_config(workdir: str):
    """The config a run saved in ``workdir/config.json`` (see :func:`train_and_evaluate`).

    >>> import tempfile
    >>> workdir = tempfile.mkdtemp()
    >>> with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    ...     _ = f.write(to_json(prepare_config({"batch_size": 64})))
    >>> load_config(workdir).batch_size
    64
    """
    path = storage.join(storage.resolve(workdir), CONFIG_FILE)
    if not storage.exists(path):
        raise UserError(f"workdir {workdir!r} has no {CONFIG_FILE}: it is not a training run's directory")
    return from_json(storage.read_text(path))


def restore_run(workdir: str, overrides=None):
    """The task and evaluation parameters of the latest checkpoint of the run in ``workdir``: its saved config (plus
    ``overrides``), its EMA parameters when the run kept them (``config.optimizer.ema_decay > 0``), else its
    parameters, gathered to the host.

    Returns ``(config, task, params, step)``. Raises ``ValueError`` if ``workdir`` is not a run or has no checkpoint.

    >>> restore_run("/nonexistent")
    Traceback (most recent call last):
    ...
    mmjax.errors.UserError: workdir '/nonexistent' has no config.json: it is not a training run's directory
    """
    config, plan, task, state = _restore(workdir, overrides)
    return config, task, jax.device_get(state.eval_params), int(state.step)


def _restore(workdir: str, overrides):
    from mmjax.train.config import merge

    config = load_config(workdir)
    if overrides:
        config = merge(config, overrides)
    config = prepare_config(config)
    ckpt_dir = storage.join(storage.resolve(workdir), CHECKPOINT_DIR)
    if not storage.path(ckpt_dir).is_dir() or not any(storage.path(ckpt_dir).iterdir()):
        raise UserError(f"no checkpoint found in {ckpt_dir}: train first (mmjax train ... --workdir {workdir})")
    plan, task, _, _, state, ckpt, _ = _setup(config, workdir)
    latest = ckpt.latest_step()
    ckpt.close()
    if latest is None:
        raise UserError(f"no checkpoint found in {ckpt_dir}: train first (mmjax train ... --workdir {workdir})")
    return config, plan, task, state


def evaluate(workdir: str, overrides=None) -> dict[str, Any]:
    """Evaluates the latest checkpoint of the run in ``workdir`` with its saved config (plus ``overrides``): its EMA
    parameters when the run kept them (``config.optimizer.ema_decay > 0``), else its parameters.

    Returns ``{"step": int, "eval_<metric>": float, ...}``. Raises ``ValueError`` if there is no checkpoint.
    (Example: see :func:`train_and_evaluate`.)

    >>> evaluate("/nonexistent")
    Traceback (most recent call last):
    ...
    mmjax.errors.UserError: workdir '/nonexistent' has no config.json: it is not a training run's directory
    """
    config, plan, task, state = _restore(workdir, overrides)
    eval_step = plan.compile_eval_step(lambda p, b: task.eval_metrics(p, b, axis_name=plan.axis_name))
    placed = plan.from_canonical(state)
    metrics = _evaluate(task, plan, eval_step, plan.params_for_eval(placed))
    return {"step": int(state.step), **{f"eval_{k}": v for k, v in metrics.items()}}
