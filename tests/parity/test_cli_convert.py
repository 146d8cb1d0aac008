"""`mmjax convert`: a Hugging Face CLIP directory to mmjax's layout and back, through the command line."""

import os

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from mmjax.cli import main
from mmjax.convert import from_hf
from mmjax.convert.hf_clip import flatten_params, load_dir
from tests.parity.test_clip_hf import make_hf

pytestmark = pytest.mark.parity


def test_convert_from_hf_and_back_is_exact(tmp_path):
    hf = make_hf("a")
    src, ours, back = tmp_path / "hf", tmp_path / "mmjax", tmp_path / "hf_again"
    hf.save_pretrained(src, safe_serialization=True)

    assert main(["convert", "--from-hf", str(src), "--out", str(ours)]) == 0
    config, params = load_dir(ours)
    model, expected = from_hf(hf)
    assert config == model.config
    got, want = flatten_params(params), flatten_params(expected)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)

    assert main(["convert", "--to-hf", str(ours), "--out", str(back)]) == 0
    original, written = load_file(os.path.join(src, "model.safetensors")), load_file(back / "model.safetensors")
    buffers = {k for k in original if k.endswith("position_ids")}
    assert sorted(set(original) - buffers) == sorted(set(written) - buffers)
    for key in set(original) - buffers:
        np.testing.assert_array_equal(written[key], original[key], err_msg=key)
    reloaded = transformers.CLIPModel.from_pretrained(back)
    assert reloaded.config.projection_dim == hf.config.projection_dim


def test_convert_rejects_other_model_types_and_missing_dirs(tmp_path, capsys):
    vit = transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=16,
            patch_size=8,
        )
    )
    vit.save_pretrained(tmp_path / "vit", safe_serialization=True)
    assert main(["convert", "--from-hf", str(tmp_path / "vit"), "--out", str(tmp_path / "o")]) == 2
    assert "model_type 'vit'" in capsys.readouterr().err
    assert main(["convert", "--to-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err


def test_convert_a_vit_gpt2_captioner_from_hf_and_back_is_exact(tmp_path):
    from tests.parity.test_captioner_hf import make_hf as make_captioner

    hf = make_captioner("proj", seed=1)
    src, ours, back = tmp_path / "hf", tmp_path / "mmjax", tmp_path / "hf_again"
    hf.save_pretrained(src, safe_serialization=True)
    assert main(["convert", "--from-hf", str(src), "--out", str(ours)]) == 0
    assert main(["convert", "--to-hf", str(ours), "--out", str(back)]) == 0
    original, written = load_file(os.path.join(src, "model.safetensors")), load_file(back / "model.safetensors")
    assert sorted(original) == sorted(written)
    for key in original:
        np.testing.assert_array_equal(written[key], original[key], err_msg=key)
    reloaded = transformers.VisionEncoderDecoderModel.from_pretrained(back)
    assert reloaded.config.decoder.n_embd == hf.config.decoder.n_embd
