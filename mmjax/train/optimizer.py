"""AdamW with path-based weight-decay rules, warmup + cosine schedule and gradient clipping.

The update of one parameter tensor ``p`` with gradient ``g`` (after clipping the global norm to ``grad_clip``) is

    m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2,   (bias-corrected m_hat, v_hat)
    p <- p - lr(t) * ( m_hat / (sqrt(v_hat) + eps) + weight_decay * mult(path) * p )

with ``lr(t)`` rising linearly from 0 to ``lr`` over ``warmup_steps`` and then following a cosine to
``lr * end_lr_ratio`` at ``total_steps`` (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019).
``mult(path)`` comes from big_vision style ``(regex, multiplier)`` rules matched against the parameter path
``"module/submodule/name"``; the first rule that matches wins. The default rules decay only ``kernel`` tensors
(including the patch-embedding projection, as big_vision does), so biases, norm scales and embeddings (position
embeddings, class tokens, MAP probes, ``nn.Embed`` tables, whose leaf is ``embedding``) are skipped.

An exponential moving average of the parameters (``config.optimizer.ema_decay > 0``) is kept by the engine in the
train state (:class:`mmjax.train.state.TrainState` ``ema_params``) and updated after every optimizer step inside the
compiled step (:func:`update_ema`, :func:`ema_decay_at`); evaluation uses it.

Gradient accumulation is done by the engine (a scan over micro-batches inside one step), so one optimizer step is one
call of the train step and the schedule counts optimizer steps. bf16 compute needs no loss scaling (its exponent range
is float32's).

>>> import jax.numpy as jnp
>>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "pos_embedding": jnp.ones((1, 4, 2))}
>>> decay_multipliers(params, DEFAULT_DECAY_RULES)
{'dense': {'bias': 0.0, 'kernel': 1.0}, 'pos_embedding': 0.0}
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mmjax.errors import UserError

#: First match wins; matched with ``re.fullmatch`` against "a/b/name". Kernels decay; everything else does not.
DEFAULT_DECAY_RULES: tuple[tuple[str, float], ...] = (
    (r"(.*/)?(pos_?embedding|positional_embedding|posemb|cls|cls_token|probe|embedding)", 0.0),  # leaf names
    (r".*kernel", 1.0),
    (r".*", 0.0),
)


def param_path(path: Sequence[Any]) -> str:
    """Joins a ``jax.tree_util`` key path into ``"a/b/c"``.

    >>> import jax
    >>> [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": {"b": 1}})[0]]
    ['a/b']
    """
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def decay_multipliers(params: Any, rules: Sequence[tuple[str, float]]) -> Any:
    """Returns a pytree like ``params`` holding the weight-decay multiplier (float) of each leaf.

    Args:
      params: the parameter pytree.
      rules: ``(regex, multiplier)`` pairs; a leaf takes the multiplier of the first regex that fully matches its path.

    Raises:
      ValueError: if a rule is malformed or a leaf matches no rule.

    >>> decay_multipliers({"kernel": 0, "bias": 0}, [(".*kernel", 1.0), (".*", 0.0)])
    {'bias': 0.0, 'kernel': 1.0}
    """
    compiled = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise UserError(f"config.optimizer.decay_rules: each rule must be (regex, multiplier), got {rule!r}")
        pattern, mult = rule
        try:
            compiled.append((re.compile(pattern), float(mult)))
        except re.error as e:
            raise UserError(f"config.optimizer.decay_rules: bad regex {pattern!r}: {e}") from e

    def lookup(path, _):
        name = param_path(path)
        for regex, mult in compiled:
            if regex.fullmatch(name):
                return mult
        raise UserError(
            f"config.optimizer.decay_rules: parameter {name!r} matches no rule; add a catch-all ('.*', 0.0)"
        )

    return jax.tree_util.tree_map_with_path(lookup, params)


def add_scaled_weight_decay(weight_decay: float, multipliers: Any) -> optax.GradientTransformation:
    """``updates + weight_decay * mult * params`` leaf by leaf (``mult`` a pytree of floats like ``params``).

    Inside ``optax.multi_transform`` (e.g. a frozen tower, :func:`mmjax.train.contrastive.freeze`) this
    transformation sees only its own parameters: the others arrive as ``optax.MaskedNode`` and pass through
    unchanged, while ``multipliers`` still covers the whole tree.

    >>> import jax.numpy as jnp
    >>> tx = add_scaled_weight_decay(0.5, {"w": 1.0, "b": 0.0})
    >>> p = {"w": jnp.ones(2), "b": jnp.ones(2)}
    >>> u, _ = tx.update({"w": jnp.zeros(2), "b": jnp.zeros(2)}, tx.init(p), p)
    >>> [float(u["w"][0]), float(u["b"][0])]
    [0.5, 0.0]
    >>> frozen_b = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, {"w": "train", "b": "frozen"})
    >>> u, _ = frozen_b.update({"w": jnp.zeros(2), "b": jnp.ones(2)}, frozen_b.init(p), p)
    >>> [float(u["w"][0]), float(u["b"][0])]
    [0.5, 0.0]
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("add_scaled_weight_decay needs params: call tx.update(grads, state, params)")

        def decay(m, u, p):
            if isinstance(u, optax.MaskedNode) or not m:  # masked out by multi_transform, or no decay
                return u
            return u + (weight_decay * m) * p

        # Mapped over the multipliers: a masked subtree of updates/params is a MaskedNode where they have a float.
        return jax.tree.map(decay, multipliers, updates, params), state

    return optax.GradientTransformation(init, update)


def make_schedule(lr: float, warmup_steps: int, total_steps: int, end_lr_ratio: float = 0.0):
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * end_lr_ratio``.

    >>> s = make_schedule(1.0, 10, 110)
    >>> [round(float(s(t)), 3) for t in (0, 5, 10, 60, 110)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    warmup_steps = int(min(warmup_steps, max(total_steps - 1, 0)))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=lr * end_lr_ratio,
    )


def make_optimizer(opt_config, params: Any, total_steps: int):
    """Builds ``(tx, schedule)`` from ``config.optimizer`` for ``params``.

    ``opt_config`` fields: ``lr``, ``weight_decay``, ``b1``, ``b2``, ``eps``, ``warmup_steps``, ``end_lr_ratio``,
    ``grad_clip`` (0 disables), ``decay_rules`` (see :data:`DEFAULT_DECAY_RULES`).

    >>> import ml_collections, jax.numpy as jnp
    >>> cfg = ml_collections.ConfigDict(dict(lr=1e-3, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
    ...     warmup_steps=2, end_lr_ratio=0.0, grad_clip=1.0, decay_rules=DEFAULT_DECAY_RULES))
    >>> tx, schedule = make_optimizer(cfg, {"kernel": jnp.ones(2)}, total_steps=10)
    >>> round(float(schedule(2)), 6)
    0.001
    """
    schedule = make_schedule(opt_config.lr, opt_config.warmup_steps, total_steps, opt_config.end_lr_ratio)
    mults = decay_multipliers(params, opt_config.decay_rules)
    parts = []
    if opt_config.grad_clip and opt_config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(opt_config.grad_clip))
    parts += [
        optax.scale_by_adam(b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps),
        add_scaled_weight_decay(opt_config.weight_decay, mults),
        optax.scale_by_learning_rate(schedule),
    ]
    return optax.chain(*parts), schedule


def global_norm(tree: Any) -> jax.Array:
    """``sqrt(sum of squares)`` over all leaves (float32).

    >>> float(global_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0])}))
    5.0
    """
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def ema_decay_at(decay: float, step: Any, warmup: bool = False) -> Any:
    """The EMA decay of the update that follows ``step`` completed optimizer steps (``step`` = 0 for the first).

    Without ``warmup`` it is ``decay``; with it, ``min(decay, (1 + step) / (10 + step))`` (the warm-up of
    TensorFlow's ``ExponentialMovingAverage(num_updates=...)``: the ``k``-th update uses at most ``k / (k + 9)``, so the
    average forgets the initial parameters quickly early in training and settles at ``decay``).

    >>> ema_decay_at(0.999, 5)
    0.999
    >>> [round(float(ema_decay_at(0.999, jnp.int32(t), warmup=True)), 4) for t in (0, 1, 90, 100000)]
    [0.1, 0.1818, 0.91, 0.999]
    """
    if not warmup:
        return decay
    t = jnp.asarray(step).astype(jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def update_ema(ema_params: Any, params: Any, decay: Any) -> Any:
    """``ema <- decay * ema + (1 - decay) * params`` leaf by leaf, computed as ``ema + (1 - decay) * (params - ema)``.

    The two forms are equal in exact arithmetic; the second leaves a parameter that did not change (a frozen tower,
    initialised to the same values) bit-identical to its EMA, where ``decay * p + (1 - decay) * p`` can round one unit
    away. Each leaf is computed in at least float32 and stored in its own dtype (a bfloat16 EMA still averages in
    float32 within a step). There is no debiasing (``optax.ema(debias=True)`` divides by ``1 - decay**t`` to undo its
    initialisation at zero): the engine's EMA starts at the initial parameters, a weighted average from the first
    step, whose weight ``decay**t`` on the initial parameters ``ema_decay_at(..., warmup=True)`` shrinks early on.

    >>> ema = update_ema({"w": jnp.zeros(2), "frozen": jnp.full(2, 0.3)}, {"w": jnp.ones(2), "frozen": jnp.full(2, 0.3)},
    ...                  0.9)
    >>> [round(float(x), 6) for x in ema["w"]], bool((ema["frozen"] == jnp.float32(0.3)).all())
    ([0.1, 0.1], True)
    """

    def one(e, p):
        dtype = jnp.promote_types(e.dtype, jnp.float32)
        e32 = e.astype(dtype)
        return (e32 + (1 - decay) * (p.astype(dtype) - e32)).astype(e.dtype)

    return jax.tree.map(one, ema_params, params)
