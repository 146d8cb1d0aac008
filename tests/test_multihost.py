"""Multi-process training on one machine: two processes x 4 CPU devices (jax.distributed, gloo collectives) reach the
same loss and parameters as one process with 8 devices, and only process 0 writes metrics; when one process is killed,
the other exits with an error within a bounded time instead of hanging. Also the distributed settings from config /
environment. Preemption, resuming after a host died and pmap across processes: tests/test_multihost_agree.py."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmjax.train import train_and_evaluate
from mmjax.train.distributed import distributed_settings, initialize
from mmjax.train.metrics import read_metrics
from mmjax.train.optimizer import param_path
from tests.jobs.contrastive_job import tiny_config
from tests.native_crash import check_not_crashed, fail_if_one_ended, run_with_one_retry_after_a_crash
from tests.tolerances import adam_params_atol, float32_atol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT = 6  # seconds without heartbeats before a process is declared dead


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(config, workdir, out, num_processes=2, extra_env=None):
    port = _free_port()
    procs = []
    for i in range(num_processes):
        env = dict(
            os.environ,
            PYTHONPATH=REPO,
            JAX_PLATFORMS="cpu",
            PYTHONFAULTHANDLER="1",  # a crash in native code prints the Python stack of every thread
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            MMJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            MMJAX_NUM_PROCESSES=str(num_processes),
            MMJAX_PROCESS_ID=str(i),
            MMJAX_HEARTBEAT_TIMEOUT=str(HEARTBEAT),
            MMJAX_INITIALIZATION_TIMEOUT="120",
            MMJAX_SHUTDOWN_TIMEOUT="30",
            **(extra_env or {}),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.jobs.contrastive_job", json.dumps(config), workdir, out],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _finish(procs, timeout=300):
    outs = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"multi-process job did not finish in {timeout} s") from None
    return outs


def test_two_processes_match_one_process_with_eight_devices(tmp_path, monkeypatch):
    run_with_one_retry_after_a_crash(_two_processes_match_one, tmp_path, monkeypatch)


def _two_processes_match_one(attempt, tmp_path, monkeypatch):
    tmp_path = tmp_path / f"attempt_{attempt}"
    tmp_path.mkdir()
    # Adam eps 1e-2, as in tests/test_contrastive.py::test_modes_agree_with_and_without_grad_cache: the two layouts
    # sum gradients in other orders, and with a tiny eps Adam turns the round-off of identically-zero gradients (the
    # attention key biases) into steps of up to lr; with 1e-2 the parameters' difference has the bound used below.
    config = tiny_config(**{"parallel.mode": "sharded", "num_steps": 3, "checkpoint_every": 0, "optimizer.eps": 1e-2})
    out = str(tmp_path / "two.npz")
    procs = _start(config, str(tmp_path / "two"), out)
    # meanwhile, the reference: one process, 8 devices, the same global batches (the two host shards, concatenated)
    monkeypatch.setenv("MMJAX_TEST_EMULATE_HOSTS", "2")
    reference = train_and_evaluate(config, str(tmp_path / "one"))
    outs = _finish(procs)
    for i, (p, (stdout, stderr)) in enumerate(zip(procs, outs)):
        check_not_crashed(p.returncode, stderr, f"process {i}")
        assert p.returncode == 0, f"process failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    two = json.load(open(out + ".json"))
    assert two["step"] == 3
    # only process 0 writes metrics.jsonl: one record per step (two processes appending would give two)
    records = read_metrics(os.path.join(tmp_path, "two", "metrics.jsonl"))
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (3, "train"), (3, "eval")]
    # losses of O(1) summed over B * L = 256 terms of a few layers: float32 round-off far below 1e-4 (measured ~3e-6)
    np.testing.assert_allclose(two["train_loss"], reference["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(two["eval_loss"], reference["eval_loss"], rtol=1e-4)
    assert two["eval_count"] == reference["eval_count"] == 32.0  # each host evaluated its own half
    from mmjax.train import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "one" / "checkpoints"))
    params = ckpt._manager.restore(ckpt.latest_step())["params"]
    ckpt.close()
    saved = np.load(out)
    flat = {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert sorted(flat) == sorted(saved.files)
    opt = config["optimizer"]
    # gradient entries are clipped to global norm c; their round-off between layouts is <= float32_atol(c, terms)
    dg = float32_atol(opt["grad_clip"], terms=4 * np.sqrt(config["batch_size"] * config["model"]["context_length"]))
    for name, value in flat.items():
        atol = adam_params_atol(
            steps=3, lr=opt["lr"], adam_eps=opt["eps"], grad_atol=dg, param_scale=np.abs(value).max()
        )
        np.testing.assert_allclose(saved[name], value, rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("victim", [1])  # victim 0 (the coordinator): tests/test_multihost_agree.py, then resumed
def test_killed_process_makes_the_other_exit_with_an_error(tmp_path, victim):
    run_with_one_retry_after_a_crash(_killed_process_makes_the_other_fail, tmp_path, victim)


def _killed_process_makes_the_other_fail(attempt, tmp_path, victim):
    tmp_path = tmp_path / f"attempt_{attempt}"
    tmp_path.mkdir()
    config = tiny_config(**{"parallel.mode": "sharded", "num_steps": 10_000, "checkpoint_every": 0, "log_every": 1})
    workdir = str(tmp_path / "run")
    procs = _start(config, workdir, str(tmp_path / "out.npz"), extra_env={"MMJAX_TEST_STEP_DELAY": "0.2"})
    metrics = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):  # both are training (collectives done)
        fail_if_one_ended(procs)
        assert time.time() - t0 < 240, "training did not start"
        time.sleep(0.1)
    procs[victim].kill()
    survivor = procs[1 - victim]
    t_kill = time.time()
    try:
        _, stderr = survivor.communicate(timeout=HEARTBEAT * 6 + 60)
    except subprocess.TimeoutExpired:
        survivor.kill()
        raise AssertionError("the surviving process hung after its peer was killed") from None
    elapsed = time.time() - t_kill
    procs[victim].communicate()
    assert survivor.returncode != 0, "the survivor must fail loudly, not report success"
    assert elapsed < HEARTBEAT * 6 + 60
    assert "heartbeat" in stderr.lower() or "unavailable" in stderr.lower() or "task" in stderr.lower(), stderr[-2000:]


def test_settings_from_config_and_environment():
    env = {
        "MMJAX_COORDINATOR_ADDRESS": "10.1.2.3:777",
        "MMJAX_NUM_PROCESSES": "4",
        "MMJAX_PROCESS_ID": "3",
        "MMJAX_HEARTBEAT_TIMEOUT": "12",
    }
    s = distributed_settings({}, environ=env)
    assert s == {
        "coordinator_address": "10.1.2.3:777",
        "num_processes": 4,
        "process_id": 3,
        "heartbeat_timeout_seconds": 12,
        "initialization_timeout": 300,
        "shutdown_timeout_seconds": 300,
    }
    # the config wins over the environment, field by field
    s = distributed_settings({"distributed": {"process_id": 1, "initialization_timeout": 5}}, environ=env)
    assert (s["process_id"], s["num_processes"], s["initialization_timeout"]) == (1, 4, 5)
    assert distributed_settings({}, environ={"JAX_NUM_PROCESSES": "1"}) is None
    assert distributed_settings({"distributed": {"auto": True}}, environ={})["heartbeat_timeout_seconds"] == 100
    assert initialize({}, environ={}) is False  # single process: nothing to do
    with pytest.raises(ValueError, match=r"\$MMJAX_NUM_PROCESSES='two' must be an int"):
        distributed_settings({}, environ=dict(env, MMJAX_NUM_PROCESSES="two"))
    with pytest.raises(ValueError, match=r"process_id=4 must lie in \[0, num_processes=4\)"):
        distributed_settings({}, environ=dict(env, MMJAX_PROCESS_ID="4"))
    with pytest.raises(ValueError, match="coordinator_address is missing"):
        distributed_settings({"distributed": {"num_processes": 2, "process_id": 0}}, environ={})
    with pytest.raises(ValueError, match="must be 'host:port'"):
        distributed_settings({}, environ=dict(env, MMJAX_COORDINATOR_ADDRESS="10.1.2.3"))


def test_a_native_crash_is_retried_once_and_only_once():
    from tests.native_crash import NativeCrash

    crashed = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    with pytest.raises(NativeCrash, match="died of SIGSEGV"):
        check_not_crashed(crashed.returncode, "", "the child")
    check_not_crashed(1, "", "a plain failure is not a crash")  # it fails the test as any error does

    def crashes_first(attempt):
        if attempt == 0:
            raise NativeCrash("boom")
        return "done"

    with pytest.warns(UserWarning, match="openxla/xla#16430"):
        assert run_with_one_retry_after_a_crash(crashes_first) == "done"

    def always_crashes(attempt):
        raise NativeCrash(f"boom {attempt}")

    with pytest.warns(UserWarning), pytest.raises(NativeCrash, match="boom 1"):
        run_with_one_retry_after_a_crash(always_crashes)


def test_one_process_ending_early_fails_and_stops_the_others():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stderr=subprocess.PIPE)
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], stderr=subprocess.PIPE, text=True)
    failed.wait()
    with pytest.raises(AssertionError, match=r"process 1 ended early \(exit 3\)"):
        fail_if_one_ended([sleeper, failed])
    assert sleeper.wait(timeout=10) == -9  # killed, not left waiting for its peer
