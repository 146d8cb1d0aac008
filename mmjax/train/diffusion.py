"""Text-to-image diffusion as a task: a DiT denoiser conditioned on a caption's text tower, trained by the engine.

The model (:class:`TextToImage`) is a :class:`mmjax.text.TextTransformer` over the caption (word tokenizer) and a
:class:`mmjax.dit.DiT` over the noisy image: the text tower's pooled end-of-text feature is added to the timestep
embedding (``model.conditioning`` ``"pooled"``), its token features are attended by cross-attention in every block
(``"tokens"``), or both (``"both"``). Both are trained jointly; for ``model.class_dropout_prob`` of the training
examples the condition is replaced by the DiT's learned null condition (what classifier-free guidance needs).

Training (:meth:`DiffusionTask.loss`): images ``uint8 [B, S, S, 3]`` become ``x0 = image / 127.5 - 1`` in ``[-1, 1]``;
``t ~ U{0, ..., T-1}``, ``noise ~ N(0, I)``, ``x_t = q_sample(x0, noise, t)`` and the loss is
:func:`mmjax.diffusion.diffusion_loss` (``prediction_type`` ``epsilon`` / ``v_prediction`` / ``sample``, uniform or
min-SNR-gamma weights). Evaluation (:meth:`DiffusionTask.eval_metrics`) is the same loss at timesteps and noise fixed
per evaluation example (drawn once from ``config.seed``), so it is deterministic and equal across parallel modes.

:meth:`DiffusionTask.final_report` samples images for the captions of the test split and of the held-out
(colour, item) combinations with :func:`mmjax.diffusion.sample` and classifier-free guidance, judges their item with
a classifier trained on the real training images (:mod:`mmjax.evaluate.judge`, its own accuracy beside), reads
their colour (and, on the ``"canvas"`` layout, size and position) back from the pixels
(:func:`mmjax.data.captions.measure_attributes`), computes the Frechet distance to the real images on the judge's
features with the real-train vs real-test floor, and saves PNG grids of samples per prompt. With
``config.image_every`` the engine saves such a grid (:meth:`DiffusionTask.sample_images`) as training goes.

The text tower is trained jointly by default; ``config.model.text_encoder_from=DIR`` loads the text tower, tokenizer
and context length of the CLIP run in ``DIR`` (e.g. ``runs/demo`` of ``make demo``) and keeps it frozen (the
``text_*`` keys are then unused).

Config (:meth:`DiffusionTask.default_config`): ``model`` (the :class:`mmjax.dit.DiT` fields, ``conditioning``, the
text tower's ``text_width``, ``text_depth``, ``text_heads``, ``text_mlp_dim``, ``context_length``, ``dtype``), ``data``
(the Fashion-MNIST captions: ``data_dir``, ``image_size``, ``layout``, ``num_train``, ``num_test``, ``num_heldout``,
``data_seed``) and ``diffusion`` (schedule, loss, sampling and report options).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import diffusion
from mmjax.data import image_text
from mmjax.dit import DiT
from mmjax.errors import ConfigError, UserError
from mmjax.text import TextTransformer
from mmjax.train.contrastive import _section, run_word_tokenizer
from mmjax.train.task import init_model_params

CONDITIONING = ("pooled", "tokens", "both")

_TEXT_KEYS = dict(text_width=128, text_depth=1, text_heads=4, text_mlp_dim=256, context_length=16)
_MODEL_DEFAULTS = dict(
    name="dit",
    conditioning="pooled",
    text_encoder_from="",  # a CLIP (contrastive) run's workdir: its text tower and tokenizer, frozen
    dtype="float32",
    variant=None,
    width=128,
    depth=4,
    num_heads=4,
    patch_size=4,
    class_dropout_prob=0.1,
    **_TEXT_KEYS,
)
_MODEL_KEYS = ("name", "conditioning", "dtype", "text_encoder_from", *_TEXT_KEYS)
_DATA_DEFAULTS = dict(
    name="fashion_mnist_captions",
    data_dir="",
    image_size=32,
    layout="canvas",
    num_train=0,
    num_test=500,
    num_heldout=500,
    data_seed=0,
)
_DIFFUSION_DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    snr_gamma=0.0,  # 0: uniform weights; > 0: min-SNR-gamma
    sampler="ddim",
    num_sampling_steps=50,
    guidance_scale=3.0,
    num_prompts=8,  # distinct prompts of each split in the final report's sample grids
    samples_per_prompt=4,
    num_eval_samples=64,  # captions of each split generated and scored by the final report (0: grids only)
    judge_steps=300,  # training steps of the final report's item classifier
    final_report=True,
)


class TextToImage(nn.Module):
    """A caption's text tower driving a DiT denoiser.

    Call: ``model.apply({"params": p}, x_t, t, ids, drop=None, deterministic=True)`` with ``x_t [B, S, S, C]``,
    ``t [B]`` integer timesteps, ``ids int [B, L]`` (padding ``pad_id``); returns the DiT's ``(output, aux)``,
    ``output [B, S, S, C]``. Parameters: ``text`` (the :class:`mmjax.text.TextTransformer`) and ``dit``.

    >>> model = TextToImage(TextTransformer(vocab_size=9, width=8, depth=1, num_heads=2, context_length=4, eot_id=3),
    ...                     DiT(variant=None, width=8, depth=1, num_heads=2, patch_size=4, pooled_text_dim=8))
    >>> x, t, ids = jnp.zeros((2, 8, 8, 3)), jnp.array([1, 500]), jnp.array([[2, 5, 3, 0], [2, 6, 7, 3]])
    >>> params = model.init(jax.random.key(0), x, t, ids)["params"]
    >>> out, aux = model.apply({"params": params}, x, t, ids)
    >>> sorted(params), out.shape
    (['dit', 'text'], (2, 8, 8, 3))
    """

    text: TextTransformer
    dit: DiT
    conditioning: str = "pooled"
    pad_id: int = 0

    @nn.compact
    def __call__(self, x_t, t, ids, *, drop=None, deterministic: bool = True):
        mask = ids != self.pad_id
        pooled, aux = self.text(ids, attention_mask=mask, train=not deterministic)
        kw: dict[str, Any] = {}
        if self.conditioning in ("pooled", "both"):
            kw["text_pooled"] = pooled
        if self.conditioning in ("tokens", "both"):
            kw.update(text_tokens=aux["tokens"], text_mask=mask)
        return self.dit(x_t, t, drop=drop, deterministic=deterministic, **kw)


class DiffusionTask:
    """Text-to-image diffusion on captioned images (see :mod:`mmjax.train.task` for the contract).

    Batches: ``{"image": uint8 [b, S, S, 3], "ids": int32 [b, L]}``; evaluation adds ``mask`` and the fixed ``t``
    ``int32 [b]`` and ``noise`` ``float32 [b, S, S, 3]`` of each example. Metrics: ``loss`` (train and eval).

    A tiny run's batch, loss and evaluation sums, on ten Fashion-MNIST-format images written as IDX files:

    >>> import tempfile
    >>> from mmjax.data import write_idx
    >>> from mmjax.train.config import prepare_config
    >>> data = tempfile.mkdtemp()
    >>> for prefix in ("train", "t10k"):
    ...     write_idx(os.path.join(data, f"{prefix}-images-idx3-ubyte"), np.full((10, 28, 28), 200, np.uint8))
    ...     write_idx(os.path.join(data, f"{prefix}-labels-idx1-ubyte"), np.arange(10, dtype=np.uint8))
    >>> config = prepare_config({"task": "diffusion", "batch_size": 4, "eval_batch_size": 4,
    ...     "model": {"width": 16, "depth": 1, "num_heads": 2, "text_width": 16, "text_heads": 2, "text_mlp_dim": 16},
    ...     "data": {"data_dir": data, "image_size": 16, "num_train": 8, "num_test": 4, "num_heldout": 4}})
    >>> task = DiffusionTask(config)
    >>> batch = next(task.train_batches(0))
    >>> batch["image"].shape, batch["ids"].shape
    ((4, 16, 16, 3), (4, 16))
    >>> params = jax.eval_shape(task.init_params, jax.random.key(0), batch)  # shapes only: nothing compiles
    >>> loss, metrics = jax.eval_shape(lambda p: task.loss(p, batch, jax.random.key(1), train=True), params)
    >>> sorted(params), loss.shape, sorted(metrics)
    (['dit', 'text'], (), ['loss'])
    >>> eval_batch = next(iter(task.eval_batches()))
    >>> sorted(eval_batch)
    ['colour', 'group', 'ids', 'image', 'item', 'mask', 'noise', 'position', 'size', 't']
    """

    unit = "img"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """The task's sections with their defaults: ``model``, ``data`` and ``diffusion``.

        >>> c = DiffusionTask.default_config()
        >>> c.model.name, c.model.conditioning, c.diffusion.sampler
        ('dit', 'pooled', 'ddim')
        """
        return ml_collections.ConfigDict(
            {"model": dict(_MODEL_DEFAULTS), "data": dict(_DATA_DEFAULTS), "diffusion": dict(_DIFFUSION_DEFAULTS)}
        )

    @staticmethod
    def model_keys(model_config) -> tuple[str, ...]:
        """``config.model``'s valid keys: the :class:`mmjax.dit.DiT` fields and the text tower's keys.

        >>> "patch_size" in DiffusionTask.model_keys({}), "text_width" in DiffusionTask.model_keys({})
        (True, True)
        """
        del model_config
        dit_fields = tuple(f.name for f in dataclasses.fields(DiT) if f.name not in ("parent", "name"))
        return dit_fields + _MODEL_KEYS

    def __init__(self, config, workdir: str | None = None):
        self.config = config
        self.workdir = workdir
        self.opts = o = _section(config, "diffusion", _DIFFUSION_DEFAULTS)
        self.data_cfg = d = _section(config, "data", _DATA_DEFAULTS)
        if d.name != "fashion_mnist_captions":
            raise ConfigError(f"config.data.name={d.name!r} is not valid; valid choices: ['fashion_mnist_captions']")
        self.schedule = diffusion.make_schedule(o.beta_schedule, int(o.num_train_timesteps))
        diffusion.loss_weight(self.schedule, jnp.zeros(1, jnp.int32), o.prediction_type, o.snr_gamma or None)
        self._check_sampling()
        self.batch_size, self.eval_batch_size = int(config.batch_size), int(config.eval_batch_size)
        self.seed = int(config.seed)
        self._load_data()
        self._build_model(_section(config, "model", _MODEL_DEFAULTS))
        self._programs: dict[tuple, Any] = {}  # compiled sampling loops (see _sampling_program)

    def _check_sampling(self):
        o = self.opts
        if not isinstance(o.num_sampling_steps, int) or not 1 <= o.num_sampling_steps <= o.num_train_timesteps:
            raise ConfigError(
                f"config.diffusion.num_sampling_steps={o.num_sampling_steps!r} must be an int in "
                f"[1, num_train_timesteps={o.num_train_timesteps}]"
            )
        if float(o.guidance_scale) < 0:
            raise ConfigError(f"config.diffusion.guidance_scale={o.guidance_scale!r} must be >= 0 (1 = no guidance)")
        if o.sampler not in diffusion.SAMPLERS:
            raise ConfigError(
                f"config.diffusion.sampler={o.sampler!r} is not valid; valid choices: {diffusion.SAMPLERS}"
            )

    # -- data ---------------------------------------------------------------------------------------------------
    def _load_data(self):
        from mmjax.data.captions import LAYOUTS, make_captions

        d, size = self.data_cfg, int(self.data_cfg.image_size)
        if d.layout not in LAYOUTS:
            raise ConfigError(f"config.data.layout={d.layout!r} is not valid; valid choices: {list(LAYOUTS)}")
        self.train_source = image_text.fashion_mnist_captions(
            "train", int(d.num_train) or None, int(d.data_seed), size, d.data_dir or None, layout=d.layout
        )
        parts = [
            make_captions(
                s, int(n) or None, int(d.data_seed), image_size=size, data_dir=d.data_dir or None, layout=d.layout
            )
            for s, n in (("test", d.num_test), ("heldout", d.num_heldout))
        ]
        cat = lambda f: np.concatenate([getattr(p, f) for p in parts])  # noqa: E731
        n = sum(len(p.captions) for p in parts)
        rng = np.random.default_rng([self.seed, 1])  # the evaluation loss's fixed timesteps and noise
        self.eval_source = image_text.ArrayImageText(
            cat("images"),
            parts[0].captions + parts[1].captions,
            item=cat("item"),
            colour=cat("colour"),
            size=cat("size"),
            position=cat("position"),
            group=np.repeat(np.arange(2, dtype=np.int32), [len(p.captions) for p in parts]),
        )
        self._eval_t = rng.integers(0, int(self.opts.num_train_timesteps), n).astype(np.int32)
        self._eval_noise_seed = [self.seed, 2]
        self.num_train_examples = len(self.train_source)

    def _build_model(self, m):
        m = m.to_dict()
        if m.get("name") != "dit":
            raise ConfigError(
                f"config.model.name={m.get('name')!r} is not valid for the diffusion task; valid: ['dit']"
            )
        if m["conditioning"] not in CONDITIONING:
            raise ConfigError(f"config.model.conditioning={m['conditioning']!r} is not valid; valid: {CONDITIONING}")
        dtype = {"float32": None, "bfloat16": jnp.bfloat16}.get(m["dtype"], "bad")
        if dtype == "bad":
            raise ConfigError(f"config.model.dtype={m['dtype']!r} is not valid; valid: ['float32', 'bfloat16']")
        self.frozen_text = None
        if m["text_encoder_from"]:
            text = self._clip_text_tower(m["text_encoder_from"], dtype)
        else:
            self.tokenizer = run_word_tokenizer(self.workdir, self.train_source.all_captions)
            self.context_length = int(m["context_length"])
            text = TextTransformer(
                vocab_size=self.tokenizer.vocab_size,
                width=int(m["text_width"]),
                depth=int(m["text_depth"]),
                num_heads=int(m["text_heads"]),
                mlp_dim=int(m["text_mlp_dim"]),
                context_length=self.context_length,
                activation="gelu",
                eot_id=self.tokenizer.eot_id,
                dtype=dtype,
            )
        dit_kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in m.items() if k not in _MODEL_KEYS}
        width = text.get_encoder_config().width
        dit_kw["pooled_text_dim"] = width if m["conditioning"] in ("pooled", "both") else None
        dit_kw["text_token_dim"] = width if m["conditioning"] in ("tokens", "both") else None
        try:
            dit = DiT(dtype=dtype, **dit_kw)
            dit.sizes()
        except TypeError as e:
            raise ConfigError(f"config.model: {e}; valid keys: {sorted(self.model_keys(m))}") from e
        self.model = TextToImage(text, dit, m["conditioning"], self.tokenizer.pad_id)

    def _clip_text_tower(self, workdir: str, dtype) -> TextTransformer:
        """``config.model.text_encoder_from``: the text tower, its trained parameters (kept in
        :attr:`frozen_text`, frozen by :meth:`wrap_optimizer`), tokenizer and context length of the CLIP run in
        ``workdir`` (its latest checkpoint; the EMA parameters when it kept them)."""
        from mmjax.train.loop import restore_run

        try:
            config, task, params, _ = restore_run(workdir)
        except UserError as e:
            raise ConfigError(f"config.model.text_encoder_from={workdir!r}: {e}") from e
        if config.task != "contrastive":
            raise ConfigError(
                f"config.model.text_encoder_from={workdir!r} is a {config.task!r} run; it must be a CLIP run "
                "(task 'contrastive', e.g. the workdir of make demo)"
            )
        cfg = task.clip_config
        self.tokenizer, self.context_length = task.tokenizer, int(task.context_length)
        self.frozen_text = jax.device_get(params["text"])
        return TextTransformer(
            vocab_size=cfg.vocab_size,
            encoder_config=cfg.text_encoder_config(dtype),
            context_length=cfg.context_length,
            pooling=cfg.text_pooling,
            eot_id=cfg.eot_id,
        )

    def wrap_optimizer(self, tx, params):
        """Engine hook: with ``config.model.text_encoder_from``, zero updates for the (loaded) text tower."""
        from mmjax.train.contrastive import freeze

        return freeze(tx, params, "text/.*") if self.frozen_text is not None else tx

    def _ids(self, captions) -> np.ndarray:
        return self.tokenizer(list(captions), context_length=self.context_length)

    def train_batches(self, start_step: int):
        """Host batches ``{"image": uint8 [b, S, S, 3], "ids": int32 [b, L]}`` from ``start_step``."""
        for batch in image_text.train_batches(self.train_source, self.batch_size, self.seed, start_step):
            yield {"image": batch["image"], "ids": self._ids(batch["caption"])}

    def eval_batches(self):
        """Ordered evaluation batches with ``mask`` and each example's fixed ``t`` and ``noise``."""
        start = 0
        size = int(self.data_cfg.image_size)
        for batch in image_text.eval_batches(self.eval_source, self.eval_batch_size):
            b = len(batch["mask"])
            index = np.minimum(np.arange(start, start + b), len(self._eval_t) - 1)
            noise = np.stack(
                [
                    np.random.default_rng([*self._eval_noise_seed, int(i)]).standard_normal((size, size, 3))
                    for i in index
                ]
            )
            out = {k: v for k, v in batch.items() if k != "caption"}
            out.update(ids=self._ids(batch["caption"]), t=self._eval_t[index], noise=noise.astype(np.float32))
            start += b
            yield out

    def example_count(self, batch) -> int:
        """Real images in a host batch."""
        return int(np.sum(batch["mask"])) if "mask" in batch else int(np.shape(batch["image"])[0])

    # -- model --------------------------------------------------------------------------------------------------
    @staticmethod
    def to_model_space(images):
        """``uint8`` pixels -> ``x0 = image / 127.5 - 1`` in ``[-1, 1]`` (float32)."""
        return jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0

    @staticmethod
    def to_pixels(x) -> np.ndarray:
        """The inverse of :meth:`to_model_space`, clipped and rounded to ``uint8``."""
        return np.clip(np.rint((np.asarray(x, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)

    def init_params(self, rng, batch):
        """Initial params ``{"text", "dit"}`` (shapes from one host batch)."""
        x = self.to_model_space(batch["image"][:1])
        params = init_model_params(self.model, rng, x, jnp.zeros(1, jnp.int32), jnp.asarray(batch["ids"][:1]))
        if self.frozen_text is not None:  # config.model.text_encoder_from: the CLIP run's trained text tower
            params = {**params, "text": jax.tree.map(jnp.asarray, self.frozen_text)}
        return params

    def _losses(self, params, x0, ids, t, noise, rng, train):
        x_t = diffusion.q_sample(self.schedule, x0, noise, t)
        rngs = {"cond_dropout": rng, "dropout": jax.random.fold_in(rng, 1)} if train else {}
        out, _ = self.model.apply({"params": params}, x_t, t, ids, deterministic=not train, rngs=rngs)
        o = self.opts
        return diffusion.diffusion_loss(
            self.schedule, out, x0, noise, t, prediction_type=o.prediction_type, snr_gamma=o.snr_gamma or None
        )

    def loss(self, params, batch, rng, *, train: bool = True, axis_name=None):
        """The mean of :func:`mmjax.diffusion.diffusion_loss` over the batch, at random ``t`` and noise."""
        del axis_name
        x0 = self.to_model_space(batch["image"])
        t_rng, noise_rng, model_rng = jax.random.split(rng, 3)
        t = jax.random.randint(t_rng, (x0.shape[0],), 0, int(self.opts.num_train_timesteps))
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        loss = jnp.mean(self._losses(params, x0, jnp.asarray(batch["ids"]), t, noise, model_rng, train))
        return loss, {"loss": loss}

    def eval_metrics(self, params, batch, *, axis_name=None):
        """Sums over the real examples: ``loss`` at each example's fixed ``t`` and noise, and ``count``."""
        del axis_name
        mask = batch["mask"].astype(jnp.float32)
        x0 = self.to_model_space(batch["image"])
        losses = self._losses(params, x0, batch["ids"], batch["t"], batch["noise"], None, False)
        return {"loss": jnp.sum(losses * mask), "count": jnp.sum(mask)}

    # -- sampling -----------------------------------------------------------------------------------------------
    def generate(
        self, params, captions, rng, *, guidance_scale=None, num_steps=None, sampler=None, **options
    ) -> np.ndarray:
        """``uint8 [len(captions), S, S, 3]`` images for ``captions``, sampled with classifier-free guidance.

        The conditional and null-condition halves run as one doubled batch
        (:func:`mmjax.diffusion.guided_denoise_fn`); the sampler, steps and scale default to ``config.diffusion``;
        ``options`` are the sampler's options of :func:`mmjax.diffusion.sample` (``eta``, ``timestep_spacing``,
        ...) except those the training run fixes (the schedule and the prediction type).

        Raises:
          ValueError: naming the value, for an empty caption or one longer than the context, an unknown sampler
            or option, ``num_steps`` outside ``[1, num_train_timesteps]``, or a negative ``guidance_scale``.
        """
        o = self.opts
        captions = list(captions)
        if not captions or any(not isinstance(c, str) or not c.strip() for c in captions):
            raise UserError(f"captions must be non-empty strings, got {captions!r}")
        too_long = [c for c in captions if len(self.tokenizer.encode(c)) > self.context_length - 2]
        if too_long:
            raise UserError(
                f"caption {too_long[0]!r} has more than context_length - 2 = {self.context_length - 2} words; "
                "shorten it or train with a longer config.model.context_length"
            )
        sampler = o.sampler if sampler is None else sampler
        if sampler not in diffusion.SAMPLERS:
            raise UserError(f"sampler={sampler!r} is not valid; choose one of {list(diffusion.SAMPLERS)}")
        num_steps = int(o.num_sampling_steps) if num_steps is None else num_steps
        T = int(o.num_train_timesteps)
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
            raise UserError(
                f"num_steps={num_steps!r} is not valid; expected an int in [1, {T}] (the run's num_train_timesteps)"
            )
        scale = float(o.guidance_scale if guidance_scale is None else guidance_scale)
        if not np.isfinite(scale) or scale < 0:
            raise UserError(f"guidance_scale={scale!r} is not valid; expected a number >= 0 (1 = no guidance)")
        fixed = sorted(set(options) & {"beta_schedule", "beta_start", "beta_end", "trained_betas", "prediction_type"})
        if fixed:
            raise UserError(
                f"option {fixed[0]}={options[fixed[0]]!r} is fixed by the training run "
                f"(config.diffusion: beta_schedule={o.beta_schedule!r}, prediction_type={o.prediction_type!r}); drop it"
            )
        ids = jnp.asarray(self._ids(captions))
        size = int(self.data_cfg.image_size)
        noise = jax.random.normal(rng, (len(captions), size, size, 3), jnp.float32)
        program = self._sampling_program(sampler, int(num_steps), tuple(sorted(options.items())))
        x = program(params, ids, noise, jax.random.fold_in(rng, 1), jnp.float32(scale))
        return self.to_pixels(x)

    def _sampling_program(self, sampler: str, num_steps: int, options: tuple = ()):
        """One jitted ``(params, ids, noise, rng, guidance_scale) -> x0`` per sampler, step count and options, kept,
        so that every later call with the same shapes reuses its compiled program (the parameters are arguments,
        not constants baked into it). Bad ``options`` raise :func:`mmjax.diffusion.sample`'s error when traced."""
        key = (sampler, num_steps, options)
        if key not in self._programs:
            o = self.opts

            def run(params, ids, noise, rng, scale):
                def model_fn(x, t, cond):
                    return self.model.apply({"params": params}, x, t, cond["ids"], drop=cond["drop"])[0]

                cond = {"ids": ids, "drop": jnp.zeros(ids.shape[0], bool)}
                null = {"ids": ids, "drop": jnp.ones(ids.shape[0], bool)}
                return diffusion.sample(
                    diffusion.guided_denoise_fn(model_fn, cond, null, scale),
                    noise,
                    sampler=sampler,
                    num_steps=num_steps,
                    num_train_timesteps=int(o.num_train_timesteps),
                    beta_schedule=o.beta_schedule,
                    prediction_type=o.prediction_type,
                    rng=rng,  # used by the stochastic samplers (ddpm, ddim with eta > 0), ignored by the others
                    **dict(options),
                )

            self._programs[key] = jax.jit(run)
        return self._programs[key]

    def generate_many(self, params, captions, rng, *, chunk: int = 128, **kw) -> np.ndarray:
        """:meth:`generate` in chunks of ``chunk`` captions (the last one padded): one compiled program for any
        number of captions. Chunk ``i`` draws its noise from ``fold_in(rng, i)``."""
        captions = list(captions)
        out = []
        for i in range(0, len(captions), chunk):
            part = captions[i : i + chunk]
            pad = [part[-1]] * (chunk - len(part)) if len(captions) > chunk else []
            out.append(self.generate(params, part + pad, jax.random.fold_in(rng, i // chunk), **kw)[: len(part)])
        return np.concatenate(out) if out else np.zeros((0, *self.train_source.images.shape[1:]), np.uint8)

    def _judge(self):
        """The item classifier of :mod:`mmjax.evaluate.judge`, trained on the real training images (item labels)
        with ``config.diffusion.judge_steps`` steps, seeded by ``config.seed``."""
        from mmjax.data.captions import ITEM_NAMES
        from mmjax.evaluate.judge import train_judge

        test = np.flatnonzero(self.eval_source.extras["group"] == 0)
        return train_judge(
            self.train_source.images,
            self.train_source.extras["item"],
            num_classes=len(ITEM_NAMES),
            test=(self.eval_source.images[test], self.eval_source.extras["item"][test]),
            num_steps=int(self.opts.judge_steps),
            batch_size=min(128, len(self.train_source)),
            seed=self.seed,
        )

    def _grid_prompts(self, group: int) -> list[str]:
        """The first ``num_prompts`` distinct captions of the test (``group`` 0) or held-out (1) rows, in order."""
        rows = np.flatnonzero(self.eval_source.extras["group"] == group)
        return list(dict.fromkeys(self.eval_source.captions[i][0] for i in rows))[: int(self.opts.num_prompts)]

    def sample_images(self, params) -> dict[str, np.ndarray]:
        """The engine's ``config.image_every`` hook: ``{"samples": uint8 [H, W, 3]}``, a tiled grid with one row per
        prompt (the first ``num_prompts`` distinct test captions, then as many held-out ones) and
        ``samples_per_prompt`` columns, from noise fixed by ``config.seed`` (the same at every step)."""
        o = self.opts
        k, per = int(o.num_prompts), int(o.samples_per_prompt)
        prompts = self._grid_prompts(0) + self._grid_prompts(1)
        images = self.generate_many(
            jax.device_get(params), [c for c in prompts for _ in range(per)], jax.random.key(self.seed), chunk=k * per
        )
        return {"samples": tile_images(images, len(prompts), per)}

    def final_report(self, params, workdir: str) -> dict[str, Any]:
        """Scores of images generated for the test and held-out captions, and PNG grids of samples per prompt.

        For the first ``num_eval_samples`` captions of each split, one image each: ``generated_{split}item_accuracy``
        (the judge of :meth:`_judge` agrees with the prompt's item; its own accuracy on the real test and held-out
        images is ``judge_accuracy`` / ``judge_heldout_accuracy``), ``generated_{split}colour_accuracy`` (the hue
        read from the pixels, :func:`mmjax.data.captions.measure_attributes`), ``generated_{split}both_accuracy``
        (item and colour both right), and with ``layout="canvas"`` the size and position accuracies. ``fid`` /
        ``heldout_fid``: :func:`mmjax.evaluate.frechet_distance` on the judge's features between the generated
        images and as many real images of the split; ``fid_floor``: the same between real training and real test
        images. Grids: ``num_prompts`` distinct captions of each split, ``samples_per_prompt`` samples each.
        """
        from mmjax.data.captions import measure_attributes
        from mmjax.evaluate.generation import frechet_distance

        if jax.process_count() > 1 or not self.opts.final_report:
            return {}
        params = jax.device_get(params)
        os.makedirs(workdir, exist_ok=True)
        src, extras, group = self.eval_source, self.eval_source.extras, self.eval_source.extras["group"]
        o = self.opts
        k, per, n = int(o.num_prompts), int(o.samples_per_prompt), int(o.num_eval_samples)
        chunk = max(1, min(256, k * per))
        judge = self._judge() if n else None
        report: dict[str, Any] = {}
        if judge is not None:
            held = np.flatnonzero(group == 1)
            report["judge_accuracy"] = judge.accuracy
            report["judge_heldout_accuracy"] = float(np.mean(judge.predict(src.images[held]) == extras["item"][held]))
            real_test = judge.features(src.images[np.flatnonzero(group == 0)[:n]])  # the floor's and the test FID's
            m = min(len(real_test), len(self.train_source))
            report["fid_floor"] = frechet_distance(judge.features(self.train_source.images[:m]), real_test[:m])
        attrs = ("colour", "size", "position") if self.data_cfg.layout == "canvas" else ("colour",)
        for g, prefix in ((0, ""), (1, "heldout_")):
            split_rows = np.flatnonzero(group == g)
            rng = jax.random.fold_in(jax.random.key(self.seed), g)
            if judge is not None:
                rows = split_rows[:n]
                images = self.generate_many(
                    params, [src.captions[i][0] for i in rows], jax.random.fold_in(rng, 0), chunk=chunk
                )
                got = measure_attributes(images)
                right = {"item": judge.predict(images) == extras["item"][rows]}
                right.update({a: got[a] == extras[a][rows] for a in attrs})
                right["both"] = right["item"] & right["colour"]
                for name, ok in right.items():
                    report[f"generated_{prefix}{name}_accuracy"] = float(np.mean(ok))
                real = real_test if g == 0 else judge.features(src.images[rows])
                report[f"{prefix}fid"] = frechet_distance(judge.features(images), real)
            prompts = self._grid_prompts(g)
            grid = self.generate_many(
                params, [c for c in prompts for _ in range(per)], jax.random.fold_in(rng, 1), chunk=chunk
            )
            name = f"samples_{prefix or 'test_'}grid.png"
            report[f"samples_{prefix or 'test_'}png"] = sample_grid(grid, prompts, per, os.path.join(workdir, name))
        with open(os.path.join(workdir, "report.json"), "w") as f:
            json.dump(report, f, indent=2, default=str)
        print("diffusion report: " + ", ".join(f"{k}={v}" for k, v in report.items()), flush=True)
        return report


def tile_images(images, rows: int, cols: int, gap: int = 1) -> np.ndarray:
    """``uint8 [rows * cols, S, S, 3]`` images as one ``uint8 [rows * (S + gap) - gap, cols * (S + gap) - gap, 3]``
    grid, row-major, ``gap`` black pixels between them.

    >>> tile_images(np.full((6, 2, 2, 3), 9, np.uint8), 2, 3).shape
    (5, 8, 3)
    """
    images = np.asarray(images)
    n, s, _, c = images.shape
    if n != rows * cols:
        raise UserError(f"tile_images: {n} images do not fill {rows} x {cols}")
    out = np.zeros((rows * (s + gap) - gap, cols * (s + gap) - gap, c), images.dtype)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        out[r * (s + gap) : r * (s + gap) + s, q * (s + gap) : q * (s + gap) + s] = image
    return out


def sample_grid(images, prompts, per_prompt, path) -> str:
    """A PNG with one row per prompt (its text on the left) and ``per_prompt`` samples; returns ``path``.
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "grid.png")
    >>> os.path.getsize(sample_grid(np.zeros((4, 8, 8, 3), np.uint8), ["a red bag", "a blue bag"], 2, path)) > 0
    True
    """
    from mmjax.evaluate.embeddings import _agg_figure, _save

    rows = len(prompts)
    fig = _agg_figure(1.2 * per_prompt + 2.6, 1.2 * rows)
    axes = fig.subplots(rows, per_prompt + 1, squeeze=False)
    for r, prompt in enumerate(prompts):
        axes[r, 0].text(0.0, 0.5, prompt, fontsize=7, va="center", wrap=True)
        for c in range(per_prompt + 1):
            axes[r, c].axis("off")
            if c:
                axes[r, c].imshow(images[r * per_prompt + c - 1], interpolation="nearest")
    return _save(fig, path, 100)
