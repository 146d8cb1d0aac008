"""CoCa training as a task of the engine (:mod:`mmjax.train.task`): a :class:`mmjax.coca.CoCa` (CLIP's two towers +
a text decoder over the image tokens) trained with both losses in one pass of the image tower.

On a global batch of ``B`` captioned images, with caption ids ``y = [bos, w_1, ..., w_n, eos, pad, ...]``::

    caption     = sum_{b,t} m_bt CE_ls(logits_bt, y_b,t+1) / sum_{b,t} m_bt,   m_bt = [y_b,t+1 != pad]
    contrastive = ( sum_i CE(e^t u_i V^T, i) + sum_i CE(e^t v_i U^T, i) ) / (2 B),   t = min(logit_scale, log 100)
    loss        = caption_loss_weight * caption + contrastive_loss_weight * contrastive

``caption`` is :class:`mmjax.train.captioning.CaptioningTask`'s loss (teacher forcing: the decoder reads ``y[:, :-1]``;
label smoothing ``CE_ls``; the end-of-text token counts, padding does not; under pmap each device's mean is weighted
by its share of the global tokens) and ``contrastive`` :class:`mmjax.train.contrastive.ContrastiveTask`'s softmax
loss (negatives from the whole global batch in every parallel mode, :func:`mmjax.losses.softmax_contrastive_loss`).
CoCa's weights are the defaults: 2.0 and 1.0.

Options (``config.coca``): ``caption_loss_weight`` (2.0), ``contrastive_loss_weight`` (1.0), ``label_smoothing``
(0.0, caption tokens only), ``final_report`` (True).

Model (``config.model``, ``name="coca"``): the contrastive task's CLIP keys (any :class:`mmjax.clip.CLIPConfig`
field, ``preset``, ``dtype``; the run's word vocabulary sets ``vocab_size`` and ``eot_id``, see
:mod:`mmjax.train.contrastive`) and the decoder's: ``decoder_width``, ``decoder_depth``, ``decoder_num_heads``,
``decoder_mlp_dim`` (0: the text tower's width, depth, heads, and 4 x the decoder width), ``decoder_activation``,
``tie_embeddings``. The decoder reads ``context_length`` positions (the text tower's) and uses the tokenizer's
``<|startoftext|>``, ``<|endoftext|>`` and ``<pad>`` as ``bos_id``, ``eos_id`` and ``pad_id``. Only the word
tokenizer is supported: a CLIP BPE tokenizer pads with the end-of-text id, which the caption loss's padding mask
would drop. Data (``config.data``): as the contrastive task (:func:`mmjax.train.contrastive.caption_sources`).

Metrics: ``caption_loss``, ``contrastive_loss``, ``token_accuracy`` (this device's rows), ``logit_scale``.
Evaluation (summed by the engine): the contrastive task's numbers (``contrastive_loss``, in-batch retrieval, zero-shot
``item_accuracy`` / ``colour_accuracy`` / ``combo_accuracy`` and their ``heldout_`` twins for the Fashion-MNIST
captions), the captioning task's (``caption_loss``, ``token_accuracy``, greedy ``exact_match`` and
``heldout_exact_match``) and ``loss``, their weighted sum. The final report is the captioning task's (generated
captions: exact match, BLEU-4, CIDEr-D, attributes parsed from the captions, ``captions.jsonl``, a caption grid),
without its scoring classifier (CoCa's zero-shot classifier is the contrastive one, already in the evaluation).

Both parent tasks' evaluation code runs unchanged: :class:`CoCaTask` holds a ``ContrastiveTask`` and a
``CaptioningTask`` that share its data side (built without loading anything twice), the first over the ``clip/...``
parameters, the second over a :class:`CoCa` seen as a captioner (:class:`CoCaCaptioner`).

>>> from mmjax.train.task import resolve_task_class
>>> resolve_task_class("coca").__name__
'CoCaTask'
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mmjax.clip import CLIP
from mmjax.coca import CoCa
from mmjax.decoder import DecoderConfig
from mmjax.errors import ConfigError
from mmjax.losses import softmax_contrastive_loss
from mmjax.train import contrastive
from mmjax.train.captioning import _CAPTIONING_DEFAULTS, CaptioningTask, token_cross_entropy
from mmjax.train.contrastive import (
    _CONTRASTIVE_DEFAULTS,
    _DATA_DEFAULTS,
    COLOUR_SPACES,
    DATASETS,
    ContrastiveTask,
    ImageTextData,
    _check_choice,
    _dtype,
    _per_channel,
    _section,
)

__all__ = ["CoCaTask", "CoCaCaptioner"]

_COCA_DEFAULTS = dict(caption_loss_weight=2.0, contrastive_loss_weight=1.0, label_smoothing=0.0, final_report=True)
_DECODER_DEFAULTS = dict(
    decoder_width=0,  # 0: the text tower's width
    decoder_depth=0,  # 0: the text tower's depth
    decoder_num_heads=0,  # 0: the text tower's heads
    decoder_mlp_dim=0,  # 0: 4 x decoder_width
    decoder_activation="gelu",
    tie_embeddings=True,
)
_MODEL_DEFAULTS = {**contrastive._MODEL_DEFAULTS, "name": "coca", **_DECODER_DEFAULTS}


class CoCaCaptioner(CoCa):
    """A :class:`mmjax.coca.CoCa` called as a :class:`mmjax.captioner.Captioner`: ``apply(v, images,
    decoder_input_ids, parallel=None, train=False) -> (logits, intermediates)`` over the same parameters (the image
    tower and the decoder only), so the captioning task's evaluation and report run on it unchanged.

    >>> from mmjax.decoder import DecoderConfig
    >>> dec = DecoderConfig(vocab_size=64, width=32, depth=1, num_heads=2, mlp_dim=32, max_length=12)
    >>> images, ids = jnp.zeros((2, 16, 16, 3)), jnp.ones((2, 3), jnp.int32)
    >>> params = CoCa("tiny", decoder=dec).init(jax.random.key(0), images, ids, ids)["params"]
    >>> logits, _ = CoCaCaptioner("tiny", decoder=dec).apply({"params": params}, images, ids)
    >>> logits.shape
    (2, 3, 64)
    """

    def __call__(self, images, decoder_input_ids, *, parallel=None, train: bool = False):
        encoded = self.encode(images, train=train)
        logits, intermediates = self.text_decoder(decoder_input_ids, encoded, parallel=parallel, train=train)
        return logits, {**intermediates, "encoded": encoded}


@functools.lru_cache(maxsize=8)
def _init_program(model: CoCa):
    """The compiled initialisation of ``model`` (eager initialisation of three transformers runs op by op and takes
    longer than compiling; cached per model, so a resumed run or a second task in one process compiles it once)."""
    return jax.jit(
        lambda rng, images, ids: model.init({"params": rng, "dropout": rng}, images, ids, ids[:, :-1])["params"]
    )


def _sharing(cls, task, **attributes):
    """An instance of the task class ``cls`` that shares ``task``'s data side (sources, tokenizer, batches, image
    normalisation: the attributes :class:`ImageTextData` reads), with ``attributes`` on top; ``cls.__init__`` is not
    run, so nothing is loaded twice."""
    other = object.__new__(cls)
    other.__dict__.update(vars(task))
    other.__dict__.update(attributes)
    return other


class CoCaTask(ImageTextData):
    """Trains a :class:`mmjax.coca.CoCa` on image-caption data (see the module docstring).

    Batches as the contrastive task's: ``{"image": uint8 [b, S, S, 3], "ids": int32 [b, L]}`` (evaluation adds
    ``mask`` and the attributes).

    >>> import os, tempfile
    >>> import numpy as np
    >>> from mmjax.data import write_idx
    >>> from mmjax.train.config import prepare_config
    >>> data = tempfile.mkdtemp()
    >>> for prefix in ("train", "t10k"):
    ...     write_idx(os.path.join(data, f"{prefix}-images-idx3-ubyte"), np.full((10, 28, 28), 200, np.uint8))
    ...     write_idx(os.path.join(data, f"{prefix}-labels-idx1-ubyte"), np.arange(10, dtype=np.uint8))
    >>> config = prepare_config({
    ...     "task": "coca", "batch_size": 4, "eval_batch_size": 4,
    ...     "model": {"preset": "tiny", "vision_depth": 1, "text_depth": 1, "decoder_width": 16},
    ...     "data": {"data_dir": data, "image_size": 16, "num_train": 8, "num_test": 4, "num_heldout": 4},
    ...     "coca": {"final_report": False}})
    >>> task = CoCaTask(config)
    >>> batch = next(task.train_batches(0))
    >>> params = jax.eval_shape(task.init_params, jax.random.key(0), batch)  # shapes only: nothing compiles
    >>> loss, metrics = jax.eval_shape(lambda p: task.loss(p, batch, jax.random.key(1)), params)
    >>> sorted(params), loss.shape, sorted(metrics)
    (['clip', 'encoder_norm', 'encoder_proj', 'text_decoder'], (), ['caption_loss', 'contrastive_loss', \
'logit_scale', 'token_accuracy'])
    >>> task.model.decoder.depth, task.model.decoder.mlp_dim  # 0: the text tower's depth, 4 x decoder_width
    (1, 64)
    """

    unit = "pairs"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """The task's sections with their defaults: ``model``, ``data`` and ``coca``.

        >>> c = CoCaTask.default_config()
        >>> c.model.name, c.coca.caption_loss_weight, c.coca.contrastive_loss_weight
        ('coca', 2.0, 1.0)
        """
        return ml_collections.ConfigDict(
            {"model": dict(_MODEL_DEFAULTS), "data": dict(_DATA_DEFAULTS), "coca": dict(_COCA_DEFAULTS)}
        )

    @staticmethod
    def model_keys(model_config) -> tuple[str, ...]:
        """``config.model``'s valid keys: the contrastive task's (CLIP's) and the decoder's.

        >>> keys = CoCaTask.model_keys({})
        >>> "text_width" in keys, "decoder_width" in keys, "tie_embeddings" in keys
        (True, True, True)
        """
        return tuple(ContrastiveTask.model_keys(model_config)) + tuple(_DECODER_DEFAULTS)

    def __init__(self, config, workdir: str | None = None):
        self.config = config
        self.workdir = workdir
        self.opts = o = _section(config, "coca", _COCA_DEFAULTS)
        self.data_cfg = d = _section(config, "data", _DATA_DEFAULTS)
        _check_choice("data.name", d.name, DATASETS)
        _check_choice("data.colour_space", d.colour_space, COLOUR_SPACES)
        for key in ("caption_loss_weight", "contrastive_loss_weight"):
            value = o[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"config.coca.{key}={value!r} must be a number >= 0")
        if not 0.0 <= float(o.label_smoothing) < 1.0:
            raise ConfigError(f"config.coca.label_smoothing={o.label_smoothing!r} must be in [0, 1)")
        accum = config.optimizer.get("grad_accum_steps", 1) if "optimizer" in config else 1
        if accum != 1:
            raise ConfigError(
                f"config.optimizer.grad_accum_steps={accum} would contrast each micro-batch on its own (negatives only "
                "within it), which is not CoCa's loss; set config.optimizer.grad_accum_steps=1"
            )
        self.batch_size, self.eval_batch_size = int(config.batch_size), int(config.eval_batch_size)
        self.seed = int(config.seed)
        self.mean, self.std = _per_channel("mean", d.mean), _per_channel("std", d.std)
        self._load_data()
        self._batch_grouping = self._grouping()
        self._build_model(_section(config, "model", _MODEL_DEFAULTS).to_dict())

    def _build_model(self, m: dict) -> None:
        if m.get("name") != "coca":
            raise ConfigError(
                f"config.model.name={m.get('name')!r} is not valid for the coca task; valid choices: ['coca']"
            )
        if m.get("tokenizer", "word") != "word":
            raise ConfigError(
                f"config.model.tokenizer={m['tokenizer']!r} is not supported by the coca task; valid choices: ['word'] "
                "(the caption loss masks padding, and CLIP's BPE tokenizer pads with the end-of-text id)"
            )
        # the CLIP part, as the contrastive task reads it (word vocabulary, image size, preset, CLIPConfig fields)
        self._clip = _sharing(
            ContrastiveTask, self, opts=ml_collections.ConfigDict(dict(_CONTRASTIVE_DEFAULTS)), groups=1
        )
        clip_keys = {k: v for k, v in m.items() if k not in _DECODER_DEFAULTS}
        self._clip._build_model({**clip_keys, "name": "clip"})
        self.tokenizer, self.context_length = self._clip.tokenizer, self._clip.context_length
        self.clip_config = c = self._clip.clip_config
        dtype = _dtype(m.get("dtype", "float32"))
        if dtype == jnp.float32:  # the parameters' dtype: float32, or float64 when a test runs the task under x64
            dtype = None
        width = int(m["decoder_width"]) or c.text_width
        tok = self.tokenizer
        try:
            decoder = DecoderConfig(
                vocab_size=c.vocab_size,
                width=width,
                depth=int(m["decoder_depth"]) or c.text_depth,
                num_heads=int(m["decoder_num_heads"]) or c.text_heads,
                mlp_dim=int(m["decoder_mlp_dim"]) or 4 * width,
                max_length=c.context_length,
                activation=m["decoder_activation"],
                tie_embeddings=bool(m["tie_embeddings"]),
                attention_implementation=c.attention_implementation,
                bos_id=tok.sot_id,
                eos_id=tok.eot_id,
                pad_id=tok.pad_id,
                dtype=dtype,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.model: {e}") from e
        self.model = CoCa(c, decoder=decoder, dtype=dtype)
        self._clip.model = CLIP(c, dtype=dtype)  # the same module as CoCa's clip/...
        self._clip._prompts = self._clip._build_prompts()
        captioning = {"final_report": bool(self.opts.final_report), "scoring_examples": 0}
        self._captioner = _sharing(
            CaptioningTask,
            self,
            opts=ml_collections.ConfigDict({**_CAPTIONING_DEFAULTS, **captioning}),
            model=CoCaCaptioner(c, decoder=decoder, dtype=dtype),
        )

    # -- model --------------------------------------------------------------------------------------------------
    def init_params(self, rng, batch):
        """Initial CoCa params (shapes from one host batch)."""
        images, ids = self._images(jnp.asarray(batch["image"][:1])), jnp.asarray(batch["ids"][:1])
        return _init_program(self.model)(rng, images, ids)

    def loss(self, params, batch, rng, *, train: bool = True, axis_name=None):
        """``caption_loss_weight * caption + contrastive_loss_weight * contrastive`` of the global batch (identical
        in every parallel mode; see the module docstring), from one forward pass, and the metrics."""
        ids = jnp.asarray(batch["ids"])
        inputs, targets, weights = self._captioner._inputs_targets(ids)
        out = self.model.apply(
            {"params": params}, self._images(batch["image"]), ids, inputs, train=train, rngs={"dropout": rng}
        )
        caption, token_accuracy = token_cross_entropy(
            out.logits, targets, weights, float(self.opts.label_smoothing), axis_name=axis_name
        )
        log_scale = self._log_scale(params)
        contrast = softmax_contrastive_loss(out.image_embeds, out.text_embeds, log_scale, axis_name=axis_name)
        loss = float(self.opts.caption_loss_weight) * caption + float(self.opts.contrastive_loss_weight) * contrast
        metrics = {
            "caption_loss": caption,
            "contrastive_loss": contrast,
            "token_accuracy": token_accuracy,
            "logit_scale": jnp.exp(log_scale),
        }
        return loss, metrics

    def _log_scale(self, params):
        """``min(logit_scale, max_logit_scale)`` in float32 or wider (the contrastive task's ``log_scale`` rounds it to
        float32, which a float64 check of the parallel modes would see)."""
        s = params["clip"]["logit_scale"]
        s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
        cap = self.clip_config.max_logit_scale
        return s if cap is None else jnp.minimum(s, cap)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def eval_metrics(self, params, batch, *, axis_name=None):
        """Sums over the real rows of one eval batch: the contrastive task's metrics (``loss`` renamed
        ``contrastive_loss``), the captioning task's (``loss`` renamed ``caption_loss``) and their weighted ``loss``."""
        out = self._clip.eval_metrics(params["clip"], batch, axis_name=axis_name)
        out["contrastive_loss"] = out.pop("loss")
        caption = self._captioner.eval_metrics(params, batch, axis_name=axis_name)
        caption["caption_loss"] = caption.pop("loss")
        out.update(caption)
        out["loss"] = (
            float(self.opts.caption_loss_weight) * out["caption_loss"]
            + float(self.opts.contrastive_loss_weight) * out["contrastive_loss"]
        )
        return out

    def final_report(self, params, workdir: str) -> dict[str, Any]:
        """The captioning task's report of the generated captions (see the module docstring); ``{}`` when
        ``config.coca.final_report`` is off or the run has several processes."""
        return self._captioner.final_report(params, workdir)
