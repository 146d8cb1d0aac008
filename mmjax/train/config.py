"""The engine's configuration: defaults, merging and validation (configs are ``ml_collections.ConfigDict`` data).

A config has two kinds of keys. The *engine's* (:func:`default_config`: seed, batch sizes, steps, ``optimizer``,
``parallel``, logging and checkpoints) and the *task's*: each task class declares its own keys and sections with
their defaults in a ``default_config()`` classmethod (e.g. ``model``, ``data`` and ``label_smoothing`` for
classification, ``contrastive`` for the contrastive task), and may check their values in ``check_config(config)``.
:func:`prepare_config`, which :func:`mmjax.train.train_and_evaluate` calls first (before any compilation), merges a
config over the engine's and its task's defaults and checks it: every key must be known - a typo is a
:class:`mmjax.errors.ConfigError` naming the key, its section and the closest valid keys - and every engine value
is checked by :func:`validate_config`. ``config.model`` takes the model's constructor arguments: its valid keys are
the model class's fields (the task's ``model_keys(model_config)``).

An experiment's ``get_config()`` usually starts from ``default_config(TASK)`` (the engine's and the task's
defaults) and changes what it needs.

>>> cfg = default_config()
>>> cfg.parallel.mode, cfg.optimizer.grad_accum_steps, "model" in cfg
('single', 1, False)
>>> try:
...     prepare_config({"num_step": 5})
... except ConfigError as e:
...     print(str(e)[:91])
config.num_step is not a known setting of the config's top level; did you mean num_steps or
>>> bad = default_config(); bad.parallel.mode = "tpu"
>>> validate_config(bad)
Traceback (most recent call last):
...
mmjax.errors.ConfigError: config.parallel.mode='tpu' is not valid; valid choices: ['single', 'pmap', 'sharded']
"""

from __future__ import annotations

import difflib
import json
import numbers
from collections.abc import Mapping

import ml_collections

from mmjax.errors import ConfigError
from mmjax.train.optimizer import DEFAULT_DECAY_RULES
from mmjax.train.parallel import MODES

#: The task a config runs when it names none.
DEFAULT_TASK = "classification"

#: Sections that a config may add although the defaults do not hold them, with their valid keys
#: (``distributed``: see :mod:`mmjax.train.distributed`).
OPTIONAL_SECTIONS = {
    "distributed": (
        "coordinator_address",
        "num_processes",
        "process_id",
        "initialization_timeout",
        "heartbeat_timeout_seconds",
        "shutdown_timeout_seconds",
        "auto",
    ),
}


def default_config(task: str | None = None) -> ml_collections.ConfigDict:
    """The engine's settings with their defaults (see the comments for meaning); with ``task`` (a name in
    :data:`mmjax.train.task.TASKS` or ``"module:Class"``), also that task's keys and sections with its defaults.

    >>> cfg = default_config()
    >>> cfg.batch_size, cfg.optimizer.lr, cfg.parallel.mode, cfg.task
    (128, 0.001, 'single', 'classification')
    >>> cfg = default_config("classification")
    >>> cfg.model.name, cfg.data.name, cfg.label_smoothing
    ('vit', 'fashion_mnist', 0.0)
    """
    c = ml_collections.ConfigDict()
    c.seed = 0  # initialisation, data order, augmentation and dropout all derive from it
    c.task = DEFAULT_TASK  # a name in mmjax.train.task.TASKS or "module:Class"
    c.batch_size = 128  # global batch (all devices, all hosts)
    c.eval_batch_size = 500
    c.num_steps = 0  # total optimizer steps; 0 = derive from num_epochs
    c.num_epochs = 1.0
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
            # exponential moving average of the parameters, updated after every step; evaluation and the task's
            # final report use it (mmjax.train.optimizer.update_ema); 0 = off, else in (0, 1), e.g. 0.999
            ema_decay=0.0,
            ema_warmup=False,  # decay min(ema_decay, (1 + step) / (10 + step)) instead of ema_decay
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
    c.image_every = 0  # steps between sample images of tasks that draw them (task.sample_images; 0 = never)
    c.keep_checkpoints = 3
    c.progress = True  # tqdm bar
    c.tensorboard = True
    c.plot = True
    if task is None:
        return c
    c = merge(c, task_defaults(_task_class(task)))
    c.task = task
    return c


def _task_class(name):
    from mmjax.train.task import resolve_task_class

    if not isinstance(name, str) or not name:
        raise ConfigError(f"config.task={name!r} is not valid; expected a task name or 'module:Class'")
    return resolve_task_class(name)


def task_defaults(task_class) -> ml_collections.ConfigDict:
    """The keys and sections a task class declares, with their defaults (its ``default_config()``; none if it has
    no such classmethod).

    >>> from mmjax.train.task import resolve_task_class
    >>> sorted(task_defaults(resolve_task_class("node_classification")))
    ['batch_size', 'data', 'eval_batch_size', 'label_smoothing', 'model']
    """
    make = getattr(task_class, "default_config", None)
    if make is None:
        return ml_collections.ConfigDict()
    defaults = make()
    return defaults if isinstance(defaults, ml_collections.ConfigDict) else ml_collections.ConfigDict(defaults)


def merge(base: ml_collections.ConfigDict, override, prefix: str = "config") -> ml_collections.ConfigDict:
    """Returns ``base`` updated recursively with ``override`` (a ConfigDict or dict); new keys are added (whether a
    key is known is checked by :func:`check_known_keys`).

    >>> merge(default_config(), {"optimizer": {"lr": 0.1}}).optimizer.lr
    0.1
    """
    out = ml_collections.ConfigDict(base.to_dict())
    for key, value in override.items() if hasattr(override, "items") else []:
        path = f"{prefix}.{key}"
        if key in out and isinstance(out[key], ml_collections.ConfigDict) and hasattr(value, "items"):
            out[key] = merge(out[key], value, path)
        else:
            with out.ignore_type():
                out[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
            if isinstance(out[key], dict):
                out[key] = ml_collections.ConfigDict(out[key])
    return out


def _is_section(x) -> bool:
    return isinstance(x, (Mapping, ml_collections.ConfigDict))


def unknown_key_error(key: str, section: str, valid, optional=()) -> ConfigError:
    """The error for an unknown ``key`` of ``section`` (``"config"`` or ``"config.data"``, ...): it names the key,
    the section, the closest valid keys (``difflib``) and all of them.

    >>> print(unknown_key_error("crop_paddding", "config.data", ["crop_padding", "flip", "mean"]))
    config.data.crop_paddding is not a known setting of config.data; did you mean crop_padding? (valid keys: crop_padding, flip, mean)
    """
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid + sorted(optional), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else "no valid key is close to it"
    where = "the config's top level" if section == "config" else section
    extra = f"; optional sections: {', '.join(sorted(optional))}" if optional else ""
    return ConfigError(
        f"{section}.{key} is not a known setting of {where}; {hint} (valid keys: {', '.join(valid)}{extra})"
    )


def check_known_keys(config, defaults, model_keys=None, section: str = "config") -> None:
    """Raises :class:`mmjax.errors.ConfigError` for the first key of ``config`` (recursively) that ``defaults``
    does not hold (see :func:`unknown_key_error`).

    ``model_keys`` (a collection, or ``None`` for "any") are the keys ``config.model`` may hold besides those of
    ``defaults.model``; :data:`OPTIONAL_SECTIONS` are accepted at the top level.

    >>> check_known_keys({"optimizer": {"lr": 0.1}}, default_config())  # known: returns None
    >>> check_known_keys({"batchsize": 3}, default_config())
    Traceback (most recent call last):
    ...
    mmjax.errors.ConfigError: config.batchsize is not a known setting of the config's top level; did you mean batch_size or eval_batch_size? (valid keys: batch_size, checkpoint_every, eval_batch_size, eval_every, image_every, keep_checkpoints, log_every, num_epochs, num_steps, optimizer, parallel, plot, progress, seed, task, tensorboard; optional sections: distributed)
    """
    top = section == "config"
    optional = OPTIONAL_SECTIONS if top else {}
    for key, value in config.items():
        path = f"{section}.{key}"
        if key in optional:
            if _is_section(value):
                for sub in value:
                    if sub not in optional[key]:
                        raise unknown_key_error(sub, path, optional[key])
            continue
        if top and key == "model" and model_keys is not None and _is_section(value):
            known = set(defaults.get("model", {}) or {}) | set(model_keys)
            for sub in value:
                if sub not in known:
                    raise unknown_key_error(sub, path, known)
            continue
        if top and key == "model" and model_keys is None:
            continue  # the model's constructor takes any keyword: the task checks them when it builds the model
        if key not in defaults:
            raise unknown_key_error(key, section, list(defaults), optional)
        if _is_section(defaults[key]) and _is_section(value):
            check_known_keys(value, defaults[key], None, path)


def check_value(cond: bool, key: str, value, expected: str) -> None:
    """Raises :class:`mmjax.errors.ConfigError` ``config.KEY=VALUE is not valid; expected ...`` unless ``cond``.

    >>> check_value(True, "seed", 0, "an int")  # returns None
    >>> check_value(False, "label_smoothing", 1.5, "a number in [0, 1)")
    Traceback (most recent call last):
    ...
    mmjax.errors.ConfigError: config.label_smoothing=1.5 is not valid; expected a number in [0, 1)
    """
    if not cond:
        raise ConfigError(f"config.{key}={value!r} is not valid; expected {expected}")


_check = check_value


def is_int(x) -> bool:
    """Whether ``x`` is an integer (not a bool).

    >>> is_int(3), is_int(3.0), is_int(True)
    (True, False, False)
    """
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x) -> bool:
    """Whether ``x`` is a real number (not a bool).

    >>> is_number(0.5), is_number(2), is_number("1")
    (True, True, False)
    """
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Checks the engine's values; raises :class:`mmjax.errors.ConfigError` naming the key, the value and what is
    valid (the task's values are checked by its ``check_config``, see :func:`prepare_config`).

    >>> validate_config(default_config())  # the defaults are valid: returns None
    >>> cfg = default_config(); cfg.batch_size = 0
    >>> validate_config(cfg)
    Traceback (most recent call last):
    ...
    mmjax.errors.ConfigError: config.batch_size=0 is not valid; expected an int > 0
    """
    if c.parallel.mode not in MODES:
        raise ConfigError(f"config.parallel.mode={c.parallel.mode!r} is not valid; valid choices: {list(MODES)}")
    _check(
        is_int(c.parallel.num_devices) and c.parallel.num_devices >= 0,
        "parallel.num_devices",
        c.parallel.num_devices,
        "an int >= 0 (0 = all devices)",
    )
    _check(isinstance(c.parallel.fsdp, bool), "parallel.fsdp", c.parallel.fsdp, "True or False")
    _check(is_int(c.seed), "seed", c.seed, "an int")
    _check(isinstance(c.task, str) and bool(c.task), "task", c.task, "a task name or 'module:Class'")
    _check(is_int(c.batch_size) and c.batch_size > 0, "batch_size", c.batch_size, "an int > 0")
    _check(is_int(c.eval_batch_size) and c.eval_batch_size > 0, "eval_batch_size", c.eval_batch_size, "an int > 0")
    _check(is_int(c.num_steps) and c.num_steps >= 0, "num_steps", c.num_steps, "an int >= 0 (0 = use num_epochs)")
    _check(is_number(c.num_epochs) and c.num_epochs >= 0, "num_epochs", c.num_epochs, "a number >= 0")
    if c.num_steps == 0 and c.num_epochs == 0:
        raise ConfigError("config.num_steps=0 and config.num_epochs=0: set one of them > 0")
    o = c.optimizer
    _check(is_number(o.lr) and o.lr >= 0, "optimizer.lr", o.lr, "a number >= 0")
    _check(is_number(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "a number >= 0")
    _check(is_number(o.b1) and 0 <= o.b1 < 1, "optimizer.b1", o.b1, "a number in [0, 1)")
    _check(is_number(o.b2) and 0 <= o.b2 < 1, "optimizer.b2", o.b2, "a number in [0, 1)")
    _check(is_number(o.eps) and o.eps > 0, "optimizer.eps", o.eps, "a number > 0")
    _check(is_int(o.warmup_steps) and o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, "an int >= 0")
    _check(
        is_number(o.end_lr_ratio) and 0 <= o.end_lr_ratio <= 1,
        "optimizer.end_lr_ratio",
        o.end_lr_ratio,
        "a number in [0, 1]",
    )
    _check(is_number(o.grad_clip) and o.grad_clip >= 0, "optimizer.grad_clip", o.grad_clip, "a number >= 0 (0 = off)")
    _check(
        is_int(o.grad_accum_steps) and o.grad_accum_steps >= 1,
        "optimizer.grad_accum_steps",
        o.grad_accum_steps,
        "an int >= 1",
    )
    _check(
        is_number(o.ema_decay) and 0 <= o.ema_decay < 1,
        "optimizer.ema_decay",
        o.ema_decay,
        "a number in [0, 1) (0 = no EMA of the parameters)",
    )
    _check(isinstance(o.ema_warmup, bool), "optimizer.ema_warmup", o.ema_warmup, "True or False")
    if o.ema_warmup and not o.ema_decay:
        raise ConfigError(
            "config.optimizer.ema_warmup=True needs config.optimizer.ema_decay > 0 (the EMA it warms up is off)"
        )
    _check(is_int(c.log_every) and c.log_every >= 1, "log_every", c.log_every, "an int >= 1")
    _check(is_int(c.eval_every) and c.eval_every >= 0, "eval_every", c.eval_every, "an int >= 0 (0 = at the end)")
    _check(is_int(c.image_every) and c.image_every >= 0, "image_every", c.image_every, "an int >= 0 (0 = never)")
    _check(
        is_int(c.checkpoint_every) and c.checkpoint_every >= 0,
        "checkpoint_every",
        c.checkpoint_every,
        "an int >= 0 (0 = at the end only)",
    )
    _check(
        is_int(c.keep_checkpoints) and c.keep_checkpoints >= 1, "keep_checkpoints", c.keep_checkpoints, "an int >= 1"
    )


def prepare_config(config) -> ml_collections.ConfigDict:
    """Merges ``config`` over the engine's and its task's defaults and checks it; returns the merged config.

    The task (``config.task``, default ``"classification"``) is resolved first; every key of ``config`` must be one
    of the engine's (:func:`default_config`), of the task's (``TaskClass.default_config()``) or of
    :data:`OPTIONAL_SECTIONS`, and ``config.model``'s keys those of the model (``TaskClass.model_keys(model)``, when
    the task defines it); then the engine's values (:func:`validate_config`) and the task's
    (``TaskClass.check_config(merged)``, when it defines it) are checked. Everything here is cheap (no data is
    read, nothing compiles), so a bad config fails at once.

    Raises:
      ConfigError: an unknown key (with the closest valid ones) or a value that is not valid.

    >>> prepare_config({"batch_size": 64}).batch_size
    64
    >>> prepare_config({"data": {"crop_paddding": 4}})
    Traceback (most recent call last):
    ...
    mmjax.errors.ConfigError: config.data.crop_paddding is not a known setting of config.data; did you mean crop_padding? (valid keys: crop_padding, data_dir, eval_split, flip, mean, name, std, train_split)
    """
    if not hasattr(config, "items"):
        raise ConfigError(f"a config must be a ConfigDict or dict, got {type(config).__name__}")
    task_class = _task_class(config.get("task", DEFAULT_TASK))
    defaults = merge(default_config(), task_defaults(task_class))
    merged = merge(defaults, config)
    model_keys = getattr(task_class, "model_keys", None)
    known_model_keys = model_keys(merged.model) if model_keys is not None and "model" in merged else None
    check_known_keys(config, defaults, known_model_keys)
    validate_config(merged)
    check_task = getattr(task_class, "check_config", None)
    if check_task is not None:
        check_task(merged)
    return merged


def to_json(config: ml_collections.ConfigDict) -> str:
    """The config as JSON (tuples become lists).

    >>> json.loads(to_json(ml_collections.ConfigDict({"seed": 0, "rules": (("bias", 0.0),)})))
    {'rules': [['bias', 0.0]], 'seed': 0}
    """
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


#: Keys that the engine's defaults held before each task declared its own (saved in the ``config.json`` of older
#: runs whatever their task); :func:`from_json` drops those that the run's task does not declare.
LEGACY_ENGINE_KEYS = {
    "label_smoothing": None,
    "data": ("name", "data_dir", "train_split", "eval_split", "crop_padding", "flip", "mean", "std"),
}


def drop_legacy_keys(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Removes from a saved config the :data:`LEGACY_ENGINE_KEYS` that its task does not declare, so that a run
    saved before the task declared its own keys still passes :func:`prepare_config`; returns ``config``.

    >>> old = ml_collections.ConfigDict({"task": "node_classification", "label_smoothing": 0.0,
    ...                                  "data": {"name": "karate_club", "flip": False}})
    >>> drop_legacy_keys(old).to_dict()
    {'data': {'name': 'karate_club'}, 'label_smoothing': 0.0, 'task': 'node_classification'}
    """
    try:
        declared = task_defaults(_task_class(config.get("task", DEFAULT_TASK)))
    except ValueError:
        return config  # an unknown task: prepare_config reports it
    for key, subkeys in LEGACY_ENGINE_KEYS.items():
        if key not in config or key in declared and subkeys is None:
            continue
        if subkeys is None:
            del config[key]
        elif _is_section(config[key]):
            keep = declared.get(key, {}) or {}
            for sub in subkeys:
                if sub in config[key] and sub not in keep:
                    del config[key][sub]
    return config


def from_json(text: str) -> ml_collections.ConfigDict:
    """Reads a config written by :func:`to_json` (decay rules come back as tuples; keys that older versions saved
    for every task are dropped where the task does not declare them, :func:`drop_legacy_keys`).

    >>> from_json(to_json(default_config())).optimizer.decay_rules[0][1]
    0.0
    """
    d = json.loads(text)
    rules = d.get("optimizer", {}).get("decay_rules")
    if rules is not None:
        d["optimizer"]["decay_rules"] = tuple(tuple(r) for r in rules)
    return drop_legacy_keys(ml_collections.ConfigDict(d))
