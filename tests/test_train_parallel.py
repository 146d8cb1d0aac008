"""The three parallel modes train, agree with each other (8 CPU devices), and reject bad batch sizes early."""

import jax
import numpy as np
import pytest

from mmjax.train import (
    TrainState,
    make_optimizer,
    make_plan,
    make_task,
    make_train_step,
    prepare_config,
    train_and_evaluate,
)
from tests.test_train_models import tiny_config, write_tiny_fashion_mnist
from tests.tracing import recorded_traces


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fm"))


def run_steps(data_dir, mode, steps=3, accum=1, fsdp=False, batch_size=32, **overrides):
    """Final params after ``steps`` optimizer steps in ``mode`` (canonical, on the host)."""
    config = prepare_config(
        tiny_config(
            data_dir,
            **{
                "parallel.mode": mode,
                "parallel.fsdp": fsdp,
                "parallel.fsdp_min_size": 16,
                "optimizer.grad_accum_steps": accum,
                "batch_size": batch_size,
                "num_steps": steps,
                **overrides,
            },
        )
    )
    plan = make_plan(mode, 0, fsdp, 16)
    plan.check_batch_size(config.batch_size, accum)
    task = make_task(config)
    batches = task.train_batches(0)
    first = next(task.train_batches(0))
    params = task.init_params(jax.random.fold_in(jax.random.key(config.seed), 0), first)
    tx, schedule = make_optimizer(config.optimizer, params, steps)
    state = TrainState.create(params, tx)
    step_fn = plan.compile_train_step(
        make_train_step(task, tx, schedule, plan, accum, config.seed), jax.eval_shape(lambda s: s, state)
    )
    placed = plan.from_canonical(state)
    losses = []
    for _ in range(steps):
        placed, metrics = step_fn(placed, plan.place_batch(next(batches)))
        loss = np.asarray(metrics["loss"])
        losses.append(float(loss.reshape(-1)[0]))
    final = jax.device_get(plan.to_canonical(placed))
    return final, losses, placed


@pytest.mark.parametrize("mode", ["single", "pmap", "sharded"])
def test_each_mode_trains_and_evaluates(data_dir, tmp_path, mode):
    result = train_and_evaluate(tiny_config(data_dir, **{"parallel.mode": mode}), str(tmp_path))
    assert result["step"] == 4 and not result["preempted"]
    assert np.isfinite(result["train_loss"])
    assert result["eval_count"] == 20.0  # every test example counted once, padding excluded
    assert 0.0 <= result["eval_accuracy"] <= 1.0


def test_modes_give_same_params_with_and_without_accumulation(data_dir):
    reference, ref_losses, _ = run_steps(data_dir, "single")
    assert ref_losses[-1] < ref_losses[0]  # it learns
    runs = {
        "pmap": run_steps(data_dir, "pmap"),
        "sharded": run_steps(data_dir, "sharded"),
        "pmap+accum2": run_steps(data_dir, "pmap", accum=2),
        "sharded+fsdp+accum2": run_steps(data_dir, "sharded", accum=2, fsdp=True),
    }
    for name, (final, losses, _) in runs.items():
        assert int(final.step) == 3, name
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=2e-6, err_msg=name)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=name),
            final.params,
            reference.params,
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=name),
            final.opt_state,
            reference.opt_state,
        )


def test_fsdp_really_shards_parameters(data_dir):
    _, _, placed = run_steps(data_dir, "sharded", steps=1, fsdp=True)
    kernel = placed.params["Dense_0"]["kernel"]  # [64, 16]: 1024 elements >= fsdp_min_size=16
    assert kernel.sharding.spec != jax.sharding.PartitionSpec()
    assert len({s.device for s in kernel.addressable_shards}) == 8
    assert kernel.addressable_shards[0].data.size == kernel.size // 8


@pytest.mark.parametrize("mode,batch,accum", [("pmap", 12, 1), ("sharded", 20, 1), ("single", 6, 4)])
def test_batch_not_divisible_is_a_clear_error(data_dir, tmp_path, mode, batch, accum):
    config = tiny_config(data_dir, **{"parallel.mode": mode, "batch_size": batch, "optimizer.grad_accum_steps": accum})
    with pytest.raises(ValueError, match=rf"config.batch_size={batch} is not divisible"):
        train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()  # failed before building anything


def test_plan_rejects_unknown_mode_and_bad_fsdp():
    with pytest.raises(ValueError, match=r"config.parallel.mode='tpu'.*valid choices"):
        make_plan("tpu")
    with pytest.raises(ValueError, match=r"fsdp=True needs config.parallel.mode='sharded'"):
        make_plan("pmap", fsdp=True)
    with pytest.raises(ValueError, match=r"num_devices=9"):
        make_plan("sharded", num_devices=9)


def test_seed_determines_init_data_order_and_dropout(data_dir):
    kwargs = {"model.dropout_rate": 0.5, "data.flip": True, "data.crop_padding": 1}
    a, losses_a, _ = run_steps(data_dir, "single", steps=2, seed=1, **kwargs)
    b, losses_b, _ = run_steps(data_dir, "single", steps=2, seed=1, **kwargs)
    c, losses_c, _ = run_steps(data_dir, "single", steps=2, seed=2, **kwargs)
    assert losses_a == losses_b
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    assert losses_a != losses_c
    assert not np.allclose(a.params["Dense_0"]["kernel"], c.params["Dense_0"]["kernel"])


def test_num_devices_over_several_processes_takes_the_same_share_of_every_process():
    from mmjax.errors import ConfigError
    from mmjax.train.parallel import select_devices

    hosts = [[f"p0d{i}" for i in range(4)], [f"p1d{i}" for i in range(4)]]
    assert select_devices(hosts, 0) == hosts[0] + hosts[1]
    assert select_devices(hosts, 6) == hosts[0][:3] + hosts[1][:3]  # every process keeps devices of its own
    for bad in (5, 3, 10):  # jax.devices()[:n] would leave process 1 with fewer (or no) devices
        with pytest.raises(ConfigError, match=rf"num_devices={bad} cannot be split over 2 processes with 4 devices"):
            select_devices(hosts, bad)
    with pytest.raises(ConfigError, match=r"use 0 \(all 8\) or one of \[2, 4, 6, 8\]"):
        select_devices(hosts, 1)
    with pytest.raises(ConfigError, match=r"different numbers of devices \(\[4, 2\]\).*one of \[2, 4\]"):
        select_devices([hosts[0], hosts[1][:2]], 0)
    assert select_devices([hosts[0]], 3) == hosts[0][:3]  # one process: the first n, as before
    plan = make_plan("pmap", num_devices=4)
    assert plan.local_devices == plan.devices == jax.local_devices()[:4]


@pytest.mark.parametrize("mode", ["single", "pmap", "sharded"])
def test_the_train_step_is_traced_once_over_several_steps(mode):
    """The placed state has the layout the compiled step returns, so the second step does not trace and compile the
    step again (pmap's outputs are laid out over a mesh axis named after its axis_name; a state placed over another
    axis name made pmap compile the whole step twice)."""
    plan = make_plan(mode)
    step = plan.compile_train_step(
        lambda s, b: (jax.tree.map(lambda v: v + b.sum(), s), {"sum": b.sum()}), {"w": jax.ShapeDtypeStruct((3,), "f4")}
    )
    with recorded_traces() as traces:
        state = plan.from_canonical({"w": np.zeros(3, np.float32)})
        counts = []
        for _ in range(3):
            state, _ = step(state, plan.place_batch(np.ones((8, 2), np.float32)))
            counts.append(len(traces))
    assert counts[0] >= 1 and counts[1:] == [counts[0]] * 2, f"{mode}: traces after each step {counts}"
    per_step = 2.0 if mode == "pmap" else 16.0  # pmap: each device's batch sum (one row); else the global batch's
    np.testing.assert_array_equal(np.asarray(plan.to_canonical(state)["w"]), np.full(3, 3 * per_step))


def test_the_canonical_state_of_pmap_is_one_program_for_the_whole_tree():
    """``to_canonical`` takes device 0's copy of every leaf as one compiled program (checkpoints and evaluations
    call it; ``x[0]`` leaf by leaf compiled one program per leaf shape), with the leaves' values, dtypes and the
    replicated layout of ``x[0]``."""
    plan = make_plan("pmap")
    state = {f"w{n}": np.arange(n * 3, dtype=np.float32).reshape(n, 3) for n in range(1, 7)}
    state["count"] = np.int32(5)
    placed = plan.from_canonical(state)
    with recorded_traces() as traces:
        canonical = plan.to_canonical(placed)
    assert len(traces) == 1, f"{len(traces)} traces for one tree of {len(state)} leaves"
    for name, want in state.items():
        got = canonical[name]
        assert got.dtype == want.dtype and got.sharding.is_fully_replicated, name
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
