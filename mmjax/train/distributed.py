"""Multi-process (multi-host) setup: ``jax.distributed.initialize`` from the config or the environment.

Every process runs the same command; process ``i`` of ``n`` sees its own local devices, and ``jax.devices()`` lists
all ``n`` processes' devices. The engine's ``"sharded"`` and ``"pmap"`` modes then span all of them (the same global
device list on every process; ``config.parallel.num_devices`` counts all processes' devices and takes the same number
from each): each process reads its own share of the data (``jax.process_index()``), a batch of ``global_batch // n``
examples, which fills its own devices (``jax.make_array_from_process_local_data`` assembles the global batch).
On CPU the collectives between processes go over gloo (``jax_cpu_collectives_implementation="gloo"``).

Settings, first found wins, per field:

1. ``config.distributed``: ``coordinator_address`` ("host:port" of process 0), ``num_processes``,
   ``process_id``, and the fault-tolerance knobs ``initialization_timeout`` (s to wait for all processes at start),
   ``heartbeat_timeout_seconds`` (a process that sends no heartbeat this long is declared dead; every other process
   then *terminates with an error* instead of hanging in a collective) and ``shutdown_timeout_seconds``;
2. the environment: ``MMJAX_COORDINATOR_ADDRESS``, ``MMJAX_NUM_PROCESSES``, ``MMJAX_PROCESS_ID`` (or the same names
   with the ``JAX_`` prefix), ``MMJAX_HEARTBEAT_TIMEOUT`` and ``MMJAX_INITIALIZATION_TIMEOUT``;
3. nothing: a single process (``initialize`` does nothing), unless ``config.distributed.auto=True``, which lets JAX
   detect the cluster (TPU pods, Slurm, Open MPI).

``initialize`` must run before JAX touches a device (before ``jax.devices()``), e.g. first thing in a launcher.
After it, every process prefixes its warnings on stderr with ``[process i/n]`` (only process 0 writes the run's files,
see :class:`mmjax.train.metrics.MetricLogger`; each process still reports its own warnings).

Stopping together: a SIGTERM reaches one process, but all must stop after the same step (or their collectives and
checkpoint saves no longer match). :class:`StopAgreement` all-reduces every process's stop flag once per step.

>>> distributed_settings({}, environ={}) is None
True
>>> s = distributed_settings({"distributed": {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
...                                           "process_id": 1}}, environ={})
>>> s["coordinator_address"], s["num_processes"], s["process_id"], s["heartbeat_timeout_seconds"]
('10.0.0.1:1234', 2, 1, 100)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.errors import UserError

__all__ = ["distributed_settings", "initialize", "StopAgreement", "DEFAULTS"]

#: Fault-tolerance defaults (seconds): JAX's own values.
DEFAULTS = {"initialization_timeout": 300, "heartbeat_timeout_seconds": 100, "shutdown_timeout_seconds": 300}

_ENV = {
    "coordinator_address": ("MMJAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("MMJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("MMJAX_PROCESS_ID", "JAX_PROCESS_ID"),
    "heartbeat_timeout_seconds": ("MMJAX_HEARTBEAT_TIMEOUT",),
    "initialization_timeout": ("MMJAX_INITIALIZATION_TIMEOUT",),
    "shutdown_timeout_seconds": ("MMJAX_SHUTDOWN_TIMEOUT",),
}
_INTS = (
    "num_processes",
    "process_id",
    "initialization_timeout",
    "heartbeat_timeout_seconds",
    "shutdown_timeout_seconds",
)

_initialized = False


def _section(config) -> dict:
    if config is None:
        return {}
    section = config.get("distributed", None) if hasattr(config, "get") else None
    if section is None:
        return {}
    return dict(section.to_dict() if hasattr(section, "to_dict") else section)


def distributed_settings(config=None, environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The keyword arguments for ``jax.distributed.initialize``, or ``None`` for a single-process run.

    Raises:
      ValueError: a setting that is not an int where one is needed, a process id outside ``[0, num_processes)``,
        or an incomplete set (an address without a process count, ...), naming where it came from.

    >>> distributed_settings({"distributed": {"coordinator_address": "h:1", "num_processes": 2}}, environ={})
    Traceback (most recent call last):
    ...
    mmjax.errors.UserError: distributed setup: process_id is missing (set config.distributed.process_id or MMJAX_PROCESS_ID); got coordinator_address='h:1', num_processes=2
    """
    environ = os.environ if environ is None else environ
    section = _section(config)
    settings: dict[str, Any] = {}
    for key, names in _ENV.items():
        value, where = section.get(key, None), f"config.distributed.{key}"
        if value in (None, ""):
            for name in names:
                if environ.get(name, "") != "":
                    value, where = environ[name], f"${name}"
                    break
        if value in (None, ""):
            continue
        if key in _INTS:
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise UserError(f"{where}={value!r} must be an int") from None
            if value < 0:
                raise UserError(f"{where}={value} must be >= 0")
        settings[key] = value
    auto = bool(section.get("auto", False))
    main = ("coordinator_address", "num_processes", "process_id")
    if not any(k in settings for k in main):
        return {k: settings.get(k, v) for k, v in DEFAULTS.items()} if auto else None
    if settings.get("num_processes") == 1 and "coordinator_address" not in settings:
        return None
    for k in main:
        if k not in settings:
            given = ", ".join(f"{g}={settings[g]!r}" for g in main if g in settings)
            env = _ENV[k][0]
            raise UserError(f"distributed setup: {k} is missing (set config.distributed.{k} or {env}); got {given}")
    if not 0 <= settings["process_id"] < settings["num_processes"]:
        raise UserError(
            f"distributed setup: process_id={settings['process_id']} must lie in [0, num_processes="
            f"{settings['num_processes']})"
        )
    if ":" not in str(settings["coordinator_address"]):
        raise UserError(
            f"distributed setup: coordinator_address={settings['coordinator_address']!r} must be 'host:port' "
            "(process 0's address and a free port)"
        )
    for k, v in DEFAULTS.items():
        settings.setdefault(k, v)
    return settings


def initialize(config=None, environ: Mapping[str, str] | None = None) -> bool:
    """Starts the JAX distributed runtime when the config/environment asks for several processes.

    Returns ``True`` if this call (or an earlier one) initialised it, ``False`` for a single-process run. Sets the
    CPU collectives to gloo so that CPU-only processes can all-reduce across processes. Must run before JAX
    initialises its backends; a second call is a no-op.

    >>> initialize({}, environ={})
    False
    """
    global _initialized
    if _initialized:
        return True
    settings = distributed_settings(config, environ)
    if settings is None:
        return False
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # older/newer JAX without the option: gloo is the default
        pass
    jax.distributed.initialize(**settings)
    _initialized = True
    _prefix_warnings(f"[process {settings['process_id']}/{settings['num_processes']}] ")
    return True


def _prefix_warnings(prefix: str) -> None:
    """Makes ``warnings`` print ``prefix`` before each message, so the merged logs of all processes stay readable."""
    original = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        return prefix + original(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


class StopAgreement:
    """Agrees across processes on when to stop: every process casts its stop flag once per step, the flags are
    all-reduced (max) by a tiny jitted computation over one device of every process, and every process reads the
    same result, so all stop after the same step.

    The reduction of the flags cast at step ``t`` runs asynchronously and is read at step ``t + 1``: a stop asked
    for during step ``t`` ends the run after step ``t + 1`` on every process, without waiting on the devices. With
    one process there is nothing to agree on and :meth:`vote` returns the flag itself (stop after this step).

    >>> agreement = StopAgreement()
    >>> agreement.vote(False), agreement.vote(True)
    (False, True)
    """

    def __init__(self):
        self.process_count = jax.process_count()
        self._pending = None
        if self.process_count > 1:
            devices = [jax.local_devices(process_index=i)[0] for i in range(self.process_count)]
            mesh = Mesh(np.array(devices), ("processes",))
            self._flags_sharding = NamedSharding(mesh, P("processes"))
            self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

    def vote(self, stop: bool) -> bool:
        """Casts this process's ``stop`` flag for the current step; returns whether every process stops now.

        Every process must call it exactly once per step, at the same point of the step (it is a collective).
        """
        if self.process_count == 1:
            return bool(stop)
        flags = jax.make_array_from_process_local_data(self._flags_sharding, np.array([int(bool(stop))], np.int32))
        previous, self._pending = self._pending, self._any(flags)
        return previous is not None and bool(np.asarray(previous.addressable_data(0)))
