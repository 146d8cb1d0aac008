"""Tests of mmjax.convert.io and the from_hf dispatcher (no torch or transformers needed)."""

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import mmjax.convert as convert
from mmjax.convert import (
    check_state_dict,
    from_hf,
    load_config,
    load_state_dict,
    register,
    save_hf_dir,
    to_numpy_state_dict,
)


def _state_dict():
    rng = np.random.RandomState(0)
    return {
        "a.weight": rng.randn(3, 4).astype(np.float32),
        "a.bias": rng.randn(3).astype(np.float16),
        "b.table": rng.randn(2, 2).astype(ml_dtypes.bfloat16),
        "c.index": np.arange(5, dtype=np.int64),
    }


def test_save_and_load_round_trip(tmp_path):
    sd = _state_dict()
    save_hf_dir(tmp_path / "out", sd, {"model_type": "toy", "hidden_size": 3})
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert load_config(tmp_path / "out") == {"model_type": "toy", "hidden_size": 3}
    back = load_state_dict(tmp_path / "out")
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype, k
        np.testing.assert_array_equal(back[k], sd[k])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers' from_pretrained requires


def test_save_accepts_config_object(tmp_path):
    class Config:
        def to_dict(self):
            return {"model_type": "toy", "layers": [1, 2]}

    save_hf_dir(tmp_path, {"w": np.ones(2, np.float32)}, Config())
    assert json.loads((tmp_path / "config.json").read_text())["layers"] == [1, 2]


def test_load_sharded_safetensors(tmp_path):
    sd = _state_dict()
    names = sorted(sd)
    save_file({k: sd[k] for k in names[:2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in names[2:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 + (i >= 2)}-of-00002.safetensors" for i, k in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    back = load_state_dict(tmp_path)
    assert set(back) == set(sd)
    np.testing.assert_array_equal(back["c.index"], sd["c.index"])


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        load_state_dict(tmp_path / "nope")
    with pytest.raises(ValueError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no weights.*model.safetensors.*\['notes.txt'\]"):
        load_state_dict(tmp_path)


def test_pytorch_bin_without_torch_says_how_to_convert(tmp_path, monkeypatch):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ValueError, match="torch is not installed.*save_file.*weights_only=True"):
        load_state_dict(tmp_path)


def test_safetensors_preferred_over_pytorch_bin(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    save_file({"w": np.ones(3, np.float32)}, str(tmp_path / "model.safetensors"))
    assert list(load_state_dict(tmp_path)) == ["w"]


def test_to_numpy_state_dict():
    sd = to_numpy_state_dict({"x": [1, 2, 3], "y": np.zeros((2,), np.float16)})
    assert sd["x"].tolist() == [1, 2, 3] and sd["y"].dtype == np.float16
    with pytest.raises(ValueError, match="keys must be strings.*3"):
        to_numpy_state_dict({3: np.zeros(1)})


def test_check_state_dict_names_every_problem():
    given = {"a": np.zeros((2, 3)), "b": np.zeros(4), "extra1": np.zeros(1), "extra2": np.zeros(1)}
    expected = {"a": (3, 2), "b": (4,), "gone1": (1,), "gone2": (2,)}
    with pytest.raises(ValueError) as info:
        check_state_dict(given, expected, what="toy checkpoint")
    msg = str(info.value)
    assert msg.startswith("toy checkpoint does not match")
    assert "unknown keys ['extra1', 'extra2']" in msg and "missing keys ['gone1', 'gone2']" in msg
    assert "a: got (2, 3), expected (3, 2)" in msg and "b:" not in msg
    check_state_dict({"a": (3, 2)}, {"a": (3, 2)})  # shapes may be given directly
    with pytest.raises(ValueError, match=r"unknown keys \['old.name \(= new\)'\]"):
        check_state_dict({"new": np.zeros(1)}, {}, display={"new": "old.name"})


def test_from_hf_dispatch_forms(tmp_path):
    calls = []

    def toy(state_dict, config, **options):
        calls.append((sorted(state_dict), config["model_type"], options))
        return "model", {k: v * 2 for k, v in state_dict.items()}

    register("toy", toy)
    try:
        sd = {"w": np.ones(2, np.float32)}
        assert from_hf(sd, config={"model_type": "toy"}, scan=True)[1]["w"].tolist() == [2.0, 2.0]
        assert from_hf((sd, {"model_type": "toy"}))[0] == "model"
        save_hf_dir(tmp_path, sd, {"model_type": "toy"})
        assert from_hf(str(tmp_path))[0] == "model" and from_hf(tmp_path)[0] == "model"

        class FakeModel:
            config = {"model_type": "toy"}

            def state_dict(self):
                return sd

        assert from_hf(FakeModel())[0] == "model"
        assert calls[0] == (["w"], "toy", {"scan": True}) and len(calls) == 5
    finally:
        del convert.CONVERTERS["toy"]


def test_from_hf_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type='nope'.*'vit'"):
        from_hf({"w": np.zeros(1)}, config={"model_type": "nope"})
    with pytest.raises(ValueError, match="no 'model_type'"):
        from_hf({"w": np.zeros(1)}, config={"hidden_size": 1})
    with pytest.raises(ValueError, match="pass config="):
        from_hf({"w": np.zeros(1)})
    with pytest.raises(ValueError, match="got int"):
        from_hf(3)
    save_hf_dir(tmp_path, {"w": np.zeros(1)}, {"model_type": "vit"})
    with pytest.raises(ValueError, match="do not pass one"):
        from_hf(tmp_path, config={"model_type": "vit"})


def test_runtime_imports_neither_torch_nor_transformers():
    assert convert.CONVERTERS["vit"] == "mmjax.convert.hf_vit:from_hf_state_dict"
    code = (
        "import sys, mmjax.convert, mmjax.convert.hf_vit, mmjax.vit, mmjax.layers; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
