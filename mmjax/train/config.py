"""The engine's configuration: defaults, merging and validation (configs are ``ml_collections.ConfigDict`` data).

An experiment's ``get_config()`` usually starts from :func:`default_config` and changes what it needs; any config
passed to :func:`mmjax.train.train_and_evaluate` is merged over the defaults and checked by :func:`validate_config`,
which raises ``ValueError`` naming the key, the value received and the valid choices.

>>> cfg = default_config()
>>> cfg.parallel.mode, cfg.optimizer.grad_accum_steps
('single', 1)
>>> bad = default_config(); bad.parallel.mode = "tpu"
>>> validate_config(bad)
Traceback (most recent call last):
...
ValueError: config.parallel.mode='tpu' is not valid; valid choices: ['single', 'pmap', 'sharded']
"""

from __future__ import annotations

import json
import numbers

import ml_collections

from mmjax.train.optimizer import DEFAULT_DECAY_RULES
from mmjax.train.parallel import MODES

#: Sections whose keys are fixed (a typo there is an error); other sections (model, data, ...) are free-form.
STRICT_SECTIONS = ("optimizer", "parallel")


def default_config() -> ml_collections.ConfigDict:
    """All engine settings with their defaults (see the comments for meaning).

    >>> cfg = default_config()
    >>> cfg.batch_size, cfg.optimizer.lr, cfg.parallel.mode
    (128, 0.001, 'single')
    """
    c = ml_collections.ConfigDict()
    c.seed = 0  # initialisation, data order, augmentation and dropout all derive from it
    c.task = "classification"  # a name in mmjax.train.task.TASKS or "module:Class"
    c.model = ml_collections.ConfigDict({"name": "vit"})  # name ("vit" or "module:Class") + constructor kwargs
    c.data = ml_collections.ConfigDict(
        dict(
            name="fashion_mnist",  # "fashion_mnist" (IDX files) or any prepared TFDS image-classification dataset
            data_dir="",  # directory with the IDX files / TFDS data_dir ("" = defaults)
            train_split="train",
            eval_split="test",
            crop_padding=0,  # random crop after zero padding by this many pixels (0 = off)
            flip=False,  # random horizontal flip
            mean=0.5,  # images are (x / 255 - mean) / std on the device
            std=0.5,
        )
    )
    c.batch_size = 128  # global batch (all devices, all hosts)
    c.eval_batch_size = 500
    c.num_steps = 0  # total optimizer steps; 0 = derive from num_epochs
    c.num_epochs = 1.0
    c.label_smoothing = 0.0
    c.optimizer = ml_collections.ConfigDict(
        dict(
            lr=1e-3,
            weight_decay=1e-4,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            warmup_steps=0,
            end_lr_ratio=0.0,
            grad_clip=1.0,
            grad_accum_steps=1,
            decay_rules=DEFAULT_DECAY_RULES,
        )
    )
    c.parallel = ml_collections.ConfigDict(
        dict(
            mode="single",  # "single" | "pmap" | "sharded"
            num_devices=0,  # 0 = all available
            fsdp=False,  # "sharded" only: shard large parameter/optimizer leaves over the devices
            fsdp_min_size=2**14,
        )
    )
    c.log_every = 50  # steps between train-metric records
    c.eval_every = 0  # steps between evaluations (0 = only at the end)
    c.checkpoint_every = 500  # steps between checkpoints (0 = only at the end / on SIGTERM)
    c.keep_checkpoints = 3
    c.progress = True  # tqdm bar
    c.tensorboard = True
    c.plot = True
    return c


def merge(base: ml_collections.ConfigDict, override, prefix: str = "config") -> ml_collections.ConfigDict:
    """Returns ``base`` updated recursively with ``override`` (a ConfigDict or dict).

    Unknown keys are added, except inside :data:`STRICT_SECTIONS`, where they raise ``ValueError``.

    >>> merge(default_config(), {"optimizer": {"lr": 0.1}}).optimizer.lr
    0.1
    """
    out = ml_collections.ConfigDict(base.to_dict())
    for key, value in override.items() if hasattr(override, "items") else []:
        path = f"{prefix}.{key}"
        if key in out and isinstance(out[key], ml_collections.ConfigDict) and hasattr(value, "items"):
            if key in STRICT_SECTIONS and prefix == "config":
                unknown = sorted(set(value.keys()) - set(out[key].keys()))
                if unknown:
                    raise ValueError(
                        f"{path}.{unknown[0]} is not a known setting; valid keys: {sorted(out[key].keys())}"
                    )
            out[key] = merge(out[key], value, path)
        else:
            with out.ignore_type():
                out[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
            if isinstance(out[key], dict):
                out[key] = ml_collections.ConfigDict(out[key])
    return out


def _check(cond: bool, key: str, value, expected: str) -> None:
    if not cond:
        raise ValueError(f"config.{key}={value!r} is not valid; expected {expected}")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Checks the engine settings; raises ``ValueError`` naming the key, the value and what is valid.

    >>> validate_config(default_config())  # the defaults are valid: returns None
    >>> cfg = default_config(); cfg.batch_size = 0
    >>> validate_config(cfg)
    Traceback (most recent call last):
    ...
    ValueError: config.batch_size=0 is not valid; expected an int > 0
    """
    if c.parallel.mode not in MODES:
        raise ValueError(f"config.parallel.mode={c.parallel.mode!r} is not valid; valid choices: {list(MODES)}")
    _check(
        _is_int(c.parallel.num_devices) and c.parallel.num_devices >= 0,
        "parallel.num_devices",
        c.parallel.num_devices,
        "an int >= 0 (0 = all devices)",
    )
    _check(isinstance(c.parallel.fsdp, bool), "parallel.fsdp", c.parallel.fsdp, "True or False")
    _check(_is_int(c.seed), "seed", c.seed, "an int")
    _check(isinstance(c.task, str) and bool(c.task), "task", c.task, "a task name or 'module:Class'")
    _check(_is_int(c.batch_size) and c.batch_size > 0, "batch_size", c.batch_size, "an int > 0")
    _check(_is_int(c.eval_batch_size) and c.eval_batch_size > 0, "eval_batch_size", c.eval_batch_size, "an int > 0")
    _check(_is_int(c.num_steps) and c.num_steps >= 0, "num_steps", c.num_steps, "an int >= 0 (0 = use num_epochs)")
    _check(_is_num(c.num_epochs) and c.num_epochs >= 0, "num_epochs", c.num_epochs, "a number >= 0")
    if c.num_steps == 0 and c.num_epochs == 0:
        raise ValueError("config.num_steps=0 and config.num_epochs=0: set one of them > 0")
    _check(
        _is_num(c.label_smoothing) and 0 <= c.label_smoothing < 1,
        "label_smoothing",
        c.label_smoothing,
        "a number in [0, 1)",
    )
    o = c.optimizer
    _check(_is_num(o.lr) and o.lr >= 0, "optimizer.lr", o.lr, "a number >= 0")
    _check(_is_num(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "a number >= 0")
    _check(_is_num(o.b1) and 0 <= o.b1 < 1, "optimizer.b1", o.b1, "a number in [0, 1)")
    _check(_is_num(o.b2) and 0 <= o.b2 < 1, "optimizer.b2", o.b2, "a number in [0, 1)")
    _check(_is_num(o.eps) and o.eps > 0, "optimizer.eps", o.eps, "a number > 0")
    _check(_is_int(o.warmup_steps) and o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, "an int >= 0")
    _check(
        _is_num(o.end_lr_ratio) and 0 <= o.end_lr_ratio <= 1,
        "optimizer.end_lr_ratio",
        o.end_lr_ratio,
        "a number in [0, 1]",
    )
    _check(_is_num(o.grad_clip) and o.grad_clip >= 0, "optimizer.grad_clip", o.grad_clip, "a number >= 0 (0 = off)")
    _check(
        _is_int(o.grad_accum_steps) and o.grad_accum_steps >= 1,
        "optimizer.grad_accum_steps",
        o.grad_accum_steps,
        "an int >= 1",
    )
    _check(_is_int(c.log_every) and c.log_every >= 1, "log_every", c.log_every, "an int >= 1")
    _check(_is_int(c.eval_every) and c.eval_every >= 0, "eval_every", c.eval_every, "an int >= 0 (0 = at the end)")
    _check(
        _is_int(c.checkpoint_every) and c.checkpoint_every >= 0,
        "checkpoint_every",
        c.checkpoint_every,
        "an int >= 0 (0 = at the end only)",
    )
    _check(
        _is_int(c.keep_checkpoints) and c.keep_checkpoints >= 1, "keep_checkpoints", c.keep_checkpoints, "an int >= 1"
    )


def prepare_config(config) -> ml_collections.ConfigDict:
    """Merges ``config`` over :func:`default_config` and validates it.

    >>> prepare_config({"batch_size": 64}).batch_size
    64
    """
    merged = merge(default_config(), config)
    validate_config(merged)
    return merged


def to_json(config: ml_collections.ConfigDict) -> str:
    """The config as JSON (tuples become lists).

    >>> json.loads(to_json(ml_collections.ConfigDict({"seed": 0, "rules": (("bias", 0.0),)})))
    {'rules': [['bias', 0.0]], 'seed': 0}
    """
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Reads a config written by :func:`to_json` (decay rules come back as tuples).

    >>> from_json(to_json(default_config())).optimizer.decay_rules[0][1]
    0.0
    """
    d = json.loads(text)
    rules = d.get("optimizer", {}).get("decay_rules")
    if rules is not None:
        d["optimizer"]["decay_rules"] = tuple(tuple(r) for r in rules)
    return ml_collections.ConfigDict(d)
