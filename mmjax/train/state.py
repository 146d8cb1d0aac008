"""The train state: step counter, parameters, optimizer state and (optionally) the EMA of the parameters in one pytree.

>>> import jax.numpy as jnp, optax
>>> state = TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1))
>>> int(state.step), state.params["w"].shape, state.ema_params
(0, (3,), None)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import GetAttrKey

_FIELDS = ("step", "params", "opt_state")


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training run needs to continue exactly: ``step`` (int32 scalar), ``params``, ``opt_state`` and,
    when ``config.optimizer.ema_decay > 0``, ``ema_params`` (the exponential moving average of the parameters, see
    :func:`mmjax.train.optimizer.update_ema`; ``None`` otherwise).

    The dropout key and the data order are derived from ``(config.seed, step)``, so they need no storage.
    The optimizer itself (a function) is not part of the state; it is rebuilt from the config.

    It is an immutable pytree: a step returns a new state with ``replace``. Its children are ``step``, ``params``,
    ``opt_state`` and ``ema_params`` only when that is not ``None``: a state without EMA is the same tree (same
    leaves, same key paths) as before the EMA existed, so its checkpoints are those of older runs and older
    checkpoints restore into it.

    >>> tx = optax.sgd(0.5)
    >>> state = TrainState.create({"w": jnp.ones(2)}, tx)
    >>> updates, opt_state = tx.update({"w": jnp.ones(2)}, state.opt_state)
    >>> state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
    ...                       opt_state=opt_state)
    >>> int(state.step), state.params["w"].tolist()
    (1, [0.5, 0.5])
    >>> [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    ['.step', ".params['w']"]
    """

    step: Any
    params: Any
    opt_state: Any
    ema_params: Any = None

    def replace(self, **changes) -> TrainState:
        """A copy with ``changes`` (field name -> new value)."""
        return dataclasses.replace(self, **changes)

    @property
    def eval_params(self) -> Any:
        """The parameters evaluation (and the task's ``final_report``) uses: ``ema_params`` when the state carries
        them, else ``params``.

        >>> s = TrainState.create({"w": jnp.ones(2)}, optax.sgd(0.1), ema=True)
        >>> s.eval_params is s.ema_params, TrainState.create({"w": jnp.ones(2)}, optax.sgd(0.1)).eval_params["w"].shape
        (True, (2,))
        """
        return self.params if self.ema_params is None else self.ema_params

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, *, ema: bool = False) -> TrainState:
        """Returns the state at step 0 for ``params`` under optimizer ``tx``; with ``ema``, ``ema_params`` starts as a
        copy of ``params`` (same tree, dtypes and placement; its own buffers, as the train step donates the state).

        >>> s = TrainState.create({"b": jnp.ones(2)}, optax.adam(1e-3), ema=True)
        >>> int(s.step), s.ema_params["b"].tolist(), s.ema_params["b"] is s.params["b"]
        (0, [1.0, 1.0], False)
        """
        ema_params = jax.tree.map(jnp.copy, params) if ema else None
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=ema_params)


def _flatten(state: TrainState):
    names = _FIELDS + (("ema_params",) if state.ema_params is not None else ())
    return [(GetAttrKey(n), getattr(state, n)) for n in names], state.ema_params is not None


def _unflatten(has_ema: bool, children) -> TrainState:
    return TrainState(*children) if has_ema else TrainState(*children, ema_params=None)


jax.tree_util.register_pytree_with_keys(TrainState, _flatten, _unflatten)
