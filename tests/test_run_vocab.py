"""A run is self-contained: the contrastive task's word vocabulary is saved in the workdir at the first start and
read back on resume and by ``mmjax eval``, so the ids never depend on the training captions at hand."""

import json
import os

import jax
import numpy as np
import pytest

from mmjax.cli import main
from mmjax.data import image_text
from mmjax.train import Checkpointer, evaluate, make_task, prepare_config, train_and_evaluate
from mmjax.train.contrastive import VOCAB_FILE
from mmjax.train.optimizer import param_path
from tests.jobs.contrastive_job import tiny_config

PROBE = ["a small red shirt in the top left", "a large blue bag in the center", "zebra"]


def _config(steps):
    # end_lr_ratio=1: a constant learning rate, so a run of 2 steps resumed to 4 takes the steps of a 4-step run
    return tiny_config(task="contrastive", num_steps=steps, **{"optimizer.end_lr_ratio": 1.0})


def _change_the_captions(monkeypatch, tokenizer):
    """From now on the training captions rank the same words in the reverse order: a vocabulary rebuilt from them
    has the same size and other ids."""
    words = json.loads(tokenizer.to_json())
    changed = [w for rank, w in enumerate(words) for _ in range(rank + 1)]
    monkeypatch.setattr(image_text.ArrayImageText, "all_captions", lambda self, *a: list(changed))


def _params(workdir):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    params = ckpt._manager.restore(ckpt.latest_step())["params"]
    ckpt.close()
    return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_resume_reads_the_saved_vocabulary(tmp_path, monkeypatch):
    reference = str(tmp_path / "reference")
    assert train_and_evaluate(_config(4), reference)["step"] == 4
    workdir = str(tmp_path / "run")
    train_and_evaluate(_config(2), workdir)
    saved = make_task(prepare_config(_config(2)), workdir).tokenizer
    assert open(os.path.join(workdir, VOCAB_FILE)).read().strip() == saved.to_json()
    ids = saved(PROBE, context_length=16)

    _change_the_captions(monkeypatch, saved)
    rebuilt = make_task(prepare_config(_config(2))).tokenizer  # without the workdir: from the changed captions
    assert rebuilt.vocab_size == saved.vocab_size and not np.array_equal(rebuilt(PROBE, context_length=16), ids)
    np.testing.assert_array_equal(
        make_task(prepare_config(_config(2)), workdir).tokenizer(PROBE, context_length=16), ids
    )
    assert train_and_evaluate(_config(4), workdir)["step"] == 4  # resumed at step 2 with the saved vocabulary
    want, got = _params(reference), _params(workdir)
    assert sorted(want) == sorted(got)
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)


def test_eval_reads_the_saved_vocabulary_and_a_corrupt_one_is_a_clear_error(tmp_path, monkeypatch, capsys):
    workdir = str(tmp_path / "run")
    train_and_evaluate(_config(2), workdir)
    before = evaluate(workdir)
    _change_the_captions(monkeypatch, make_task(prepare_config(_config(2)), workdir).tokenizer)
    assert evaluate(workdir) == before  # same ids, same numbers, whatever the training captions say now
    capsys.readouterr()
    assert main(["eval", "--workdir", workdir]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :]) == json.loads(json.dumps(before))

    with open(os.path.join(workdir, VOCAB_FILE), "w") as f:
        f.write('["a", "red", ')  # cut short
    with pytest.raises(ValueError, match=r"vocab\.json is not a word vocabulary saved by mmjax \(it is not valid JSON"):
        evaluate(workdir)
    assert main(["eval", "--workdir", workdir]) == 2  # a user error: one line, no traceback
    err = capsys.readouterr().err
    assert "vocab.json is not a word vocabulary saved by mmjax" in err and "Traceback" not in err
    with open(os.path.join(workdir, VOCAB_FILE), "w") as f:
        f.write('{"a": 4}')
    with pytest.raises(ValueError, match=r"expected a JSON list of words, got dict"):
        train_and_evaluate(_config(3), workdir)
