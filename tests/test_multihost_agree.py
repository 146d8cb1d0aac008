"""Several processes agree: two processes x 3 of their 4 CPU devices (jax.distributed on 127.0.0.1, gloo) train in
pmap mode, one scenario in one workdir, as a user meets it:

1. an uninterrupted run (the reference), matched against one process with 6 devices fed the same global batches;
   only process 0 writes ``metrics.jsonl`` and TensorBoard events, and every process prints its own warnings;
2. the same job, SIGTERM to process 1 only: both processes stop after the same step, save it once and exit 0;
3. the rerun resumes; process 0 is killed (-9): the survivor exits with an error;
4. the rerun of both resumes from the last checkpoint and ends bit-exactly where the uninterrupted run ended.

Also the device selection of ``config.parallel.num_devices`` over several processes.
This file is also the job the processes run: ``python -m tests.test_multihost_agree CONFIG_JSON WORKDIR``.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from tests.native_crash import check_not_crashed, fail_if_one_ended, run_with_one_retry_after_a_crash

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT = 6  # seconds without heartbeats before a process is declared dead
STEPS = 12


class HostTask:
    """The classification task with test knobs from the environment: ``MMJAX_TEST_BATCH_DELAY`` (seconds slept per
    training batch, so a test can signal a run mid-way), ``MMJAX_TEST_EMULATE_HOSTS=n`` (one process yields the
    concatenation of the ``n`` hosts' batches, i.e. the global batch ``n`` processes assemble) and
    ``MMJAX_TEST_WARN=1`` (warns once when built)."""

    @staticmethod
    def default_config():
        """The classification task's keys and defaults."""
        from mmjax.train.classification import ClassificationTask

        return ClassificationTask.default_config()

    def __new__(cls, config):
        import warnings

        from mmjax.data.pipeline import train_batches
        from mmjax.train.classification import ClassificationTask

        task = ClassificationTask(config)
        delay = float(os.environ.get("MMJAX_TEST_BATCH_DELAY", "0"))
        hosts = int(os.environ.get("MMJAX_TEST_EMULATE_HOSTS", "0"))
        if os.environ.get("MMJAX_TEST_WARN"):
            warnings.warn("the host task was built", stacklevel=1)
        original = task.train_batches

        def batches(start_step):
            if hosts:
                streams = [
                    train_batches(task.train_source, task.batch_size, task.seed, start_step, 0, False, i, hosts)
                    for i in range(hosts)
                ]
                for parts in zip(*streams, strict=True):
                    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            for batch in original(start_step):
                time.sleep(delay)
                yield batch

        task.train_batches = batches
        return task


def job_config(data_dir, **overrides):
    from tests.test_train_models import tiny_config

    config = tiny_config(
        data_dir,
        **{
            "task": "tests.test_multihost_agree:HostTask",
            "parallel.mode": "pmap",
            "parallel.num_devices": 6,  # 3 of each process's 4 devices
            "batch_size": 12,
            "eval_batch_size": 12,
            "num_steps": STEPS,
            "log_every": 1,
            "checkpoint_every": 2,
            "data.crop_padding": 0,
            "data.flip": False,
            **overrides,
        },
    )
    return config


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(config, workdir, **extra_env):
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            PYTHONPATH=REPO,
            JAX_PLATFORMS="cpu",
            PYTHONFAULTHANDLER="1",  # a crash in native code prints the Python stack of every thread
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            MMJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            MMJAX_NUM_PROCESSES="2",
            MMJAX_PROCESS_ID=str(i),
            MMJAX_HEARTBEAT_TIMEOUT=str(HEARTBEAT),
            MMJAX_INITIALIZATION_TIMEOUT="300",
            MMJAX_SHUTDOWN_TIMEOUT="60",
            **extra_env,
        )
        cmd = [sys.executable, "-m", "tests.test_multihost_agree", json.dumps(config), workdir]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def _finish(procs, timeout=600):
    """(returncode, result dict or None, stderr) of each process."""
    deadline, outs = time.time() + timeout, []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"the multi-process job did not finish in {timeout} s") from None
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        outs.append((p.returncode, json.loads(lines[-1][7:]) if lines else None, stderr))
    return outs


def _succeeded(outs):
    for i, (rc, result, stderr) in enumerate(outs):
        check_not_crashed(rc, stderr, f"process {i}")
        assert rc == 0 and result is not None, f"process {i} failed (rc={rc}):\n{stderr[-4000:]}"
    return [result for _, result, _ in outs]


def _train_steps(workdir):
    from mmjax.train.metrics import read_metrics

    return [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]


def _wait_for_step(procs, workdir, step, timeout=400):
    t0 = time.time()
    while not any(s >= step for s in _train_steps(workdir)):
        fail_if_one_ended(procs)
        assert time.time() - t0 < timeout, f"training did not reach step {step} in {timeout} s"
        time.sleep(0.05)


def _state(workdir, step):
    """Checkpoint ``step`` of ``workdir`` (saved by any number of processes) as ``{leaf path: numpy array}``."""
    import jax

    from mmjax.train import Checkpointer

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert step in ckpt.all_steps(), (step, ckpt.all_steps())
    meta = ckpt._manager.item_metadata(step)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), getattr(meta, "tree", meta)
    )
    state = ckpt.restore(target, step=step)
    ckpt.close()
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_preemption_host_death_and_pmap_across_processes(tmp_path, monkeypatch):
    run_with_one_retry_after_a_crash(_scenario, tmp_path, monkeypatch)


def _scenario(attempt, tmp_path, monkeypatch):
    from mmjax.train import train_and_evaluate
    from mmjax.train.metrics import read_metrics
    from tests.test_train_models import write_tiny_fashion_mnist
    from tests.tolerances import assert_float32_close, assert_trees_float32_close

    tmp_path = tmp_path / f"attempt_{attempt}"
    tmp_path.mkdir()
    data_dir = write_tiny_fashion_mnist(tmp_path / "data")
    reference_dir, workdir = str(tmp_path / "uninterrupted"), str(tmp_path / "interrupted")
    one_dir = str(tmp_path / "one_process")

    # 1. uninterrupted, two processes; meanwhile one process with 6 devices on the same global batches
    procs = _start(job_config(data_dir, tensorboard=True), reference_dir, MMJAX_TEST_WARN="1")
    monkeypatch.setenv("MMJAX_TEST_EMULATE_HOSTS", "2")
    one = train_and_evaluate(job_config(data_dir), one_dir)
    monkeypatch.delenv("MMJAX_TEST_EMULATE_HOSTS")
    outs = _finish(procs)
    two = _succeeded(outs)
    assert [r["step"] for r in two] == [STEPS, STEPS] and not any(r["preempted"] for r in two)
    for i, (_, _, stderr) in enumerate(outs):  # each process reports its own warnings, marked with its index
        assert f"[process {i}/2] " in stderr and "the host task was built" in stderr, stderr[-2000:]
    # only process 0 writes the run's files: one record per step, one TensorBoard event file
    assert _train_steps(reference_dir) == list(range(1, STEPS + 1))
    assert len(os.listdir(os.path.join(reference_dir, "tensorboard"))) == 1
    # pmap over 2 x 3 devices of two processes = pmap over 6 devices of one process, up to float32 round-off of the
    # longest reduction (a batch of 12 examples of 8 x 8 pixels), accumulated over the steps
    terms = 12 * 64 * STEPS
    one_losses = [r["loss"] for r in read_metrics(os.path.join(one_dir, "metrics.jsonl")) if r["split"] == "train"]
    two_losses = [
        r["loss"] for r in read_metrics(os.path.join(reference_dir, "metrics.jsonl")) if r["split"] == "train"
    ]
    assert_float32_close(two_losses, one_losses, terms=terms)
    assert one["step"] == STEPS and one["eval_count"] == two[0]["eval_count"] == 20.0
    reference = _state(reference_dir, STEPS)
    assert_trees_float32_close(reference, _state(one_dir, STEPS), terms=terms, scale="tree")

    # 2. SIGTERM to process 1 alone: both stop after the same step, save it and exit 0
    procs = _start(job_config(data_dir), workdir, MMJAX_TEST_BATCH_DELAY="0.5")
    _wait_for_step(procs, workdir, 2)
    procs[1].send_signal(signal.SIGTERM)
    outs = _finish(procs)
    stopped = _succeeded(outs)
    assert all(r["preempted"] for r in stopped), stopped
    assert stopped[0]["step"] == stopped[1]["step"] < STEPS - 4, stopped
    first_stop = stopped[0]["step"]
    assert "process 1/2 received SIGTERM" in outs[1][2] and "received SIGTERM" not in outs[0][2]
    assert _train_steps(workdir) == list(range(1, first_stop + 1))
    _state(workdir, first_stop)

    # 3. the rerun resumes; process 0 dies: the survivor fails loudly within a bounded time
    procs = _start(job_config(data_dir), workdir, MMJAX_TEST_BATCH_DELAY="0.5")
    _wait_for_step(procs, workdir, first_stop + 3)
    procs[0].kill()
    t_kill = time.time()
    outs = _finish(procs, timeout=HEARTBEAT * 6 + 120)
    assert outs[1][0] != 0, "the survivor must fail loudly, not report success"
    assert time.time() - t_kill < HEARTBEAT * 6 + 120

    # 4. the rerun of both resumes from the last checkpoint and ends bit-exactly where the uninterrupted run ended
    from mmjax.train import Checkpointer

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    resume_step = ckpt.latest_step()
    ckpt.close()
    assert first_stop < resume_step < STEPS
    resumed = _succeeded(_finish(_start(job_config(data_dir), workdir)))
    assert [r["step"] for r in resumed] == [STEPS, STEPS] and not any(r["preempted"] for r in resumed)
    final = _state(workdir, STEPS)
    assert sorted(final) == sorted(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(final[name], value, err_msg=name)
    np.testing.assert_array_equal(resumed[0]["eval_loss"], two[0]["eval_loss"])


def _main(config_json, workdir):
    from mmjax.train import distributed

    config = json.loads(config_json)
    distributed.initialize(config)
    from mmjax.train import train_and_evaluate

    result = train_and_evaluate(config, workdir)
    print("RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    _main(*sys.argv[1:])
