"""Checkpoints with orbax-checkpoint: atomic saves, keep the last K, restore the latest or fail loudly.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoints intact (the partial one is ignored and cleaned up). Restoring checks the saved tree against the
expected one (same leaves, shapes and dtypes) first; a checkpoint that cannot be read or does not fit raises
``ValueError`` naming its directory - never a silent restart from scratch.

>>> import tempfile, jax.numpy as jnp
>>> ckpt = Checkpointer(tempfile.mkdtemp() + "/ckpt", keep=2)
>>> ckpt.save(3, {"w": jnp.ones(2)})
>>> ckpt.latest_step(), ckpt.restore({"w": jnp.zeros(2)})["w"].tolist()
(3, [1.0, 1.0])
>>> ckpt.close()
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mmjax.errors import UserError
from mmjax.train import storage


class Checkpointer:
    """Saves and restores the canonical train state under ``directory/<step>``.

    Args:
      directory: where checkpoints live (created if missing): a local path or a URI orbax writes to
        (``gs://bucket/run/checkpoints``).
      keep: how many of the most recent checkpoints to keep (``>= 1``).

    >>> import tempfile, jax.numpy as jnp
    >>> with tempfile.TemporaryDirectory() as d:
    ...     ckpt = Checkpointer(d, keep=2)
    ...     for step in (1, 2, 3):
    ...         ckpt.save(step, {"w": jnp.full(2, float(step))})
    ...     print(ckpt.all_steps(), ckpt.restore({"w": jnp.zeros(2)}, step=2)["w"].tolist())
    ...     ckpt.close()
    [2, 3] [2.0, 2.0]
    """

    def __init__(self, directory: str, keep: int = 3):
        if not isinstance(keep, int) or keep < 1:
            raise UserError(f"config.keep_checkpoints={keep!r} must be an int >= 1")
        self.directory = storage.resolve(directory)  # a URI (gs://...) as given, a local path made absolute
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
                item_handlers=ocp.StandardCheckpointHandler(),  # lets a fresh process read metadata
            )
        except Exception as e:  # an unreadable checkpoint directory
            raise UserError(f"cannot open checkpoint directory {self.directory}: {type(e).__name__}: {e}") from e

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None`` when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints kept, oldest first."""
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        """The directory holding checkpoint ``step``."""
        return storage.join(self.directory, str(step))

    def save(self, step: int, state: Any) -> None:
        """Saves ``state`` (a pytree of arrays) as checkpoint ``step`` and waits until it is on disk."""
        if step in self._manager.all_steps():
            return
        self._manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restores checkpoint ``step`` (default: latest) into the structure, shapes, dtypes and shardings of ``target``.

        ``target`` leaves may be arrays or ``jax.ShapeDtypeStruct`` (with ``sharding``). Raises ``ValueError`` naming
        the checkpoint directory if there is no checkpoint, if it cannot be read, or if it does not match ``target``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint found in {self.directory}")
        path = self.step_dir(step)
        self._check_compatible(step, target, path)
        abstract = jax.tree.map(_abstract, target)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:
            raise UserError(
                f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}); "
                "delete that step directory to resume from an older checkpoint, or use a fresh --workdir"
            ) from e

    def saved_keys(self, step: int | None = None) -> list[str]:
        """The top-level keys of the tree saved as checkpoint ``step`` (default: latest), read from its metadata
        (nothing is restored): ``["opt_state", "params", "step"]`` for a train state, plus ``"ema_params"`` when it
        keeps an EMA of the parameters. Raises ``ValueError`` naming the directory when it cannot be read.

        >>> import tempfile, jax.numpy as jnp
        >>> ckpt = Checkpointer(tempfile.mkdtemp())
        >>> ckpt.save(1, {"params": {"w": jnp.ones(2)}, "step": jnp.int32(1)})
        >>> ckpt.saved_keys()
        ['params', 'step']
        >>> ckpt.close()
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint found in {self.directory}")
        saved = self._saved_tree(step, self.step_dir(step))
        return sorted(saved) if hasattr(saved, "keys") else []

    def _saved_tree(self, step: int, path: str) -> Any:
        try:
            meta = self._manager.item_metadata(step)
            saved = getattr(meta, "tree", meta)
        except Exception as e:
            raise UserError(
                f"checkpoint {path} is corrupt or unreadable: its metadata cannot be read "
                f"({type(e).__name__}: {e}); delete that step directory or use a fresh --workdir"
            ) from e
        if saved is None:
            raise UserError(f"checkpoint {path} has no metadata (corrupt?); delete it or use a fresh --workdir")
        return saved

    def _check_compatible(self, step: int, target: Any, path: str) -> None:
        saved = self._saved_tree(step, path)
        want = _shapes(target)
        have = _shapes(saved)
        if want != have:
            diffs = [
                f"{k}: checkpoint {have.get(k)} vs run {want.get(k)}"
                for k in sorted(set(want) | set(have))
                if want.get(k) != have.get(k)
            ]
            raise UserError(
                f"checkpoint {path} does not match this run's train state (different model or optimizer config?): "
                + "; ".join(diffs[:8])
                + (f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else "")
                + ". Use a fresh --workdir or the config the checkpoint was written with."
            )
        want_dtypes, have_dtypes = _dtypes(target), _dtypes(saved)
        diffs = [k for k in sorted(want_dtypes) if have_dtypes.get(k, want_dtypes[k]) != want_dtypes[k]]
        if diffs:  # orbax would silently cast: float32 Adam moments restored as bfloat16, say
            raise UserError(
                f"checkpoint {path} does not match this run's train state: "
                + "; ".join(
                    f"{k} was saved as {have_dtypes[k]} but this run expects {want_dtypes[k]}" for k in diffs[:8]
                )
                + (f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else "")
                + ". Use the config the checkpoint was written with (its dtypes), or a fresh --workdir."
            )

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _leaf_paths(tree: Any) -> list[tuple[str, Any]]:
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.append(("/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path), leaf))
    return out


def _shapes(tree: Any) -> dict[str, tuple]:
    """``{"a/b": shape}`` of a tree of arrays, ``ShapeDtypeStruct`` or orbax metadata."""
    return {key: tuple(getattr(leaf, "shape", ()) or ()) for key, leaf in _leaf_paths(tree)}


def _dtypes(tree: Any) -> dict[str, str]:
    """``{"a/b": dtype name}`` of the leaves that have a dtype (``"float32"``, ``"bfloat16"``, ...)."""
    return {
        key: np.dtype(leaf.dtype).name for key, leaf in _leaf_paths(tree) if getattr(leaf, "dtype", None) is not None
    }
