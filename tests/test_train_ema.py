"""The exponential moving average of the parameters (``config.optimizer.ema_decay``, ``ema_warmup``): the recurrence,
off means unchanged, exact resume, evaluation on the EMA, the parallel modes, a frozen tower, bad values."""

import os
import signal

import flax.struct
import jax
import numpy as np
import pytest

from mmjax.errors import ConfigError, UserError
from mmjax.train import (
    Checkpointer,
    TrainState,
    evaluate,
    make_optimizer,
    make_plan,
    make_task,
    make_train_step,
    prepare_config,
    train_and_evaluate,
)
from mmjax.train.optimizer import param_path
from tests.test_train_models import tiny_config, write_tiny_fashion_mnist
from tests.tolerances import assert_float32_close

STEPS = 6
SIGTERM_ENV = "MMJAX_TEST_SIGTERM_AT_STEP"


class EmaTestTask:
    """ClassificationTask (same data, model and results) with two test knobs: ``final_report`` returns the float64
    sum of every parameter it is given (``report_param_sum``), so a test sees which parameters the engine passed;
    with ``MMJAX_TEST_SIGTERM_AT_STEP=s`` the process sends itself SIGTERM while loading the batch of step ``s``
    (1-based), so the run stops after step ``s`` as a preempted job does."""

    @staticmethod
    def default_config():
        """The classification task's keys and defaults."""
        from mmjax.train.classification import ClassificationTask

        return ClassificationTask.default_config()

    def __new__(cls, config):
        from mmjax.train.classification import ClassificationTask

        task = ClassificationTask(config)
        original = task.train_batches
        stop_at = int(os.environ.get(SIGTERM_ENV, "0"))

        def batches(start_step):
            for i, batch in enumerate(original(start_step)):
                if stop_at and start_step + i + 1 == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

        def final_report(params, workdir):
            del workdir
            return {"report_param_sum": float(sum(np.sum(np.asarray(x, np.float64)) for x in jax.tree.leaves(params)))}

        task.train_batches = batches
        task.final_report = final_report
        return task


@flax.struct.dataclass
class OldTrainState:
    """The train state as it was before the EMA existed (what older checkpoints were written from)."""

    step: object
    params: object
    opt_state: object


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fm"))


def run_config(data_dir, **overrides):
    return tiny_config(
        data_dir,
        task="tests.test_train_ema:EmaTestTask",
        num_steps=STEPS,
        checkpoint_every=2,
        log_every=1,
        **{"optimizer.ema_decay": 0.9, "optimizer.ema_warmup": True, **overrides},
    )


@pytest.fixture(scope="module")
def ema_run(data_dir, tmp_path_factory):
    """An uninterrupted 6-step single-device run with EMA (decay 0.9, warm-up): (config, workdir, result)."""
    config = run_config(data_dir)
    workdir = str(tmp_path_factory.mktemp("ema_run"))
    return config, workdir, train_and_evaluate(config, workdir)


@pytest.fixture(scope="module")
def plain_run(data_dir, tmp_path_factory):
    """The same run without EMA (ema_decay=0): (config, workdir, result)."""
    config = run_config(data_dir, **{"optimizer.ema_decay": 0.0, "optimizer.ema_warmup": False})
    workdir = str(tmp_path_factory.mktemp("plain_run"))
    return config, workdir, train_and_evaluate(config, workdir)


def saved(workdir, step=None):
    """The raw tree of checkpoint ``step`` (default: latest) as saved: ``{"step", "params", "opt_state", ...}``."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step() if step is None else step
    tree = ckpt._manager.restore(step)
    ckpt.close()
    return jax.device_get(tree)


def steps_config(data_dir, mode="single", steps=4, accum=1, fsdp=False, **overrides):
    """The tiny classification config for :func:`run_steps`: batch 32 over up to 8 devices."""
    return tiny_config(
        data_dir,
        **{
            "parallel.mode": mode,
            "parallel.fsdp": fsdp,
            "parallel.fsdp_min_size": 16,
            "optimizer.grad_accum_steps": accum,
            "batch_size": 32,
            "num_steps": steps,
            **overrides,
        },
    )


def run_steps(config):
    """``config.num_steps`` optimizer steps as the engine's loop takes them (its plan, optimizer and the task's
    ``wrap_optimizer``): (initial params, canonical params after every step, final canonical state, placed state)."""
    config = prepare_config(config)
    opt, par, steps, accum = config.optimizer, config.parallel, config.num_steps, config.optimizer.grad_accum_steps
    plan = make_plan(par.mode, par.num_devices, par.fsdp, par.fsdp_min_size)
    task = make_task(config)
    batches = task.train_batches(0)
    params = task.init_params(jax.random.fold_in(jax.random.key(config.seed), 0), next(task.train_batches(0)))
    initial = jax.device_get(params)
    tx, schedule = make_optimizer(opt, params, steps)
    if hasattr(task, "wrap_optimizer"):  # as the loop does: e.g. LiT's frozen tower
        tx = task.wrap_optimizer(tx, params)
    state = TrainState.create(params, tx, ema=opt.ema_decay > 0)
    step_fn = make_train_step(
        task, tx, schedule, plan, accum, config.seed, ema_decay=opt.ema_decay, ema_warmup=opt.ema_warmup
    )
    step_fn = plan.compile_train_step(step_fn, jax.eval_shape(lambda s: s, state))
    placed = plan.from_canonical(state)
    trajectory = []
    for _ in range(steps):
        placed, _ = step_fn(placed, plan.place_batch(next(batches)))
        trajectory.append(jax.device_get(plan.to_canonical(placed).params))
    return initial, trajectory, jax.device_get(plan.to_canonical(placed)), placed


def leaves(tree):
    return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_equal(got, want, what):
    got, want = leaves(got), leaves(want)
    assert sorted(got) == sorted(want), what
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{what}: {name}")


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_the_numpy_recurrence_over_the_param_trajectory(data_dir, warmup):
    decay, steps = 0.8, 5
    initial, trajectory, final, _ = run_steps(
        steps_config(data_dir, steps=steps, **{"optimizer.ema_decay": decay, "optimizer.ema_warmup": warmup})
    )
    assert int(final.step) == steps
    want = {k: v.astype(np.float64) for k, v in leaves(initial).items()}
    for t, params in enumerate(trajectory):  # t completed steps before this update
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        want = {k: d * want[k] + (1 - d) * v.astype(np.float64) for k, v in leaves(params).items()}
    got = leaves(final.ema_params)
    assert sorted(got) == sorted(want)
    for name, value in got.items():
        assert value.dtype == leaves(final.params)[name].dtype == np.float32, name
        # each step rounds p - ema, the product and the sum (3 roundings of at most |p|), damped by d < 1 afterwards
        scale = max(np.max(np.abs(leaves(p)[name])) for p in [initial, *trajectory])
        assert_float32_close(value, want[name], terms=3 * steps, scale=scale, err_msg=name)
        assert not np.allclose(value, leaves(final.params)[name]), f"{name}: the EMA should lag the parameters"


def test_ema_off_leaves_the_state_and_the_parameters_as_before(data_dir, ema_run, plain_run):
    assert prepare_config({}).optimizer.ema_decay == 0.0 and prepare_config({}).optimizer.ema_warmup is False
    # no EMA: the state is the tree it was before the EMA existed (the same key paths, hence the same checkpoints)
    _, _, off, _ = run_steps(steps_config(data_dir, steps=3))
    assert off.ema_params is None
    old = OldTrainState(off.step, off.params, off.opt_state)
    key_paths = lambda t: [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]]  # noqa: E731
    assert key_paths(off) == key_paths(old)
    assert sorted(saved(plain_run[1])) == ["opt_state", "params", "step"]
    # the EMA never feeds back: with it on, the parameters and optimizer state are bit-identical to the run without it
    _, _, on, _ = run_steps(steps_config(data_dir, steps=3, **{"optimizer.ema_decay": 0.9}))
    assert_trees_equal(on.params, off.params, "params")
    assert_trees_equal(on.opt_state, off.opt_state, "opt_state")
    ema_final, plain_final = saved(ema_run[1]), saved(plain_run[1])
    assert_trees_equal(ema_final["params"], plain_final["params"], "params of the runs")
    assert sorted(ema_final) == ["ema_params", "opt_state", "params", "step"]


def test_checkpoint_written_before_the_ema_existed_resumes_exactly(plain_run, tmp_path):
    config, plain_dir, plain_result = plain_run
    prepared = prepare_config(config)
    task = make_task(prepared)
    params = task.init_params(jax.random.key(0), next(task.train_batches(0)))
    target = TrainState.create(params, make_optimizer(prepared.optimizer, params, STEPS)[0])
    ckpt = Checkpointer(os.path.join(plain_dir, "checkpoints"))
    mid = ckpt.all_steps()[0]
    state = ckpt.restore(target, step=mid)
    ckpt.close()
    assert mid < STEPS and int(state.step) == mid
    old_dir = str(tmp_path / "old")  # the checkpoint of step `mid` as the engine wrote it before the EMA existed
    old = Checkpointer(os.path.join(old_dir, "checkpoints"))
    old.save(mid, OldTrainState(step=state.step, params=state.params, opt_state=state.opt_state))
    old.close()
    resumed = train_and_evaluate(config, old_dir)
    assert resumed["step"] == STEPS
    assert_trees_equal(saved(old_dir), saved(plain_dir), "resumed from a pre-EMA checkpoint")
    assert resumed["eval_loss"] == plain_result["eval_loss"]


def test_resume_mid_run_is_bit_identical_params_and_ema(ema_run, tmp_path, monkeypatch):
    config, ref_dir, reference = ema_run
    workdir = str(tmp_path / "interrupted")
    monkeypatch.setenv(SIGTERM_ENV, "3")  # stops after step 3: between checkpoints 2 and 4, mid warm-up
    first = train_and_evaluate(config, workdir)
    assert first["preempted"] is True and first["step"] == 3
    interrupted = saved(workdir)
    assert int(interrupted["step"]) == 3 and "ema_params" in interrupted
    monkeypatch.delenv(SIGTERM_ENV)
    resumed = train_and_evaluate(config, workdir)
    assert resumed["step"] == STEPS and not resumed["preempted"]
    got, want = saved(workdir), saved(ref_dir)
    assert int(got["step"]) == int(want["step"]) == STEPS
    assert_trees_equal(got["params"], want["params"], "params")
    assert_trees_equal(got["ema_params"], want["ema_params"], "ema_params")
    assert_trees_equal(got["opt_state"], want["opt_state"], "opt_state")
    assert resumed["eval_loss"] == reference["eval_loss"]
    assert resumed["eval_report_param_sum"] == reference["eval_report_param_sum"]


def direct_eval(config, *param_sets):
    """The eval metrics of each of ``param_sets``, computed here on one device (sum / count over the batches)."""
    task = make_task(prepare_config(config))
    fn = jax.jit(lambda p, b: task.eval_metrics(p, b))
    results = []
    for params in param_sets:
        sums = None
        for batch in task.eval_batches():
            out = jax.device_get(fn(params, batch))
            sums = out if sums is None else {k: sums[k] + out[k] for k in out}
        count = float(sums.pop("count"))
        results.append({k: float(v) / count for k, v in sums.items()})
    return results


def param_sum(params):
    return float(sum(np.sum(np.asarray(x, np.float64)) for x in jax.tree.leaves(params)))


@pytest.mark.parametrize("mode", ["single", "pmap", "sharded"])
def test_evaluation_and_final_report_use_the_ema_params(data_dir, ema_run, tmp_path, mode):
    config, workdir, result = ema_run
    if mode != "single":
        config = run_config(data_dir, **{"parallel.mode": mode})
        workdir = str(tmp_path / mode)
        result = train_and_evaluate(config, workdir)
    state = saved(workdir)
    with_ema, with_params = direct_eval(config, state["ema_params"], state["params"])
    rtol = 0 if mode == "single" else 1e-5  # the same program on one device; a sum over devices otherwise
    for metric in ("loss", "accuracy"):
        np.testing.assert_allclose(result[f"eval_{metric}"], with_ema[metric], rtol=rtol, err_msg=metric)
    assert abs(with_ema["loss"] - with_params["loss"]) > 1e-4  # the raw params give another loss
    assert result["eval_report_param_sum"] == param_sum(state["ema_params"]) != param_sum(state["params"])
    again = evaluate(workdir)  # `mmjax eval`: the saved config, the latest checkpoint, the EMA params
    assert again["step"] == STEPS and again["eval_loss"] == result["eval_loss"]
    if mode != "single":  # the modes agree with one device, as the parameters do
        np.testing.assert_allclose(result["eval_loss"], ema_run[2]["eval_loss"], rtol=1e-5)


def test_parallel_modes_give_the_same_ema(data_dir):
    ema = {"optimizer.ema_decay": 0.8, "optimizer.ema_warmup": True}
    _, _, reference, _ = run_steps(steps_config(data_dir, "single", steps=3, **ema))
    runs = {
        "pmap": run_steps(steps_config(data_dir, "pmap", steps=3, **ema)),
        "sharded": run_steps(steps_config(data_dir, "sharded", steps=3, **ema)),
        "sharded+fsdp+accum2": run_steps(steps_config(data_dir, "sharded", steps=3, accum=2, fsdp=True, **ema)),
    }
    for name, (_, _, final, placed) in runs.items():
        assert int(final.step) == 3, name
        for tree in ("params", "ema_params"):  # bounded as tests/test_train_parallel.py bounds the parameters
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=f"{name} {tree}"),
                getattr(final, tree),
                getattr(reference, tree),
            )
        # the EMA is laid out as the parameters are (replicated, pmap-stacked or FSDP-sharded)
        same_layout = jax.tree.map(lambda e, p: e.sharding == p.sharding, placed.ema_params, placed.params)
        assert all(jax.tree.leaves(same_layout)), name
    kernel = runs["sharded+fsdp+accum2"][3].ema_params["Dense_0"]["kernel"]
    assert kernel.sharding.spec != jax.sharding.PartitionSpec()  # really sharded, as its parameter
    assert kernel.addressable_shards[0].data.size == kernel.size // 8


def test_frozen_image_tower_stays_frozen_in_the_ema():
    from tests.jobs.contrastive_job import tiny_config as clip_config

    lit = {"num_steps": 2, "contrastive.freeze_image_tower": True, "optimizer.ema_decay": 0.5}
    initial, _, final, _ = run_steps(clip_config(**lit))
    init, params, ema = leaves(initial), leaves(final.params), leaves(final.ema_params)
    assert sorted(ema) == sorted(params) == sorted(init)
    frozen = [k for k in init if k.split("/")[0] in ("vision", "visual_projection")]
    assert frozen and len(frozen) < len(init)
    for name in init:
        if name in frozen:  # never changes, so its EMA is it, bit for bit
            np.testing.assert_array_equal(params[name], init[name], err_msg=name)
            np.testing.assert_array_equal(ema[name], init[name], err_msg=name)
        else:  # trained: the EMA lags the parameters
            assert not np.array_equal(ema[name], init[name]) and not np.array_equal(ema[name], params[name]), name


@pytest.mark.parametrize("value", [-0.1, 1.0, "x", None])
def test_bad_ema_decay_is_a_config_error_naming_the_value(value):
    with pytest.raises(
        ConfigError, match=rf"^config.optimizer.ema_decay={value!r} is not valid; expected a number in \[0, 1\)"
    ):
        prepare_config({"optimizer": {"ema_decay": value}})


def test_bad_ema_warmup_is_a_config_error():
    with pytest.raises(ConfigError, match=r"config.optimizer.ema_warmup='yes' is not valid; expected True or False"):
        prepare_config({"optimizer": {"ema_decay": 0.9, "ema_warmup": "yes"}})
    with pytest.raises(ConfigError, match=r"ema_warmup=True needs config.optimizer.ema_decay > 0"):
        prepare_config({"optimizer": {"ema_warmup": True}})


def test_a_checkpoint_resumes_only_with_the_ema_setting_it_was_written_with(ema_run, plain_run):
    with pytest.raises(
        UserError, match=r"checkpoints/6 holds an EMA of the parameters, but config.optimizer.ema_decay=0"
    ):
        evaluate(ema_run[1], {"optimizer": {"ema_decay": 0.0, "ema_warmup": False}})
    with pytest.raises(UserError, match=r"checkpoints/6 was written without an EMA .*\.ema_decay=0.9 needs one"):
        evaluate(plain_run[1], {"optimizer": {"ema_decay": 0.9}})
