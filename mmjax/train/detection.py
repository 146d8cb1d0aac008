"""Open-vocabulary detection (OWL-ViT) as a task of the engine (:mod:`mmjax.train.task`).

Model: :class:`mmjax.detection.OWLViT` (CLIP's two towers with a box and a class head on every image token).
Data: Fashion-MNIST detection canvases (:mod:`mmjax.data.detection`), a fresh batch for every step (a function of
``config.seed`` and the step, so a resumed run continues exactly).

Queries: the phrase vocabulary is the 80 (colour, item) phrases "a red sneaker" (:data:`mmjax.data.detection.PHRASES`)
followed by the 10 item phrases "a sneaker" (:data:`~mmjax.data.detection.ITEM_PHRASES`). A training image is
queried with ``detection.num_queries`` phrases: the phrases of its items (its combinations, and with
``item_queries`` their item phrases), then negatives from the training vocabulary (never a held-out combination: it
would be taught as always absent): a fraction ``hard_negatives`` of them hard - another item in the colour of one of
the image's items, or one of its items in another colour ("a red sandal" beside a red sneaker) - and the rest at
random. A box answers every query that names it: "a red sneaker" and
"a sneaker" (OWL-ViT's multi-label targets). The text tower embeds the whole vocabulary once per step.

Loss: :func:`mmjax.detection.detection_loss` (Hungarian matching, sigmoid focal loss, L1 and GIoU; OWL-ViT's
weights 1 / 1 / 1, focal alpha 0.3, gamma 2), a mean of per-image losses in every parallel mode.

Evaluation (``eval_metrics``, summed by the engine, per ground-truth box of the test canvases):
``grounding_recall`` (the token scoring highest for the box's phrase among all 80 combination phrases has IoU >= 0.5
with it) and ``item_grounding_recall`` (the same for its item phrase). The final report
(:meth:`DetectionTask.final_report`) computes COCO AP, AP50 and AP75 (:func:`mmjax.evaluate.coco_ap`) for three query
sets: ``seen`` (test canvases, every combination phrase a query, ground-truth labels the combinations), ``heldout``
(canvases of the held-out combinations only, the same 80 queries) and ``item`` (test canvases, the 10 item phrases),
with the top ``max_detections`` (token, query) pairs of each image as its detections; and draws test canvases with
their detections (``detections.png``).

Options: ``config.init_from`` (a CLIP run's workdir, e.g. ``runs/demo``): start from its latest parameters (the
``clip`` subtree), its tokenizer, image size and image normalisation (``colour_space``, ``mean``, ``std``, which
replace ``config.data``'s); ``config.model`` is then ignored except ``prior_prob`` and ``dtype``.
``config.model``: :class:`mmjax.clip.CLIPConfig` fields (``preset`` first if given) plus ``name`` (``"owlvit"``),
``dtype`` and ``prior_prob``; the word tokenizer is built from the phrase vocabulary and saved with the run.

>>> from mmjax.train.task import resolve_task_class
>>> resolve_task_class("detection").__name__
'DetectionTask'
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import boxes as bx
from mmjax.clip import CLIPConfig, get_config
from mmjax.data import detection as dd
from mmjax.data.captions import COLOUR_NAMES, ITEM_NAMES
from mmjax.detection import LOSS_DEFAULTS, OWLViT, detection_loss
from mmjax.errors import ConfigError, UserError
from mmjax.evaluate.detection import coco_ap
from mmjax.train import storage
from mmjax.train.contrastive import (
    COLOUR_SPACES,
    VOCAB_FILE,
    _check_choice,
    _dtype,
    _per_channel,
    _section,
    normalize_images,
    run_word_tokenizer,
    write_report,
)
from mmjax.train.task import init_model_params

__all__ = ["DetectionTask", "VOCABULARY", "phrase_attributes"]

#: The phrase vocabulary: 80 combination phrases (index = combination label), then 10 item phrases (80 + item).
VOCABULARY = dd.PHRASES + dd.ITEM_PHRASES
MATCHERS = ("jax", "scipy")

_DETECTION_DEFAULTS = dict(
    num_queries=24,
    item_queries=True,
    hard_negatives=0.5,
    matcher="jax",
    final_report=True,
    max_detections=100,
    plot_examples=12,
    **LOSS_DEFAULTS,
)
_DATA_DEFAULTS = dict(
    name="fashion_mnist_detection",
    data_dir="",
    image_size=64,
    min_items=1,
    max_items=4,
    max_overlap=0.2,
    mosaic_sizes=(1,),
    mosaic_probs=(),
    num_test=1000,
    num_heldout=1000,
    data_seed=0,
    mean=0.5,
    std=0.5,
    colour_space="rgb",
)
_MODEL_DEFAULTS = dict(
    name="owlvit",
    preset="",
    dtype="float32",
    prior_prob=0.01,
    embed_dim=128,
    patch_size=1,
    vision_width=128,
    vision_depth=2,
    vision_heads=4,
    vision_mlp_dim=256,
    vision_stem_features=(32, 64, 128),
    vision_stem_impl="matmul",
    context_length=8,
    text_width=128,
    text_depth=1,
    text_heads=4,
    text_mlp_dim=256,
)
_TASK_MODEL_KEYS = ("name", "preset", "dtype", "prior_prob")


def phrase_attributes() -> tuple[np.ndarray, np.ndarray]:
    """``(item [90], colour [90])`` of every phrase of :data:`VOCABULARY` (colour -1 for the item phrases).

    >>> item, colour = phrase_attributes()
    >>> VOCABULARY[56], int(item[56]), int(colour[56]), VOCABULARY[87], int(colour[87])
    ('a red sneaker', 7, 0, 'a sneaker', -1)
    """
    n_c = len(COLOUR_NAMES)
    combos = np.arange(len(dd.PHRASES))
    item = np.concatenate([combos // n_c, np.arange(len(ITEM_NAMES))])
    colour = np.concatenate([combos % n_c, np.full(len(ITEM_NAMES), -1)])
    return item.astype(np.int32), colour.astype(np.int32)


class DetectionTask:
    """OWL-ViT detection on Fashion-MNIST canvases; see the module docstring.

    >>> from mmjax.train.task import with_defaults
    >>> task = DetectionTask(with_defaults({"task": "detection", "batch_size": 2, "eval_batch_size": 2,
    ...     "data": {"num_test": 2, "num_heldout": 2}, "model": {"vision_depth": 1}}, DetectionTask))
    >>> batch = next(task.train_batches(0))
    >>> batch["image"].shape, batch["boxes"].shape, batch["query"].shape
    ((2, 64, 64, 3), (2, 4, 4), (2, 24))
    """

    unit = "img"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """The task's sections with their defaults: ``model``, ``data``, ``detection`` and ``init_from``.

        >>> c = DetectionTask.default_config()
        >>> c.model.name, c.detection.focal_alpha, c.data.max_items, c.init_from
        ('owlvit', 0.3, 4, '')
        """
        return ml_collections.ConfigDict(
            {
                "model": dict(_MODEL_DEFAULTS),
                "data": dict(_DATA_DEFAULTS),
                "detection": dict(_DETECTION_DEFAULTS),
                "init_from": "",
            }
        )

    @staticmethod
    def model_keys(model_config) -> tuple[str, ...]:
        """``config.model``'s valid keys: the CLIPConfig fields and ``name``, ``preset``, ``dtype``, ``prior_prob``.

        >>> "vision_width" in DetectionTask.model_keys({}), "prior_prob" in DetectionTask.model_keys({})
        (True, True)
        """
        del model_config
        return (*_TASK_MODEL_KEYS, *(f.name for f in dataclasses.fields(CLIPConfig)))

    def __init__(self, config, workdir: str | None = None):
        self.config = config
        self.workdir = workdir
        self.opts = o = _section(config, "detection", _DETECTION_DEFAULTS)
        self.data_cfg = d = _section(config, "data", _DATA_DEFAULTS)
        _check_choice("data.name", d.name, ("fashion_mnist_detection",))
        _check_choice("detection.matcher", o.matcher, MATCHERS)
        for key in ("class_weight", "bbox_weight", "giou_weight", "focal_gamma"):
            if not isinstance(o[key], (int, float)) or o[key] < 0:
                raise ConfigError(f"config.detection.{key}={o[key]!r} must be a number >= 0")
        if not isinstance(o.hard_negatives, (int, float)) or not 0 <= o.hard_negatives <= 1:
            raise ConfigError(f"config.detection.hard_negatives={o.hard_negatives!r} must be a number in [0, 1]")
        if not isinstance(o.focal_alpha, (int, float)) or not 0 <= o.focal_alpha <= 1:
            raise ConfigError(f"config.detection.focal_alpha={o.focal_alpha!r} must be a number in [0, 1]")
        for key in ("num_queries", "max_detections"):
            if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < 1:
                raise ConfigError(f"config.detection.{key}={o[key]!r} must be an int >= 1")
        self.batch_size, self.eval_batch_size = int(config.batch_size), int(config.eval_batch_size)
        self.seed = int(config.seed)
        self.init_from = str(config.get("init_from", "") or "")
        m = config.get("model", ml_collections.ConfigDict())
        m = m.to_dict() if hasattr(m, "to_dict") else dict(m)
        if m.get("name", "owlvit") != "owlvit":
            raise ConfigError(f"config.model.name={m['name']!r} is not valid for the detection task; valid: ['owlvit']")
        if self.init_from:
            self._from_clip_run(self.init_from)
        else:
            self._build_model(m)
        _check_choice("data.colour_space", d.colour_space, COLOUR_SPACES)
        self.mean, self.std = _per_channel("mean", d.mean), _per_channel("std", d.std)
        dtype = _dtype(m.get("dtype", "float32"))
        if dtype == jnp.float32:  # compute in the parameters' dtype: float32, or float64 when a test runs under x64
            dtype = None
        self.model = OWLViT(self.clip_config, dtype=dtype, prior_prob=m.get("prior_prob", 0.01))
        self.image_size = int(self.clip_config.image_size)
        if int(d.image_size) != self.image_size:
            raise ConfigError(
                f"config.data.image_size={d.image_size} differs from the model's image size {self.image_size}"
                + (f" (the CLIP run {self.init_from!r})" if self.init_from else "")
                + "; set them equal"
            )
        self.canvas_kwargs = dict(
            image_size=self.image_size,
            min_items=d.min_items,
            max_items=d.max_items,
            max_overlap=d.max_overlap,
            mosaic_sizes=tuple(d.mosaic_sizes),
            mosaic_probs=tuple(d.mosaic_probs) or None,
        )
        self._sources: dict[str, tuple] = {}
        dd.make_detection("train", 0, source=(np.zeros((1, 28, 28), np.uint8), np.zeros(1, int)), **self.canvas_kwargs)
        self.vocab_ids = np.asarray(self.tokenizer(list(VOCABULARY), context_length=self.context_length), np.int32)
        self.phrase_item, self.phrase_colour = phrase_attributes()
        held = set(dd.heldout_labels().tolist())
        train_vocab = [v for v in range(len(dd.PHRASES)) if v not in held]
        if o.item_queries:
            train_vocab += list(range(len(dd.PHRASES), len(VOCABULARY)))
        self.train_vocab = np.asarray(train_vocab, np.int32)
        self.num_train_examples = 60000  # nominal (a fresh canvas every step): the Fashion-MNIST training items
        self._eval_data: dict[str, dd.DetectionCanvases] = {}

    # -- model ----------------------------------------------------------------------------------------------------
    def _build_model(self, m):
        fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in m.items() if k not in _TASK_MODEL_KEYS}
        self.tokenizer = run_word_tokenizer(self.workdir, list(VOCABULARY))
        fields.update(vocab_size=self.tokenizer.vocab_size, eot_id=self.tokenizer.eot_id)
        fields.setdefault("text_pooling", "eot")
        fields.setdefault("image_size", int(self.data_cfg.image_size))
        base = get_config(m["preset"]) if m.get("preset") else CLIPConfig()
        try:
            self.clip_config = base.replace(**fields)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.model: {e}; valid keys: {list(self.model_keys(m))}") from e
        self.context_length = self.clip_config.context_length
        self.clip_params = None

    def _from_clip_run(self, run: str):
        from mmjax.train.loop import restore_run

        try:
            clip_cfg, clip_task, params, step = restore_run(run)
        except UserError as e:
            raise ConfigError(f"config.init_from={run!r} is not a CLIP run to start from: {e}") from e
        if not hasattr(clip_task, "clip_config"):
            raise ConfigError(
                f"config.init_from={run!r} is a {clip_cfg.task!r} run; detection starts from a contrastive (CLIP) run"
            )
        self.clip_config, self.tokenizer = clip_task.clip_config, clip_task.tokenizer
        self.context_length = self.clip_config.context_length
        self.clip_params = jax.tree.map(np.asarray, params)
        for key in ("colour_space", "mean", "std"):
            self.data_cfg[key] = clip_task.data_cfg[key]
        if self.workdir is not None and hasattr(self.tokenizer, "to_json") and jax.process_index() == 0:
            saved = storage.join(storage.resolve(self.workdir), VOCAB_FILE)
            if not storage.exists(saved):
                storage.write_text(saved, self.tokenizer.to_json() + "\n")
        print(f"detection: starting from the CLIP run {run} (step {step})", flush=True)

    def init_params(self, rng, batch):
        """Initial OWL-ViT params; with ``config.init_from`` the ``clip`` subtree is the CLIP run's."""
        images = self._images(jnp.asarray(batch["image"][:1]))
        params = init_model_params(self.model, {"params": rng, "dropout": rng}, images, jnp.asarray(self.vocab_ids[:2]))
        if self.clip_params is not None:
            want = jax.tree.map(lambda x: (x.shape, x.dtype), params["clip"])
            got = jax.tree.map(lambda x: (x.shape, x.dtype), self.clip_params)
            if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
                raise ConfigError(
                    f"config.init_from={self.init_from!r}: its CLIP parameters do not fit this model's clip/ tree"
                )
            params = dict(params, clip=jax.tree.map(jnp.asarray, self.clip_params))
        return params

    def _images(self, images):
        return normalize_images(images, self.data_cfg.colour_space, self.mean, self.std)

    def _targets(self, item, colour, valid, query):
        """``[B, K, Q]``: box ``k`` answers query ``q`` (same item; same colour unless the query names none)."""
        qi, qc = jnp.asarray(self.phrase_item)[query], jnp.asarray(self.phrase_colour)[query]
        same_item = item[:, :, None] == qi[:, None, :]
        same_colour = (qc[:, None, :] == -1) | (qc[:, None, :] == colour[:, :, None])
        return same_item & same_colour & valid[:, :, None]

    def _forward(self, params, images, query, train, rng=None):
        rngs = {"dropout": rng} if rng is not None else None
        vocab = self.model.apply({"params": params}, self.vocab_ids, train=train, method="embed_queries", rngs=rngs)
        return self.model.apply(
            {"params": params}, self._images(images), query_embeds=vocab[query], train=train, rngs=rngs
        )

    def loss(self, params, batch, rng, *, train: bool = True, axis_name=None):
        """The mean over this device's images of the per-image OWL-ViT loss (see the module docstring)."""
        del axis_name  # a mean of per-image losses: the engine's mean over devices is the global mean
        out = self._forward(params, batch["image"], batch["query"], train, rng)
        targets = self._targets(batch["item"], batch["colour"], batch["valid"], batch["query"])
        o = self.opts
        loss, aux = detection_loss(
            out.logits,
            out.boxes,
            targets,
            batch["boxes"],
            batch["valid"],
            batch["query_mask"],
            **{k: float(o[k]) for k in LOSS_DEFAULTS},
            matcher=o.matcher,
        )
        return loss, {k: aux[k].mean() for k in ("class_loss", "bbox_loss", "giou_loss")}

    # -- data -----------------------------------------------------------------------------------------------------
    def _host_batch(self, canvases: dd.DetectionCanvases, rng: np.random.Generator | None) -> dict:
        """Arrays of one batch; with ``rng`` also the training queries (positives, then sampled negatives)."""
        out = {
            "image": canvases.images,
            "boxes": np.asarray(bx.xyxy_to_cxcywh(canvases.boxes / np.float32(self.image_size))),
            "valid": canvases.valid,
            "item": canvases.item,
            "colour": canvases.colour,
        }
        if rng is None:
            return out
        n_q = int(self.opts.num_queries)
        query = np.zeros((len(canvases.images), n_q), np.int32)
        mask = np.zeros((len(canvases.images), n_q), bool)
        for b in range(len(canvases.images)):
            labels = canvases.label[b][canvases.valid[b]]
            pos = list(dict.fromkeys(labels.tolist()))
            if self.opts.item_queries:
                pos += list(dict.fromkeys((len(dd.PHRASES) + canvases.item[b][canvases.valid[b]]).tolist()))
            neg = np.setdiff1d(self.train_vocab, pos)
            # hard negatives: the other items in an item's colour and the item in the other colours
            combos = labels[labels >= 0]
            n_c = len(COLOUR_NAMES)
            same = np.isin(neg // n_c, combos // n_c) | np.isin(neg % n_c, combos % n_c)
            hard = neg[(neg < len(dd.PHRASES)) & same]
            n_hard = min(len(hard), int(round(float(self.opts.hard_negatives) * max(n_q - len(pos), 0))))
            hard = rng.permutation(hard)[:n_hard]
            rest = rng.permutation(np.setdiff1d(neg, hard))
            chosen = (pos + hard.tolist() + rest.tolist())[:n_q]
            query[b, : len(chosen)] = chosen
            mask[b, : len(chosen)] = True
        out.update(query=query, query_mask=mask)
        return out

    def train_batches(self, start_step: int):
        """Host batches from ``start_step``: fresh canvases (a function of the seed and the step) and their queries."""
        per_host = self.batch_size // jax.process_count()
        step = int(start_step)
        while True:
            key = (self.seed, step, jax.process_index())
            canvases = dd.make_detection(
                "train", per_host, seed=key, source=self._source("train"), **self.canvas_kwargs
            )
            yield self._host_batch(canvases, np.random.default_rng((*key, 1)))
            step += 1

    def _eval_canvases(self, split: str) -> dd.DetectionCanvases:
        """The ``"test"`` or ``"heldout"`` canvases (``data.num_test`` / ``num_heldout``), generated once."""
        if split not in self._eval_data:
            d = self.data_cfg
            n = int(d.num_test if split == "test" else d.num_heldout)
            source = self._source(split)
            self._eval_data[split] = dd.make_detection(
                split, n, seed=int(d.data_seed), source=source, **self.canvas_kwargs
            )
        return self._eval_data[split]

    def _source(self, split: str):
        """The Fashion-MNIST images and labels a split draws from, read once."""
        fmnist_split = "train" if split == "train" else "test"
        if fmnist_split not in self._sources:
            from mmjax.data.fashion_mnist import load_fashion_mnist

            self._sources[fmnist_split] = load_fashion_mnist(fmnist_split, self.data_cfg.data_dir or None)
        return self._sources[fmnist_split]

    def eval_batches(self):
        """The test canvases in order (``data.num_test``), the last batch padded (``mask``)."""
        data = self._host_batch(self._eval_canvases("test"), None)
        n, b = len(data["image"]), self.eval_batch_size
        for start in range(0, n, b):
            chunk = {k: v[start : start + b] for k, v in data.items()}
            real = len(chunk["image"])
            if real < b:
                chunk = {k: np.concatenate([v, np.zeros((b - real, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()}
            chunk["mask"] = np.arange(b) < real
            yield chunk

    def example_count(self, batch) -> int:
        """Images in a host batch (real ones for an evaluation batch)."""
        return int(np.sum(batch["mask"])) if "mask" in batch else int(np.shape(batch["image"])[0])

    # -- evaluation -----------------------------------------------------------------------------------------------
    def eval_metrics(self, params, batch, *, axis_name=None):
        """Sums over the real ground-truth boxes of one batch: ``grounding_recall`` and ``item_grounding_recall``
        (the best token for the box's combination / item phrase, among all 90 phrases, overlaps it with IoU >= 0.5),
        ``count`` (boxes)."""
        del axis_name
        valid = batch["valid"] & batch["mask"][:, None]
        images = batch["image"]
        vocab = self.model.apply({"params": params}, self.vocab_ids, method="embed_queries")
        out = self.model.apply({"params": params}, self._images(images), query_embeds=vocab)
        label = jnp.maximum(batch["item"], 0) * len(COLOUR_NAMES) + jnp.maximum(batch["colour"], 0)
        truth = bx.cxcywh_to_xyxy(batch["boxes"])  # [B, K, 4]

        def recall(query):  # query [B, K] -> hits [B, K]
            best = jnp.argmax(jnp.take_along_axis(out.logits, query[:, None, :], axis=2), axis=1)  # [B, K] token
            pred = jnp.take_along_axis(out.boxes, best[..., None], axis=1)
            return (bx.iou(bx.cxcywh_to_xyxy(pred), truth) >= 0.5) & valid

        item_query = len(dd.PHRASES) + jnp.maximum(batch["item"], 0)
        return {
            "grounding_recall": recall(label).sum(),
            "item_grounding_recall": recall(item_query).sum(),
            "count": valid.sum(),
        }

    def predict(self, params, images, queries, batch_size: int = 100, max_detections: int | None = None):
        """Detections of ``images uint8 [N, S, S, 3]`` for the phrases ``queries`` (indices into
        :data:`VOCABULARY`, or ids ``[Q, T]``): per image the top ``max_detections`` (token, query) pairs by score,
        as :func:`mmjax.evaluate.coco_ap` reads them (``boxes`` x0, y0, x1, y1 in pixels, clipped to the image;
        ``labels`` the position in ``queries``; ``scores`` sigmoid probabilities)."""
        k = int(max_detections or self.opts.max_detections)
        queries = np.asarray(queries)
        ids = self.vocab_ids[queries] if queries.ndim == 1 else queries.astype(np.int32)
        fn = self._predict_fn()
        results = []
        for start in range(0, len(images), batch_size):
            chunk = np.asarray(images[start : start + batch_size])
            real = len(chunk)
            if real < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - real, *chunk.shape[1:]), chunk.dtype)])
            scores, labels, boxes = jax.device_get(fn(params, chunk, ids, k))
            for i in range(real):
                results.append({"boxes": boxes[i], "labels": labels[i], "scores": scores[i]})
        return results

    def _predict_fn(self):
        if getattr(self, "_predict_jit", None) is None:
            size = self.image_size

            def predict(params, images, ids, k):
                q = self.model.apply({"params": params}, ids, method="embed_queries")
                out = self.model.apply({"params": params}, self._images(images), query_embeds=q)
                b, p, nq = out.logits.shape
                scores, flat = jax.lax.top_k(jax.nn.sigmoid(out.logits).reshape(b, p * nq), min(k, p * nq))
                token, label = flat // nq, flat % nq
                xyxy = bx.cxcywh_to_xyxy(jnp.take_along_axis(out.boxes, token[..., None], axis=1))
                return scores, label, jnp.clip(xyxy * size, 0.0, size)

            self._predict_jit = jax.jit(predict, static_argnums=3)
        return self._predict_jit

    def detect_phrases(self, params, images, phrases, threshold: float = 0.3, iou: float = 0.5) -> list[list[dict]]:
        """Free-text detection: for each image ``uint8 [N, S, S, 3]`` and each phrase, the best box and every other
        box scoring at least ``threshold`` that overlaps no better box of the same phrase by IoU ``>= iou``.

        Returns per image a list of ``{"query", "box" (x0, y0, x1, y1 pixels), "score"}``, best first per query.

        Raises:
          ValueError: no phrase, an empty phrase, images of another size or dtype (naming it).
        """
        phrases = [str(p) for p in phrases]
        if not phrases or any(not p.strip() for p in phrases):
            raise UserError(f"queries={phrases!r}: give at least one non-empty text query, e.g. 'a red sneaker'")
        images = np.asarray(images)
        want = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != want or images.dtype != np.uint8:
            raise UserError(
                f"images must be uint8 [N, {want[0]}, {want[1]}, 3] (the run's config.data.image_size), got "
                f"{images.dtype} {images.shape}; resize them to {want[0]}x{want[1]} first"
            )
        ids = np.asarray(self.tokenizer(phrases, context_length=self.context_length), np.int32)
        out = []
        for det in self.predict(params, images, ids, max_detections=10**9):
            found = []
            for q, phrase in enumerate(phrases):
                rows = np.flatnonzero(det["labels"] == q)  # already sorted by score
                kept: list[int] = []
                for r in rows:
                    if kept and det["scores"][r] < threshold:
                        break
                    if not kept or dd.box_iou_matrix(det["boxes"][r], det["boxes"][kept]).max() < iou:
                        kept.append(int(r))
                found += [
                    {"query": phrase, "box": det["boxes"][r].tolist(), "score": float(det["scores"][r])} for r in kept
                ]
            out.append(found)
        return out

    def final_report(self, params, workdir: str) -> dict[str, Any]:
        """COCO AP / AP50 / AP75 for the seen, held-out and item-only query sets, and ``detections.png``."""
        if not self.opts.final_report:
            return {}
        report: dict[str, Any] = {}
        test, held = self._eval_canvases("test"), self._eval_canvases("heldout")
        combos = np.arange(len(dd.PHRASES))
        items = np.arange(len(dd.PHRASES), len(VOCABULARY))
        cases = {
            "seen": (test, combos, test.label),
            "heldout": (held, combos, held.label),
            "item": (test, items, test.item),
        }
        for name, (canvases, queries, labels) in cases.items():
            detections = self.predict(params, canvases.images, queries)
            truth = [{"boxes": bx[v], "labels": lb[v]} for bx, lb, v in zip(canvases.boxes, labels, canvases.valid)]
            ap = coco_ap(truth, detections)
            report.update({f"{name}_{k}": float(ap[k]) for k in ("AP", "AP50", "AP75")})
        if jax.process_index() == 0:
            n = int(self.opts.plot_examples)
            images = np.concatenate([test.images[: n - n // 3], held.images[: n // 3]])
            path = os.path.join(workdir, "detections.png")
            names = [p.removeprefix("a ") for p in dd.PHRASES]  # "red sneaker": short labels on small canvases
            draw_detections(images, self.predict(params, images, combos), names, path)
            report["detections_png"] = path
            write_report(report, workdir, "detection")
        return report


def draw_detections(images, detections, names, path: str, threshold: float = 0.3, columns: int = 4) -> str:
    """Saves a grid of ``images [N, S, S, 3]`` with their detections (one box per query: its best, drawn when its
    score is at least ``threshold`` and no better query's box covers it with IoU > 0.9, labelled ``names[label]``
    and the score) as a PNG; returns ``path``.

    >>> import tempfile
    >>> det = [{"boxes": np.array([[2.0, 2.0, 10.0, 12.0]]), "labels": np.array([0]), "scores": np.array([0.9])}]
    >>> p = draw_detections(np.zeros((1, 16, 16, 3), np.uint8), det, ["a red sneaker"], tempfile.mktemp(suffix=".png"))
    >>> os.path.getsize(p) > 0
    True
    """
    from matplotlib.patches import Rectangle

    from mmjax.evaluate.embeddings import _agg_figure, _save

    images = np.asarray(images)
    n = len(images)
    if len(detections) != n:
        raise ValueError(f"draw_detections: {len(detections)} detection lists for {n} images; give one per image.")
    size = images.shape[1:3] if images.ndim == 4 else None
    for i, det in enumerate(detections):
        b = np.asarray(det["boxes"], np.float64).reshape(-1, 4)
        if (
            size is not None
            and len(b)
            and (b.min() < 0 or (b[:, [0, 2]] > size[1]).any() or (b[:, [1, 3]] > size[0]).any())
        ):
            raise ValueError(
                f"draw_detections: image {i} has a box outside the image ({size[1]}x{size[0]} px): "
                f"{b[(b < 0).any(1) | (b[:, [0, 2]] > size[1]).any(1) | (b[:, [1, 3]] > size[0]).any(1)][0].tolist()}"
                " (boxes are x0, y0, x1, y1 in pixels)."
            )
    rows = -(-n // columns)
    fig = _agg_figure(2.6 * columns, 2.8 * rows)
    for i in range(n):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(images[i], interpolation="nearest")
        ax.set_axis_off()
        det = detections[i]
        best: dict[int, int] = {}
        for j in np.argsort(-np.asarray(det["scores"])):
            best.setdefault(int(det["labels"][j]), int(j))
        boxes = np.asarray(det["boxes"], np.float64)
        drawn: list[int] = []
        for label, j in sorted(best.items(), key=lambda kv: -float(det["scores"][kv[1]])):
            score = float(det["scores"][j])
            if score < threshold:
                continue
            if drawn and dd.box_iou_matrix(boxes[j], boxes[drawn]).max() > 0.9:
                continue  # the same box already carries a better query: one label per box
            drawn.append(j)
            x0, y0, x1, y1 = boxes[j] - 0.5
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.2))
            ax.text(
                x0,
                y0 - 1,
                f"{names[label]} {score:.2f}",
                color="white",
                fontsize=6,
                va="bottom",
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 0.5, "linewidth": 0},
            )
    return _save(fig, path, 110)
