"""The train state: step counter, parameters and optimizer state in one pytree.

>>> import jax.numpy as jnp, optax
>>> state = TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1))
>>> int(state.step), state.params["w"].shape
(0, (3,))
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to continue exactly: ``step`` (int32 scalar), ``params``, ``opt_state``.

    The dropout key and the data order are derived from ``(config.seed, step)``, so they need no storage.
    The optimizer itself (a function) is not part of the state; it is rebuilt from the config.

    It is an immutable pytree (``flax.struct.dataclass``): a step returns a new state with ``replace``.

    >>> tx = optax.sgd(0.5)
    >>> state = TrainState.create({"w": jnp.ones(2)}, tx)
    >>> updates, opt_state = tx.update({"w": jnp.ones(2)}, state.opt_state)
    >>> state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
    ...                       opt_state=opt_state)
    >>> int(state.step), state.params["w"].tolist()
    (1, [0.5, 0.5])
    """

    step: Any
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> TrainState:
        """Returns the state at step 0 for ``params`` under optimizer ``tx``.

        >>> s = TrainState.create({"b": jnp.ones(2)}, optax.adam(1e-3))
        >>> int(s.step)
        0
        """
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
