"""The command line: help texts, a tiny training run with overrides, eval, and clear errors."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from mmjax.cli import COMMANDS, apply_overrides, load_config_file, main
from tests.test_train_models import write_tiny_fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "experiments", "fashion_mnist_vit_quick.py")


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "mmjax", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_subcommands_and_options():
    top = run_cli("--help")
    assert top.returncode == 0
    for name in COMMANDS:
        assert name in top.stdout
    train = run_cli("train", "--help")
    assert train.returncode == 0
    for text in ("--config FILE", "--workdir DIR", "--config.KEY=VALUE", "SIGTERM"):
        assert text in train.stdout
    ev = run_cli("eval", "--help")
    assert ev.returncode == 0 and "--workdir DIR" in ev.stdout


TINY_CONFIG = '''"""Tiny MLP run for the CLI test: mmjax train --config THIS --workdir DIR (finishes in seconds)."""
import ml_collections
from mmjax.train.config import default_config


def get_config():
    config = default_config()
    config.model = ml_collections.ConfigDict({"name": "tests.test_train_models:TinyMLP", "hidden": 16})
    config.batch_size, config.eval_batch_size, config.num_steps = 16, 8, 2
    config.log_every, config.checkpoint_every = 2, 2
    config.progress, config.tensorboard, config.plot = False, False, False
    return config
'''


def test_train_then_eval_through_the_cli(tmp_path, capsys):
    data = write_tiny_fashion_mnist(tmp_path / "fm", n_train=64, n_test=24)
    config_file = tmp_path / "tiny.py"
    config_file.write_text(TINY_CONFIG)
    workdir = str(tmp_path / "run")
    out = run_cli(
        "train",
        "--config",
        str(config_file),
        "--workdir",
        workdir,
        f"--config.data.data_dir={data}",
        "--config.num_steps=4",
        "--config.optimizer.lr",
        "0.003",
        "--config.model.hidden=8",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert result["step"] == 4 and result["eval_count"] == 24.0
    assert "eval accuracy" in out.stdout and workdir in out.stdout
    saved = json.loads(open(os.path.join(workdir, "config.json")).read())
    assert saved["optimizer"]["lr"] == 0.003 and saved["model"]["hidden"] == 8 and saved["num_steps"] == 4

    capsys.readouterr()
    assert main(["eval", "--workdir", workdir]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["step"] == 4
    assert evaluated["eval_accuracy"] == pytest.approx(result["eval_accuracy"], abs=1e-6)


def test_quick_vit_job_config_runs(tmp_path, capsys):
    data = write_tiny_fashion_mnist(tmp_path / "fm", n_train=64, n_test=16, size=14)
    code = main(
        [
            "train",
            "--config",
            QUICK,
            "--workdir",
            str(tmp_path / "run"),
            f"--config.data.data_dir={data}",
            "--config.num_steps=2",
            "--config.model.width=8",
            "--config.eval_batch_size=16",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out[: out.rindex("}") + 1])
    assert result["step"] == 2 and result["eval_count"] == 16.0 and 0 <= result["eval_accuracy"] <= 1


def test_cli_errors_are_clear(tmp_path):
    bad = run_cli("train", "--config", QUICK, "--workdir", str(tmp_path / "w"), "--config.parallel.mode=gpu")
    assert bad.returncode == 2
    assert "config.parallel.mode='gpu' is not valid; valid choices" in bad.stderr
    missing = run_cli("eval", "--workdir", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "not a training run's directory" in missing.stderr
    assert main(["train", "--config", str(tmp_path / "none.py"), "--workdir", str(tmp_path)]) == 2


def test_config_typos_exit_2_with_the_closest_key(tmp_path, capsys):
    code = main(["train", "--config", QUICK, "--workdir", str(tmp_path / "w"), "--config.num_step=5"])
    err = capsys.readouterr().err
    assert code == 2 and "config.num_step is not a known setting" in err and "did you mean num_steps" in err
    assert "Traceback" not in err and not (tmp_path / "w").exists()
    code = main(["train", "--config", QUICK, "--workdir", str(tmp_path / "w"), "--config.data.crop_paddding=4"])
    assert code == 2 and "did you mean crop_padding" in capsys.readouterr().err


def test_a_bad_dataset_name_is_a_user_error(tmp_path, capsys):
    code = main(["train", "--config", QUICK, "--workdir", str(tmp_path / "w"), "--config.data.name=''"])
    err = capsys.readouterr().err
    assert code == 2 and "config.data.name='' is not valid" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.parallel.mode=pmap --config.batch_size=7", "config.batch_size=7 is not divisible"),  # parallel
        ("--config.parallel.mode=pmap --config.parallel.num_devices=9", "num_devices"),  # more devices than exist
        ("--config.data.data_dir=/nonexistent/fmnist", "/nonexistent/fmnist"),  # mmjax.data.fashion_mnist
    ],
)
def test_engine_and_data_errors_are_user_errors(tmp_path, capsys, override, message):
    """Settings the engine and the data readers refuse exit 2 with one line, not a traceback (a bug's exit 1)."""
    code = main(["train", "--config", QUICK, "--workdir", str(tmp_path / "w"), *override.split()])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_bugs_show_their_traceback_and_exit_1(tmp_path, capsys):
    buggy = tmp_path / "buggy.py"  # a ValueError that is no user error: a bug in the code the config runs
    buggy.write_text("def get_config():\n    return int('not a number')\n")
    code = main(["train", "--config", str(buggy), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and "buggy.py" in err and "invalid literal for int()" in err
    assert "internal error" in err


def test_seed_sweep_runs_one_run_per_seed_and_summarises(tmp_path, capsys):
    data = write_tiny_fashion_mnist(tmp_path / "fm", n_train=32, n_test=16)
    config_file = tmp_path / "tiny.py"
    config_file.write_text(TINY_CONFIG)
    workdir = tmp_path / "sweep"
    argv = ["train", "--config", str(config_file), "--workdir", str(workdir), f"--config.data.data_dir={data}"]
    assert main([*argv, "--config.seed=0,1"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((workdir / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and "eval_accuracy: mean" in out
    runs = {}
    for seed in (0, 1):
        run = workdir / f"seed_{seed}"
        saved = json.loads((run / "config.json").read_text())
        assert saved["seed"] == seed and os.listdir(run / "checkpoints")  # a run directory like any other
        runs[seed] = json.loads((run / "result.json").read_text())
        assert runs[seed]["step"] == 2 and summary["wall_time_s"][str(seed)] == runs[seed]["wall_time_s"]
    assert runs[0]["eval_loss"] != runs[1]["eval_loss"]  # the seeds differ
    for name in ("eval_loss", "eval_accuracy", "train_loss"):
        values = [runs[0][name], runs[1][name]]
        m = summary["metrics"][name]
        assert m["min"] == min(values) and m["max"] == max(values)
        assert m["mean"] == pytest.approx(sum(values) / 2, rel=1e-12)
    # Rerunning the same command trains nothing again: finished seeds are read back.
    assert main([*argv, "--config.seed=0,1"]) == 0
    assert json.loads((workdir / "seeds.json").read_text()) == summary
    capsys.readouterr()
    assert main([*argv, "--config.seed=0,0"]) == 2
    assert "repeats a seed" in capsys.readouterr().err


def test_overrides_are_typed():
    config = ml_collections.ConfigDict({"lr": 1.0, "steps": 3, "name": "vit", "flag": False, "sub": {"x": (1, 2)}})
    apply_overrides(
        config, [("lr", "2"), ("steps", "5"), ("name", "7"), ("flag", "True"), ("sub.x", "[3, 4]"), ("sub.new", "None")]
    )
    assert config.lr == 2.0 and isinstance(config.lr, float)
    assert config.steps == 5 and config.name == "7" and config.flag is True and config.sub.x == (3, 4)
    assert config.sub.new is None
    with pytest.raises(ValueError, match=r"--config.steps='2.5': expected an int"):
        apply_overrides(config, [("steps", "2.5")])


def test_experiment_configs_load_and_validate():
    from mmjax.train.config import prepare_config

    for name in ("fashion_mnist_vit.py", "fashion_mnist_vit_quick.py"):
        path = os.path.join(REPO, "experiments", name)
        config = prepare_config(load_config_file(path))
        assert config.model.name == "vit"
        doc = open(path).read().split('"""')[1]
        assert f"mmjax train --config experiments/{name}" in doc  # the docstring gives the command
    # Every job's config holds only known keys (strict validation) for its task.
    tasks = {}
    for name in sorted(os.listdir(os.path.join(REPO, "experiments"))):
        if name.endswith(".py") and not name.startswith("bench"):  # bench_*.py and their harness, benchmarking.py
            config = prepare_config(load_config_file(os.path.join(REPO, "experiments", name)))
            tasks[name] = config.task
    assert tasks == {
        "clip_b16_tpu.py": "contrastive",
        "clip_fashion_mnist.py": "contrastive",
        "caption_fashion_mnist.py": "captioning",
        "detect_fashion_mnist.py": "detection",
        "diffusion_fashion_mnist.py": "diffusion",
        "fashion_mnist_graphs.py": "classification",
        "graph_fusion_fashion_mnist.py": "graph_matching",
        "fashion_mnist_vit.py": "classification",
        "fashion_mnist_vit_quick.py": "classification",
        "karate_gcn.py": "node_classification",
    }


def test_convert_and_bench_help_and_bench_runs():
    conv = run_cli("convert", "--help")
    assert conv.returncode == 0
    for text in ("--from-hf DIR", "--to-hf DIR", "--out DIR", "weights_only=True"):
        assert text in conv.stdout
    bench = run_cli("bench", "--help")
    assert bench.returncode == 0 and "attention,vit,gnn,clip" in bench.stdout
    assert run_cli("bench", "nope").returncode == 2
    # A real (tiny) benchmark run through the command line: mmjax's attention alone at T=64, forward only.
    tiny = run_cli(
        "bench", "attention", "--lengths", "64", "--causal", "0", "--modes", "fwd", "--impls", "mmjax", "--rounds", "1"
    )
    assert tiny.returncode == 0, tiny.stderr
    assert '"impl": "mmjax", "T": 64' in tiny.stdout


def test_train_starts_itself_again_with_huge_pages_unless_the_user_set_glibc_tunables(tmp_path):
    from mmjax.cli import HUGE_PAGES, huge_page_environment

    config = tmp_path / "show_env.py"
    config.write_text(
        "import os\n"
        "def get_config():\n"
        "    print('GLIBC_TUNABLES=' + os.environ.get('GLIBC_TUNABLES', '<unset>'), flush=True)\n"
        "    return {'task': 'no_such_task'}\n"
    )
    argv = [sys.executable, "-m", "mmjax", "train", "--config", str(config), "--workdir", str(tmp_path / "w")]
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"PYTHONPATH": REPO}
    unset = subprocess.run(argv, cwd=REPO, env=base, capture_output=True, text=True, timeout=120)
    expected = HUGE_PAGES if huge_page_environment({}, ["train"]) is not None else "<unset>"  # glibc >= 2.35 here
    assert f"GLIBC_TUNABLES={expected}\n" in unset.stdout, unset.stdout + unset.stderr
    assert unset.returncode == 2 and "no_such_task" in unset.stderr  # the re-started process ran the command
    opted_out = subprocess.run(argv, cwd=REPO, env=base | {"GLIBC_TUNABLES": ""}, capture_output=True, text=True)
    assert "GLIBC_TUNABLES=\n" in opted_out.stdout and opted_out.returncode == 2
    assert huge_page_environment({}, ["convert", "--help"], platform="linux", glibc="glibc 2.36") is None
    assert huge_page_environment({}, ["train"], platform="darwin", glibc="") is None
