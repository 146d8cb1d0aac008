"""Parity of a converted transformers ``VisionEncoderDecoderModel`` (ViT encoder + GPT-2 decoder with
cross-attention) with mmjax's :class:`~mmjax.captioner.Captioner`: logits (teacher forced and through the KV cache),
the exact round trip back to the Hugging Face layout, the errors on unsupported checkpoints, and
:func:`mmjax.generate.generate` against transformers' ``generate()`` (greedy and beam search).

Reference models are random-initialised (no download); every weight is re-drawn at a visible scale and the
end-of-text row of the output embedding is scaled up so that sequences end early and the beam search stopping
rules (``length_penalty``, ``early_stopping``) decide the outcome.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from mmjax.captioner import Captioner
from mmjax.convert import from_hf, to_numpy_state_dict
from mmjax.convert import hf_vision_encoder_decoder as ved
from mmjax.errors import UserError
from mmjax.generate import generate
from tests.tolerances import assert_matches_reference

pytestmark = pytest.mark.parity

BOS, EOS, PAD = 1, 2, 3
VOCAB, POSITIONS, IMAGE = 64, 32, 32
# (encoder width, decoder width, tied lm_head, layers): the same width without a projection and tied, and
# different widths (enc_to_dec_proj) with an untied lm_head.
CONFIGS = {"tied": (32, 32, True, 1), "proj": (32, 48, False, 2)}


def make_hf(name, seed, eos_scale=3.0, noise=0.2):
    enc_w, dec_w, tied, layers = CONFIGS[name]
    enc = transformers.ViTConfig(
        hidden_size=enc_w,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * enc_w,
        image_size=IMAGE,
        patch_size=8,
    )
    dec = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=POSITIONS,
        n_embd=dec_w,
        n_layer=layers,
        n_head=2,
        n_inner=3 * dec_w if tied else None,
        add_cross_attention=True,
        is_decoder=True,
        tie_word_embeddings=tied,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = BOS, EOS, PAD
    torch.manual_seed(seed)
    model = transformers.VisionEncoderDecoderModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
        model.decoder.lm_head.weight[EOS] *= eos_scale  # tied: wte is the same tensor
    return model


def pixels(seed, batch=3):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def nhwc(px):
    return jnp.asarray(px.permute(0, 2, 3, 1).numpy())


@functools.cache
def converted_model(name):
    # Weights at the scale of a trained model (logits of order 1), where the comparisons below
    # (1e-5 of the output's magnitude) are as tight as an absolute 1e-5.
    hf = make_hf(name, seed=0, noise=0.05)
    model, params = from_hf(hf)
    return hf, model, params


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request):
    return (request.param, *converted_model(request.param))


def test_logits_equal_transformers(converted):
    name, hf, model, params = converted
    assert isinstance(model, Captioner)
    assert ("encoder_proj" in params) == (name == "proj")
    assert ("head" in params["text_decoder"]) == (name == "proj")
    assert (model.decoder.bos_id, model.decoder.eos_id, model.decoder.pad_id) == (BOS, EOS, PAD)
    px = pixels(1)
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = BOS
    with torch.no_grad():
        ref = hf(pixel_values=px, decoder_input_ids=ids)
        enc_ref = hf.encoder(pixel_values=px).last_hidden_state.numpy()
    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)[0])
    assert_matches_reference(np.asarray(forward(params, nhwc(px), ids.numpy())), ref.logits.numpy())
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, x: m.vision(x))[1]["encoded"])
    assert_matches_reference(np.asarray(encode(params, nhwc(px))), enc_ref)

    # Through the KV cache: prefill 4 tokens, then one token per call.
    encoded = model.apply({"params": params}, nhwc(px), method="encode")
    decode = jax.jit(lambda p, t, e, c: model.apply({"params": p}, t, encoded=e, cache=c, method="decode"))
    cache = model.init_cache(3, ids.shape[1], encoded.shape[1])
    step, cache = decode(params, ids[:, :4].numpy(), encoded, cache)
    steps = [step]
    for t in range(4, ids.shape[1]):
        step, cache = decode(params, ids[:, t : t + 1].numpy(), None, cache)
        steps.append(step)
    assert_matches_reference(np.concatenate(steps, axis=1), ref.logits.numpy())
    assert int(cache.index) == ids.shape[1]


def test_round_trip_is_exact(converted, tmp_path):
    name, hf, model, params = converted
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    written = ved.to_hf_state_dict(model, params)
    assert sorted(written) == sorted(saved)
    assert ("decoder.lm_head.weight" in written) == (name == "proj")
    for key, value in saved.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)

    # The file layout converts as the in-memory one does.
    file_model, from_file = from_hf(str(tmp_path / "hf"))
    assert file_model == model
    flat = lambda tree: {k: np.asarray(v) for k, v in ved.flatten_params(tree).items()}  # noqa: E731
    assert flat(from_file).keys() == flat(params).keys()
    for key, value in flat(params).items():
        np.testing.assert_array_equal(flat(from_file)[key], value, err_msg=key)

    # mmjax's own format (what `mmjax convert --from-hf` writes) and back to a directory transformers loads.
    mm, back = tmp_path / "mmjax", tmp_path / "hf_again"
    assert ved.convert_hf_dir(tmp_path / "hf", mm).decoder == model.decoder
    loaded_model, loaded = ved.load_dir(mm)
    assert loaded_model == model
    ved.to_hf_dir(loaded_model, loaded, back)
    again = load_file(back / "model.safetensors")
    assert sorted(again) == sorted(saved)
    for key, value in saved.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    reloaded = transformers.VisionEncoderDecoderModel.from_pretrained(back).eval()
    assert (reloaded.generation_config.decoder_start_token_id, reloaded.generation_config.eos_token_id) == (BOS, EOS)
    assert reloaded.generation_config.pad_token_id == PAD
    px, ids = pixels(3), torch.tensor([[BOS, 5, 6, 7]] * 3)
    with torch.no_grad():
        want = hf(pixel_values=px, decoder_input_ids=ids).logits
        got = reloaded(pixel_values=px, decoder_input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def _greedy_margin(ref):
    """The smallest top-1 minus top-2 logit gap over the steps of rows still generating."""
    gaps = []
    done = np.zeros(ref.sequences.shape[0], bool)
    for t, scores in enumerate(ref.scores):
        top2 = np.sort(scores.numpy(), axis=-1)[:, -2:]
        gaps.extend((top2[:, 1] - top2[:, 0])[~done])
        done |= ref.sequences.numpy()[:, 1 + t] == EOS
    return min(gaps)


def _greedy_log_prob(ref):
    """Sum over generated tokens (up to and including end of text) of log_softmax of transformers' step logits."""
    seqs, total = ref.sequences.numpy(), np.zeros(ref.sequences.shape[0])
    done = np.zeros(seqs.shape[0], bool)
    for t, scores in enumerate(ref.scores):
        logp = torch.log_softmax(scores, dim=-1).numpy()
        token = seqs[:, 1 + t]
        total += np.where(done, 0.0, logp[np.arange(len(token)), token])
        done |= token == EOS
    return total


def _ended_early(sequences, max_new_tokens):
    """Whether some row produced end-of-text before its last possible token."""
    return bool((sequences[:, 1:max_new_tokens] == EOS).any())


def _check_generate(hf, model, params, px, *, max_new_tokens, beams):
    """Greedy and beam search vs transformers; returns what happened (for the caller's coverage checks)."""
    images = nhwc(px)
    common = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        decoder_start_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        ref = hf.generate(px, num_beams=1, **common)
    out = generate(model, params, images, max_new_tokens=max_new_tokens)
    assert _greedy_margin(ref) > 1e-3, "greedy: a near tie makes the comparison fragile"
    np.testing.assert_array_equal(out.sequences, ref.sequences.numpy(), err_msg="greedy sequences")
    assert_matches_reference(out.scores, _greedy_log_prob(ref))
    ended = {"greedy": _ended_early(out.sequences, max_new_tokens)}

    results = {}
    for num_beams, length_penalty, early_stopping in beams:
        case = f"num_beams={num_beams} length_penalty={length_penalty} early_stopping={early_stopping}"
        with torch.no_grad():
            ref = hf.generate(
                px,
                num_beams=num_beams,
                num_return_sequences=num_beams,  # every finished hypothesis, best first, to check the margin
                length_penalty=length_penalty,
                early_stopping=early_stopping,
                **common,
            )
        out = generate(
            model,
            params,
            images,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
        )
        hyp = ref.sequences.numpy().reshape(px.shape[0], num_beams, -1)
        hyp_scores = ref.sequences_scores.numpy().reshape(px.shape[0], num_beams)
        assert (hyp_scores[:, 0] - hyp_scores[:, 1]).min() > 1e-4, f"{case}: best and runner-up nearly tie"
        best, length = hyp[:, 0], out.sequences.shape[1]
        assert length <= best.shape[1] and (best[:, length:] == PAD).all(), (case, out.sequences, best)
        assert not (out.sequences[:, -1] == PAD).all(), f"{case}: mmjax kept an all-padding column"
        np.testing.assert_array_equal(out.sequences, best[:, :length], err_msg=case)
        assert_matches_reference(out.scores, hyp_scores[:, 0], err_msg=case)
        results[(num_beams, length_penalty, early_stopping)] = (out.sequences, out.scores)
        ended[case] = _ended_early(out.sequences, max_new_tokens)
    return ended, results


BEAM_GRID = list(itertools.product((2, 3, 4), (0.5, 1.0, 2.0), (True, False)))


@pytest.mark.parametrize("seed", [3, 5])
def test_generate_matches_transformers_projection_config(seed):
    hf = make_hf("proj", seed)
    model, params = from_hf(hf)
    ended, results = _check_generate(hf, model, params, pixels(seed), max_new_tokens=8, beams=BEAM_GRID)
    assert ended["greedy"] or any(ended.values()), "no sequence ended early: the stopping rules were not exercised"
    assert sum(ended.values()) >= 3, ended
    # early_stopping changes at least one outcome (sequences or scores) somewhere in the grid.
    assert any(
        results[(b, lp, True)][0].shape != results[(b, lp, False)][0].shape
        or not np.array_equal(results[(b, lp, True)][0], results[(b, lp, False)][0])
        or not np.allclose(results[(b, lp, True)][1], results[(b, lp, False)][1], atol=1e-6)
        for b, lp in itertools.product((2, 3, 4), (0.5, 1.0, 2.0))
    ), "early_stopping=True and False agree everywhere: pick a seed where they differ"


def test_generate_matches_transformers_tied_config():
    hf = make_hf("tied", 5, eos_scale=2.5)
    model, params = from_hf(hf)
    beams = [(3, 0.5, True), (3, 1.0, False), (3, 2.0, False), (3, 2.0, True)]
    ended, _ = _check_generate(hf, model, params, pixels(12), max_new_tokens=10, beams=beams)
    assert all(ended.values()), ended


def _config_with(hf, **changes):
    cfg = hf.config.to_dict()
    for key, value in changes.items():
        where, _, field = key.rpartition(".")
        (cfg[where] if where else cfg)[field] = value
    return cfg


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"encoder.model_type": "deit"}, "encoder model_type='deit'"),
        ({"decoder.model_type": "bert"}, "decoder model_type='bert'"),
        ({"decoder.add_cross_attention": False}, "add_cross_attention=False"),
        ({"decoder.scale_attn_weights": False}, "scale_attn_weights=False"),
        ({"decoder.scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ({"decoder.cross_attention_hidden_size": 32}, "cross_attention_hidden_size=32"),
        ({"eos_token_id": 50256}, "eos_id=50256"),
        ({"eos_token_id": [2, 5]}, "eos_token_id=[2, 5]"),
        ({"decoder.activation_function": "mish"}, "activation_function='mish'"),
        ({"decoder.n_layer": 3}, "missing keys"),
    ],
)
def test_unsupported_checkpoints_are_refused(changes, message):
    hf, _, _ = converted_model("proj")
    sd = to_numpy_state_dict(hf.state_dict())
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_hf((sd, _config_with(hf, **changes)))


def test_other_bad_inputs(converted):
    name, hf, model, params = converted
    sd = to_numpy_state_dict(hf.state_dict())
    if name == "tied":  # a tied head that differs from the token embedding
        sd["decoder.lm_head.weight"] = sd["decoder.lm_head.weight"] + 1.0
        with pytest.raises(UserError, match="tie_word_embeddings"):
            from_hf((sd, hf.config))
        return
    with pytest.raises(UserError, match="unknown model options"):
        from_hf(hf, num_classes=3)
    with pytest.raises(UserError, match="unknown keys"):
        from_hf(({**sd, "decoder.transformer.extra": np.zeros(2)}, hf.config))
    # Special ids can be overridden (GPT-2's default 50256 is outside a small vocabulary).
    cfg = _config_with(hf, eos_token_id=None, **{"decoder.eos_token_id": 50256})
    assert from_hf((sd, cfg), eos_id=7)[0].decoder.eos_id == 7
    mapped = Captioner(vision=model.vision, decoder=model.decoder, num_map_queries=2)
    with pytest.raises(UserError, match="num_map_queries=2"):
        ved.to_hf_state_dict(mapped, params)
