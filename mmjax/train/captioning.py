"""Image captioning as a task of the engine (:mod:`mmjax.train.task`): a :class:`mmjax.captioner.Captioner`
trained by teacher forcing, with CapPa's parallel prediction as an option.

With caption ids ``y = [bos, w_1, ..., w_n, eos, pad, ...]`` (``[B, L]``) the decoder reads ``y[:, :-1]`` and
predicts ``y[:, 1:]``; the loss is the label-smoothed cross-entropy averaged over the predicted tokens that are not
padding (the end-of-text token counts), over the *global* batch in every parallel mode::

    L = sum_{b,t} m_bt CE_ls(logits_bt, y_b,t+1) / sum_{b,t} m_bt,     m_bt = [y_b,t+1 != pad]

CapPa (Tschannen et al. 2023, ``config.captioning.masked_pred_prob = p``): a random fraction ``p`` of the training
rows reads ``[MASK]`` at every input position with no causal mask, so the decoder must predict every token from the
image alone (parallel prediction); the rest are trained autoregressively. ``[MASK]`` is one extra row of the
vocabulary (``mask_id = tokenizer.vocab_size``).

Evaluation (``eval_metrics``, summed by the engine): ``loss`` and ``token_accuracy`` (teacher forcing) and greedy
decoding inside the compiled evaluation step: ``exact_match`` (the generated ids equal the caption's) on the test
split and ``heldout_exact_match`` on the held-out (colour, item) combinations of the Fashion-MNIST captions. The
final report (:meth:`CaptioningTask.final_report`) generates with :func:`mmjax.generate.generate` (greedy or beams),
parses every caption (:func:`mmjax.data.captions.parse_caption`) for per-attribute accuracy, scores BLEU-4 and
CIDEr-D (:mod:`mmjax.evaluate`), runs CapPa's scoring classifier (:func:`mmjax.generate.log_likelihood` of the
zero-shot prompts, log-sum-exp over each class's templates) and draws a grid of test images with their captions.

Model (``config.model``): the image tower's ``vision_*`` keys (a :class:`mmjax.vit.ViT`: width, depth, heads,
MLP, patch size, a convolutional stem), the decoder's ``decoder_*`` keys (:class:`mmjax.decoder.DecoderConfig`),
``num_map_queries`` (0: cross-attend every image token), ``context_length`` (caption length with start and end
tokens), ``dtype``, ``attention_implementation`` (both towers; empty: the platform's default). The word tokenizer is built from the training captions and saved with the run
(``workdir/vocab.json``), as the contrastive task does; its ``<|startoftext|>``, ``<|endoftext|>`` and ``<pad>``
are the decoder's ``bos_id``, ``eos_id`` and ``pad_id``. Data (``config.data``): as the contrastive task
(:func:`mmjax.train.contrastive.caption_sources`), including ``colour_space``.

>>> from mmjax.train.task import resolve_task_class
>>> resolve_task_class("captioning").__name__
'CaptioningTask'
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.captioner import Captioner
from mmjax.decoder import DecoderConfig
from mmjax.errors import ConfigError, UserError
from mmjax.losses import softmax_cross_entropy
from mmjax.train.contrastive import (
    _DATA_DEFAULTS,
    COLOUR_SPACES,
    DATASETS,
    ImageTextData,
    _check_choice,
    _dtype,
    _per_channel,
    _section,
    write_report,
)
from mmjax.train.task import init_model_params
from mmjax.vit import ViT

__all__ = ["CaptioningTask", "captioner_from_config", "token_cross_entropy", "DECODE_MODES"]

DECODE_MODES = ("autoregressive", "parallel")

_CAPTIONING_DEFAULTS = dict(
    label_smoothing=0.0,
    masked_pred_prob=0.0,
    num_beams=1,
    length_penalty=1.0,
    decode="autoregressive",  # or "parallel" (CapPa's parallel decoding; needs masked_pred_prob > 0)
    final_report=True,
    scoring_examples=500,  # test images the scoring classifier reads (it scores 800 prompts per image)
)
_MODEL_DEFAULTS = dict(
    name="captioner",
    dtype="float32",
    context_length=12,
    vision_width=128,
    vision_depth=2,
    vision_num_heads=4,
    vision_mlp_dim=256,
    vision_patch_size=1,
    vision_stem_features=(32, 64, 128, 128),
    vision_stem_impl="matmul",
    vision_posemb="learn",
    num_map_queries=0,
    decoder_width=128,
    decoder_depth=2,
    decoder_num_heads=4,
    decoder_mlp_dim=256,
    decoder_activation="gelu",
    tie_embeddings=True,
    dropout_rate=0.0,
    attention_implementation="",  # "": the default for the platform (mmjax.attention.select_implementation)
)


def captioner_from_config(m, vocab_size: int, bos_id: int, eos_id: int, pad_id: int, mask_id: int | None = None):
    """The :class:`mmjax.captioner.Captioner` of a ``config.model`` section (see the module docstring) for a
    tokenizer with ``vocab_size`` ids and these special ids.

    Raises:
      ConfigError: a value the image tower or the decoder refuses, named with its key.

    >>> import ml_collections
    >>> m = ml_collections.ConfigDict(_MODEL_DEFAULTS)
    >>> model = captioner_from_config(m, vocab_size=40, bos_id=2, eos_id=3, pad_id=0)
    >>> model.decoder.width, model.vision.stem_features, model.decoder.max_length
    (128, (32, 64, 128, 128), 12)
    """
    name = m.get("name", "captioner")
    if name != "captioner":
        raise ConfigError(
            f"config.model.name={name!r} is not valid for the captioning task; valid choices: ['captioner']"
        )
    dtype = _dtype(m.get("dtype", "float32"))
    if dtype == jnp.float32:  # the parameters' dtype: float32, or float64 when a test runs the task under x64
        dtype = None
    try:
        vision = ViT(
            width=int(m.vision_width),
            depth=int(m.vision_depth),
            num_heads=int(m.vision_num_heads),
            mlp_dim=int(m.vision_mlp_dim),
            patch_size=int(m.vision_patch_size),
            stem_features=tuple(int(f) for f in m.vision_stem_features),
            stem_impl=m.vision_stem_impl,
            posemb=m.vision_posemb,
            num_classes=0,
            pool_type="gap",
            dropout_rate=float(m.dropout_rate),
            attention_implementation=m.attention_implementation or None,
            dtype=dtype,
        )
        vision.sizes()  # validates the tower's values now
        decoder = DecoderConfig(
            vocab_size=int(vocab_size),
            width=int(m.decoder_width),
            depth=int(m.decoder_depth),
            num_heads=int(m.decoder_num_heads),
            mlp_dim=int(m.decoder_mlp_dim),
            max_length=int(m.context_length),
            activation=m.decoder_activation,
            tie_embeddings=bool(m.tie_embeddings),
            dropout_rate=float(m.dropout_rate),
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            mask_id=mask_id,
            attention_implementation=m.attention_implementation or None,
            dtype=dtype,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from e
    queries = int(m.num_map_queries)
    if queries < 0:
        raise ConfigError(f"config.model.num_map_queries={queries} must be >= 0 (0: every image token)")
    return Captioner(vision=vision, decoder=decoder, num_map_queries=queries or None)


def token_cross_entropy(logits, targets, weights, label_smoothing: float = 0.0, *, axis_name=None):
    """The label-smoothed token cross-entropy of the *global* batch, ``sum m CE / sum m`` over every device's
    tokens with weight ``m`` (1 = a target that counts), as this device's share, and the token accuracy of its rows.

    Under ``pmap`` (``axis_name``) the engine averages the devices' losses, so each device returns its own mean
    weighted by ``its tokens * devices / global tokens``: the average is the global token mean whatever the
    devices' token counts (equal in every parallel mode).

    Args:
      logits: ``[B, T, V]``; targets: int ``[B, T]``; weights: ``[B, T]``.
      label_smoothing: ``eps`` in ``[0, 1)``.
      axis_name: the pmap axis, or ``None`` (the batch is global).

    Returns:
      ``(loss, token_accuracy)`` scalars.

    >>> logits = jnp.zeros((1, 2, 4)); targets = jnp.array([[1, 0]]); weights = jnp.array([[1.0, 0.0]])
    >>> [round(float(x), 4) for x in token_cross_entropy(logits, targets, weights)]  # log 4; argmax 0 != 1
    [1.3863, 0.0]
    """
    local = jnp.sum(weights)
    total = local if axis_name is None else jax.lax.psum(local, axis_name)
    devices = 1 if axis_name is None else jax.lax.psum(1, axis_name)
    mean_local = softmax_cross_entropy(logits, targets, label_smoothing, where=weights)
    loss = mean_local * local * devices / jnp.maximum(total, 1.0)
    correct = (jnp.argmax(logits, -1) == targets).astype(weights.dtype)
    return loss, jnp.sum(correct * weights) / jnp.maximum(local, 1.0)


class CaptioningTask(ImageTextData):
    """Trains a :class:`mmjax.captioner.Captioner` on image-caption data (see the module docstring).

    Batches as the contrastive task's: ``{"image": uint8 [b, S, S, 3], "ids": int32 [b, L]}`` (evaluation adds
    ``mask`` and the attributes): the data side is :class:`mmjax.train.contrastive.ImageTextData`.

    >>> import os, tempfile
    >>> from mmjax.data import write_idx
    >>> from mmjax.train.config import prepare_config
    >>> data = tempfile.mkdtemp()
    >>> for prefix in ("train", "t10k"):
    ...     write_idx(os.path.join(data, f"{prefix}-images-idx3-ubyte"), np.full((10, 28, 28), 200, np.uint8))
    ...     write_idx(os.path.join(data, f"{prefix}-labels-idx1-ubyte"), np.arange(10, dtype=np.uint8))
    >>> config = prepare_config({
    ...     "task": "captioning", "batch_size": 4, "eval_batch_size": 4,
    ...     "model": {"vision_width": 16, "vision_depth": 1, "vision_num_heads": 2, "vision_mlp_dim": 32,
    ...               "vision_stem_features": (8,), "decoder_width": 16, "decoder_depth": 1,
    ...               "decoder_num_heads": 2, "decoder_mlp_dim": 32},
    ...     "data": {"data_dir": data, "image_size": 16, "num_train": 8, "num_test": 4, "num_heldout": 4},
    ...     "captioning": {"final_report": False, "masked_pred_prob": 0.5}})
    >>> task = CaptioningTask(config)
    >>> batch = next(task.train_batches(0))
    >>> params = jax.eval_shape(task.init_params, jax.random.key(0), batch)  # shapes only: nothing compiles
    >>> loss, metrics = jax.eval_shape(lambda p: task.loss(p, batch, jax.random.key(1)), params)
    >>> sorted(params), loss.shape, sorted(metrics)
    (['text_decoder', 'vision'], (), ['parallel_fraction', 'token_accuracy'])
    """

    unit = "img"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """The task's sections with their defaults: ``model``, ``data`` and ``captioning``.

        >>> c = CaptioningTask.default_config()
        >>> c.model.name, c.captioning.masked_pred_prob, c.data.name
        ('captioner', 0.0, 'fashion_mnist_captions')
        """
        return ml_collections.ConfigDict(
            {"model": dict(_MODEL_DEFAULTS), "data": dict(_DATA_DEFAULTS), "captioning": dict(_CAPTIONING_DEFAULTS)}
        )

    @staticmethod
    def model_keys(model_config) -> tuple[str, ...]:
        """``config.model``'s valid keys (the module docstring lists them).

        >>> "decoder_width" in CaptioningTask.model_keys({})
        True
        """
        del model_config
        return tuple(_MODEL_DEFAULTS)

    def __init__(self, config, workdir: str | None = None):
        self.config = config
        self.workdir = workdir
        self.opts = o = _section(config, "captioning", _CAPTIONING_DEFAULTS)
        self.data_cfg = d = _section(config, "data", _DATA_DEFAULTS)
        _check_choice("data.name", d.name, DATASETS)
        _check_choice("data.colour_space", d.colour_space, COLOUR_SPACES)
        if not 0.0 <= float(o.label_smoothing) < 1.0:
            raise ConfigError(f"config.captioning.label_smoothing={o.label_smoothing!r} must be in [0, 1)")
        if not 0.0 <= float(o.masked_pred_prob) <= 1.0:
            raise ConfigError(f"config.captioning.masked_pred_prob={o.masked_pred_prob!r} must be in [0, 1]")
        if not isinstance(o.num_beams, int) or o.num_beams < 1:
            raise ConfigError(f"config.captioning.num_beams={o.num_beams!r} must be an int >= 1 (1: greedy)")
        _check_choice("captioning.decode", o.decode, DECODE_MODES)
        if o.decode == "parallel" and not float(o.masked_pred_prob) > 0:
            raise ConfigError(
                "config.captioning.decode='parallel' predicts every position from [MASK] inputs, which only a decoder "
                "trained with parallel prediction can do: set config.captioning.masked_pred_prob > 0 (CapPa: 0.75)"
            )
        self.batch_size, self.eval_batch_size = int(config.batch_size), int(config.eval_batch_size)
        self.seed = int(config.seed)
        self.mean, self.std = _per_channel("mean", d.mean), _per_channel("std", d.std)
        self._load_data()
        self._batch_grouping = self._grouping()
        m = _section(config, "model", _MODEL_DEFAULTS)
        self.tokenizer = self._word_tokenizer()
        self.context_length = int(m.context_length)
        tok = self.tokenizer
        mask_id = tok.vocab_size if float(o.masked_pred_prob) > 0 else None
        vocab = tok.vocab_size + (mask_id is not None)
        self.model = captioner_from_config(m, vocab, tok.sot_id, tok.eot_id, tok.pad_id, mask_id)

    # -- model --------------------------------------------------------------------------------------------------
    def init_params(self, rng, batch):
        """Initial Captioner params (shapes from one host batch)."""
        images, ids = self._images(jnp.asarray(batch["image"][:1])), jnp.asarray(batch["ids"][:1, :-1])
        return init_model_params(self.model, {"params": rng, "dropout": rng}, images, ids)

    def _inputs_targets(self, ids):
        ids = jnp.asarray(ids)
        targets = ids[:, 1:]
        return ids[:, :-1], targets, (targets != self.model.decoder.pad_id).astype(jnp.float32)

    def loss(self, params, batch, rng, *, train: bool = True, axis_name=None):
        """Token cross-entropy over the global batch's non-pad targets (identical in every parallel mode) and
        metrics ``token_accuracy`` (this device's rows) and ``parallel_fraction`` (rows trained CapPa-style)."""
        inputs, targets, weights = self._inputs_targets(batch["ids"])
        r_mask, r_drop = jax.random.split(rng)
        parallel = None
        p = float(self.opts.masked_pred_prob)
        if p > 0 and train:
            parallel = jax.random.bernoulli(r_mask, p, (inputs.shape[0],))
            inputs = jnp.where(parallel[:, None], self.model.decoder.mask_id, inputs)
        logits, _ = self.model.apply(
            {"params": params},
            self._images(batch["image"]),
            inputs,
            parallel=parallel,
            train=train,
            rngs={"dropout": r_drop},
        )
        loss, token_accuracy = token_cross_entropy(
            logits, targets, weights, float(self.opts.label_smoothing), axis_name=axis_name
        )
        metrics = {
            "token_accuracy": token_accuracy,
            "parallel_fraction": jnp.mean(parallel.astype(jnp.float32)) if parallel is not None else jnp.zeros(()),
        }
        return loss, metrics

    def _greedy_ids(self, params, images):
        """Greedy decoding inside a compiled step: ``[B, L - 1]`` ids after the start token, ``pad`` after the end
        of text (a fixed number of steps: one per caption position)."""
        model, cfg = self.model, self.model.decoder
        encoded = model.apply({"params": params}, images, method="encode")
        B, steps = images.shape[0], self.context_length - 1
        cache = model.init_cache(B, self.context_length, encoded.shape[1])
        start = jnp.full((B, 1), cfg.bos_id, jnp.int32)
        logits, cache = model.apply({"params": params}, start, encoded=encoded, cache=cache, method="decode")

        def step(carry, _):
            logits, cache, done = carry
            token = jnp.where(done, cfg.pad_id, jnp.argmax(logits[:, -1], -1).astype(jnp.int32))
            done = done | (token == cfg.eos_id)
            logits, cache = model.apply({"params": params}, token[:, None], cache=cache, method="decode")
            return (logits, cache, done), token

        _, tokens = jax.lax.scan(step, (logits, cache, jnp.zeros((B,), bool)), None, length=steps)
        return tokens.T

    def _parallel_ids(self, params, images):
        """CapPa's parallel decoding inside a compiled step (:func:`mmjax.generate.parallel_predict`): ``[B, L - 1]``
        ids, ``pad`` after the end of text."""
        from mmjax.generate import parallel_predict

        return parallel_predict(self.model, params, images, self.context_length - 1)[0]

    def eval_metrics(self, params, batch, *, axis_name=None):
        """Sums over the real rows of one eval batch: ``loss``, ``token_accuracy`` (teacher forcing) and the greedy
        ``exact_match`` (test split) / ``heldout_exact_match`` (held-out combinations) for the captions data."""
        del axis_name  # every sum here is per row
        images = self._images(batch["image"])
        inputs, targets, weights = self._inputs_targets(batch["ids"])
        logits, _ = self.model.apply({"params": params}, images, inputs)
        mask = batch["mask"].astype(jnp.float32)
        tokens = jnp.maximum(jnp.sum(weights, -1), 1.0)
        ce = jax.vmap(lambda lg, t, w: softmax_cross_entropy(lg, t, where=w))(logits, targets, weights)
        correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights, -1) / tokens
        exact = {"": jnp.all(self._greedy_ids(params, images) == targets, axis=-1).astype(jnp.float32)}
        if self.model.decoder.mask_id is not None:
            exact["parallel_"] = jnp.all(self._parallel_ids(params, images) == targets, axis=-1).astype(jnp.float32)
        out = {
            "count": jnp.sum(mask),
            "loss": jnp.sum(mask * ce),
            "token_accuracy": jnp.sum(mask * correct),
        }
        for kind, hits in exact.items():
            if self.has_attributes:
                total = float(sum(self.group_sizes))
                for g, prefix in ((0, ""), (1, "heldout_")):
                    w = mask * (batch["group"] == g) * (total / max(self.group_sizes[g], 1))
                    out[f"{prefix}{kind}exact_match"] = jnp.sum(w * hits)
            else:
                out[f"{kind}exact_match"] = jnp.sum(mask * hits)
        return out

    # -- final report -------------------------------------------------------------------------------------------
    def caption_images(
        self,
        params,
        images,
        batch_size: int | None = None,
        *,
        decode: str | None = None,
        num_beams: int | None = None,
        length_penalty: float | None = None,
        max_new_tokens: int | None = None,
        with_scores: bool = False,
    ):
        """Captions of ``images`` (uint8 ``[N, S, S, 3]``) by :func:`mmjax.generate.generate` (greedy when
        ``num_beams`` is 1) or by :func:`mmjax.generate.parallel_decode` (``decode="parallel"``), decoded to text,
        in chunks of ``batch_size`` (default ``eval_batch_size``; the last chunk padded: one compiled program).
        ``decode``, ``num_beams``, ``length_penalty`` default to the run's ``config.captioning``, ``max_new_tokens``
        to every position after the start token. Returns the texts, and their scores with ``with_scores``."""
        from mmjax.generate import generate, parallel_decode

        batch_size = batch_size or self.eval_batch_size
        decode = self.opts.decode if decode is None else decode
        num_beams = int(self.opts.num_beams if num_beams is None else num_beams)
        length_penalty = float(self.opts.length_penalty if length_penalty is None else length_penalty)
        max_new_tokens = self.context_length - 1 if max_new_tokens is None else max_new_tokens
        texts: list[str] = []
        scores: list[float] = []
        for start in range(0, len(images), batch_size):
            chunk = np.asarray(images[start : start + batch_size])
            real = len(chunk)
            if real < batch_size:  # one compiled program: pad the last chunk
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
            pixels = self._images(jnp.asarray(chunk))
            if decode == "parallel":
                out = parallel_decode(self.model, params, pixels)
            else:
                out = generate(
                    self.model,
                    params,
                    pixels,
                    max_new_tokens=max_new_tokens,
                    num_beams=num_beams,
                    length_penalty=length_penalty,
                )
            texts += [self.tokenizer.decode(row) for row in np.asarray(out.sequences)[:real]]
            scores += [float(x) for x in np.asarray(out.scores)[:real]]
        return (texts, scores) if with_scores else texts

    def scoring_classifier(self, params, images, attribute: str = "item", batch_size: int = 4096) -> np.ndarray:
        """CapPa's zero-shot scoring classifier: for each image the class whose prompts
        (:data:`mmjax.data.captions.ZERO_SHOT_TEMPLATES`, e.g. the 80 captions of "sneaker" over size, colour and
        position) have the largest ``logsumexp`` of log-likelihoods (the marginal likelihood of the class). Returns
        the predicted class per image."""
        from mmjax.data.captions import ATTRIBUTES, ZERO_SHOT_TEMPLATES
        from mmjax.generate import log_likelihood

        names, templates = ATTRIBUTES[attribute], ZERO_SHOT_TEMPLATES[attribute]
        ids = self.tokenizer([t.format(n) for n in names for t in templates], context_length=self.context_length)
        ll = log_likelihood(self.model, params, self._images(jnp.asarray(images)), ids, batch_size=batch_size)
        ll = np.asarray(ll, np.float64).reshape(len(images), len(names), len(templates))
        top = ll.max(-1, keepdims=True)
        return np.argmax((top + np.log(np.exp(ll - top).sum(-1, keepdims=True)))[..., 0], axis=1)

    def final_report(self, params, workdir: str) -> dict[str, Any]:
        """Generated captions of every evaluation image, scored (see the module docstring); written to
        ``workdir/report.json``, ``workdir/captions.jsonl`` and ``workdir/caption_grid.png``."""
        from mmjax import evaluate as ev

        if jax.process_count() > 1 or not self.opts.final_report:
            return {}
        params = jax.device_get(params)
        os.makedirs(workdir, exist_ok=True)
        source = self.eval_source
        images = np.stack([source[i]["image"] for i in range(len(source))])
        truth = [source[i]["captions"][0] for i in range(len(source))]
        texts = self.caption_images(params, images)
        split = lambda t: " ".join(self.tokenizer.split(t))  # noqa: E731  (the metrics' tokenisation)
        report: dict[str, Any] = {}
        group = source.extras["group"] if self.has_attributes else np.zeros(len(source), np.int32)
        for g, prefix in ((0, ""), (1, "heldout_")):
            rows = np.flatnonzero(group == g)
            if not len(rows):
                continue
            refs = [[split(truth[i])] for i in rows]
            cands = [split(texts[i]) for i in rows]
            report[f"{prefix}exact_match"] = float(np.mean([c == r[0] for c, r in zip(cands, refs)]))
            report[f"{prefix}bleu4"] = ev.bleu(refs, cands)["BLEU-4"]
            report[f"{prefix}cider_d"] = ev.cider_d(refs, cands)
            if self.has_attributes:
                from mmjax.data.captions import parse_caption

                parsed = [parse_caption(texts[i]) for i in rows]
                for attr in ("item", "colour", "size", "position"):
                    want = source.extras[attr][rows]
                    report[f"{prefix}{attr}_accuracy"] = float(np.mean([p[attr] for p in parsed] == want))
        if self.has_attributes and int(self.opts.scoring_examples) > 0:
            rows = np.flatnonzero(group == 0)[: int(self.opts.scoring_examples)]
            pred = self.scoring_classifier(params, images[rows])
            report["scoring_classifier_item_accuracy"] = float(np.mean(pred == source.extras["item"][rows]))
            report["scoring_classifier_examples"] = len(rows)
        exact = [split(c) == split(t) for c, t in zip(texts, truth)]
        with open(os.path.join(workdir, "captions.jsonl"), "w") as f:
            for i, (t, c) in enumerate(zip(truth, texts)):
                row = {"index": i, "group": int(group[i]), "caption": t, "generated": c, "exact": exact[i]}
                f.write(json.dumps(row) + "\n")
        shown = list(np.flatnonzero(group == 0)[:8]) + list(np.flatnonzero(group == 1)[:8])
        report["caption_grid_png"] = _caption_grid(images, texts, exact, group, shown, workdir)
        report["checkpoint_dir"] = os.path.join(workdir, "checkpoints")
        return write_report(report, workdir, "captioning")


def _caption_grid(images, texts, exact, group, rows, workdir: str) -> str:
    """A PNG of the images ``rows``, each titled with its generated caption (green: exact, red: not)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise UserError("no evaluation images to draw")
    cols = 4
    fig = Figure(figsize=(3.2 * cols, 2.9 * (-(-len(rows) // cols))))
    FigureCanvasAgg(fig)
    for n, i in enumerate(rows):
        ax = fig.add_subplot(-(-len(rows) // cols), cols, n + 1)
        ax.imshow(images[i])
        ax.set_axis_off()
        tag = "held-out" if group[i] == 1 else "test"
        ax.set_title(f"{tag}: {texts[i]}", fontsize=7, color="green" if exact[i] else "red", wrap=True)
    fig.tight_layout()
    path = os.path.join(workdir, "caption_grid.png")
    fig.savefig(path, dpi=110)
    return path
