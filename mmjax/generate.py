"""Text generation from an image-conditioned decoder: greedy, sampling and beam search as one jitted loop over a KV
cache, and the log-likelihood of given texts (CapPa's zero-shot "scoring classifier").

The model is an encoder-decoder such as :class:`mmjax.captioner.Captioner`: ``encode`` maps images to tokens in
the decoder's width, ``init_cache`` preallocates a :class:`mmjax.decoder.DecoderCache`, and ``decode`` runs the
causal decoder over new tokens at the cache's positions (see the Captioner for the contract). The special ids
(``bos_id`` the decoder start token, ``eos_id`` end of text, ``pad_id``) and the number of learned positions
(``max_length``) come from ``model.decoder`` (a :class:`mmjax.decoder.DecoderConfig`).

Algorithm of :func:`generate` (one ``jax.jit`` program per model and static options; shapes are static)::

    encoded = encode(images)                                   # once, [B, S, W]
    ids     = [bos_id] + prompt                                # P tokens (bos prepended unless a row has it)
    cache   = init_cache(B, L = P + max_new_tokens, S)
    logits  = decode(ids, encoded, cache)[:, -1]               # ONE prefill call over the whole prompt
    select the first new token from logits
    while not every sequence is finished:                      # lax.while_loop, one token per iteration
        logits = decode(last token, cache)                     # cross-attention keys/values come from the cache
        select the next token

The cache is heads-major (:class:`mmjax.attention.KVCache`), so a step reads it without a transpose; for beam search
the ``K`` beams of an image share the image's cross-attention keys/values (one copy per image, not per beam: the
beams' queries attend them together), and only the self-attention caches are reordered at each step.

Greedy and sampling (transformers' ``_sample``): the next token is ``argmax(logits)``, or a draw from
``softmax(warp(logits))`` where ``warp`` applies, in transformers' order, ``logits / temperature``, then top-k
(tokens below the k-th largest score get ``-inf``; ties are kept), then top-p (sort ascending, drop the tokens whose
cumulative probability is ``<= 1 - top_p``, always keeping the most probable one). A row that has produced
``eos_id`` is finished: it gets ``pad_id`` from then on. The loop ends when every row is finished or
``max_new_tokens`` were generated. ``scores`` is the sum over the generated tokens (up to and including
``eos_id``) of ``log_softmax(logits)`` of the model, before any warping.

Beam search (transformers' ``_beam_search``, ``num_return_sequences=1``, one end-of-text id): per image ``K =
num_beams`` running beams (initially one real beam, the others at ``-1e9``) and ``K`` slots of finished hypotheses
(initially empty at ``-1e9``). At each step, with ``cur_len`` the sequence length before the step and ``P`` the
decoder prompt length (start token included)::

    acc        = log_softmax(logits) + running_score                       # [B, K, V] -> [B, K * V]
    top 2K of acc -> candidates (parent beam, token), sorted by acc
    hits       = token == eos  or  cur_len + 1 == P + max_new_tokens       # the stopping criteria
    running    = the K best candidates of acc - 1e9 * hits                 # -> cache reordered by their parents
    new finished score = acc / (cur_len + 1 - P) ** length_penalty, minus 1e9 unless the candidate hits a stop
        and is among the first K; minus 1e9 when early_stopping is True and all K slots are filled; minus 1e9
        when the row is done (below)
    finished   = the K best of (finished slots, new finished scores)
    done(row) |= not any_k(best_running / h ** length_penalty > worst_finished(k))
        with h = cur_len + 1 - P, or max_new_tokens for early_stopping="never" with length_penalty > 0, and
        worst_finished(k) = min of the row's finished scores where slot k is filled, else -1e9
    stop when  all rows done  or  (early_stopping is True and all slots of all rows are filled)  or  every
        candidate hit a stop (max_new_tokens reached)

The result is the best finished hypothesis of each image; ``scores`` is its length-penalised score
(transformers' ``sequences_scores``). The ``-1e9`` additions are done in float32 exactly as transformers does
them, so the same hypotheses win.

``sequences`` is laid out as transformers' ``generate(...).sequences`` for an encoder-decoder model: the decoder
prompt (start token first), the generated tokens, ``pad_id`` after end-of-text, trimmed on the host to the longest
row (the loop reports how many steps it ran; for beams, the longest best hypothesis).

Where mmjax departs from transformers, on purpose: a sampled token comes from ``jax.random`` (``fold_in(rng,
step)``), not from torch's generator; the beam fill value is always ``pad_id`` (transformers' ``pad_token_id or
eos_token_id`` falls back to the end-of-text id when ``pad_id`` is 0); ``top_k=None`` means no top-k filter
(transformers' ``GenerationConfig`` defaults to 50); beam sampling (``do_sample=True`` with ``num_beams > 1``) is not
offered.

:func:`log_likelihood` scores texts given images with one teacher-forced decoder pass per (image, text) pair:
``sum_t log p(text[t] | image, text[:t])`` over the tokens after the start token up to and including the first
``eos_id`` (the tokens after it, and ``pad_id`` tokens, are not counted). The argmax over class texts is CapPa's zero-shot scoring classifier
(Tschannen et al. 2023, "Image Captioners Are Scalable Vision Learners Too").

Example (a tiny random captioner; the function examples below use the same one, from ``_tiny_model()``):
    >>> import jax, jax.numpy as jnp
    >>> from mmjax.captioner import Captioner
    >>> from mmjax.decoder import DecoderConfig
    >>> from mmjax.vit import ViT
    >>> small = dict(width=16, num_heads=2, mlp_dim=32, attention_implementation="reference")
    >>> vit = ViT(depth=1, patch_size=4, num_classes=0, pool_type="gap", **small)
    >>> cfg = DecoderConfig(vocab_size=24, depth=2, max_length=16, tie_embeddings=False, head_bias=True, **small)
    >>> model = Captioner(vision=vit, decoder=cfg)
    >>> images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    >>> params = jax.jit(model.init)(jax.random.key(0), images, jnp.ones((2, 2), jnp.int32))["params"]
    >>> out = generate(model, params, images, max_new_tokens=6)
    >>> out.sequences.shape[0], bool((out.sequences[:, 0] == cfg.bos_id).all()), out.scores.shape
    (2, True, (2,))
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import UserError

__all__ = ["GenerateOutput", "generate", "log_likelihood", "parallel_decode", "parallel_predict"]

Array = jax.Array

_NEG = -1.0e9  # transformers' "very large negative value" for beam bookkeeping (added, not -inf)

# Times each jitted program was traced (a Python side effect inside the traced functions): repeated calls with
# the same shapes and static options must not retrace (tests check this).
_TRACES: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """What :func:`generate` returns (host NumPy arrays).

    Attributes:
      sequences: ``[batch, length]`` int32 token ids: the decoder start token, the prompt, the generated tokens and
        ``pad_id`` after end-of-text, trimmed to the longest row (transformers' ``generate(...).sequences``).
      scores: ``[batch]`` float32: greedy and sampling: the sum of the model's log-probabilities of the generated
        tokens (up to and including end-of-text); beam search: the best hypothesis' score, the sum of its
        log-probabilities divided by ``generated_length ** length_penalty`` (transformers' ``sequences_scores``).

    Example:
      >>> out = GenerateOutput(sequences=np.array([[0, 5, 1]], np.int32), scores=np.array([-1.5], np.float32))
      >>> out.sequences.shape, float(out.scores[0])
      ((1, 3), -1.5)
    """

    sequences: np.ndarray
    scores: np.ndarray


# --------------------------------------------------------------------------------------------------------------
# Checks of the inputs (on the host, before anything is traced).


def _config(model):
    cfg = getattr(model, "decoder", None)
    if cfg is None or not all(hasattr(cfg, k) for k in ("bos_id", "eos_id", "pad_id", "vocab_size", "max_length")):
        raise UserError(
            f"model {type(model).__name__} has no decoder config (model.decoder with bos_id, eos_id, pad_id, "
            "vocab_size, max_length); expected an encoder-decoder such as mmjax.captioner.Captioner."
        )
    return cfg


def _check_images(model, images) -> None:
    shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", None)
    if shape is None or dtype is None:
        raise UserError(f"images must be an array [batch, height, width, channels], got {type(images).__name__}.")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise UserError(
            f"images have dtype {dtype} (shape {tuple(shape)}); expected floating images (float32 or bfloat16), "
            "normalised: convert with images.astype(np.float32) / 255 and normalise (see mmjax.preprocess)."
        )
    if len(shape) != 4 or shape[0] < 1:
        raise UserError(
            f"images have shape {tuple(shape)}; expected [batch, height, width, channels] with batch >= 1 "
            "(add a batch axis for one image)."
        )
    # The size is the image tower's to check (a learned position embedding fixes it; ViT raises a ValueError
    # naming the expected size when the program is traced).


def _prepare_prompt(prompt, batch: int, cfg) -> np.ndarray:
    """The decoder prompt ``[batch, P]`` int32, start token first (prepended when no row starts with it)."""
    start = np.full((batch, 1), cfg.bos_id, np.int32)
    if prompt is None:
        return start
    p = np.asarray(prompt)
    if p.size and not np.issubdtype(p.dtype, np.integer):
        raise UserError(f"prompt has dtype {p.dtype}; expected integer token ids [batch, length] or [length].")
    p = p.astype(np.int32)
    if p.ndim == 1:
        p = np.broadcast_to(p[None], (batch, p.shape[0]))
    if p.ndim != 2 or p.shape[0] != batch:
        raise UserError(
            f"prompt has shape {p.shape}; expected [{batch}, length] (one row per image) or [length] (the same "
            "prompt for every image)."
        )
    if p.size and (p.min() < 0 or p.max() >= cfg.vocab_size):
        raise UserError(
            f"prompt has token ids in [{p.min()}, {p.max()}]; expected ids in [0, {cfg.vocab_size}) "
            "(the decoder's vocab_size)."
        )
    # As transformers does for decoder_input_ids: prepend the start token unless a row already starts with it.
    if p.shape[1] == 0 or np.all(p[:, 0] != cfg.bos_id):
        p = np.concatenate([start, p], axis=1)
    return np.ascontiguousarray(p)


def _check_options(*, max_new_tokens, num_beams, do_sample, temperature, top_k, top_p, early_stopping, rng):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens!r} is not valid; expected an int >= 1.")
    if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise UserError(
            f"num_beams={num_beams!r} is not valid; expected an int >= 1 (1: greedy or sampling, > 1: beam search)."
        )
    if top_p is not None and not (0.0 < float(top_p) <= 1.0):
        raise UserError(f"top_p={top_p!r} is not valid; expected a float in (0, 1] (1 or None: no nucleus filter).")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0):
        raise UserError(f"top_k={top_k!r} is not valid; expected an int >= 1 (None or 0: no top-k filter).")
    if early_stopping not in (True, False, "never"):
        raise UserError(f"early_stopping={early_stopping!r} is not valid; expected True, False or 'never'.")
    if do_sample:
        if num_beams > 1:
            raise UserError(
                f"do_sample=True with num_beams={num_beams} (beam sampling) is not supported; use num_beams=1 to "
                "sample, or do_sample=False for beam search."
            )
        if not float(temperature) > 0.0:
            raise UserError(
                f"temperature={temperature!r} is not valid with do_sample=True; expected a float > 0 (small values "
                "approach greedy decoding: use do_sample=False for greedy)."
            )
        if rng is None:
            raise UserError("do_sample=True needs rng, a JAX PRNG key: pass rng=jax.random.key(seed).")
        is_key = jnp.issubdtype(getattr(rng, "dtype", None) or np.int32, jax.dtypes.prng_key)
        if not is_key and not (np.shape(rng) == (2,) and getattr(rng, "dtype", None) == np.uint32):
            raise UserError(
                f"rng={rng!r} is not a JAX PRNG key; pass rng=jax.random.key(seed) (or jax.random.PRNGKey(seed))."
            )


# --------------------------------------------------------------------------------------------------------------
# Token selection.


def _argmax(logits: Array) -> Array:
    """``jnp.argmax(logits, axis=-1)`` (the first index of the largest value; of the first NaN when there is one) as
    two plain reductions: XLA:CPU runs ``argmax``'s (value, index) reduction about 5x slower (0.5 ms a step on
    ``[32, 8000]`` logits, a tenth of a greedy decoding step of ``experiments/bench_generate.py``)."""
    vocab = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)  # NaN when any entry is NaN
    hit = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)


def _warp(scores: Array, temperature, top_k, top_p, min_keep: int = 1) -> Array:
    """transformers' sampling processors in their order: temperature, top-k, top-p (``-inf`` for removed ids).

    ``top_k`` (int, ``vocab`` for none) and ``top_p`` (float, 1 for none) may be traced: one ascending sort serves
    both filters (the ids top-k removes are the first ones of that order, so it stays sorted after top-k).
    """
    scores = scores / temperature
    vocab = scores.shape[-1]
    k = jnp.clip(jnp.maximum(top_k, min_keep), 1, vocab)
    order = jnp.argsort(scores, axis=-1)  # ascending
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    kth = jax.lax.dynamic_index_in_dim(sorted_scores, vocab - k, axis=-1, keepdims=True)
    sorted_scores = jnp.where(sorted_scores < kth, -jnp.inf, sorted_scores)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1.0 - top_p) & (top_p < 1.0)  # top_p = 1: no nucleus filter (transformers)
    remove_sorted = remove_sorted | jnp.isneginf(sorted_scores)
    remove_sorted = remove_sorted & (jnp.arange(vocab) < vocab - min_keep)
    rows = jnp.arange(scores.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, scores)


# --------------------------------------------------------------------------------------------------------------
# The jitted programs.


def _decode(model, params, tokens, encoded, cache):
    return model.apply({"params": params}, tokens, encoded=encoded, cache=cache, method="decode")


def _prefill(model, params, images, prompt_ids, max_len):
    encoded = model.apply({"params": params}, images, method="encode")
    cache = model.init_cache(prompt_ids.shape[0], max_len, encoded.shape[1])
    logits, cache = _decode(model, params, prompt_ids, encoded, cache)
    return logits[:, -1].astype(jnp.float32), cache


@functools.lru_cache(maxsize=64)
def _sample_program(model, max_new_tokens: int, do_sample: bool):
    """Greedy / sampling: ``(params, images, prompt_ids, rng, temperature, top_k, top_p) -> (seqs, scores,
    length)``."""
    cfg = model.decoder
    eos, pad = cfg.eos_id, cfg.pad_id

    def run(params, images, prompt_ids, rng, temperature, top_k, top_p):
        _TRACES["sample"] += 1
        batch, plen = prompt_ids.shape
        total = plen + max_new_tokens
        logits, cache = _prefill(model, params, images, prompt_ids, total)
        seqs = jnp.full((batch, total), pad, jnp.int32).at[:, :plen].set(prompt_ids)

        def select(state):
            step, seqs, done, scores, logits, cache = state
            logp = jax.nn.log_softmax(logits, axis=-1)
            if do_sample:
                warped = _warp(logits, temperature, top_k, top_p)
                token = jax.random.categorical(jax.random.fold_in(rng, step), warped, axis=-1)
            else:
                token = _argmax(logits)
            token = jnp.where(done, pad, token.astype(jnp.int32))
            gained = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
            scores = scores + jnp.where(done, 0.0, gained)
            seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[:, None], plen + step, axis=1)
            return step + 1, seqs, done | (token == eos), scores, logits, cache

        def cond(state):
            step, _, done, *_ = state
            return (step < max_new_tokens) & ~jnp.all(done)

        def body(state):
            step, seqs, done, scores, _, cache = state
            last = jax.lax.dynamic_slice_in_dim(seqs, plen + step - 1, 1, axis=1)
            logits, cache = _decode(model, params, last, None, cache)
            return select((step, seqs, done, scores, logits[:, -1].astype(jnp.float32), cache))

        state = (jnp.int32(0), seqs, jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.float32), logits, cache)
        step, seqs, _, scores, _, _ = jax.lax.while_loop(cond, body, select(state))
        return seqs, scores, plen + step

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def _beam_program(model, max_new_tokens: int, num_beams: int):
    """Beam search: ``(params, images, prompt_ids, score_pow, heuristic_pow, stop_when_full) -> (seqs, scores,
    length)``; ``score_pow[g] = g ** length_penalty`` and ``heuristic_pow[g]`` the early-stop heuristic's
    denominator after ``g`` generated tokens, both float32 tables computed on the host as transformers does."""
    from mmjax.decoder import reorder_cache

    cfg = model.decoder
    eos, pad = cfg.eos_id, cfg.pad_id
    nb = num_beams
    keep = 2 * nb  # transformers' beams_to_keep = max(2, 1 + number of eos ids) * num_beams

    def gather(x, idx):  # x [B, N, ...], idx [B, M] -> [B, M, ...]
        idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=1)

    def run(params, images, prompt_ids, score_pow, heuristic_pow, stop_when_full):
        _TRACES["beam"] += 1
        batch, plen = prompt_ids.shape
        total = plen + max_new_tokens
        logits, cache = _prefill(model, params, images, prompt_ids, total)
        # as transformers expands the inputs, but the K beams of an image share its cross-attention keys/values
        cache = reorder_cache(cache, jnp.repeat(jnp.arange(batch), nb), cross=False)
        logits = jnp.repeat(logits, nb, axis=0)  # [B * K, V]
        vocab = logits.shape[-1]

        seqs = jnp.full((batch, nb, total), pad, jnp.int32).at[:, :, :plen].set(prompt_ids[:, None, :])
        running_scores = jnp.full((batch, nb), _NEG, jnp.float32).at[:, 0].set(0.0)
        state = dict(
            step=jnp.int32(0),
            running=seqs,
            running_scores=running_scores,
            parents=jnp.zeros((batch, nb), jnp.int32),
            finished=seqs,
            finished_scores=jnp.full((batch, nb), _NEG, jnp.float32),
            finished_lengths=jnp.zeros((batch, nb), jnp.int32),
            is_finished=jnp.zeros((batch, nb), bool),
            improvable=jnp.ones((batch,), bool),  # transformers' is_early_stop_heuristic_unsatisfied
            go=jnp.bool_(True),
            logits=logits,
            cache=cache,
        )

        def select(s):
            step = s["step"]
            cur = plen + step  # sequence length before this step
            logp = jax.nn.log_softmax(s["logits"], axis=-1).reshape(batch, nb, vocab)
            acc = (logp + s["running_scores"][:, :, None]).reshape(batch, nb * vocab)
            top_scores, top_idx = jax.lax.top_k(acc, keep)
            parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
            cand = gather(s["running"], parent)
            cand = jnp.where(jnp.arange(total) == cur, token[:, :, None], cand)  # [B, 2K, total]
            hits = (token == eos) | (cur + 1 >= total)

            # the K best candidates that did not stop keep running
            run_scores, run_idx = jax.lax.top_k(top_scores + hits.astype(jnp.float32) * _NEG, nb)
            running = gather(cand, run_idx)
            parents = gather(parent, run_idx)

            # stopped candidates among the first K enter the finished slots when they beat the worst one
            just_finished = hits & (jnp.arange(keep) < nb)[None, :]
            new = top_scores / score_pow[step + 1]
            full = jnp.all(s["is_finished"], axis=-1, keepdims=True) & stop_when_full
            new = new + full.astype(jnp.float32) * _NEG
            new = new + (~s["improvable"])[:, None].astype(jnp.float32) * _NEG
            new = new + (~just_finished).astype(jnp.float32) * _NEG
            merged_scores = jnp.concatenate([s["finished_scores"], new], axis=1)
            fin_scores, fin_idx = jax.lax.top_k(merged_scores, nb)
            finished = gather(jnp.concatenate([s["finished"], cand], axis=1), fin_idx)
            new_lengths = jnp.broadcast_to(step + 1, (batch, keep)).astype(jnp.int32)
            fin_lengths = gather(jnp.concatenate([s["finished_lengths"], new_lengths], axis=1), fin_idx)
            is_finished = gather(jnp.concatenate([s["is_finished"], just_finished], axis=1), fin_idx)

            # can a running beam still beat the worst finished hypothesis? (transformers' early-stop heuristic)
            best_running = run_scores[:, :1] / heuristic_pow[step + 1]
            worst = jnp.where(is_finished, jnp.min(fin_scores, axis=1, keepdims=True), _NEG)
            improvable = s["improvable"] & jnp.any(best_running > worst, axis=-1)
            go = jnp.any(improvable) & ~(jnp.all(is_finished) & stop_when_full) & ~jnp.all(hits)
            return dict(
                step=step + 1,
                running=running,
                running_scores=run_scores,
                parents=parents,
                finished=finished,
                finished_scores=fin_scores,
                finished_lengths=fin_lengths,
                is_finished=is_finished,
                improvable=improvable,
                go=go,
                logits=s["logits"],
                cache=s["cache"],
            )

        def body(s):
            rows = (s["parents"] + jnp.arange(batch)[:, None] * nb).reshape(-1)
            cache = reorder_cache(s["cache"], rows, cross=False)  # rows stay within their image
            last = jax.lax.dynamic_slice_in_dim(s["running"], plen + s["step"] - 1, 1, axis=2)
            logits, cache = _decode(model, params, last.reshape(batch * nb, 1), None, cache)
            return select({**s, "logits": logits[:, -1].astype(jnp.float32), "cache": cache})

        s = jax.lax.while_loop(lambda s: s["go"], body, select(state))
        length = plen + jnp.max(s["finished_lengths"][:, 0])
        return s["finished"][:, 0], s["finished_scores"][:, 0], length

    return jax.jit(run)


def _length_pow_tables(max_new_tokens: int, length_penalty: float, early_stopping) -> tuple[np.ndarray, np.ndarray]:
    """``g ** length_penalty`` for ``g = 0 .. max_new_tokens`` (Python floats, then float32, as transformers
    divides a float32 tensor by a Python float), and the early-stop heuristic's denominators."""
    lp = float(length_penalty)
    score_pow = np.array([1.0] + [g**lp for g in range(1, max_new_tokens + 1)], np.float32)
    if early_stopping == "never" and lp > 0.0:
        heuristic_pow = np.full(max_new_tokens + 1, max_new_tokens**lp, np.float32)
    else:
        heuristic_pow = score_pow
    return score_pow, heuristic_pow


def generate(
    model,
    params,
    images,
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    rng: Any = None,
    prompt: Any = None,
) -> GenerateOutput:
    """Generates text for each image: greedy, sampling or beam search, as one jitted loop over the decoder's cache.

    The semantics are transformers' ``generate`` for an encoder-decoder model (see the module docstring for the
    algorithm and the few departures). The program is compiled once per model, shapes (batch, prompt length) and
    ``(max_new_tokens, num_beams, do_sample)``; ``temperature``, ``top_k``, ``top_p``, ``length_penalty`` and
    ``early_stopping`` are runtime values (changing them does not recompile).

    Args:
      model: an encoder-decoder such as :class:`mmjax.captioner.Captioner` (``encode``, ``init_cache``,
        ``decode`` and ``model.decoder`` with the special ids and ``max_length``).
      params: its parameters (the ``"params"`` collection).
      images: ``[batch, height, width, channels]`` floating, normalised as for training.
      max_new_tokens: the most tokens to generate after the prompt (the start token and the prompt included, the
        sequence must fit ``model.decoder.max_length`` positions).
      num_beams: 1 for greedy / sampling, ``> 1`` for beam search (the best beam per image is returned).
      do_sample: sample the next token instead of taking the argmax (``num_beams=1`` only).
      temperature: divides the logits before sampling (``> 0``; sampling only).
      top_k: keep the ``top_k`` most likely tokens when sampling (``None`` or 0: all).
      top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability exceeds ``top_p``
        (in ``(0, 1]``; ``None`` or 1: all).
      length_penalty: beam search: a finished hypothesis scores ``sum log p / generated_length **
        length_penalty``.
      early_stopping: beam search: ``True`` stops an image as soon as it has ``num_beams`` finished hypotheses;
        ``False`` stops it when the best running beam, at the current length, cannot beat the worst finished one;
        ``"never"`` as ``False`` but with the longest possible length when ``length_penalty > 0``.
      rng: a JAX PRNG key, needed when ``do_sample=True`` (step ``i`` draws with ``fold_in(rng, i)``).
      prompt: token ids ``[batch, P]`` (or ``[P]``, the same for every image) that every sequence continues; the
        start token is prepended unless a row starts with it.

    Returns:
      A :class:`GenerateOutput` with ``sequences`` ``[batch, length]`` int32 (start token first, ``pad_id`` after
      end-of-text, trimmed to the longest row) and ``scores`` ``[batch]`` float32.

    Raises:
      ValueError: (:class:`mmjax.errors.UserError`) bad options, a prompt that does not fit, or images of the
        wrong rank, size or dtype.

    Example:
      >>> import jax
      >>> model, params, images = _tiny_model()
      >>> greedy = generate(model, params, images, max_new_tokens=6)
      >>> beams = generate(model, params, images, max_new_tokens=6, num_beams=3, length_penalty=0.5)
      >>> sampled = generate(model, params, images, max_new_tokens=6, do_sample=True, top_k=3, rng=jax.random.key(0))
      >>> [o.sequences.dtype.name for o in (greedy, beams, sampled)]
      ['int32', 'int32', 'int32']
      >>> bool((greedy.sequences[:, 0] == model.decoder.bos_id).all())
      True
    """
    cfg = _config(model)
    _check_options(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        early_stopping=early_stopping,
        rng=rng,
    )
    _check_images(model, images)
    batch = int(images.shape[0])
    prompt_ids = _prepare_prompt(prompt, batch, cfg)
    total = prompt_ids.shape[1] + int(max_new_tokens)
    if total > cfg.max_length:
        raise UserError(
            f"the decoder prompt ({prompt_ids.shape[1]} tokens, start token included) plus "
            f"max_new_tokens={max_new_tokens} is {total} positions, more than model.decoder.max_length="
            f"{cfg.max_length}; shorten the prompt or lower max_new_tokens to at most "
            f"{cfg.max_length - prompt_ids.shape[1]}."
        )
    max_new_tokens = int(max_new_tokens)
    if num_beams == 1:
        program = _sample_program(model, max_new_tokens, bool(do_sample))
        seqs, scores, length = program(
            params,
            images,
            prompt_ids,
            rng if rng is not None else jax.random.key(0),
            jnp.float32(temperature if do_sample else 1.0),
            jnp.int32(top_k if top_k else cfg.vocab_size),
            jnp.float32(top_p if top_p is not None else 1.0),
        )
    else:
        score_pow, heuristic_pow = _length_pow_tables(max_new_tokens, length_penalty, early_stopping)
        program = _beam_program(model, max_new_tokens, int(num_beams))
        seqs, scores, length = program(
            params, images, prompt_ids, score_pow, heuristic_pow, jnp.bool_(early_stopping is True)
        )
    length = int(length)
    return GenerateOutput(sequences=np.asarray(seqs)[:, :length], scores=np.asarray(scores))


# --------------------------------------------------------------------------------------------------------------
# Scoring given texts.


@functools.lru_cache(maxsize=16)
def _encode_program(model):
    def run(params, images):
        _TRACES["encode"] += 1
        return model.apply({"params": params}, images, method="encode")

    return jax.jit(run)


@functools.lru_cache(maxsize=16)
def _score_program(model):
    cfg = model.decoder
    eos, pad = cfg.eos_id, cfg.pad_id

    def run(params, encoded, texts, length_normalize):  # encoded [N, S, W], texts [M, L] -> [N, M]
        _TRACES["score"] += 1
        n, m = encoded.shape[0], texts.shape[0]
        enc = jnp.repeat(encoded, m, axis=0)
        ids = jnp.tile(texts, (n, 1))
        logits, _ = _decode(model, params, ids[:, :-1], enc, None)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        target = ids[:, 1:]
        token_logp = jnp.take_along_axis(logp, target[:, :, None], axis=-1)[:, :, 0]
        is_eos = target == eos
        counted = (jnp.cumsum(is_eos, axis=1) - is_eos == 0) & (is_eos | (target != pad))
        total = jnp.sum(jnp.where(counted, token_logp, 0.0), axis=1)
        total = jnp.where(length_normalize, total / jnp.maximum(jnp.sum(counted, axis=1), 1), total)
        return total.reshape(n, m)

    return jax.jit(run)


def _pad_rows(x: np.ndarray | Array, rows: int):
    if x.shape[0] == rows:
        return x
    pad = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad) if isinstance(x, jax.Array) else np.pad(x, pad)


def log_likelihood(
    model, params, images, texts, *, length_normalize: bool = False, batch_size: int = 256
) -> np.ndarray:
    """The log-likelihood of each text given each image, by teacher forcing (CapPa's scoring classifier).

    ``ll[i, j] = sum_t log p(texts[j, t] | images[i], texts[j, :t])`` over ``t >= 1`` up to and including the
    first ``eos_id``; tokens after it, and ``pad_id`` tokens, are not counted. The images are encoded once; the
    decoder runs on chunks of at most ``batch_size`` (image, text) pairs (fixed shapes, so one compilation).
    ``np.argmax(ll, axis=1)`` over class-name texts is a zero-shot classifier.

    Args:
      model: an encoder-decoder such as :class:`mmjax.captioner.Captioner`.
      params: its parameters.
      images: ``[num_images, height, width, channels]`` floating.
      texts: ``[num_texts, length]`` integer token ids, each ``bos_id`` first, ``eos_id`` last, then ``pad_id``
        (``length <= model.decoder.max_length``).
      length_normalize: divide each sum by the number of counted tokens (the mean log-probability per token).
      batch_size: the most (image, text) pairs per decoder call (bounds the memory of the logits).

    Returns:
      ``[num_images, num_texts]`` float32 log-likelihoods.

    Example:
      >>> import numpy as np
      >>> model, params, images = _tiny_model()
      >>> c = model.decoder
      >>> texts = np.array([[c.bos_id, 5, 6, c.eos_id], [c.bos_id, 7, c.eos_id, c.pad_id]])
      >>> ll = log_likelihood(model, params, images, texts)
      >>> ll.shape, bool((ll < 0).all())
      ((2, 2), True)
    """
    cfg = _config(model)
    _check_images(model, images)
    texts = np.asarray(texts)
    if texts.ndim != 2 or texts.shape[1] < 2 or not np.issubdtype(texts.dtype, np.integer):
        raise UserError(
            f"texts have shape {texts.shape} and dtype {texts.dtype}; expected integer token ids [num_texts, "
            "length] with length >= 2 (bos_id first)."
        )
    if texts.shape[1] > cfg.max_length:
        raise UserError(
            f"texts have length {texts.shape[1]}, more than model.decoder.max_length={cfg.max_length}; truncate "
            f"them to {cfg.max_length} tokens."
        )
    if texts.min() < 0 or texts.max() >= cfg.vocab_size:
        raise UserError(
            f"texts have token ids in [{texts.min()}, {texts.max()}]; expected ids in [0, {cfg.vocab_size})."
        )
    if np.any(texts[:, 0] != cfg.bos_id):
        bad = np.flatnonzero(texts[:, 0] != cfg.bos_id)[:5].tolist()
        raise UserError(
            f"texts {bad} do not start with the decoder start token bos_id={cfg.bos_id}; prepend it to every text."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UserError(f"batch_size={batch_size!r} is not valid; expected an int >= 1 (pairs per decoder call).")
    texts = texts.astype(np.int32)
    num_images, num_texts = int(images.shape[0]), texts.shape[0]
    text_chunk = min(num_texts, int(batch_size))
    image_chunk = max(1, min(num_images, int(batch_size) // text_chunk))
    encode = _encode_program(model)
    score = _score_program(model)
    blocks = []
    for i in range(0, num_images, image_chunk):
        block = images[i : i + image_chunk]
        encoded = encode(params, _pad_rows(block, image_chunk))
        row = []
        for j in range(0, num_texts, text_chunk):
            chunk = texts[j : j + text_chunk]
            got = score(params, encoded, _pad_rows(chunk, text_chunk), jnp.bool_(length_normalize))
            row.append(np.asarray(got)[: block.shape[0], : chunk.shape[0]])
        blocks.append(np.concatenate(row, axis=1))
    return np.concatenate(blocks, axis=0)


@functools.lru_cache(maxsize=1)
def _tiny_model():
    """A tiny random Captioner, its parameters and two 8x8 images, for the examples (not public)."""
    from mmjax.captioner import Captioner
    from mmjax.decoder import DecoderConfig
    from mmjax.vit import ViT

    # the configuration of tests/test_generate.py (equal modules share the compiled programs)
    small = dict(width=16, num_heads=2, mlp_dim=32, attention_implementation="reference")  # fast to compile
    vit = ViT(depth=1, patch_size=4, num_classes=0, pool_type="gap", **small)
    cfg = DecoderConfig(vocab_size=24, depth=2, max_length=16, tie_embeddings=False, head_bias=True, **small)
    model = Captioner(vision=vit, decoder=cfg)
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    params = jax.jit(model.init)(jax.random.key(0), images, jnp.ones((2, 2), jnp.int32))["params"]
    return model, params, images


def parallel_predict(model, params, images, length: int):
    """The traceable core of :func:`parallel_decode` (call it inside ``jit``, e.g. in an evaluation step): the
    ``[B, length]`` ids, ``pad_id`` after the first end-of-text, and the ``[B]`` summed log-probabilities of the kept
    ids. No checks (see :func:`parallel_decode`).

    Example:
      >>> import jax.numpy as jnp
      >>> from mmjax.captioner import Captioner
      >>> from mmjax.decoder import DecoderConfig
      >>> from mmjax.vit import ViT
      >>> vit = ViT(width=8, depth=1, num_heads=2, mlp_dim=16, patch_size=4, num_classes=0, pool_type="gap")
      >>> cfg = DecoderConfig(vocab_size=9, width=8, depth=1, num_heads=2, mlp_dim=16, max_length=6, mask_id=8)
      >>> model = Captioner(vision=vit, decoder=cfg)
      >>> images = jnp.zeros((2, 8, 8, 3))
      >>> params = model.init(jax.random.key(0), images, jnp.ones((2, 5), jnp.int32))["params"]
      >>> tokens, scores = jax.jit(lambda p, x: parallel_predict(model, p, x, 4))(params, images)
      >>> tokens.shape, scores.shape
      ((2, 4), (2,))
    """
    cfg = model.decoder
    encoded = model.apply({"params": params}, images, method="encode")
    B = images.shape[0]
    inputs = jnp.full((B, length), cfg.mask_id, jnp.int32)
    logits, _ = model.apply({"params": params}, inputs, encoded, jnp.ones((B,), bool), method=_parallel_logits)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tokens = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    ended = jnp.cumsum(tokens == cfg.eos_id, axis=1) - (tokens == cfg.eos_id) > 0  # after the first eos
    tokens = jnp.where(ended, cfg.pad_id, tokens)
    picked = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
    return tokens, jnp.sum(jnp.where(ended, 0.0, picked), axis=1)


@functools.lru_cache(maxsize=32)
def _parallel_program(model, length: int):
    def run(params, images):
        tokens, score = parallel_predict(model, params, images, length)
        start = jnp.full((images.shape[0], 1), model.decoder.bos_id, jnp.int32)
        return jnp.concatenate([start, tokens], axis=1), score

    return jax.jit(run)


def _parallel_logits(module, tokens, encoded, parallel):
    return module.text_decoder(tokens, encoded, parallel=parallel)


def parallel_decode(model, params, images, *, length: int | None = None) -> GenerateOutput:
    """CapPa's parallel decoding: every caption position predicted at once from the image alone.

    The decoder reads ``[MASK]`` (``model.decoder.mask_id``) at all ``length`` positions with no causal mask (the
    inputs the task's ``masked_pred_prob`` rows are trained on) and each position takes its argmax; tokens after
    the first end-of-text become ``pad_id``. One forward pass, no cache; the prediction of a word does not depend on
    the words before it, so no language prior over the caption can override what the image shows. Needs a model
    trained with parallel prediction (Tschannen et al., "Image Captioners Are Scalable Vision Learners Too", 2023).

    Args:
      model: a :class:`mmjax.captioner.Captioner` whose decoder has a ``mask_id``.
      params: its parameters.
      images: ``[batch, height, width, channels]`` floating, normalised as for training.
      length: caption positions to predict (default ``model.decoder.max_length - 1``).

    Returns:
      :class:`GenerateOutput`: ``sequences [batch, 1 + length]`` (start token first, pad after end-of-text, not
      trimmed) and ``scores`` (the summed log-probabilities of the kept tokens).

    Raises:
      UserError: a decoder without ``mask_id``, a ``length`` outside ``[1, max_length - 1]``, bad images.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mmjax.captioner import Captioner
      >>> from mmjax.decoder import DecoderConfig
      >>> from mmjax.vit import ViT
      >>> vit = ViT(width=8, depth=1, num_heads=2, mlp_dim=16, patch_size=4, num_classes=0, pool_type="gap")
      >>> cfg = DecoderConfig(vocab_size=9, width=8, depth=1, num_heads=2, mlp_dim=16, max_length=6, mask_id=8)
      >>> model = Captioner(vision=vit, decoder=cfg)
      >>> images = jnp.zeros((2, 8, 8, 3))
      >>> params = model.init(jax.random.key(0), images, jnp.ones((2, 5), jnp.int32))["params"]
      >>> parallel_decode(model, params, images).sequences.shape
      (2, 6)
    """
    cfg = _config(model)
    _check_images(model, images)
    if cfg.mask_id is None:
        raise UserError(
            "parallel_decode needs a decoder trained with parallel prediction: model.decoder.mask_id is None (train "
            "with config.captioning.masked_pred_prob > 0), or use generate()."
        )
    length = cfg.max_length - 1 if length is None else length
    if not isinstance(length, int) or not 1 <= length <= cfg.max_length - 1:
        raise UserError(f"length={length!r} must be an int in [1, {cfg.max_length - 1}] (max_length - 1).")
    sequences, scores = _parallel_program(model, length)(params, jnp.asarray(images))
    return GenerateOutput(np.asarray(sequences), np.asarray(scores))
