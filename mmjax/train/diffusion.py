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
(colour, item) combinations with :func:`mmjax.diffusion.sample` and classifier-free guidance, reads the colour,
size and position of each generated item back from its pixels (:func:`mmjax.data.captions.measure_attributes`) and
reports the fraction that match the prompt, with a PNG grid of samples per prompt.

Config (:meth:`DiffusionTask.default_config`): ``model`` (the :class:`mmjax.dit.DiT` fields, ``conditioning``, the
text tower's ``text_width``, ``text_depth``, ``text_heads``, ``text_mlp_dim``, ``context_length``, ``dtype``), ``data``
(the Fashion-MNIST captions: ``data_dir``, ``image_size``, ``num_train``, ``num_test``, ``num_heldout``, ``data_seed``)
and ``diffusion`` (schedule, loss and sampling options).
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

CONDITIONING = ("pooled", "tokens", "both")

_TEXT_KEYS = dict(text_width=128, text_depth=1, text_heads=4, text_mlp_dim=256, context_length=16)
_MODEL_DEFAULTS = dict(
    name="dit",
    conditioning="pooled",
    dtype="float32",
    variant=None,
    width=128,
    depth=4,
    num_heads=4,
    patch_size=4,
    class_dropout_prob=0.1,
    **_TEXT_KEYS,
)
_MODEL_KEYS = ("name", "conditioning", "dtype", *_TEXT_KEYS)
_DATA_DEFAULTS = dict(
    name="fashion_mnist_captions", data_dir="", image_size=32, num_train=0, num_test=500, num_heldout=500, data_seed=0
)
_DIFFUSION_DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    snr_gamma=0.0,  # 0: uniform weights; > 0: min-SNR-gamma
    sampler="ddim",
    num_sampling_steps=50,
    guidance_scale=3.0,
    num_prompts=8,  # prompts of each split sampled by the final report
    samples_per_prompt=4,
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
        self._programs: dict[tuple[str, int], Any] = {}  # compiled sampling loops (see _sampling_program)

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
        from mmjax.data.captions import make_captions

        d, size = self.data_cfg, int(self.data_cfg.image_size)
        self.train_source = image_text.fashion_mnist_captions(
            "train", int(d.num_train) or None, int(d.data_seed), size, d.data_dir or None
        )
        parts = [
            make_captions(s, int(n) or None, int(d.data_seed), image_size=size, data_dir=d.data_dir or None)
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
        self.tokenizer = run_word_tokenizer(self.workdir, self.train_source.all_captions)
        self.context_length = int(m["context_length"])
        dtype = {"float32": None, "bfloat16": jnp.bfloat16}.get(m["dtype"], "bad")
        if dtype == "bad":
            raise ConfigError(f"config.model.dtype={m['dtype']!r} is not valid; valid: ['float32', 'bfloat16']")
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
        width = int(m["text_width"])
        dit_kw["pooled_text_dim"] = width if m["conditioning"] in ("pooled", "both") else None
        dit_kw["text_token_dim"] = width if m["conditioning"] in ("tokens", "both") else None
        try:
            dit = DiT(dtype=dtype, **dit_kw)
            dit.sizes()
        except TypeError as e:
            raise ConfigError(f"config.model: {e}; valid keys: {sorted(self.model_keys(m))}") from e
        self.model = TextToImage(text, dit, m["conditioning"], self.tokenizer.pad_id)

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
        return self.model.init(rng, x, jnp.zeros(1, jnp.int32), jnp.asarray(batch["ids"][:1]))["params"]

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
    def generate(self, params, captions, rng, *, guidance_scale=None, num_steps=None, sampler=None) -> np.ndarray:
        """``uint8 [len(captions), S, S, 3]`` images for ``captions``, sampled with classifier-free guidance.

        The conditional and null-condition halves run as one doubled batch
        (:func:`mmjax.diffusion.guided_denoise_fn`); the sampler, steps and scale default to ``config.diffusion``.
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
        ids = jnp.asarray(self._ids(captions))
        size = int(self.data_cfg.image_size)
        noise = jax.random.normal(rng, (len(captions), size, size, 3), jnp.float32)
        scale = jnp.float32(o.guidance_scale if guidance_scale is None else guidance_scale)
        program = self._sampling_program(sampler or o.sampler, int(num_steps or o.num_sampling_steps))
        x = program(params, ids, noise, jax.random.fold_in(rng, 1), scale)
        return self.to_pixels(x)

    def _sampling_program(self, sampler: str, num_steps: int):
        """One jitted ``(params, ids, noise, rng, guidance_scale) -> x0`` per sampler and step count, kept, so that
        every later call with the same shapes reuses its compiled program (the parameters are arguments, not
        constants baked into it)."""
        key = (sampler, num_steps)
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
                    **({"rng": rng} if sampler == "ddpm" else {}),
                )

            self._programs[key] = jax.jit(run)
        return self._programs[key]

    def final_report(self, params, workdir: str) -> dict[str, Any]:
        """Samples for ``num_prompts`` test and held-out captions (``samples_per_prompt`` each): the fraction whose
        colour, size and position, read back from the pixels, match the prompt; a PNG grid per split."""
        from mmjax.data.captions import measure_attributes

        if jax.process_count() > 1 or not self.opts.final_report:
            return {}
        params = jax.device_get(params)
        os.makedirs(workdir, exist_ok=True)
        extras, group = self.eval_source.extras, self.eval_source.extras["group"]
        report: dict[str, Any] = {}
        k, per = int(self.opts.num_prompts), int(self.opts.samples_per_prompt)
        for g, prefix in ((0, ""), (1, "heldout_")):
            rows = np.flatnonzero(group == g)[:k]
            captions = [self.eval_source[int(i)]["captions"][0] for i in rows for _ in range(per)]
            images = self.generate(params, captions, jax.random.fold_in(jax.random.key(self.seed), g))
            got = measure_attributes(images)
            for attr in ("colour", "size", "position"):
                want = np.repeat(extras[attr][rows], per)
                report[f"generated_{prefix}{attr}_accuracy"] = float(np.mean(got[attr] == want))
            report[f"samples_{prefix or 'test_'}png"] = _sample_grid(
                images, captions[::per], per, os.path.join(workdir, f"samples_{prefix or 'test_'}grid.png")
            )
        with open(os.path.join(workdir, "report.json"), "w") as f:
            json.dump(report, f, indent=2, default=str)
        print("diffusion report: " + ", ".join(f"{k}={v}" for k, v in report.items()), flush=True)
        return report


def _sample_grid(images, prompts, per_prompt, path) -> str:
    """A PNG with one row per prompt (its text on the left) and ``per_prompt`` samples; returns ``path``."""
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
