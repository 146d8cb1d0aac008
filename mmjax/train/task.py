"""The Task interface: what a task supplies so that one engine trains every kind of model.

The engine (:mod:`mmjax.train.loop`) owns the optimizer, the parallel mode, the step loop, checkpoints and
metrics. A *task* joins a model, a loss, metrics and data. Eight are built in (:data:`TASKS`): image (and
image-graph) classification (:class:`mmjax.train.classification.ClassificationTask`), contrastive image-text
training - CLIP, SigLIP, LiT (:class:`mmjax.train.contrastive.ContrastiveTask`) -, transductive node
classification (:class:`mmjax.train.node_classification.NodeClassificationTask`), text-to-image diffusion
(:class:`mmjax.train.diffusion.DiffusionTask`), image captioning - teacher forcing, CapPa
(:class:`mmjax.train.captioning.CaptioningTask`) -, CoCa (:class:`mmjax.train.coca.CoCaTask`), open-vocabulary
detection (:class:`mmjax.train.detection.DetectionTask`) and image-text matching against hard negatives - graph
fusion of patches and words, cross-attention, CLIP - (:class:`mmjax.train.graph_matching.GraphMatchingTask`); each
plugs into the same engine, which knows none of them.

Contract
--------
A task is any object with these members (duck-typed; :class:`Task` spells them out as a ``typing.Protocol``):

``init_params(rng, batch) -> params``
    Initialise the model. ``batch`` is one *host* batch (numpy pytree) used only for shapes. Returns the
    ``params`` pytree (only the ``"params"`` collection is trained; stateful collections such as batch statistics
    are not supported by the engine).

``loss(params, batch, rng, *, train, axis_name) -> (loss, metrics)``
    The scalar training loss on one *device-local* batch and a dict of scalar metrics (means over the local batch,
    e.g. ``{"accuracy": ...}``). ``rng`` is a fresh key per step (and per device under ``pmap``) for dropout.
    ``axis_name`` tells the task how its batch is laid out:

    * ``None`` in ``"single"`` and ``"sharded"`` modes: ``batch`` holds the *global* batch (under ``"sharded"``
      its arrays are global ``jax.Array``\\ s split over the mesh; the compiler inserts the communication). A loss
      that needs the whole global batch (contrastive) simply computes on it.
    * ``"batch"`` (the pmap axis name) in ``"pmap"`` mode: ``batch`` is this device's shard. A loss that needs the
      whole global batch gathers it with ``jax.lax.all_gather(x, axis_name, tiled=True)``; ``lax.axis_index``
      gives this device's position.

    The engine averages gradients over devices (``lax.pmean``), so the loss it optimises is the *mean over devices*
    of what ``loss`` returns; for a contrastive loss, return the mean over this device's rows of the loss against
    the gathered global batch, and the gradient is exact (the transpose of ``all_gather`` sums the cotangents of
    every device). Metrics returned by ``loss`` are likewise ``pmean``-ed.

``eval_metrics(params, batch, *, axis_name) -> dict[str, Array]``
    *Sums* over one device-local (pmap) or global (single/sharded) evaluation batch, including a ``"count"`` entry
    (number of real examples). Padded examples (see below) must be excluded, usually with ``batch["mask"]``. The
    engine sums over batches and devices and reports ``name = sum / count`` for every other key.

``train_batches(start_step) -> Iterator[batch]``
    Host-local training batches for steps ``start_step, start_step + 1, ...``. The batch for step ``s`` must be a
    function of the seed and ``s`` only (this is what makes a resumed run continue exactly). Under multi-host
    training each host yields its share (``global_batch // jax.process_count()`` examples).

``eval_batches() -> Iterable[batch]``
    Host-local evaluation batches, all of the same shape (pad the last one and mark padding in ``batch["mask"]``).

``num_train_examples -> int`` and ``example_count(batch) -> int``
    Used for epochs and for throughput (images/s, graphs/s, pairs/s): ``example_count`` counts the real examples in
    a host training batch; the engine's throughput and progress bar count ``example_count(batch) *
    jax.process_count()`` examples per step.

Config (classmethods, called before the task is built)
-------------------------------------------------------
``default_config() -> ConfigDict``
    The task's keys and sections with their defaults (e.g. ``model``, ``data``, ``label_smoothing``); the engine
    merges them under its own (:func:`mmjax.train.config.prepare_config`), and a key that neither declares is an
    error. A task without it accepts only the engine's keys.

``model_keys(model_config) -> collection of str`` (optional)
    The keys ``config.model`` may hold, usually ``{"name"}`` plus the model class's constructor fields
    (:func:`constructor_keys`); without it, ``config.model`` is not checked before the task is built.

``check_config(config)`` (optional)
    Checks the task's values on the merged config; raises :class:`mmjax.errors.ConfigError`.

Optional members
----------------
``wrap_optimizer(tx, params) -> tx``
    Called once with the engine's optimizer (AdamW + schedule + clipping); returns the one to use (e.g. zero updates
    for a frozen tower with ``optax.multi_transform``).

``final_report(params, workdir) -> dict``
    Called once after the final evaluation (not after a SIGTERM stop) with the canonical params; returns extra
    results (numbers, file paths) that join the ``eval_*`` entries of the result (e.g. full-set retrieval, plots).

``unit``
    What one example is called in the progress bar ("img", "pair", "graph").

Batch layout
------------
A batch is a pytree of arrays (usually a dict) whose leaves all share a leading *example axis*, which the engine
splits over devices: ``[B, ...]`` stays as is under ``"single"``; becomes ``[devices, B // devices, ...]`` under
``"pmap"``; is placed with ``NamedSharding(mesh, P("data"))`` under ``"sharded"``. ``B`` must be divisible by the
number of devices (and by ``grad_accum_steps`` times it) or the engine raises ``ValueError`` before compiling.
Gradient accumulation splits each device's examples into ``grad_accum_steps`` equal micro-batches along the same
axis (note: a contrastive loss then contrasts within a micro-batch).

A task whose natural batch has no such axis - graphs, where nodes and edges come in different counts - stacks
``S`` padded sub-batches: each leaf of a ``Graph`` batch is ``[S, ...]`` with every sub-batch padded to the same
node/edge/graph counts and ``S`` a multiple of the device count; its ``loss`` ``vmap``-s over the leading axis (or
merges it) and masks the padding. ``example_count`` then returns the number of real graphs.

Registering a task
------------------
``config.task`` names the task: a key of :data:`TASKS` or a ``"module.path:ClassName"``. The class is built as
``Cls(config)`` with the merged config and reads what it needs from it (``config.model``, ``config.data``, ...).
A class whose constructor also takes ``workdir`` is built as ``Cls(config, workdir=...)`` by the engine: the run's
directory (a local path or a URI, see :mod:`mmjax.train.storage`), for files that belong with the run.

>>> from mmjax.train.task import resolve_task_class
>>> resolve_task_class("classification").__name__
'ClassificationTask'
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import jax

from mmjax.errors import ConfigError

#: Built-in tasks, name -> "module:attribute" (imported lazily). Adding a task is one line here, or pass a path.
TASKS: dict[str, str] = {
    "classification": "mmjax.train.classification:ClassificationTask",
    "contrastive": "mmjax.train.contrastive:ContrastiveTask",
    "node_classification": "mmjax.train.node_classification:NodeClassificationTask",
    "diffusion": "mmjax.train.diffusion:DiffusionTask",
    "captioning": "mmjax.train.captioning:CaptioningTask",
    "coca": "mmjax.train.coca:CoCaTask",
    "detection": "mmjax.train.detection:DetectionTask",
    "graph_matching": "mmjax.train.graph_matching:GraphMatchingTask",
}


@runtime_checkable
class Task(Protocol):
    """What the engine needs from a task; see the module docstring for the full contract.

    ``isinstance(obj, Task)`` checks that the members exist (not their signatures):

    >>> import ml_collections
    >>> cfg = ml_collections.ConfigDict({"task": "node_classification", "model": {"name": "gcn", "hidden": 4},
    ...                                  "data": {"name": "karate_club"}, "parallel": {"mode": "single"},
    ...                                  "batch_size": 1, "eval_batch_size": 1, "label_smoothing": 0.0, "seed": 0,
    ...                                  "plot": False})
    >>> isinstance(make_task(cfg), Task), isinstance(object(), Task)
    (True, False)
    """

    num_train_examples: int

    def init_params(self, rng: Any, batch: Any) -> Any:
        """Returns the initial ``params`` pytree, given a PRNG key and one host batch (for shapes)."""

    def loss(self, params: Any, batch: Any, rng: Any, *, train: bool, axis_name: str | None):
        """Returns ``(scalar_loss, {metric_name: scalar})`` on a device-local (pmap) or global batch."""

    def eval_metrics(self, params: Any, batch: Any, *, axis_name: str | None) -> dict:
        """Returns sums over the batch, including ``"count"`` (real examples, padding excluded)."""

    def train_batches(self, start_step: int) -> Iterator[Any]:
        """Yields the host-local training batch of step ``start_step``, then of each following step."""

    def eval_batches(self) -> Iterable[Any]:
        """Yields host-local evaluation batches of one shape (last one padded, ``batch["mask"]`` marks real)."""

    def example_count(self, batch: Any) -> int:
        """Number of real examples in a host batch (for throughput)."""


def init_model_params(model, rngs, *args, **kwargs) -> Any:
    """``model.init(rngs, *args, **kwargs)["params"]`` as one compiled program, with the eager values bit for bit.

    Run eagerly, ``init`` dispatches every initialiser and every op of the forward pass one by one, and XLA compiles
    each (the detection job's model: 224 programs, 18 s on a 2-core CPU, against 5 s for the whole). Compiled whole,
    XLA's algebraic simplifier would fold the constants of an initialiser (``normal(0.02)`` is
    ``0.02 * (sqrt(2) * erfinv(u))``, two roundings, which it makes one multiplication by ``0.02 * sqrt(2)``) and
    change the last bit of some parameters, and with them every number a training run reports; the program is
    compiled without that pass (``xla_disable_hlo_passes=algsimp``), so the parameters are those of the eager
    ``init``. Keyword arguments with a ``shape`` (arrays) are traced, the others (``train=False``) are static. Under a
    transformation (``jax.eval_shape``, ``jax.jit``) it is ``model.init``, traced into the outer program. The jitted
    function is cached per model and static arguments (and jit caches its executable per input type): a second task
    or a resumed run in the same process does not compile it again.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    >>> model, x = nn.Dense(3, kernel_init=nn.initializers.normal(0.02)), jnp.ones((1, 2))
    >>> params = init_model_params(model, jax.random.key(0), x)
    >>> params["kernel"].shape
    (2, 3)
    >>> bool(np.array_equal(params["kernel"], model.init(jax.random.key(0), x)["params"]["kernel"]))
    True
    """
    arrays = {k: v for k, v in kwargs.items() if hasattr(v, "shape")}
    static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((rngs, args, arrays))):
        return model.init(rngs, *args, **kwargs)["params"]  # inside jit / eval_shape (compiler options are top-level)
    try:
        program = _init_program(model, static)
    except TypeError:  # an unhashable model or static argument: compiled, not cached
        program = _init_program.__wrapped__(model, static)
    return program(rngs, args, arrays)


@functools.lru_cache(maxsize=16)
def _init_program(model, static: tuple) -> Callable:
    return jax.jit(
        lambda rngs, args, arrays: model.init(rngs, *args, **arrays, **dict(static))["params"],
        compiler_options={"xla_disable_hlo_passes": "algsimp"},
    )


def load_object(path: str, what: str = "object") -> Any:
    """Imports ``"package.module:attribute"`` and returns the attribute.

    >>> load_object("collections:OrderedDict").__name__
    'OrderedDict'
    """
    if not isinstance(path, str) or ":" not in path:
        raise ConfigError(f"{what}: expected 'package.module:Attribute', got {path!r}")
    module_name, attr = path.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what}: cannot import module {module_name!r} from {path!r}: {e}") from e
    if not hasattr(module, attr):
        raise ConfigError(f"{what}: module {module_name!r} has no attribute {attr!r} (from {path!r})")
    return getattr(module, attr)


def resolve_named(name, table: dict, key: str, *, problem: str = "is not valid", kind: str = "Class") -> Any:
    """The object a config value names: a key of ``table`` (values ``"module:attr"``) or a ``"module:attr"`` path.

    ``key`` (e.g. ``"config.model.name"``), ``problem`` and ``kind`` word the error for anything else.

    >>> resolve_named("od", {"od": "collections:OrderedDict"}, "config.x").__name__
    'OrderedDict'
    >>> resolve_named("nope", {"od": "collections:OrderedDict"}, "config.x")
    Traceback (most recent call last):
    ...
    mmjax.errors.ConfigError: config.x='nope' is not valid; valid choices: ['od'] or a 'package.module:Class' path
    """
    if name in table:
        return load_object(table[name], key)
    if isinstance(name, str) and ":" in name:
        return load_object(name, key)
    raise ConfigError(f"{key}={name!r} {problem}; valid choices: {sorted(table)} or a 'package.module:{kind}' path")


def with_defaults(config, task_class) -> Any:
    """``config`` merged over the engine's and ``task_class``'s defaults (what :func:`mmjax.train.prepare_config`
    merges, without its checks): a task built directly from a partial config reads every key it declares.

    >>> from mmjax.train.node_classification import NodeClassificationTask
    >>> with_defaults({"model": {"hidden": 4}}, NodeClassificationTask).model.to_dict()
    {'hidden': 4, 'name': 'gcn'}
    """
    from mmjax.train.config import default_config, merge, task_defaults

    return merge(merge(default_config(), task_defaults(task_class)), config)


def check_label_smoothing(config) -> None:
    """Checks ``config.label_smoothing`` (a number in ``[0, 1)``) for the classification tasks.

    >>> check_label_smoothing({"label_smoothing": 0.1})  # valid: returns None
    >>> check_label_smoothing({"label_smoothing": 1.0})
    Traceback (most recent call last):
    ...
    mmjax.errors.ConfigError: config.label_smoothing=1.0 is not valid; expected a number in [0, 1)
    """
    from mmjax.train.config import check_value, is_number

    eps = config["label_smoothing"]
    check_value(is_number(eps) and 0 <= eps < 1, "label_smoothing", eps, "a number in [0, 1)")


def constructor_keys(cls) -> frozenset[str] | None:
    """The keyword arguments ``cls(...)`` takes: a Flax module's (or any dataclass's) init fields without Flax's
    ``parent`` and ``name``, else the parameters of its signature; ``None`` when it takes ``**kwargs`` (any key).

    >>> import flax.linen as nn
    >>> sorted(constructor_keys(nn.Dropout))
    ['broadcast_dims', 'deterministic', 'rate', 'rng_collection']
    >>> constructor_keys(dict) is None
    True
    """
    if dataclasses.is_dataclass(cls):
        return frozenset(f.name for f in dataclasses.fields(cls) if f.init) - {"parent", "name"}
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def instantiate_model(cls, fields: dict, num_classes: int):
    """``cls(**fields)`` with lists turned into tuples and ``num_classes`` passed when ``cls`` takes it and
    ``fields`` does not set it; a constructor error becomes a ValueError that names the config section.

    >>> instantiate_model(dict, {"features": [1, 2]}, num_classes=3)
    {'features': (1, 2)}
    """
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    if "num_classes" in params and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"config.model: cannot build {cls.__name__}(**{kwargs}): {e}") from e


def resolve_task_class(name: str):
    """Returns the task class for ``config.task``: a name in :data:`TASKS` or a ``"module:Class"`` path.

    >>> resolve_task_class("classification").__name__
    'ClassificationTask'
    """
    return resolve_named(name, TASKS, "config.task", problem="is not a known task", kind="ClassName")


def make_task(config, workdir: str | None = None) -> Task:
    """Builds the task named by ``config.task`` as ``TaskClass(config)``, or ``TaskClass(config, workdir=workdir)``
    when a run directory is given and the class takes one (for files that belong with the run, such as the
    contrastive task's word vocabulary, so that a checkpoint never depends on the data it was trained from).

    >>> import ml_collections
    >>> cfg = ml_collections.ConfigDict({"task": "node_classification", "model": {"name": "gcn", "hidden": 4},
    ...                                  "data": {"name": "karate_club"}, "parallel": {"mode": "single"},
    ...                                  "batch_size": 1, "eval_batch_size": 1, "label_smoothing": 0.0, "seed": 0,
    ...                                  "plot": False})
    >>> task = make_task(cfg)
    >>> type(task).__name__, task.num_train_examples
    ('NodeClassificationTask', 1)
    """
    cls = resolve_task_class(config.task)
    if workdir is not None and "workdir" in inspect.signature(cls).parameters:
        return cls(config, workdir=workdir)
    return cls(config)
