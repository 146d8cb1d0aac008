"""``mmjax caption``: captions of image files from a trained captioning run, greedy and beam search, and clear
errors for bad input. One tiny run is trained once for the module (60 steps: the captions are sentences, if often
wrong ones); the command must print exactly what the task and :func:`mmjax.generate.generate` give for the same
pixels."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mmjax.cli import main
from mmjax.generate import generate
from mmjax.train import prepare_config, restore_run, train_and_evaluate
from mmjax.train.config import to_json
from tests.test_train_captioning import _config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained tiny captioning run, its restored task and parameters, and image files of its test images: two
    PNGs at the run's size and a larger JPEG (resized by the command)."""
    root = tmp_path_factory.mktemp("caption_cli")
    workdir = str(root / "run")
    config = _config(
        num_steps=60,
        checkpoint_every=0,
        eval_every=0,
        **{"data.num_train": 32, "data.num_test": 8, "data.num_heldout": 8, "captioning.final_report": False},
    )
    train_and_evaluate(config, workdir)
    _, task, params, _ = restore_run(workdir)
    pngs = []
    for i in range(2):
        path = str(root / f"test_{i}.png")
        Image.fromarray(task.eval_source[i]["image"]).save(path)
        pngs.append(path)
    jpeg = str(root / "large.jpg")
    Image.fromarray(task.eval_source[2]["image"]).resize((40, 30)).save(jpeg, quality=95)
    return {"workdir": workdir, "task": task, "params": params, "pngs": pngs, "jpeg": jpeg, "root": root}


def _caption(capsys, *args):
    code = main(["caption", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _pixels(run, paths):
    """What the command feeds the model: RGB, resized (bilinear) to the run's image size."""
    size = run["task"].data_cfg.image_size
    out = []
    for p in paths:
        image = Image.open(p).convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        out.append(np.asarray(image))
    return np.stack(out)


def test_greedy_captions_are_the_tasks_captions_of_the_same_pixels(run, capsys):
    task, params = run["task"], run["params"]
    paths = [*run["pngs"], run["jpeg"]]
    pixels = _pixels(run, paths)
    np.testing.assert_array_equal(pixels[:2], np.stack([task.eval_source[i]["image"] for i in range(2)]))  # lossless
    code, out, err = _caption(capsys, "--workdir", run["workdir"], *paths, "--scores")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3, out
    rows = [line.split("\t") for line in lines]
    assert [r[0] for r in rows] == paths
    assert [r[1] for r in rows] == task.caption_images(params, pixels, batch_size=3)
    assert max(len(r[1].split()) for r in rows) >= 4  # 60 steps: sentences, not just "a"
    expected = generate(task.model, params, task._images(pixels), max_new_tokens=task.context_length - 1)
    np.testing.assert_allclose([float(r[2]) for r in rows], expected.scores, atol=1e-4)
    assert all(float(r[2]) <= 0 for r in rows)  # a sum of log-probabilities

    code, plain, _ = _caption(capsys, *paths, "--workdir", run["workdir"])  # the same compiled program
    assert code == 0 and plain == "".join(f"{p}\t{r[1]}\n" for p, r in zip(paths, rows))  # two columns


def test_beam_search_and_its_options(run, capsys):
    task, params = run["task"], run["params"]
    pixels = _pixels(run, run["pngs"])
    args = ["--workdir", run["workdir"], *run["pngs"], "--num-beams", "2", "--length-penalty", "0.5", "--scores"]
    args += ["--max-new-tokens", "6"]
    code, out, err = _caption(capsys, *args)
    assert code == 0, err
    out_beams = generate(task.model, params, task._images(pixels), max_new_tokens=6, num_beams=2, length_penalty=0.5)
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[1] for r in rows] == [task.tokenizer.decode(s) for s in out_beams.sequences]
    np.testing.assert_allclose([float(r[2]) for r in rows], out_beams.scores, atol=1e-4)
    assert all(len(task.tokenizer.decode(s).split()) <= 6 for s in out_beams.sequences)


def test_bad_input_is_a_one_line_user_error(run, capsys, tmp_path):
    workdir, png = run["workdir"], run["pngs"][0]

    def error(*args):
        code, out, err = _caption(capsys, *args)
        assert code == 2 and out == "", (code, out, err)
        assert err.startswith("mmjax caption: error: ") and err.count("\n") == 1, err
        return err

    assert "--num-beams=0 is not valid; expected an int >= 1" in error("--workdir", workdir, png, "--num-beams", "0")
    assert "--max-new-tokens=0" in error("--workdir", workdir, png, "--max-new-tokens", "0")
    assert "use at most 11" in error("--workdir", workdir, png, "--max-new-tokens", "99")
    missing = str(tmp_path / "missing.png")
    assert f"IMAGE {missing!r}: no such file" in error("--workdir", workdir, png, missing)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert f"IMAGE {str(corrupt)!r} is not an image PIL can read" in error("--workdir", workdir, str(corrupt))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(png, "rb").read()[:60])
    assert "is not an image PIL can read" in error("--workdir", workdir, str(truncated))

    assert "has no config.json" in error("--workdir", str(tmp_path), png)
    other = tmp_path / "classification"
    other.mkdir()
    (other / "config.json").write_text(to_json(prepare_config({"batch_size": 64})))
    err = error("--workdir", str(other), png)
    assert "is a 'classification' run; mmjax caption needs a 'captioning' run" in err
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    with open(os.path.join(workdir, "config.json")) as f:
        (untrained / "config.json").write_text(json.dumps(json.load(f)))
    assert "no checkpoint found" in error("--workdir", str(untrained), png)
    assert "takes no config overrides" in error("--workdir", workdir, png, "--config.seed=1")


def test_help_describes_the_output(capsys):
    with pytest.raises(SystemExit) as e:
        main(["caption", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("--workdir DIR", "--num-beams N", "--length-penalty A", "--max-new-tokens K", "--scores", "IMAGE"):
        assert text in out
