"""Parallel modes as a config value: ``"single"``, ``"pmap"`` and ``"sharded"``.

* ``"single"``: one device, ``jax.jit``.
* ``"pmap"``: ``jax.pmap`` with the named axis ``"batch"``; the state is replicated (a leading axis of this process's
  devices), each device gets ``B / devices`` examples, gradients are averaged with ``lax.pmean``. With several
  processes every process passes the same global device list (JAX requires it) and feeds its local devices.
* ``"sharded"``: ``jax.jit`` over a one-axis ``Mesh`` (``"data"``, Auto axis type) with ``NamedSharding``; the batch is
  split over ``"data"`` (data parallel) and the state is replicated, or, with ``fsdp=True``, every state leaf of at
  least ``fsdp_min_size`` elements is split along its largest axis divisible by the device count (FSDP-style: the
  compiler all-gathers parameters for the forward/backward and reduce-scatters gradients).

With several processes (:mod:`mmjax.train.distributed`) the plan's devices are global and grouped by process:
every process takes part with the same number of its own devices (:func:`select_devices`), and its host batch
(``B / processes`` examples) fills exactly its own devices.

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

from mmjax.errors import ConfigError, UserError

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
            raise UserError(
                f"batch leaf of shape {x.shape}: leading size {b} is not divisible by devices*grad_accum_steps"
                f" = {groups}*{accum}; change config.batch_size or config.optimizer.grad_accum_steps"
            )
        y = x.reshape((groups, accum, b // (groups * accum)) + x.shape[1:])
        y = jnp.swapaxes(y, 0, 1) if isinstance(x, jax.Array) else np.swapaxes(y, 0, 1)
        return y.reshape((accum, b // accum) + x.shape[1:])

    return jax.tree.map(split, batch)


@jax.jit
def _first_copies(stacked: Any) -> Any:
    """``x[0]`` of every leaf of a pmap-replicated tree, as one compiled program per tree structure and types (a
    separate ``x[0]`` per leaf compiles one program per leaf shape)."""
    return jax.tree.map(lambda x: x[0], stacked)


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
        auto = (jax.sharding.AxisType.Auto,)
        self.mesh = Mesh(np.array(self.devices), (MESH_AXIS,), axis_types=auto)
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        self._local_mesh = Mesh(np.array(self.local_devices), (PMAP_AXIS,), axis_types=auto)

    @property
    def num_devices(self) -> int:
        """Number of devices the batch is split over (all processes together)."""
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
        mmjax.errors.UserError: config.batch_size=6 is not divisible by devices (1) * grad_accum_steps (4) = 4; ...
        """
        n = self.num_devices * accum
        if batch_size <= 0 or batch_size % n:
            raise UserError(
                f"{what}={batch_size} is not divisible by devices ({self.num_devices}) * grad_accum_steps ({accum})"
                f" = {n}; choose a multiple of {n} (or change config.parallel.mode / grad_accum_steps)"
            )

    # ------------------------------------------------------------------------------------------------ state
    def state_shardings(self, abstract_state: Any) -> Any:
        """The sharding of each leaf of the canonical state (as the jitted step wants it).

        With several processes a pmap plan's canonical state is replicated over all its devices, so that every
        process holds it and checkpoints of all processes agree.
        """
        if self.mode == "pmap" and jax.process_count() > 1:
            return jax.tree.map(lambda _: NamedSharding(self.mesh, P()), abstract_state)
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
        """Places a canonical (unreplicated) state for this mode; pmap gets a leading axis of the local devices."""
        if self.mode == "pmap":
            n = len(self.local_devices)
            stacked = jax.tree.map(lambda x: np.broadcast_to(_host_value(x)[None], (n,) + np.shape(x)), state)
            return self._put_pmap(stacked)
        return jax.device_put(state, self.state_shardings(state))

    def to_canonical(self, placed: Any) -> Any:
        """The canonical state back from this mode's layout (pmap: the first local device's copy; with several
        processes, replicated over all the plan's devices, see :meth:`state_shardings`)."""
        if self.mode == "pmap":
            first = _first_copies(placed)
            if jax.process_count() > 1:
                replicated = NamedSharding(self.mesh, P())
                first = jax.tree.map(lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x)), first)
            return first
        return placed

    # ---------------------------------------------------------------------------------------------- batches
    def place_batch(self, batch: Any) -> Any:
        """Moves a host batch (numpy pytree, leading example axis) onto the devices in this mode's layout."""
        if self.mode == "single":
            return jax.device_put(batch, self.devices[0])
        if self.mode == "pmap":
            n = len(self.local_devices)

            def reshape(x):
                x = np.asarray(x)
                if x.shape[0] % n:
                    raise UserError(
                        f"batch leaf of shape {x.shape} does not split over this process's {n} devices; "
                        "its leading size must be a multiple of the local device count"
                    )
                return x.reshape((n, x.shape[0] // n) + x.shape[1:])

            return self._put_pmap(jax.tree.map(reshape, batch))
        sharding = NamedSharding(self.mesh, P(MESH_AXIS))
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

    def _put_pmap(self, stacked):
        # pmap (built on shard_map in current JAX) takes host-local arrays split over this process's devices along
        # axis 0, in the order of the global device list (then it wraps them into global arrays without a copy)
        return jax.device_put(stacked, NamedSharding(self._local_mesh, P(PMAP_AXIS)))

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
        """The params a placed state is evaluated with (its ``ema_params`` when it keeps an EMA of the parameters,
        see :attr:`mmjax.train.state.TrainState.eval_params`), laid out as the compiled eval step wants them."""
        return placed_state.eval_params


def select_devices(devices_by_process: list[list], num_devices: int = 0) -> list:
    """The devices a plan uses: the first ``num_devices / processes`` devices of every process, grouped by process.

    Every process of a multi-process run reads its own share of each batch and must fill devices of its own, so
    ``num_devices`` (0 = all) is split evenly over the processes; a count that would leave a process with no
    devices, or with a different number than the others, is refused with a :class:`~mmjax.errors.ConfigError`
    naming the value, the devices per process and the counts that work.

    Args:
      devices_by_process: ``devices_by_process[i]`` are process ``i``'s devices (``jax.local_devices(i)``).
      num_devices: the global device count to use (``config.parallel.num_devices``; 0 = all).

    >>> select_devices([["a0", "a1", "a2", "a3"], ["b0", "b1", "b2", "b3"]], num_devices=4)
    ['a0', 'a1', 'b0', 'b1']
    >>> select_devices([["a0", "a1", "a2", "a3"], ["b0", "b1", "b2", "b3"]], num_devices=3)
    Traceback (most recent call last):
    ...
    mmjax.errors.ConfigError: config.parallel.num_devices=3 cannot be split over 2 processes with 4 devices each: every process must use the same number of its own devices; use 0 (all 8) or one of [2, 4, 6, 8]
    """
    processes = len(devices_by_process)
    counts = sorted({len(ds) for ds in devices_by_process})
    per_process = counts[0]
    choices = [processes * k for k in range(1, per_process + 1)]
    if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 0:
        raise ConfigError(f"config.parallel.num_devices={num_devices!r} must be an int >= 0 (0 = all devices)")
    if len(counts) > 1 and num_devices == 0:
        raise ConfigError(
            f"the {processes} processes have different numbers of devices ({[len(ds) for ds in devices_by_process]});"
            f" set config.parallel.num_devices to one of {choices} so that every process uses as many as the others"
        )
    if num_devices == 0:
        return [d for ds in devices_by_process for d in ds]
    if num_devices > processes * per_process or num_devices % processes:
        if processes == 1:
            hint = f"only {per_process} devices are available; use 0 (all) or a count from 1 to {per_process}"
            raise ConfigError(f"config.parallel.num_devices={num_devices} but {hint}")
        raise ConfigError(
            f"config.parallel.num_devices={num_devices} cannot be split over {processes} processes with "
            f"{per_process} devices each: every process must use the same number of its own devices; use 0 (all "
            f"{processes * per_process}) or one of {choices}"
        )
    k = num_devices // processes
    return [d for ds in devices_by_process for d in ds[:k]]


def make_plan(mode: str, num_devices: int = 0, fsdp: bool = False, fsdp_min_size: int = 2**14) -> Plan:
    """Builds the :class:`Plan` for ``config.parallel``.

    Args:
      mode: ``"single"``, ``"pmap"`` or ``"sharded"``.
      num_devices: devices to use, all processes together (0 = all); with several processes every process
        contributes ``num_devices / processes`` of its own (see :func:`select_devices`).
      fsdp: shard large state leaves (``"sharded"`` only).
      fsdp_min_size: smallest leaf (in elements) that ``fsdp`` shards.

    >>> make_plan("pmap", num_devices=1).axis_name
    'batch'
    """
    if mode not in MODES:
        raise UserError(f"config.parallel.mode={mode!r} is not valid; valid choices: {list(MODES)}")
    if not isinstance(num_devices, int) or num_devices < 0:
        raise UserError(f"config.parallel.num_devices={num_devices!r} must be an int >= 0 (0 = all devices)")
    if fsdp and mode != "sharded":
        raise UserError(f"config.parallel.fsdp=True needs config.parallel.mode='sharded', got mode={mode!r}")
    if mode == "single":
        if jax.process_count() > 1:
            raise UserError("config.parallel.mode='single' cannot run with several processes; use 'sharded'")
        devices = [jax.local_devices()[0]]
    else:  # the same global list on every process (pmap requires it), grouped by process
        by_process = [jax.local_devices(process_index=i) for i in range(jax.process_count())]
        devices = select_devices(by_process, num_devices)
    return Plan(mode=mode, devices=devices, fsdp=fsdp, fsdp_min_size=fsdp_min_size)


def _host_value(x) -> np.ndarray:
    """A leaf as a NumPy array; a replicated array spread over several processes gives this process's copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)
