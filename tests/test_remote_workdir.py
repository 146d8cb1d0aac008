"""Remote workdirs (``gs://``) for checkpoints, config, metrics, plots, TensorBoard, the vocabulary and the final
report, against a local stand-in for GCS (:mod:`tests.fake_gcs`); and the TPU job as documented, built and run for
one step on CPU at a tiny size."""

import functools
import gzip
import io
import json
import os

import jax
import pytest
from PIL import Image

from mmjax.cli import main
from mmjax.tokenizer import CLIPTokenizer
from mmjax.train import evaluate, storage, train_and_evaluate
from tests import fake_gcs
from tests.jobs.contrastive_job import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """``gs://`` routed to ``tmp_path/gcs``; the working directory is an empty ``tmp_path/cwd``."""
    root = tmp_path / "gcs"
    root.mkdir()
    fake_gcs.install(monkeypatch, str(root))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return root


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_storage_keeps_uris_and_writes_atomically(bucket):
    assert storage.resolve("gs://b/run/") == "gs://b/run" and storage.join("gs://b/run", "x") == "gs://b/run/x"
    storage.write_text("gs://b/run/config.json", "{}")
    storage.write_text("gs://b/run/config.json", '{"a": 1}')
    assert storage.read_text("gs://b/run/config.json") == '{"a": 1}'
    assert _files(bucket) == ["b/run/config.json"]  # no temporary file left behind
    with pytest.raises(NotImplementedError, match="cannot append"):  # the stand-in behaves like an object store
        storage.path("gs://b/run/config.json").open("a")


def test_training_in_a_gs_workdir(bucket, tmp_path):
    workdir = "gs://bucket/runs/clip"
    cfg = tiny_config(
        task="contrastive",
        num_steps=2,
        keep_checkpoints=1,
        tensorboard=True,
        plot=True,
        **{"contrastive.final_report": True},
    )
    result = train_and_evaluate(cfg, workdir)
    assert result["workdir"] == workdir and result["step"] == 2
    run = bucket / "bucket" / "runs" / "clip"
    files = _files(run)
    for name in ("config.json", "metrics.jsonl", "curves.png", "vocab.json", "report.json", "retrieval_grid.png"):
        assert name in files, (name, files)
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files), files
    assert "checkpoints/2/commit_success.txt" in files  # orbax's GCS path: a commit marker instead of a rename
    assert not any(f.startswith("checkpoints/1/") for f in files)  # keep_checkpoints=1 deleted step 1 on "GCS"
    assert result["eval_retrieval_grid_png"] == workdir + "/retrieval_grid.png"  # the staged report, copied up
    assert os.listdir(tmp_path / "cwd") == []  # nothing went to <cwd>/gs:/...
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2, 2]

    again = train_and_evaluate({**cfg, "num_steps": 3}, workdir)  # resumes from gs://.../checkpoints/2
    assert again["step"] == 3
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2, 2, 3, 3]  # the records of both runs: rewritten whole, never appended
    assert evaluate(workdir)["eval_loss"] == pytest.approx(again["eval_loss"], abs=1e-6)
    assert main(["eval", "--workdir", workdir]) == 0


@functools.cache
def _tiny_coco_builder():
    import tensorflow_datasets as tfds

    class TinyCocoCaptions(tfds.core.GeneratorBasedBuilder):
        """coco_captions' features and splits, a few 40x30 images."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 16), "val": self._generate_examples(16, 8)}

        def _generate_examples(self, start, n):
            for i in range(start, start + n):
                buf = io.BytesIO()
                Image.new("RGB", (40, 30), (13 * i % 256, 80, 160)).save(buf, format="PNG")
                yield i, {"image": buf.getvalue(), "captions": [{"text": f"a photo of thing {i}"}, {"text": "a cat"}]}

    TinyCocoCaptions.__module__ = "tiny_coco_captions_builder"  # see tests/test_data.py
    return TinyCocoCaptions


def _tiny_coco(data_dir) -> str:
    """A coco_captions-shaped TFDS dataset (ArrayRecord; image + captions/text; train and val splits); its name."""
    _tiny_coco_builder()(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "tiny_coco_captions"


def test_tpu_job_as_documented_runs_one_step_at_a_tiny_size(bucket, tmp_path):
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("p", "h")]
    gz = bucket / "bucket" / "bpe_simple_vocab_16e6.txt.gz"
    gz.parent.mkdir(parents=True)
    with gzip.open(gz, "wt", encoding="utf-8") as f:  # OpenAI's format: a header line, then one merge per line
        f.write("\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in merges]) + "\n")
    vocab_size = CLIPTokenizer.from_pretrained(str(gz), num_merges=len(merges)).vocab_size
    name = _tiny_coco(tmp_path / "tfds")
    documented = [  # experiments/clip_b16_tpu.py's command; the data stay local (ArrayRecord reads gs:// natively)
        "train",
        "--config",
        os.path.join(REPO, "experiments", "clip_b16_tpu.py"),
        "--workdir",
        "gs://bucket/clip_b16",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.model.bpe_path=gs://bucket/bpe_simple_vocab_16e6.txt.gz",
    ]
    tiny = {
        "data.tfds_name": name,
        "model.image_size": 32,
        "data.image_size": 32,
        "model.embed_dim": 16,
        "model.vision_width": 32,
        "model.vision_depth": 2,
        "model.vision_heads": 2,
        "model.text_width": 32,
        "model.text_depth": 2,
        "model.text_heads": 2,
        "model.context_length": 16,
        "batch_size": 8,
        "eval_batch_size": 8,
        "num_steps": 1,
        "parallel.fsdp_min_size": 64,
    }
    overrides = [f"--config.{k}={v}" for k, v in tiny.items()]
    with pytest.MonkeyPatch.context() as mp:  # OpenAI's file has 48894 merges; this one 5
        original = CLIPTokenizer.from_pretrained.__func__
        mp.setattr(
            CLIPTokenizer, "from_pretrained", classmethod(lambda cls, p, **kw: original(cls, p, num_merges=len(merges)))
        )
        assert main(documented + overrides) == 0
    run = bucket / "bucket" / "clip_b16"
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["bpe_path"] == "gs://bucket/bpe_simple_vocab_16e6.txt.gz" and saved["parallel"]["fsdp"]
    assert saved["model"]["dtype"] == "bfloat16" and saved["model"]["remat"] and saved["model"]["scan"]
    assert saved["parallel"]["mode"] == "sharded" and jax.device_count() == 8
    files = _files(run)
    assert "checkpoints/1/commit_success.txt" in files and "metrics.jsonl" in files and "curves.png" in files
    assert any(f.startswith("tensorboard/") for f in files)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and records[0]["split"] == "train" and records[0]["loss"] > 0
    assert vocab_size == 256 * 2 + len(merges) + 2


def test_tpu_job_without_a_bpe_path_says_what_to_pass(tmp_path, capsys):
    name = _tiny_coco(tmp_path / "tfds")
    argv = ["train", "--config", os.path.join(REPO, "experiments", "clip_b16_tpu.py"), "--workdir", str(tmp_path)]
    assert main(argv + [f"--config.data.tfds_name={name}", f"--config.data.data_dir={tmp_path / 'tfds'}"]) == 2
    err = capsys.readouterr().err
    assert "config.model.bpe_path" in err and "bpe_simple_vocab_16e6.txt.gz" in err


def test_a_tfds_copy_in_a_bucket_is_found_without_tensorflow(bucket, tmp_path):
    import shutil

    import tensorflow_datasets as tfds

    from mmjax.data import image_text

    name = _tiny_coco(tmp_path / "tfds")
    shutil.copytree(tmp_path / "tfds", bucket / "bucket" / "tensorflow_datasets")
    builder = image_text._prepared_copy(tfds, name, "gs://bucket/tensorflow_datasets")  # read through etils.epath
    assert builder is not None and str(builder.data_dir).startswith("gs://bucket/tensorflow_datasets/" + name)
    assert sorted(builder.info.splits) == ["train", "val"] and builder.is_prepared()
