"""Checkpoints: save/restore, keep-last-K, exact resume after kill -9, SIGTERM (also during set-up), corrupt and incompatible errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.train import Checkpointer, train_and_evaluate
from mmjax.train.config import prepare_config
from mmjax.train.metrics import read_metrics
from tests.test_train_models import tiny_config, write_tiny_fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fm"))


def slow_config(data_dir):
    return tiny_config(
        data_dir,
        task="tests.test_train_models:SlowClassificationTask",
        num_steps=STEPS,
        checkpoint_every=2,
        log_every=1,
    )


def final_params(workdir):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    params = ckpt._manager.restore(step)  # raw restore as saved (numpy/jax arrays)
    ckpt.close()
    return step, params


def start_run(config, workdir, delay):
    """Starts train_and_evaluate(config, workdir) in a subprocess; prints the result as JSON on its last line."""
    code = (
        "import json, sys; from mmjax.train import train_and_evaluate\n"
        f"r = train_and_evaluate(json.loads({json.dumps(json.dumps(config))}), {str(workdir)!r})\n"
        "print(json.dumps(r))\n"
    )
    env = dict(os.environ, MMJAX_TEST_BATCH_DELAY=str(delay), PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_checkpoint(workdir, proc, min_step=2, timeout=600):
    ckpt_dir = os.path.join(workdir, "checkpoints")
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
        if steps and max(steps) >= min_step:
            return max(steps)
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_checkpointer_roundtrip_and_keeps_last_k(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "c"), keep=2)
    assert ckpt.latest_step() is None
    for step in (1, 2, 3):
        ckpt.save(step, {"w": jnp.full((2, 3), float(step)), "step": jnp.int32(step)})
    assert ckpt.all_steps() == [2, 3]
    restored = ckpt.restore({"w": jnp.zeros((2, 3)), "step": jnp.int32(0)})
    np.testing.assert_array_equal(restored["w"], np.full((2, 3), 3.0))
    older = ckpt.restore({"w": jnp.zeros((2, 3)), "step": jnp.int32(0)}, step=2)
    assert int(older["step"]) == 2
    ckpt.close()


def test_resume_after_kill_is_exact(data_dir, tmp_path):
    config = slow_config(data_dir)
    reference = train_and_evaluate({**config, "task": "classification"}, str(tmp_path / "ref"))
    assert reference["step"] == STEPS

    workdir = str(tmp_path / "killed")
    proc = start_run(config, workdir, delay=0.3)
    killed_at = wait_for_checkpoint(workdir, proc, min_step=2)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert killed_at < STEPS
    resumed = train_and_evaluate(config, workdir)
    assert resumed["step"] == STEPS

    ref_step, ref_params = final_params(str(tmp_path / "ref"))
    res_step, res_params = final_params(workdir)
    assert ref_step == res_step == STEPS
    jax.tree.map(np.testing.assert_array_equal, res_params, ref_params)  # bit-for-bit
    assert resumed["eval_accuracy"] == reference["eval_accuracy"]
    train_steps = [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
    assert train_steps[-1] == STEPS and min(train_steps) == 1


def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
    workdir = str(tmp_path / "term")
    proc = start_run(slow_config(data_dir), workdir, delay=0.3)
    wait_for_checkpoint(workdir, proc, min_step=2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["preempted"] is True and result["step"] < STEPS
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == result["step"]  # the step it stopped at was saved
    ckpt.close()


class SignalledDuringSetupTask:
    """ClassificationTask that sends SIGTERM to its own process when it is built, i.e. during the loop's set-up,
    before data loading, initialisation and compilation are done."""

    @staticmethod
    def default_config():
        """The classification task's keys and defaults."""
        from mmjax.train.classification import ClassificationTask

        return ClassificationTask.default_config()

    def __new__(cls, config):
        from mmjax.train.classification import ClassificationTask

        task = ClassificationTask(config)
        os.kill(os.getpid(), signal.SIGTERM)
        return task


def test_sigterm_during_setup_stops_after_the_first_step(data_dir, tmp_path):
    # the test's own handler stands in for the default action (which would kill the test process): before the loop
    # installed its handler at the start, the signal reached this one and training ran to the end
    outer = []
    previous = signal.signal(signal.SIGTERM, lambda *args: outer.append(args))
    try:
        config = tiny_config(data_dir, task="tests.test_train_checkpoint:SignalledDuringSetupTask", num_steps=STEPS)
        result = train_and_evaluate(config, str(tmp_path / "w"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not outer, "the SIGTERM reached the handler outside the loop"
    assert result["preempted"] is True and result["step"] == 1, result
    ckpt = Checkpointer(os.path.join(tmp_path, "w", "checkpoints"))
    assert ckpt.latest_step() == 1
    ckpt.close()


def test_corrupt_checkpoint_error_names_it(data_dir, tmp_path):
    workdir = str(tmp_path / "w")
    train_and_evaluate(tiny_config(data_dir), workdir)
    step_dir = os.path.join(workdir, "checkpoints", "4")
    assert os.path.isdir(step_dir)
    for root, _, files in os.walk(step_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")
    with pytest.raises(ValueError, match=rf"checkpoint {step_dir}\b.*(corrupt|unreadable)"):
        train_and_evaluate(tiny_config(data_dir), workdir)


def test_incompatible_checkpoint_is_an_error_not_a_restart(data_dir, tmp_path):
    workdir = str(tmp_path / "w")
    train_and_evaluate(tiny_config(data_dir), workdir)
    bigger = tiny_config(data_dir, **{"model.hidden": 32, "num_steps": 8})
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoints/4 does not match.*Dense_0/kernel"):
        train_and_evaluate(bigger, workdir)


def test_finished_run_rerun_only_evaluates(data_dir, tmp_path):
    workdir = str(tmp_path / "w")
    first = train_and_evaluate(tiny_config(data_dir), workdir)
    again = train_and_evaluate(tiny_config(data_dir), workdir)
    assert again["step"] == first["step"] == 4
    assert again["eval_accuracy"] == first["eval_accuracy"]
    assert prepare_config(tiny_config(data_dir)).num_steps == 4
