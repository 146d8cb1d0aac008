"""Parallel modes as a config value: ``"single"``, ``"pmap"`` and ``"sharded"``.

* ``"single"``: one device, ``jax.jit``.
* ``"pmap"``: ``jax.pmap`` over the local devices with the named axis ``"batch"``; the state is replicated (a leading
  device axis), each device gets ``B / devices`` examples, gradients are averaged with ``lax.pmean``.
* ``"sharded"``: ``jax.jit`` over a one-axis ``Mesh`` (``"data"``, Auto axis type) with ``NamedSharding``; the batch is
  split over ``"data"`` (data parallel) and the state is replicated, or, with ``fsdp=True``, every state leaf of at
  least ``fsdp_min_size`` elements is split along its largest axis divisible by the device count (FSDP-style: the
  compiler all-gathers parameters for the forward/backward and reduce-scatters gradients).

All three give the same parameters after the same steps on the same data, up to float32 round-off. The *canonical*
state (what checkpoints hold) is the unreplicated state; :meth:`Plan.to_canonical` / :meth:`Plan.from_canonical`
convert.

>>> plan = make_plan("single")
>>> plan.num_devices
1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MODES = ("single", "pmap", "sharded")
PMAP_AXIS = "batch"
MESH_AXIS = "data"


def split_micro_batches(batch: Any, accum: int, groups: int = 1) -> Any:
    """Reshapes every leaf ``[B, ...]`` to ``[accum, B // accum, ...]``, keeping each of ``groups`` device blocks local.

    Example ``i`` of device block ``g`` (``B = groups * b``) goes to micro-batch ``(i % b) // (b // accum)``, so under
    ``"sharded"`` every micro-batch still has ``b // accum`` examples on each device.

    >>> x = np.arange(8)
    >>> split_micro_batches(x, 2, groups=2).tolist()
    [[0, 1, 4, 5], [2, 3, 6, 7]]
    """

    def split(x):
        b = x.shape[0]
        if b % (groups * accum):
            raise ValueError(
                f"batch leaf of shape {x.shape}: leading size {b} is not divisible by devices*grad_accum_steps"
                f" = {groups}*{accum}; change config.batch_size or config.optimizer.grad_accum_steps"
            )
        y = x.reshape((groups, accum, b // (groups * accum)) + x.shape[1:])
        y = jnp.swapaxes(y, 0, 1) if isinstance(x, jax.Array) else np.swapaxes(y, 0, 1)
        return y.reshape((accum, b // accum) + x.shape[1:])

    return jax.tree.map(split, batch)


@dataclasses.dataclass
class Plan:
    """How the state and batches are laid out on devices for one parallel ``mode``.

    Attributes:
      mode: one of :data:`MODES`.
      devices: the devices used (one for ``"single"``).
      fsdp: shard large state leaves over the mesh (``"sharded"`` only).
      fsdp_min_size: leaves with fewer elements stay replicated.

    A host batch ``[B, ...]`` becomes ``[devices, B // devices, ...]`` under ``"pmap"``; the canonical state gains a
    leading device axis and loses it again:

    >>> plan = Plan("pmap", jax.local_devices()[:1])
    >>> plan.num_devices, plan.axis_name, plan.place_batch({"x": np.zeros((4, 3))})["x"].shape
    (1, 'batch', (1, 4, 3))
    >>> placed = plan.from_canonical({"w": np.ones(2)})
    >>> placed["w"].shape, plan.to_canonical(placed)["w"].shape
    ((1, 2), (2,))
    """

    mode: str
    devices: list
    fsdp: bool = False
    fsdp_min_size: int = 2**14

    def __post_init__(self):
        self.mesh = Mesh(np.array(self.devices), (MESH_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))

    @property
    def num_devices(self) -> int:
        """Number of devices the batch is split over."""
        return len(self.devices)

    @property
    def axis_name(self) -> str | None:
        """The named axis the task sees (``"batch"`` under pmap, else ``None``)."""
        return PMAP_AXIS if self.mode == "pmap" else None

    # ----------------------------------------------------------------------------------------------- checks
    def check_batch_size(self, batch_size: int, accum: int = 1, what: str = "config.batch_size") -> None:
        """Raises ``ValueError`` unless ``batch_size`` divides into ``devices * accum`` equal parts (before compiling).

        >>> make_plan("single").check_batch_size(6, accum=4)
        Traceback (most recent call last):
        ...
        ValueError: config.batch_size=6 is not divisible by devices (1) * grad_accum_steps (4) = 4; ...
        """
        hosts = jax.process_count() if self.mode == "pmap" else 1  # pmap devices are per host
        n = self.num_devices * hosts * accum
        if batch_size <= 0 or batch_size % n:
            raise ValueError(
                f"{what}={batch_size} is not divisible by devices ({self.num_devices}) * grad_accum_steps ({accum})"
                f" = {n}; choose a multiple of {n} (or change config.parallel.mode / grad_accum_steps)"
            )

    # ------------------------------------------------------------------------------------------------ state
    def state_shardings(self, abstract_state: Any) -> Any:
        """The sharding of each leaf of the canonical state (as the jitted step wants it)."""
        if self.mode != "sharded":
            return jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(self.devices[0]), abstract_state)
        return jax.tree.map(self._leaf_sharding, abstract_state)

    def _leaf_sharding(self, leaf) -> NamedSharding:
        shape = tuple(getattr(leaf, "shape", ()))
        n = self.num_devices
        if self.fsdp and int(np.prod(shape, dtype=np.int64)) >= self.fsdp_min_size:
            candidates = [i for i, d in enumerate(shape) if d % n == 0]
            if candidates:
                axis = max(candidates, key=lambda i: shape[i])
                spec = [None] * len(shape)
                spec[axis] = MESH_AXIS
                return NamedSharding(self.mesh, P(*spec))
        return NamedSharding(self.mesh, P())

    def from_canonical(self, state: Any) -> Any:
        """Places a canonical (unreplicated) state for this mode; pmap gets a leading device axis."""
        if self.mode == "pmap":
            stacked = jax.tree.map(
                lambda x: np.broadcast_to(np.asarray(x)[None], (self.num_devices,) + np.shape(x)), state
            )
            return self._put_pmap(stacked)
        return jax.device_put(state, self.state_shardings(state))

    def to_canonical(self, placed: Any) -> Any:
        """The canonical state back from this mode's layout (pmap: device 0's copy)."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: x[0], placed)
        return placed

    # ---------------------------------------------------------------------------------------------- batches
    def place_batch(self, batch: Any) -> Any:
        """Moves a host batch (numpy pytree, leading example axis) onto the devices in this mode's layout."""
        if self.mode == "single":
            return jax.device_put(batch, self.devices[0])
        if self.mode == "pmap":

            def reshape(x):
                x = np.asarray(x)
                if x.shape[0] % self.num_devices:
                    raise ValueError(
                        f"batch leaf of shape {x.shape} does not split over {self.num_devices} devices; "
                        "its leading size must be a multiple of the device count"
                    )
                return x.reshape((self.num_devices, x.shape[0] // self.num_devices) + x.shape[1:])

            return self._put_pmap(jax.tree.map(reshape, batch))
        sharding = NamedSharding(self.mesh, P(MESH_AXIS))
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

    def _put_pmap(self, stacked):
        return jax.device_put(
            stacked, NamedSharding(self.mesh, P(MESH_AXIS))
        )  # pmap (built on shard_map in current JAX) takes arrays split over its devices along axis 0

    # ---------------------------------------------------------------------------------------------- compile
    def compile_train_step(self, step_fn: Callable, abstract_state: Any) -> Callable:
        """Compiles ``step_fn(state, batch) -> (state, metrics)`` for this mode (the state argument is donated)."""
        if self.mode == "single":
            return jax.jit(step_fn, donate_argnums=0)
        if self.mode == "pmap":
            return jax.pmap(step_fn, axis_name=PMAP_AXIS, devices=self.devices, donate_argnums=0)
        state_sh = self.state_shardings(abstract_state)
        return jax.jit(
            step_fn,
            in_shardings=(state_sh, NamedSharding(self.mesh, P(MESH_AXIS))),
            out_shardings=(state_sh, NamedSharding(self.mesh, P())),
            donate_argnums=0,
        )

    def compile_eval_step(self, eval_fn: Callable) -> Callable:
        """Compiles ``eval_fn(params, batch) -> dict of sums``; the result is summed over devices and unreplicated."""
        if self.mode == "single":
            return jax.jit(eval_fn)
        if self.mode == "pmap":
            summed = jax.pmap(
                lambda p, b: jax.lax.psum(eval_fn(p, b), PMAP_AXIS), axis_name=PMAP_AXIS, devices=self.devices
            )
            return lambda p, b: jax.tree.map(lambda x: x[0], summed(p, b))
        return jax.jit(eval_fn, out_shardings=NamedSharding(self.mesh, P()))

    def params_for_eval(self, placed_state: Any) -> Any:
        """The params of a placed state, laid out as the compiled eval step wants them."""
        return placed_state.params


def make_plan(mode: str, num_devices: int = 0, fsdp: bool = False, fsdp_min_size: int = 2**14) -> Plan:
    """Builds the :class:`Plan` for ``config.parallel``.

    Args:
      mode: ``"single"``, ``"pmap"`` or ``"sharded"``.
      num_devices: devices to use (0 = all: ``jax.local_devices()`` for pmap, ``jax.devices()`` for sharded).
      fsdp: shard large state leaves (``"sharded"`` only).
      fsdp_min_size: smallest leaf (in elements) that ``fsdp`` shards.

    >>> make_plan("pmap", num_devices=1).axis_name
    'batch'
    """
    if mode not in MODES:
        raise ValueError(f"config.parallel.mode={mode!r} is not valid; valid choices: {list(MODES)}")
    if not isinstance(num_devices, int) or num_devices < 0:
        raise ValueError(f"config.parallel.num_devices={num_devices!r} must be an int >= 0 (0 = all devices)")
    if fsdp and mode != "sharded":
        raise ValueError(f"config.parallel.fsdp=True needs config.parallel.mode='sharded', got mode={mode!r}")
    if mode == "single":
        if jax.process_count() > 1:
            raise ValueError("config.parallel.mode='single' cannot run with several processes; use 'sharded'")
        devices = [jax.local_devices()[0]]
    else:
        available = jax.local_devices() if mode == "pmap" else jax.devices()
        if num_devices > len(available):
            raise ValueError(
                f"config.parallel.num_devices={num_devices} but only {len(available)} devices are available"
            )
        devices = list(available[: num_devices or len(available)])
    return Plan(mode=mode, devices=devices, fsdp=fsdp, fsdp_min_size=fsdp_min_size)
