"""``mmjax detect``: boxes and scores of text queries in image files from a trained detection run, the PNG, and
one-line errors for bad input (no query, an image of the wrong size, a run of another task). The printed boxes are
what DetectionTask.detect_phrases gives for the same pixels, which is the model's top box per query."""

import numpy as np
import pytest
from PIL import Image

from mmjax.cli import main
from mmjax.train import prepare_config, restore_run, train_and_evaluate
from mmjax.train.config import to_json
from mmjax.train.detection import draw_detections
from tests.test_train_detection import _config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect_cli")
    workdir = str(root / "run")
    train_and_evaluate(_config(num_steps=2, checkpoint_every=0, **{"detection.final_report": False}), workdir)
    _, task, params, _ = restore_run(workdir)
    test = task._eval_canvases("test")
    paths = []
    for i in range(2):
        paths.append(str(root / f"test_{i}.png"))
        Image.fromarray(test.images[i]).save(paths[-1])
    return {"workdir": workdir, "task": task, "params": params, "paths": paths, "images": test.images[:2]}


def _detect(capsys, *args):
    code = main(["detect", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_prints_the_best_box_of_each_query_and_draws_them(run, capsys, tmp_path):
    queries = ["a red sneaker", "a bag"]
    out_png = str(tmp_path / "boxes.png")
    args = ["--workdir", run["workdir"], *run["paths"], "--out", out_png]
    code, out, err = _detect(capsys, *args, *[a for q in queries for a in ("--query", q)], "--threshold", "0.9")
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines() if not line.startswith("wrote")]
    want = run["task"].detect_phrases(run["params"], run["images"], queries, threshold=0.9)
    expected = [
        (p, d["query"], " ".join(f"{v:.1f}" for v in d["box"]), f"{d['score']:.4f}")
        for p, ds in zip(run["paths"], want)
        for d in ds
    ]
    assert [tuple(x) for x in lines] == expected
    assert {(p, q) for p, q, *_ in lines} == {(p, q) for p in run["paths"] for q in queries}  # the best box at least
    # the top box of a query is the highest-scoring (token, query) pair of predict()
    top = run["task"].predict(
        run["params"],
        run["images"][:1],
        np.asarray(run["task"].tokenizer(queries, context_length=run["task"].context_length)),
    )
    first = next(d for d in want[0] if d["query"] == queries[0])
    assert first["score"] == pytest.approx(float(top[0]["scores"][top[0]["labels"] == 0][0]), rel=1e-6)
    assert open(out_png, "rb").read(4) == b"\x89PNG"


def test_bad_input_is_a_one_line_user_error(run, capsys, tmp_path):
    workdir, png = run["workdir"], run["paths"][0]

    def error(*args):
        code, out, err = _detect(capsys, *args)
        assert code == 2 and out == "", (code, out, err)
        assert err.startswith("mmjax detect: error: ") and err.count("\n") == 1, err
        return err

    assert "no query given" in error("--workdir", workdir, png)
    big = str(tmp_path / "big.png")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(big)
    assert "is 24x20 px; the run detects in 16x16 images" in error("--workdir", workdir, big, "--query", "a bag")
    assert "--threshold=1.5 is not valid" in error("--workdir", workdir, png, "--query", "a bag", "--threshold", "1.5")
    assert "give at least one non-empty text query" in error("--workdir", workdir, png, "--query", " ")
    other = tmp_path / "classification"
    other.mkdir()
    (other / "config.json").write_text(to_json(prepare_config({"batch_size": 64})))
    assert "mmjax detect needs a 'detection' run" in error("--workdir", str(other), png, "--query", "a bag")


def test_drawing_refuses_boxes_outside_the_image(tmp_path):
    det = [{"boxes": np.array([[2.0, 2.0, 20.0, 12.0]]), "labels": np.array([0]), "scores": np.array([0.9])}]
    with pytest.raises(ValueError, match=r"image 0 has a box outside the image \(16x16 px\): \[2.0, 2.0, 20.0, 12.0\]"):
        draw_detections(np.zeros((1, 16, 16, 3), np.uint8), det, ["a bag"], str(tmp_path / "x.png"))
