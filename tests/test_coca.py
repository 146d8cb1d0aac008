"""CoCa (mmjax.coca) and its task (mmjax.train.coca): a trained CLIP's params drop into CoCa's ``clip/...`` unchanged,
generate() runs on it, the loss is 2 * caption + 1 * contrastive recomputed by hand, the parallel modes agree
(float64 proof, float32 bound), a preempted run resumes bit-exactly, bad settings are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.clip import CLIP, get_config
from mmjax.coca import CoCa
from mmjax.decoder import DecoderConfig
from mmjax.errors import ConfigError, UserError
from mmjax.generate import generate, log_likelihood
from mmjax.keypath import set_path
from mmjax.train import make_task, prepare_config, train_and_evaluate
from mmjax.train.coca import CoCaTask
from tests.task_helpers import SIGTERM_ENV, SigtermAtStep, assert_modes_agree_after_one_step, saved_state

CLIP_CONFIG = get_config("tiny", vision_depth=1, text_depth=1, vision_heads=2, text_heads=2)
DECODER = DecoderConfig(vocab_size=64, width=16, depth=1, num_heads=2, mlp_dim=32, max_length=12, eos_id=63)


@pytest.fixture(scope="module")
def model_and_params():
    model = CoCa(CLIP_CONFIG, decoder=DECODER)
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    ids = jnp.array([[1, 5, 9, 63, 0], [1, 7, 63, 0, 0]], jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), images, ids, ids[:, :-1])["params"]
    return model, params, images, ids


def test_a_trained_clip_drops_into_coca(model_and_params):
    model, params, images, ids = model_and_params
    clip = CLIP(CLIP_CONFIG)
    clip_shapes = jax.eval_shape(clip.init, jax.random.key(7), images, ids)["params"]
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert shapes(params["clip"]) == shapes(clip_shapes)  # the same tree, path for path
    assert sorted(params) == ["clip", "encoder_norm", "encoder_proj", "text_decoder"]  # 32 -> 16 wide: projected
    # CLIP's tree drives CoCa's towers exactly as it drives CLIP (here CoCa's own clip/..., scaled to differ)
    clip_params = jax.tree.map(lambda x: 1.5 * x, params["clip"])
    params = {**params, "clip": clip_params}
    got = jax.jit(lambda p: model.apply({"params": p}, images, ids, ids[:, :-1]))(params)
    want = jax.jit(lambda p: clip.apply({"params": p}, images, ids))(clip_params)
    for name in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text", "logit_scale"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-6, err_msg=name)
    # the decoder reads the image tower's tokens (class token + 4 patches), normalised and projected
    tokens = want.image_intermediates["encoded"]
    norm = (tokens - tokens.mean(-1, keepdims=True)) / jnp.sqrt(tokens.var(-1, keepdims=True) + 1e-5)
    norm = norm * params["encoder_norm"]["scale"] + params["encoder_norm"]["bias"]
    proj = norm @ params["encoder_proj"]["kernel"] + params["encoder_proj"]["bias"]
    np.testing.assert_allclose(got.encoded, proj, atol=1e-5)


def test_generate_and_log_likelihood_run_on_coca(model_and_params):
    model, params, images, _ = model_and_params
    out = generate(model, params, images, max_new_tokens=4)
    # greedy = argmax of a teacher-forced pass (no cache) over the prefix, one token at a time; the decoder is
    # causal, so one compiled pass over 5 positions serves every prefix length (later positions are ignored)
    encoded = jax.jit(lambda p: model.apply({"params": p}, images, method="encode"))(params)
    decode = jax.jit(lambda p, s: model.apply({"params": p}, s, encoded=encoded, method="decode")[0])
    want = np.zeros((2, 5), np.int32)
    want[:, 0] = DECODER.bos_id
    for t in range(4):
        want[:, t + 1] = np.argmax(decode(params, jnp.asarray(want))[:, t], -1)
    seqs = np.asarray(out.sequences)
    for row in range(2):  # up to and including the first end of text, then padding
        stop = next((t + 1 for t in range(1, 5) if want[row, t] == DECODER.eos_id), 5)
        np.testing.assert_array_equal(seqs[row, :stop], want[row, :stop])
        assert np.all(seqs[row, stop:] == DECODER.pad_id)
    ll = log_likelihood(model, params, images, np.array([[1, 5, 63], [1, 7, 63]]))
    assert ll.shape == (2, 2) and np.all(ll < 0)


def _config(**overrides) -> dict:
    config = {
        "task": "coca",
        "seed": 0,
        "model": {
            "preset": "tiny",
            "embed_dim": 8,
            "vision_width": 16,
            "vision_depth": 1,
            "vision_heads": 2,
            "text_width": 16,
            "text_depth": 1,
            "text_heads": 2,
            "decoder_width": 8,
            "decoder_num_heads": 2,
            "decoder_mlp_dim": 16,
            "attention_implementation": "reference",
        },
        "data": {"image_size": 16, "num_train": 64, "num_test": 8, "num_heldout": 8},
        "batch_size": 16,
        "eval_batch_size": 8,
        "num_steps": 4,
        "optimizer": {"lr": 3e-3, "warmup_steps": 0},
        "log_every": 2,
        "checkpoint_every": 2,
        "progress": False,
        "tensorboard": False,
        "plot": False,
    }
    for key, value in overrides.items():
        set_path(config, key, value)
    return config


class SigtermCoCaTask(SigtermAtStep, CoCaTask):
    """The CoCa task, preempting itself at step ``$MMJAX_TEST_SIGTERM_AT_STEP``."""


@pytest.fixture(scope="module")
def initial_params():
    """The task's initial params (key 0, as tests.test_train_task.run draws them), computed once for the tests."""
    task = make_task(prepare_config(_config()))
    return jax.device_get(task.init_params(jax.random.key(0), next(task.train_batches(0))))  # host copies


def test_the_loss_is_2_caption_plus_1_contrastive(initial_params):
    task = make_task(prepare_config(_config(**{"coca.label_smoothing": 0.1})))
    assert task.model.decoder.depth == 1 and task.model.decoder.max_length == task.context_length  # text tower's
    batch = jax.tree.map(jnp.asarray, next(task.train_batches(0)))
    params = initial_params
    loss, metrics = jax.jit(lambda p: task.loss(p, batch, jax.random.key(1), train=False))(params)
    ids = batch["ids"]
    out = jax.jit(lambda p: task.model.apply({"params": p}, task._images(batch["image"]), ids, ids[:, :-1]))(params)
    # caption: label-smoothed token cross-entropy over the non-pad targets (the end-of-text token counts)
    targets, weights = ids[:, 1:], (ids[:, 1:] != task.tokenizer.pad_id).astype(jnp.float32)
    assert 0 < weights.sum() < weights.size
    smooth = optax.smooth_labels(jax.nn.one_hot(targets, out.logits.shape[-1]), 0.1)
    caption = jnp.sum(optax.softmax_cross_entropy(out.logits, smooth) * weights) / jnp.sum(weights)
    # contrastive: CLIP's symmetric softmax loss at the clamped temperature, the whole batch as negatives
    scale = jnp.exp(jnp.minimum(params["clip"]["logit_scale"], jnp.log(100.0)))
    sims = scale * out.image_embeds @ out.text_embeds.T
    labels = jnp.arange(sims.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(sims, labels)
    t2i = optax.softmax_cross_entropy_with_integer_labels(sims.T, labels)
    contrast = (i2t.mean() + t2i.mean()) / 2
    np.testing.assert_allclose(float(metrics["caption_loss"]), float(caption), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["contrastive_loss"]), float(contrast), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(2 * caption + contrast), rtol=1e-5)
    correct = (jnp.argmax(out.logits, -1) == targets) * weights
    np.testing.assert_allclose(float(metrics["token_accuracy"]), float(correct.sum() / weights.sum()), rtol=1e-6)


def test_parallel_modes_agree_in_float64_and_float32(initial_params):
    """single / pmap (8 devices: the caption loss weighted by each device's token share, the contrastive loss over
    the gathered global batch) / sharded: one optimizer step from the same params (the task's initial ones, computed
    once). Adam eps 1e-2 as tests/test_train_captioning.py (identically-zero gradients, e.g. the attention key biases,
    would otherwise turn round-off into steps of up to lr)."""
    config = prepare_config(_config())

    def task():
        t = make_task(config)
        t.init_params = lambda rng, batch: initial_params
        return t

    # clipped gradients: sums over the batch's 16 x 11 tokens and 16 x 16 image-text pairs
    assert_modes_agree_after_one_step(task, gradient_terms=16 * 16)


def test_a_preempted_run_resumes_bit_exactly(tmp_path, monkeypatch):
    reference_dir = str(tmp_path / "reference")
    reference = train_and_evaluate(_config(), reference_dir)
    # the evaluation joins both tasks' numbers; the report scores the generated captions
    for key in ("caption_loss", "contrastive_loss", "token_accuracy", "item_accuracy", "heldout_exact_match"):
        assert np.isfinite(reference[f"eval_{key}"]), key
    want = 2 * reference["eval_caption_loss"] + reference["eval_contrastive_loss"]
    assert reference["eval_loss"] == pytest.approx(want, rel=1e-5)
    assert 0.0 <= reference["eval_bleu4"] <= 1.0 and "eval_scoring_classifier_examples" not in reference
    assert open(reference["eval_caption_grid_png"], "rb").read(4) == b"\x89PNG"

    config = _config(task="tests.test_coca:SigtermCoCaTask", **{"coca.final_report": False})
    workdir = str(tmp_path / "interrupted")
    monkeypatch.setenv(SIGTERM_ENV, "3")  # stops after step 3, between the checkpoints of steps 2 and 4
    first = train_and_evaluate(config, workdir)
    assert first["preempted"] is True and first["step"] == 3
    monkeypatch.delenv(SIGTERM_ENV)
    resumed = train_and_evaluate(config, workdir)
    assert resumed["step"] == 4
    got, want = saved_state(workdir), saved_state(reference_dir)
    for tree in ("params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, got[tree], want[tree])
    assert resumed["eval_loss"] == reference["eval_loss"]


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("coca.caption_loss_weight", -1.0, "caption_loss_weight=-1.0 must be a number >= 0"),
        ("coca.label_smoothing", 1.0, "label_smoothing=1.0 must be in"),
        ("model.decoder_width", 15, "not divisible by num_heads"),
        ("model.name", "clip", "not valid for the coca task"),
        ("model.tokenizer", "bpe", "not supported by the coca task"),
        ("optimizer.grad_accum_steps", 2, "grad_accum_steps=2"),
    ],
)
def test_bad_settings_are_refused_with_the_value(key, value, match):
    with pytest.raises(UserError, match=match):
        make_task(prepare_config(_config(**{key: value})))


def test_a_typo_in_the_model_section_names_the_closest_key():
    with pytest.raises(ConfigError, match="decoder_width"):
        prepare_config(_config(**{"model.decoder_widht": 16}))
