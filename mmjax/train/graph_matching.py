"""Image-text matching against hard negatives, and re-ranking a dual encoder's retrievals, as a task of the engine.

Data: the Fashion-MNIST captions (:mod:`mmjax.data.captions`; ``"train"``, ``"test"``, and ``"heldout"``: the
(colour, item) combinations never seen in training). Each training image comes with its caption and
``negatives_per_image`` hard negatives of distinct kinds drawn from ``negative_kinds`` (:mod:`mmjax.data.matching`:
the caption with the colour, the item, the size or the position changed, or a random caption; a training negative
never names a held-out combination). A batch is ``{"image": uint8 [B, S, S, 3], "ids": int32 [B, 1 + K, L]}``
(column 0 the true caption), ``"kind"`` ``int32 [B, K]`` (into ``negative_kinds``) and ``"index"`` ``int32 [B]`` (the
training example), a function of ``config.seed`` and the step.

Models (``config.model.name``):

* ``"graph_fusion"``: :class:`mmjax.graph_fusion.GraphFusion` (its ``patch_word="none"`` is the late-fusion
  graph); ``"cross_attention"``: :class:`mmjax.graph_fusion.CrossAttentionMatcher`. Score: the match logit; loss:
  binary cross-entropy of every (image, caption) pair (ALBEF / BLIP's image-text matching head), true caption 1,
  negatives 0.
* ``"clip"``: :class:`mmjax.clip.CLIP` (:class:`mmjax.clip.CLIPConfig` fields in ``config.model``). Score:
  ``exp(logit_scale) cos(u, v)``; loss: the symmetric contrastive loss where each image's hard negatives join the
  batch's captions as extra columns (NegCLIP, Yuksekgonul et al. 2023).

Evaluation (``eval_metrics``): test images, each with its caption and one negative of every kind;
``{kind}_accuracy`` is the fraction with ``score(true) > score(negative)`` (:func:`mmjax.evaluate.pairwise_accuracy`),
``accuracy`` their mean. The final report adds the same on the held-out combinations (``heldout_{kind}_accuracy``)
and two-stage retrieval over the test images and their distinct captions: a CLIP (this run when the model is CLIP,
else ``graph_matching.retriever``, the workdir of a ``"clip"`` run of this task) ranks, the model re-ranks CLIP's
top ``rerank_k``; Recall@1/5/10 both ways, before (``clip_*``) and after (``rerank_*``). Image->text: a hit when the
image's caption is among the first K; text->image: when an image that caption describes is. ``pairs_per_s``: (image,
caption) pairs scored per second over the test and held-out candidates (``eval_batch_size`` images x 6 captions per
call, after compilation; CLIP encodes both sides of every pair, as a matcher would); ``rerank_pairs_per_s`` the same
during the re-ranking. For a graph model with attention and patch-word edges,
``attention.png``: each word's attention over the patches of a few test images (the last block).

>>> from mmjax.train.task import resolve_task_class
>>> resolve_task_class("graph_matching").__name__
'GraphMatchingTask'
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmjax.clip import CLIP, CLIPConfig
from mmjax.data.captions import ATTRIBUTES, make_captions
from mmjax.data.matching import NEGATIVE_KINDS, heldout_table, negative_attributes
from mmjax.errors import ConfigError, UserError
from mmjax.evaluate import matching as em
from mmjax.graph_fusion import CrossAttentionMatcher, GraphFusion
from mmjax.train.contrastive import (
    COLOUR_SPACES,
    _check_choice,
    _dtype,
    _per_channel,
    _section,
    normalize_images,
    run_word_tokenizer,
    write_report,
)
from mmjax.train.task import constructor_keys, init_model_params

__all__ = ["GraphMatchingTask", "MODELS", "grammar_captions", "tokenize_strict"]

MODELS = {"graph_fusion": GraphFusion, "cross_attention": CrossAttentionMatcher, "clip": CLIP}
_SPLIT_STREAM = {"test": 1, "heldout": 2}

_OPTS_DEFAULTS = dict(
    negatives_per_image=3,
    itc_weight=1.0,
    negative_kinds=NEGATIVE_KINDS,
    retriever="",
    rerank_k=20,
    final_report=True,
    attention_examples=4,
)
_DATA_DEFAULTS = dict(
    name="fashion_mnist_captions",
    data_dir="",
    image_size=48,
    num_train=0,
    num_test=1000,
    num_heldout=1000,
    data_seed=0,
    colour_space="hsv",
    mean=0.25,
    std=0.35,
)
_MODEL_DEFAULTS = dict(name="graph_fusion", dtype="float32", context_length=12)


def grammar_captions() -> list[str]:
    """Every caption the Fashion-MNIST caption grammar can produce (800), the word vocabulary's source.

    >>> len(grammar_captions()), grammar_captions()[0]
    (800, 'a small red t-shirt in the top left')
    """
    from mmjax.data.captions import caption

    n = [len(ATTRIBUTES[k]) for k in ("item", "colour", "size", "position")]
    return [caption(i, c, s, p) for s in range(n[2]) for p in range(n[3]) for i in range(n[0]) for c in range(n[1])]


def tokenize_strict(tokenizer, texts, context_length: int) -> np.ndarray:
    """``int32 [N, context_length]`` ids (start, words, end, padding 0); raises ``ValueError`` naming a caption that
    does not fit instead of truncating it.

    >>> from mmjax.tokenizer import WordTokenizer
    >>> tok = WordTokenizer(["a", "red", "shirt"])
    >>> tokenize_strict(tok, ["a red shirt"], 5).tolist()
    [[2, 4, 5, 6, 3]]
    >>> tokenize_strict(tok, ["a red red shirt"], 5)
    Traceback (most recent call last):
    ...
    ValueError: caption 'a red red shirt' has 4 words + start and end = 6 tokens, more than context_length=5; raise context_length.
    """
    texts = list(texts)
    for t in texts:
        n = len(tokenizer.encode(t))
        if n + 2 > context_length:
            raise ValueError(
                f"caption {t!r} has {n} words + start and end = {n + 2} tokens, more than "
                f"context_length={context_length}; raise context_length."
            )
    return np.asarray(tokenizer(texts, context_length=context_length), np.int32)


def _negclip_loss(img, txt, scale, axis_name=None):
    """NegCLIP's contrastive loss: ``img [b, D]`` against every caption of the (global) batch ``txt [b, C, D]`` (the
    true caption in column 0, hard negatives after it), and each true caption against the batch's images; the mean
    of the two cross-entropies."""
    b, c = txt.shape[:2]
    all_img, all_txt, offset = img, txt, 0
    if axis_name is not None:
        all_img = jax.lax.all_gather(img, axis_name, tiled=True)
        all_txt = jax.lax.all_gather(txt, axis_name, tiled=True)
        offset = jax.lax.axis_index(axis_name) * b
    columns = all_txt.reshape(-1, all_txt.shape[-1])
    i2t = scale * img @ columns.T  # [b, B * C]
    t2i = scale * txt[:, 0] @ all_img.T  # [b, B]
    rows = offset + jnp.arange(b)
    return 0.5 * (
        optax.softmax_cross_entropy_with_integer_labels(i2t, rows * c).mean()
        + optax.softmax_cross_entropy_with_integer_labels(t2i, rows).mean()
    )


class GraphMatchingTask:
    """Image-text matching with hard negatives (graph fusion, cross-attention, CLIP); see the module docstring.

    >>> from mmjax.train.task import with_defaults
    >>> src = (np.full((20, 28, 28), 200, np.uint8), np.arange(20) % 10)
    >>> cfg = with_defaults({"task": "graph_matching", "batch_size": 4, "eval_batch_size": 4,
    ...     "data": {"num_test": 4, "num_heldout": 4}, "model": {"width": 16, "depth": 1, "heads": 2,
    ...     "mlp_dim": 16, "stem_features": [8, 8, 8]}}, GraphMatchingTask)
    >>> task = GraphMatchingTask(cfg, source=src)
    >>> batch = next(task.train_batches(0))
    >>> batch["image"].shape, batch["ids"].shape, batch["kind"].shape
    ((4, 48, 48, 3), (4, 4, 12), (4, 3))
    """

    unit = "img"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """The task's sections: ``model``, ``data``, ``graph_matching``.

        >>> c = GraphMatchingTask.default_config()
        >>> c.model.name, c.graph_matching.rerank_k, c.data.image_size
        ('graph_fusion', 20, 48)
        """
        return ml_collections.ConfigDict(
            {"model": dict(_MODEL_DEFAULTS), "data": dict(_DATA_DEFAULTS), "graph_matching": dict(_OPTS_DEFAULTS)}
        )

    @staticmethod
    def model_keys(model_config) -> tuple[str, ...]:
        """``config.model``'s valid keys for its ``name``: ``name``, ``dtype`` and the model's fields
        (:class:`~mmjax.clip.CLIPConfig`'s for ``"clip"``).

        >>> "patch_word" in GraphMatchingTask.model_keys({"name": "graph_fusion"})
        True
        >>> "vision_width" in GraphMatchingTask.model_keys({"name": "clip"})
        True
        """
        name = model_config.get("name", "graph_fusion")
        if name == "clip":
            fields = [f.name for f in dataclasses.fields(CLIPConfig)]
        elif name in MODELS:
            fields = sorted(constructor_keys(MODELS[name]) - {"vocab_size"})
        else:
            raise ConfigError(f"config.model.name={name!r} is not valid for graph_matching; valid: {sorted(MODELS)}")
        return ("name", "dtype", *fields)

    def __init__(self, config, workdir: str | None = None, source=None):
        self.config, self.workdir = config, workdir
        self.opts = o = _section(config, "graph_matching", _OPTS_DEFAULTS)
        self.data_cfg = d = _section(config, "data", _DATA_DEFAULTS)
        _check_choice("data.name", d.name, ("fashion_mnist_captions",))
        _check_choice("data.colour_space", d.colour_space, COLOUR_SPACES)
        kinds = tuple(o.negative_kinds)
        for k in kinds:
            _check_choice("graph_matching.negative_kinds", k, NEGATIVE_KINDS)
        if len(set(kinds)) != len(kinds) or not kinds:
            raise ConfigError(f"config.graph_matching.negative_kinds={kinds!r} must be distinct kinds, at least one")
        self.kinds = kinds
        k = o.negatives_per_image
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(kinds):
            raise ConfigError(
                f"config.graph_matching.negatives_per_image={k!r} must be an int in [1, {len(kinds)}] "
                f"(one negative per kind of {kinds})"
            )
        if not isinstance(o.rerank_k, int) or o.rerank_k < 10:
            raise ConfigError(f"config.graph_matching.rerank_k={o.rerank_k!r} must be an int >= 10 (R@10 is reported)")
        self.batch_size, self.eval_batch_size = int(config.batch_size), int(config.eval_batch_size)
        self.seed = int(config.seed)
        self.mean, self.std = _per_channel("mean", d.mean), _per_channel("std", d.std)
        self.image_size = int(d.image_size)
        self.source = source
        make = lambda split, n: make_captions(  # noqa: E731
            split,
            n or None,
            seed=int(d.data_seed),
            image_size=self.image_size,
            data_dir=d.data_dir or None,
            source=source,
        )
        self.train_data = make("train", int(d.num_train))
        self.splits = {"test": make("test", int(d.num_test)), "heldout": make("heldout", int(d.num_heldout))}
        self.num_train_examples = len(self.train_data.captions)
        self.avoid = heldout_table()
        self.tokenizer = run_word_tokenizer(workdir, grammar_captions)
        self._build_model(config.get("model", ml_collections.ConfigDict()))
        self._eval_ids = {s: self._eval_candidates(s) for s in self.splits}

    # -- model ----------------------------------------------------------------------------------------------------
    def _build_model(self, m):
        m = m.to_dict() if hasattr(m, "to_dict") else dict(m)
        self.model_name = name = m.get("name", "graph_fusion")
        if name not in MODELS:
            raise ConfigError(f"config.model.name={name!r} is not valid for graph_matching; valid: {sorted(MODELS)}")
        fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in m.items() if k not in ("name", "dtype")}
        dtype = _dtype(m.get("dtype", "float32"))
        dtype = None if dtype == jnp.float32 else dtype  # compute in the parameters' dtype
        vocab = self.tokenizer.vocab_size
        if name == "clip":
            fields.update(vocab_size=vocab, eot_id=self.tokenizer.eot_id, image_size=self.image_size)
            fields.setdefault("text_pooling", "eot")
            try:
                self.clip_config = CLIPConfig().replace(**fields)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"config.model: {e}; valid keys: {list(self.model_keys(m))}") from e
            self.context_length = int(self.clip_config.context_length)
            self.model = CLIP(self.clip_config, dtype=dtype)
        else:
            fields.setdefault("image_size", self.image_size)
            if int(fields["image_size"]) != self.image_size:
                raise ConfigError(
                    f"config.model.image_size={fields['image_size']} differs from config.data.image_size="
                    f"{self.image_size}; set them equal"
                )
            try:
                self.model = MODELS[name](vocab_size=vocab, dtype=dtype, **fields)
                if name == "graph_fusion":
                    self.model.layout()  # checks knn / patch_word against the grid
            except (TypeError, ValueError) as e:
                raise ConfigError(f"config.model ({name}): {e}") from e
            self.context_length = int(self.model.context_length)
        tokenize_strict(self.tokenizer, grammar_captions(), self.context_length)  # every caption must fit

    def init_params(self, rng, batch):
        """Initial parameters (shapes from one host batch)."""
        images, ids = self._images(jnp.asarray(batch["image"][:1])), jnp.asarray(batch["ids"][:1, 0])
        return init_model_params(self.model, {"params": rng, "dropout": rng}, images, ids)

    def _images(self, images):
        return normalize_images(images, self.data_cfg.colour_space, self.mean, self.std)

    def clip_embeddings(self, params, images, ids):
        """CLIP only: ``(image_embeds [B, D], text_embeds [T, D])``, L2-normalised; ``images`` uint8, ``ids [T, L]``."""
        img = self.model.apply({"params": params}, self._images(images), normalize=True, method="encode_image")
        txt = self.model.apply({"params": params}, ids, None, True, method="encode_text")
        return img, txt

    def _log_scale(self, params):
        s = params["logit_scale"].astype(jnp.float32)
        cap = self.clip_config.max_logit_scale
        return s if cap is None else jnp.minimum(s, cap)

    def scores(self, params, images, ids):
        """Match scores ``[B, C]`` of each image (uint8 ``[B, S, S, 3]``) with each of its ``C`` captions
        (``ids [B, C, L]``): the model's logit, or CLIP's ``exp(logit_scale) cos``."""
        b, c, L = ids.shape
        if self.model_name == "clip":
            img, txt = self.clip_embeddings(params, images, ids.reshape(b * c, L))
            return jnp.exp(self._log_scale(params)) * jnp.einsum("bd,bcd->bc", img, txt.reshape(b, c, -1))
        x = jnp.repeat(self._images(images), c, axis=0)
        return self.model.apply({"params": params}, x, ids.reshape(b * c, L))[0].reshape(b, c)

    def loss(self, params, batch, rng, *, train: bool = True, axis_name=None):
        """BCE of every pair (fusion models) or NegCLIP's contrastive loss (CLIP), and ``pair_accuracy`` (the true
        caption scores above each negative)."""
        del rng, train
        images, ids = jnp.asarray(batch["image"]), jnp.asarray(batch["ids"])
        b, c, L = ids.shape
        if self.model_name == "clip":
            img, txt = self.clip_embeddings(params, images, ids.reshape(b * c, L))
            txt = txt.reshape(b, c, -1)
            scale = jnp.exp(self._log_scale(params))
            loss = _negclip_loss(img, txt, scale, axis_name)
            s = scale * jnp.einsum("bd,bcd->bc", img, txt)
        else:
            x = jnp.repeat(self._images(images), c, axis=0)
            logits, aux = self.model.apply({"params": params}, x, ids.reshape(b * c, L))
            s = logits.reshape(b, c)
            labels = jnp.zeros_like(s).at[:, 0].set(1.0)
            loss = optax.sigmoid_binary_cross_entropy(s, labels).mean()
            if "image_embed" in aux and self.opts.itc_weight:
                img = aux["image_embed"].reshape(b, c, -1)[:, 0]
                txt = aux["text_embed"].reshape(b, c, -1)
                scale = jnp.exp(jnp.minimum(aux["logit_scale"], np.log(100.0)))
                loss = loss + self.opts.itc_weight * _negclip_loss(img, txt, scale, axis_name)
        sg = jax.lax.stop_gradient(s)
        return loss, {"pair_accuracy": jnp.mean(sg[:, :1] > sg[:, 1:])}

    # -- data -------------------------------------------------------------------------------------------------------
    def _attrs(self, data, index):
        return {k: np.asarray(getattr(data, k))[index] for k in ("item", "colour", "size", "position")}

    def _candidates(self, data, index, kinds_per_row, rng, avoid) -> np.ndarray:
        """``int32 [b, 1 + K, L]``: the true caption of each row of ``data[index]``, then one negative per kind in
        ``kinds_per_row`` ``int [b, K]`` (indices into ``self.kinds``)."""
        from mmjax.data.captions import caption

        attrs = self._attrs(data, index)
        b, K = kinds_per_row.shape
        texts = np.empty((b, 1 + K), object)
        texts[:, 0] = [caption(*a) for a in zip(attrs["item"], attrs["colour"], attrs["size"], attrs["position"])]
        for col in range(K):
            for kind_id, kind in enumerate(self.kinds):
                rows = np.flatnonzero(kinds_per_row[:, col] == kind_id)
                if rows.size:
                    sub = {k: v[rows] for k, v in attrs.items()}
                    neg = negative_attributes(
                        sub["item"], sub["colour"], sub["size"], sub["position"], kind, rng, avoid
                    )
                    texts[rows, 1 + col] = [
                        caption(*a) for a in zip(neg["item"], neg["colour"], neg["size"], neg["position"])
                    ]
        return tokenize_strict(self.tokenizer, texts.reshape(-1).tolist(), self.context_length).reshape(b, 1 + K, -1)

    def train_batches(self, start_step: int):
        """Host batches of ``batch_size`` training images (drawn with ``numpy.random.default_rng([seed, step])``),
        each with its caption and ``negatives_per_image`` negatives of distinct kinds."""
        n, K = self.num_train_examples, int(self.opts.negatives_per_image)
        step = int(start_step)
        while True:
            rng = np.random.default_rng([self.seed, step])
            index = rng.integers(0, n, self.batch_size)
            kinds = np.argsort(rng.random((self.batch_size, len(self.kinds))), axis=1)[:, :K]
            ids = self._candidates(self.train_data, index, kinds, rng, self.avoid)
            yield {
                "image": self.train_data.images[index],
                "ids": ids,
                "kind": kinds.astype(np.int32),
                "index": index.astype(np.int32),
            }
            step += 1

    def _eval_candidates(self, split: str) -> np.ndarray:
        data = self.splits[split]
        n = len(data.captions)
        rng = np.random.default_rng([int(self.data_cfg.data_seed), 1000 + _SPLIT_STREAM[split]])
        every_kind = np.broadcast_to(np.arange(len(self.kinds)), (n, len(self.kinds)))
        return self._candidates(data, np.arange(n), every_kind, rng, avoid=None)

    def _batches(self, split: str):
        data, ids = self.splits[split], self._eval_ids[split]
        n, bs = len(data.captions), self.eval_batch_size
        for s in range(0, n, bs):
            idx = np.arange(s, s + bs)
            mask = idx < n
            idx = np.where(mask, idx, 0)
            yield {"image": data.images[idx], "ids": ids[idx], "mask": mask}

    def eval_batches(self):
        """The test images in batches of ``eval_batch_size`` (last one padded), each with its caption and one
        negative of every kind."""
        return self._batches("test")

    def example_count(self, batch) -> int:
        """Images in a host batch."""
        return int(np.shape(batch["image"])[0])

    def eval_metrics(self, params, batch, *, axis_name=None):
        """Sums over a batch: ``{kind}_accuracy`` (true caption above that kind's negative), ``accuracy`` (mean over
        kinds), ``count``."""
        del axis_name
        s = self.scores(params, jnp.asarray(batch["image"]), jnp.asarray(batch["ids"]))
        mask = jnp.asarray(batch["mask"]).astype(s.dtype)
        right = (s[:, :1] > s[:, 1:]) + 0.5 * (s[:, :1] == s[:, 1:])  # [b, kinds]
        out = {f"{k}_accuracy": jnp.sum(right[:, i] * mask) for i, k in enumerate(self.kinds)}
        out["accuracy"] = jnp.sum(right.mean(axis=1) * mask)
        out["count"] = jnp.sum(mask)
        return out

    # -- final report -------------------------------------------------------------------------------------------
    def _score_fn(self):
        if not hasattr(self, "_jit_scores"):
            self._jit_scores = jax.jit(self.scores)
        return self._jit_scores

    def split_accuracy(self, params, split: str, clock: dict | None = None) -> dict[str, float]:
        """``{kind: pairwise accuracy}`` and ``"mean"`` on ``split`` (``"test"`` or ``"heldout"``); ``clock``, if
        given, accumulates the pairs scored and the seconds taken after the first (compiling) batch."""
        fn, scores = self._score_fn(), []
        for i, batch in enumerate(self._batches(split)):
            if i == 0:
                jax.block_until_ready(fn(params, batch["image"], batch["ids"]))
            t = time.perf_counter()
            s = np.asarray(fn(params, batch["image"], batch["ids"]))
            if clock is not None:
                clock["seconds"] = clock.get("seconds", 0.0) + time.perf_counter() - t
                clock["pairs"] = clock.get("pairs", 0) + s.size
            scores.append(s[batch["mask"]])
        s = np.concatenate(scores)
        out = {k: em.pairwise_accuracy(s[:, 0], s[:, 1 + i]) for i, k in enumerate(self.kinds)}
        out["mean"] = float(np.mean(list(out.values())))
        return out

    def _retriever(self, params):
        if self.model_name == "clip":
            return self, params
        run = str(self.opts.retriever or "")
        if not run:
            return None, None
        from mmjax.train.loop import restore_run

        try:
            _, task, r_params, _ = restore_run(run)
        except (UserError, ValueError) as e:
            raise ConfigError(f"config.graph_matching.retriever={run!r} is not a run to retrieve with: {e}") from e
        if getattr(task, "model_name", None) != "clip":
            raise ConfigError(
                f"config.graph_matching.retriever={run!r} is not a graph_matching run of model 'clip'; train one with "
                "--config.model.name=clip (see experiments/graph_fusion_fashion_mnist.py)"
            )
        return task, r_params

    def retrieval(self, params, batch_size: int = 500) -> dict[str, float]:
        """Recall@1/5/10 image->text and text->image over the test images and their distinct captions, by CLIP alone
        (``clip_*``) and re-ranked by this model (``rerank_*``, only for a fusion model with a retriever), plus
        ``rerank_pairs_per_s``."""
        task, r_params = self._retriever(params)
        if task is None:
            return {}
        data = self.splits["test"]
        captions = sorted(set(data.captions))
        caption_of = np.asarray([captions.index(c) for c in data.captions])
        ids = tokenize_strict(self.tokenizer, captions, self.context_length)
        r_ids = tokenize_strict(task.tokenizer, captions, task.context_length)
        embed = jax.jit(task.clip_embeddings)
        img = np.concatenate(
            [
                np.asarray(embed(r_params, data.images[s : s + batch_size], r_ids[:2])[0])
                for s in range(0, len(caption_of), batch_size)
            ]
        )
        txt = np.concatenate(
            [
                np.asarray(embed(r_params, data.images[:1], r_ids[s : s + batch_size])[1])
                for s in range(0, len(captions), batch_size)
            ]
        )
        sim = img @ txt.T  # [N_img, N_cap]
        relevant = caption_of[:, None] == np.arange(len(captions))[None, :]
        k = min(int(self.opts.rerank_k), len(captions))
        i2t, t2i = em.top_candidates(sim, k), em.top_candidates(sim.T, min(k, len(caption_of)))
        out = {}
        for name, ranked, rel in (("image_to_text", i2t, relevant), ("text_to_image", t2i, relevant.T)):
            for kk, v in em.recall_at_k(ranked, rel, (1, 5, 10)).items():
                out[f"clip_{name}_R@{kk}"] = v
        if self.model_name == "clip":
            return out
        clock = {"pairs": 0, "seconds": 0.0}  # the re-ranking's own pairs/s: report["rerank_pairs_per_s"]
        i2t_scores = self._pair_scores(
            params, data.images, np.repeat(np.arange(len(caption_of)), k), ids[i2t.reshape(-1)], batch_size, clock
        )
        t2i_scores = self._pair_scores(
            params, data.images, t2i.reshape(-1), np.repeat(ids, t2i.shape[1], 0), batch_size, clock
        )
        rr_i2t = em.rerank(i2t, i2t_scores.reshape(i2t.shape))
        rr_t2i = em.rerank(t2i, t2i_scores.reshape(t2i.shape))
        for name, ranked, rel in (("image_to_text", rr_i2t, relevant), ("text_to_image", rr_t2i, relevant.T)):
            for kk, v in em.recall_at_k(ranked, rel, (1, 5, 10)).items():
                out[f"rerank_{name}_R@{kk}"] = v
        out["rerank_pairs_per_s"] = clock["pairs"] / max(clock["seconds"], 1e-9)
        return out

    def _pair_scores(self, params, images, image_index, ids, batch_size: int, clock: dict) -> np.ndarray:
        """``[M]`` scores of the pairs (``images[image_index[m]]``, ``ids[m]``), ``batch_size`` pairs per call (the last
        call padded to the same shape); ``clock`` accumulates pairs and seconds after the first (compiling) call."""
        fn, out = self._score_fn(), []
        for s in range(0, len(image_index), batch_size):
            im, ci = image_index[s : s + batch_size], ids[s : s + batch_size]
            real = len(im)
            if real < batch_size:
                im = np.concatenate([im, np.repeat(im[:1], batch_size - real)])
                ci = np.concatenate([ci, np.repeat(ci[:1], batch_size - real, 0)])
            if not clock.get("compiled"):
                jax.block_until_ready(fn(params, images[im], ci[:, None]))
                clock["compiled"] = True
            t = time.perf_counter()
            r = np.asarray(fn(params, images[im], ci[:, None]))[:real, 0]
            clock["seconds"] += time.perf_counter() - t
            clock["pairs"] += real
            out.append(r)
        return np.concatenate(out)

    def patch_word_attention(self, params, images, captions) -> np.ndarray:
        """``[B, L, P]``: the last block's attention (mean over heads) of each word position over the patches."""
        ids = tokenize_strict(self.tokenizer, captions, self.context_length)
        if not hasattr(self, "_jit_attention"):  # compiled once per task (op by op it took 16 s at a tiny size)
            self._jit_attention = jax.jit(
                lambda p, x, i: self.model.apply({"params": p}, self._images(x), i)[1]["patch_word_attention"][-1]
            )
        return np.asarray(self._jit_attention(params, jnp.asarray(images), jnp.asarray(ids)))

    def final_report(self, params, workdir: str) -> dict[str, Any]:
        """Matching accuracy per negative kind on the test and held-out images, two-stage retrieval, pairs/s and
        (graph models with attention and patch-word edges) ``attention.png``; written to ``workdir/report.json``."""
        if not self.opts.final_report:
            return {}
        report: dict[str, Any] = {"parameters": int(sum(np.size(x) for x in jax.tree.leaves(params)))}
        clock: dict = {}
        for split, prefix in (("test", ""), ("heldout", "heldout_")):
            for k, v in self.split_accuracy(params, split, clock).items():
                report[f"{prefix}{k}_accuracy"] = v
        report["pairs_per_s"] = clock["pairs"] / max(clock["seconds"], 1e-9)
        report.update(self.retrieval(params))
        n = int(self.opts.attention_examples)
        model = self.model
        if n and isinstance(model, GraphFusion) and model.conv != "rgcn" and model.patch_word != "none":
            data = self.splits["test"]
            att = self.patch_word_attention(params, data.images[:n], data.captions[:n])
            words = [c.split() for c in data.captions[:n]]
            ids = tokenize_strict(self.tokenizer, data.captions[:n], self.context_length)
            rows = []
            for i in range(n):  # the word positions of each caption's words (after the start token)
                toks = [self.tokenizer.inverse_vocab[int(t)] for t in ids[i][1:] if int(t) not in (0, 2, 3)]
                rows.append(att[i, 1 : 1 + len(toks)])
                words[i] = toks
            width = max(len(w) for w in words)
            table = np.zeros((n, width, att.shape[-1]))
            for i, r in enumerate(rows):
                table[i, : len(r)] = r
            if jax.process_index() == 0:
                report["attention_png"] = em.plot_patch_word_attention(
                    data.images[:n], words, table, os.path.join(workdir, "attention.png")
                )
        if jax.process_index() == 0:
            write_report(report, workdir, "graph_matching")
        return report
