"""mmjax.generate against host-side references on tiny captioners: greedy equals an argmax loop over the full
teacher-forced forward (no cache); beam search equals a plain-Python implementation of transformers' beam-search
rules (written here, list by list, per image); sampling's limits and filters; the log-likelihood scorer equals
teacher-forced recomputation; bad input raises ValueError; one compilation per shape.

Every model here has the same config (only the parameters differ), batch 2 and ``max_new_tokens=6``, so the jitted
programs are shared between tests. Exact parity with transformers itself (a converted GPT-2) is in tests/parity/.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import generate as gen
from mmjax.captioner import Captioner
from mmjax.decoder import DecoderConfig
from mmjax.generate import GenerateOutput, generate, log_likelihood
from mmjax.vit import ViT
from tests.tolerances import assert_float32_close

VOCAB = 24
MAX_LEN = 16
NEW = 6  # max_new_tokens everywhere
ROWS = 4  # the reference forward pads its batch to this many rows (one compilation)


def _captioner():
    """A tiny captioner (ViT: 8x8 images -> 5 tokens; a 2-block decoder with an untied head)."""
    small = dict(width=16, num_heads=2, mlp_dim=32, attention_implementation="reference")  # fast to compile
    vit = ViT(depth=1, patch_size=4, num_classes=0, pool_type="gap", **small)
    cfg = DecoderConfig(vocab_size=VOCAB, depth=2, max_length=MAX_LEN, tie_embeddings=False, head_bias=True, **small)
    return Captioner(vision=vit, decoder=cfg)


MODEL = _captioner()
_INIT = jax.jit(lambda key, images: MODEL.init(key, images, jnp.ones((images.shape[0], 3), jnp.int32))["params"])


def _model(seed, *, eos_bias=0.0, batch=2):
    """:data:`MODEL`, parameters drawn from ``seed`` and ``batch`` images. ``eos_bias`` is added to the end-of-text
    logit (the head's bias) so that rows end early; the pad and start tokens get -30, as a trained model never
    emits them."""
    c = MODEL.decoder
    images = jax.random.normal(jax.random.key(seed + 1000), (batch, 8, 8, 3))
    params = _INIT(jax.random.key(seed), images)
    head = params["text_decoder"]["head"]
    bias = head["bias"].at[c.eos_id].add(eos_bias).at[c.pad_id].add(-30.0).at[c.bos_id].add(-30.0)
    params = {**params, "text_decoder": {**params["text_decoder"], "head": {**head, "bias": bias}}}
    return MODEL, params, images


_FORWARD = {}


def _teacher_forced(model, params, images, ids):
    """Logits at every position by the full teacher-forced forward (no cache): ``[B, T, V]`` float64 NumPy.

    Rows are padded to ``ROWS`` and ids to ``max_length`` so that one compilation serves every call (the decoder
    is causal: tokens after position ``t`` do not change the logits at ``t``)."""
    ids = np.asarray(ids)
    rows, length = ids.shape
    padded = np.full((ROWS, MAX_LEN), model.decoder.pad_id, np.int32)
    padded[:rows, :length] = ids
    images = np.concatenate([images, np.zeros((ROWS - rows, *images.shape[1:]), images.dtype)])
    if model not in _FORWARD:
        _FORWARD[model] = jax.jit(lambda p, x, i: model.apply({"params": p}, x, i)[0])
    return np.asarray(_FORWARD[model](params, images, padded), np.float64)[:rows, :length]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _full_prompt(model, batch, prompt):
    """The decoder prompt as transformers builds it: the start token prepended unless a row starts with it."""
    c = model.decoder
    start = np.full((batch, 1), c.bos_id)
    if prompt is None:
        return start
    p = np.broadcast_to(np.asarray(prompt), (batch, np.shape(prompt)[-1]))
    return p if (p[:, 0] == c.bos_id).any() else np.concatenate([start, p], 1)


# ---------------------------------------------------------------------------------------------- greedy


def _greedy_reference(model, params, images, prompt=None):
    """Host loop: argmax of the teacher-forced logits, pad after eos, stop when every row is done.

    Returns the sequences, the summed log-probabilities, which rows ended with eos and the smallest top-2 logit gap
    of a chosen token (a near tie would make token-for-token equality fragile)."""
    c = model.decoder
    ids = _full_prompt(model, images.shape[0], prompt)
    done = np.zeros(ids.shape[0], bool)
    scores = np.zeros(ids.shape[0])
    min_gap = np.inf
    for _ in range(NEW):
        logits = _teacher_forced(model, params, images, ids)[:, -1]
        top2 = np.sort(logits, -1)[:, -2:]
        min_gap = min(min_gap, float(np.min(np.where(done, np.inf, top2[:, 1] - top2[:, 0]))))
        token = np.where(done, c.pad_id, logits.argmax(-1))
        scores += np.where(done, 0.0, _log_softmax(logits)[np.arange(len(token)), token])
        ids = np.concatenate([ids, token[:, None]], 1)
        done |= token == c.eos_id
        if done.all():
            break
    return ids, scores, done, min_gap


def test_greedy_equals_a_teacher_forced_argmax_loop():
    seen = set()
    for seed, eos_bias, prompt in [
        (0, 0.0, None),
        (1, 2.0, None),
        (2, 3.0, None),
        (3, 2.5, [5, 7]),  # the start token is prepended
        (4, 0.0, np.array([[1, 9, 4], [1, 4, 3]])),  # one prompt per row, start token given
        (5, 3.0, [1, 6, 8]),
    ]:
        model, params, images = _model(seed, eos_bias=eos_bias)
        out = generate(model, params, images, max_new_tokens=NEW, prompt=prompt)
        want, want_scores, ended, gap = _greedy_reference(model, params, images, prompt)
        assert gap > 1e-3, f"seed {seed}: a near tie ({gap}) makes the argmax fragile; pick another seed"
        assert isinstance(out, GenerateOutput)
        assert out.sequences.dtype == np.int32 and out.scores.dtype == np.float32
        np.testing.assert_array_equal(out.sequences, want, err_msg=f"seed {seed}")
        # each score sums <= NEW log-softmax values over VOCAB logits
        assert_float32_close(out.scores, want_scores, terms=NEW * VOCAB, err_msg=f"seed {seed}")
        seen |= {"eos" if e else "max_new_tokens" for e in ended}
        if want.shape[1] < _full_prompt(model, 2, prompt).shape[1] + NEW:
            seen.add("every row ended early")
    assert seen == {"eos", "max_new_tokens", "every row ended early"}, seen


# ---------------------------------------------------------------------------------------------- beam search


def _beam_reference(model, params, image, prompt, num_beams, length_penalty, early_stopping):
    """transformers' beam search (``_beam_search`` and its helpers) for one image, in plain Python.

    Running beams and finished hypotheses are lists of ``(score, tokens)``. Rules: candidates are the ``2K`` best
    (running score + log p); the ``K`` best that did not stop keep running; the stopped ones among the first ``K``
    candidates join the finished list (score / generated_length ** length_penalty; the ``K`` best are kept), unless
    the image is done: ``early_stopping=True`` and ``K`` hypotheses finished, or the best running beam's score over
    ``h ** length_penalty`` (``h`` the generated length, or ``max_new_tokens`` for ``"never"`` with a positive
    penalty) cannot beat the worst finished one. An empty finished slot and a stopped running beam count as -1e9.
    Returns ``(tokens of the best hypothesis, its score, whether it ended with eos)``.
    """
    c = model.decoder
    K, NEG = num_beams, -1e9
    running = [(0.0, list(prompt))] + [(NEG, list(prompt)) for _ in range(K - 1)]
    finished = []  # (score, tokens), best first, at most K
    improvable = True
    for step in range(NEW):
        generated = step + 1  # tokens after the prompt, the candidate's included
        logits = _teacher_forced(model, params, np.repeat(image[None], K, 0), [t for _, t in running])[:, -1]
        logp = _log_softmax(logits).astype(np.float32)
        acc = (logp + np.array([s for s, _ in running], np.float32)[:, None]).reshape(-1)
        candidates = []
        for idx in np.argsort(-acc, kind="stable")[: 2 * K]:
            parent, token = divmod(int(idx), VOCAB)
            stopped = token == c.eos_id or generated == NEW
            candidates.append((float(acc[idx]), running[parent][1] + [token], stopped))
        live = [(s, t) for s, t, stop in candidates if not stop]
        running = (live + [(s + NEG, t) for s, t, stop in candidates if stop])[:K]
        done = not improvable or (early_stopping is True and len(finished) == K)
        if not done:
            new = [(s / generated**length_penalty, t) for s, t, stop in candidates[:K] if stop]
            finished = sorted(finished + new, key=lambda h: -h[0])[:K]
        h = NEW if early_stopping == "never" and length_penalty > 0 else generated
        worst = finished[-1][0] if len(finished) == K else NEG
        improvable = improvable and running[0][0] / h**length_penalty > worst
        if not improvable or (early_stopping is True and len(finished) == K) or generated == NEW:
            best_score, best = finished[0]
            return best, best_score, best[-1] == c.eos_id
    raise AssertionError("unreachable: every candidate stops at max_new_tokens")


def _beam_reference_batch(model, params, images, prompt, num_beams, length_penalty, early_stopping):
    """Per image, then padded to the longest best hypothesis. transformers runs the images in lockstep until all
    are done, but an image's finished hypotheses no longer change once it is done, so the results agree."""
    rows = [
        _beam_reference(model, params, images[i], list(prompt[i]), num_beams, length_penalty, early_stopping)
        for i in range(images.shape[0])
    ]
    seqs = np.full((len(rows), max(len(t) for t, _, _ in rows)), model.decoder.pad_id)
    for i, (tokens, _, _) in enumerate(rows):
        seqs[i, : len(tokens)] = tokens
    return seqs, np.array([s for _, s, _ in rows]), [e for _, _, e in rows]


@pytest.mark.parametrize(
    "num_beams,length_penalty,early_stopping",
    [
        (2, 1.0, False),
        (3, 0.0, False),
        (2, -0.5, False),
        (2, 1.0, True),  # an image that is done stops collecting while the other one runs on
        (3, 1.0, True),
        (3, 2.0, "never"),
        (2, 1.5, "never"),
    ],
)
def test_beam_search_equals_a_reference_of_transformers_rules(num_beams, length_penalty, early_stopping):
    ended = []
    cases = [(10, 1.5, None), (11, 3.0, None), (12, 0.5, None)]
    if num_beams == 2:
        cases.append((13, 2.0, [4, 5]))
    for seed, eos_bias, prompt in cases:
        model, params, images = _model(seed, eos_bias=eos_bias)
        out = generate(
            model,
            params,
            images,
            max_new_tokens=NEW,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            prompt=prompt,
        )
        full = _full_prompt(model, 2, prompt)
        want, want_scores, eos = _beam_reference_batch(
            model, params, images, full, num_beams, length_penalty, early_stopping
        )
        np.testing.assert_array_equal(out.sequences, want, err_msg=f"seed {seed}")
        assert_float32_close(out.scores, want_scores, terms=NEW * VOCAB, err_msg=f"seed {seed}")
        ended += eos
    assert any(ended), "no best hypothesis ended with eos: raise eos_bias"
    if length_penalty <= 1.0:
        assert not all(ended), "every best hypothesis ended with eos: lower eos_bias"


# ---------------------------------------------------------------------------------------------- sampling


def test_sampling_limits_equal_greedy():
    model, params, images = _model(20, eos_bias=1.0)
    greedy = generate(model, params, images, max_new_tokens=NEW)
    for kw in (dict(top_k=1), dict(temperature=1e-4), dict(top_p=1e-6), dict(top_k=1, top_p=0.3, temperature=3.0)):
        out = generate(model, params, images, max_new_tokens=NEW, do_sample=True, rng=jax.random.key(3), **kw)
        np.testing.assert_array_equal(out.sequences, greedy.sequences, err_msg=str(kw))
        assert_float32_close(out.scores, greedy.scores, terms=1, err_msg=str(kw))


def _allowed(logits, top_k=None, top_p=None, temperature=1.0):
    """transformers' TopK then TopP warpers on one row, in NumPy: the tokens that may be drawn."""
    s = logits / temperature
    keep = np.ones(s.shape, bool)
    if top_k:
        keep &= s >= np.sort(s)[-top_k]
    if top_p is not None:
        s = np.where(keep, s, -np.inf)
        order = np.argsort(s, kind="stable")
        p = np.exp(s[order] - s.max())
        drop = np.cumsum(p / p.sum()) <= 1 - top_p
        drop[-1] = False
        keep[order[drop]] = False
    return keep


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.6), dict(top_k=5, top_p=0.8, temperature=0.7)])
def test_sampled_tokens_stay_in_the_top_k_top_p_set(kw):
    model, params, images = _model(21)
    c = model.decoder
    outs = [
        generate(model, params, images, max_new_tokens=NEW, do_sample=True, rng=jax.random.key(s), **kw)
        for s in range(5)
    ]
    assert len({o.sequences.tobytes() for o in outs}) > 1  # it does sample
    for out in outs:
        seqs = out.sequences
        logits = _teacher_forced(model, params, images, seqs)
        scores = np.zeros(seqs.shape[0])
        for b in range(seqs.shape[0]):
            for t in range(1, seqs.shape[1]):
                assert _allowed(logits[b, t - 1], **kw)[seqs[b, t]], (kw, b, t)
                scores[b] += _log_softmax(logits[b, t - 1])[seqs[b, t]]
                if seqs[b, t] == c.eos_id:
                    assert (seqs[b, t + 1 :] == c.pad_id).all()
                    break
        assert_float32_close(out.scores, scores, terms=NEW * VOCAB)


def test_sampling_is_deterministic_for_a_fixed_rng():
    model, params, images = _model(22)
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5)
    a = generate(model, params, images, rng=jax.random.key(7), **kw)
    b = generate(model, params, images, rng=jax.random.key(7), **kw)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    np.testing.assert_array_equal(a.scores, b.scores)


# ---------------------------------------------------------------------------------------------- log-likelihood


def test_log_likelihood_equals_teacher_forced_recomputation():
    model, params, images = _model(30)
    c = model.decoder
    texts = np.array(
        [
            [c.bos_id, 5, 6, 7, c.eos_id, c.pad_id],
            [c.bos_id, 9, c.eos_id, c.pad_id, c.pad_id, c.pad_id],
            [c.bos_id, 3, 4, 5, 6, 8],  # no end-of-text: every token counts
            [c.bos_id, 11, c.eos_id, 12, 13, c.pad_id],  # tokens after eos do not count
            [c.bos_id, 10, 10, c.eos_id, c.pad_id, c.pad_id],
        ]
    )
    counted = [[1, 2, 3, 4], [1, 2], [1, 2, 3, 4, 5], [1, 2], [1, 2, 3]]
    want = np.zeros((2, len(texts)))
    for i in range(2):
        for j0 in range(0, len(texts), ROWS):
            block = texts[j0 : j0 + ROWS]
            logp = _log_softmax(_teacher_forced(model, params, np.repeat(images[i : i + 1], len(block), 0), block))
            for j, positions in enumerate(counted[j0 : j0 + ROWS]):
                want[i, j0 + j] = sum(logp[j, t - 1, block[j, t]] for t in positions)
    got = log_likelihood(model, params, images, texts)
    small = log_likelihood(model, params, images, texts, batch_size=2)  # text chunks, padded rows
    norm = log_likelihood(model, params, images, texts, length_normalize=True)
    assert got.shape == (2, len(texts)) and got.dtype == np.float32
    # a sum of <= 5 log-softmax values over VOCAB logits each
    assert_float32_close(got, want, terms=5 * VOCAB)
    assert_float32_close(small, want, terms=5 * VOCAB)
    assert_float32_close(norm, want / np.array([len(p) for p in counted]), terms=5 * VOCAB)


def test_log_likelihood_ranks_each_image_own_greedy_caption_first():
    """The zero-shot scoring classifier: each image's greedy caption is more likely than random texts of the same
    length (the same tokens replaced by random ones)."""
    model, params, images = _model(31, eos_bias=-1.0)
    c = model.decoder
    out = generate(model, params, images, max_new_tokens=NEW)
    words = (out.sequences > c.eos_id) & (np.arange(out.sequences.shape[1]) > 0)
    assert words.sum(1).min() >= 2
    rng = np.random.default_rng(0)
    texts = [out.sequences]
    for _ in range(4):
        texts.append(np.where(words, rng.integers(c.eos_id + 1, VOCAB, out.sequences.shape), out.sequences))
    texts = np.concatenate(texts)  # [caption 0, caption 1, random 0, random 1, ...]
    ll = log_likelihood(model, params, images, texts)
    for i in range(2):
        assert ll[i, i] > ll[i, 2 + i :: 2].max(), (i, ll[i])
    # the log-likelihood of the greedy caption is its generation score
    assert_float32_close(ll[[0, 1], [0, 1]], out.scores, terms=NEW * VOCAB)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_beams=0), "num_beams=0"),
        (dict(num_beams=2.0), "num_beams=2.0"),
        (dict(top_p=0.0, do_sample=True), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(temperature=0.0, do_sample=True, rng=jax.random.key(0)), "temperature=0.0"),
        (dict(temperature=-1.0, do_sample=True, rng=jax.random.key(0)), "temperature=-1.0"),
        (dict(do_sample=True), "rng"),
        (dict(do_sample=True, rng=5), "rng=5 is not a JAX PRNG key"),
        (dict(top_k=-2, do_sample=True, rng=jax.random.key(0)), "top_k=-2"),
        (dict(early_stopping="always"), "early_stopping='always'"),
        (dict(do_sample=True, num_beams=2, rng=jax.random.key(0)), "beam sampling"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(max_new_tokens=MAX_LEN), f"max_length={MAX_LEN}"),  # 1 + 16 positions
        (dict(max_new_tokens=8, prompt=list(range(3, 11))), "17 positions"),  # prompt longer than allowed
        (dict(prompt=[[3, 4]] * 5), r"prompt has shape \(5, 2\)"),
        (dict(prompt=[3, VOCAB]), "token ids"),
    ],
)
def test_bad_options_raise_value_error(kw, match):
    model, params, images = _model(40)
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=match):
        generate(model, params, images, **kw)


def test_bad_images_and_texts_raise_value_error():
    model, params, images = _model(41)
    with pytest.raises(ValueError, match="dtype int32"):
        generate(model, params, (images * 255).astype(np.int32), max_new_tokens=3)
    with pytest.raises(ValueError, match=r"shape \(8, 8, 3\)"):
        generate(model, params, images[0], max_new_tokens=3)
    # the size and channels are the image tower's to check (its learned positions, its patch embedding)
    with pytest.raises(ValueError, match=r"pos_embedding has shape \(1, 5, 16\)"):
        generate(model, params, jnp.zeros((2, 12, 12, 3)), max_new_tokens=3)
    with pytest.raises(ValueError, match="1 channels"):
        generate(model, params, jnp.zeros((2, 8, 8, 1)), max_new_tokens=3)
    with pytest.raises(ValueError, match="bos_id"):
        log_likelihood(model, params, images, np.array([[5, 6, model.decoder.eos_id]]))
    with pytest.raises(ValueError, match="max_length"):
        log_likelihood(model, params, images, np.ones((1, MAX_LEN + 1), np.int32))


# ---------------------------------------------------------------------------------------------- compilation


def test_repeated_calls_do_not_retrace():
    model, params, images = _model(50)
    texts = np.array([[1, 5, 6, 7, 2, 0]] * 5)  # the shape test_log_likelihood_* use
    generate(model, params, images, max_new_tokens=NEW)
    generate(model, params, images, max_new_tokens=NEW, num_beams=2)
    log_likelihood(model, params, images, texts)
    before = dict(gen._TRACES)
    generate(model, params, images + 1.0, max_new_tokens=NEW)
    generate(model, params, images, max_new_tokens=NEW, num_beams=2, length_penalty=0.3, early_stopping="never")
    generate(model, params, images, max_new_tokens=NEW, num_beams=2, early_stopping=True)
    log_likelihood(model, params, images, texts + [0, 3, 0, 0, 0, 0], length_normalize=True)
    _, other, _ = _model(51)  # other parameters, the same config: the same programs
    generate(model, other, images, max_new_tokens=NEW)
    assert dict(gen._TRACES) == before
    generate(model, params, images, max_new_tokens=NEW - 1)  # a new static option compiles a new program
    assert gen._TRACES["sample"] == before["sample"] + 1


def test_parallel_decode_is_one_masked_non_causal_forward():
    """CapPa's parallel decoding: argmax of the decoder over all-[MASK] inputs with no causal mask, pad after the
    first end-of-text; its score sums the kept tokens' log-probabilities. A model without mask_id is refused."""
    from mmjax.generate import parallel_decode

    model = Captioner(vision=MODEL.vision, decoder=MODEL.decoder.replace(mask_id=VOCAB - 1))
    c = model.decoder
    images = jax.random.normal(jax.random.key(7), (3, 8, 8, 3))
    params = jax.jit(lambda k: model.init(k, images, jnp.ones((3, 3), jnp.int32))["params"])(jax.random.key(3))
    head = params["text_decoder"]["head"]
    params["text_decoder"]["head"] = {**head, "bias": head["bias"].at[c.eos_id].add(2.5)}  # some rows end early
    out = parallel_decode(model, params, images, length=8)
    inputs = jnp.full((3, 8), c.mask_id, jnp.int32)
    logits, _ = model.apply({"params": params}, images, inputs, parallel=jnp.ones((3,), bool))
    logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
    want = np.argmax(logp, -1)
    assert out.sequences.shape == (3, 9) and np.all(out.sequences[:, 0] == c.bos_id)
    ended = 0
    for row, tokens in enumerate(want):
        stop = list(tokens).index(c.eos_id) + 1 if c.eos_id in tokens else len(tokens)
        ended += stop < len(tokens)
        np.testing.assert_array_equal(out.sequences[row, 1 : 1 + stop], tokens[:stop])
        assert np.all(out.sequences[row, 1 + stop :] == c.pad_id)
        assert_float32_close(out.scores[row], logp[row, np.arange(stop), tokens[:stop]].sum(), terms=8 * VOCAB)
    assert ended >= 1
    # a causal decoder reading the same inputs predicts otherwise: the parallel mask matters
    causal, _ = model.apply({"params": params}, images, inputs)
    assert np.abs(np.asarray(causal) - np.asarray(logits)).max() > 1e-3
    with pytest.raises(ValueError, match="mask_id is None"):
        parallel_decode(MODEL, _model(0)[1], images)
    with pytest.raises(ValueError, match="length=16 must be an int in"):
        parallel_decode(model, params, images, length=16)


def test_argmax_is_jnp_argmax_with_ties_and_nan():
    """The greedy token (two plain reductions) is ``jnp.argmax``'s: the first of tied maxima, the first NaN."""
    x = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32)
    x[1, [3, 17, 40]] = 9.0  # tie: the first wins
    x[2, [5, 30]] = np.nan  # NaN: the first NaN, as argmax
    x[3, :] = -np.inf
    x[4, 49] = np.inf
    x[5, :] = 0.0
    got = np.asarray(gen._argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    assert got.tolist()[1:] == [3, 5, 0, 49, 0]
