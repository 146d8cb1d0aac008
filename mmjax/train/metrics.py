"""Training metrics: JSON lines, TensorBoard event files, a tqdm progress bar and a saved training-curve plot.

Every record goes to ``workdir/metrics.jsonl`` as ``{"step": int, "split": "train" | "eval", name: float, ...}``
(appended, so a resumed run continues the same file), and to TensorBoard events in ``workdir/tensorboard`` as
``split/name``. :func:`plot_curves` turns the JSON lines into ``workdir/curves.png``. In a multi-process run only
process 0 writes these files and shows the progress bar (every process computes the same metrics); the others'
loggers write nothing, while each process's warnings still go to its own stderr.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> log = MetricLogger(d, total_steps=2, start_step=0, progress=False, tensorboard=False)
>>> for step, split, m in [(1, "train", {"loss": 2.0}), (2, "train", {"loss": 1.0}), (2, "eval", {"accuracy": 0.5})]:
...     _ = log.write(step, split, m)
>>> log.close()
>>> [r["step"] for r in read_metrics(os.path.join(d, "metrics.jsonl"))]
[1, 2, 2]
>>> os.path.exists(os.path.join(d, "curves.png"))
True
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from typing import Any

import numpy as np

from mmjax.errors import UserError
from mmjax.train import storage


class MetricLogger:
    """Writes metrics records and drives the progress bar.

    Args:
      workdir: the run's directory.
      total_steps: steps of the whole run (progress bar total).
      start_step: the step this process starts at (resumed runs start later).
      examples_per_step: examples in one global batch; the bar shows examples/s (``unit``) and the ETA.
      progress: show the tqdm bar.
      tensorboard: write TensorBoard events (tensorboardX).
      unit: what an example is called in the bar ("img", "graph", "pair").
      primary: whether this process writes the files and shows the bar (default: ``jax.process_index() == 0``);
        the others only return the records.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> log = MetricLogger(d, total_steps=10, progress=False, tensorboard=False)
    >>> log.write(1, "train", {"loss": np.float32(0.5), "accuracy": 1})
    {'loss': 0.5, 'accuracy': 1.0}
    >>> log.close(plot=False)
    >>> print(open(os.path.join(d, "metrics.jsonl")).read().strip())
    {"step": 1, "split": "train", "loss": 0.5, "accuracy": 1.0}

    A process other than the first writes nothing:

    >>> other = MetricLogger(tempfile.mkdtemp(), total_steps=10, progress=False, primary=False)
    >>> other.write(1, "train", {"loss": 0.5}), os.listdir(other.workdir)
    ({'loss': 0.5}, [])
    >>> other.close()
    """

    def __init__(
        self,
        workdir: str,
        total_steps: int,
        start_step: int = 0,
        examples_per_step: int = 1,
        progress: bool = True,
        tensorboard: bool = True,
        unit: str = "img",
        primary: bool | None = None,
    ):
        if primary is None:
            import jax

            primary = jax.process_index() == 0
        self.primary = bool(primary)
        self.workdir = workdir
        self.path = storage.join(workdir, "metrics.jsonl")
        self._file = _open_for_append(self.path) if self.primary else None
        self._tb = None
        if tensorboard and self.primary:
            self._tb = _summary_writer(storage.join(workdir, "tensorboard"))
        self._bar = None
        self.examples_per_step = examples_per_step
        if progress and self.primary:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps * examples_per_step,
                initial=start_step * examples_per_step,
                unit=unit,
                unit_scale=True,
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> dict[str, float]:
        """Appends one record; returns it with plain-float values."""
        record = {k: _to_float(v) for k, v in metrics.items()}
        if self._file is None:
            return record
        self._file.write(json.dumps({"step": int(step), "split": split, **record}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, int(step))
            self._tb.flush()
        if self._bar is not None and split == "train":
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "accuracy")})
        if self._bar is not None and split == "eval":
            self._bar.write(f"step {step}: " + ", ".join(f"eval {k}={v:.4f}" for k, v in record.items()))
        return record

    def write_images(self, step: int, images: dict[str, Any]) -> list[str]:
        """Saves each ``uint8 [H, W, 3]`` image as ``workdir/images/{name}_{step:07d}.png`` and to TensorBoard (tag
        ``images/{name}``); returns the PNG paths (none on other processes than the primary)."""
        if self._file is None:
            return []
        from PIL import Image

        paths = []
        for name, image in images.items():
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"image {name!r} must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
            path = storage.join(self.workdir, "images", f"{name}_{int(step):07d}.png")
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            storage.write_bytes(path, buffer.getvalue())
            paths.append(path)
            if self._tb is not None:
                self._tb.add_image(f"images/{name}", image, int(step), dataformats="HWC")
        if self._tb is not None:
            self._tb.flush()
        return paths

    def advance(self, steps: int = 1) -> None:
        """Moves the progress bar by ``steps`` global batches."""
        if self._bar is not None:
            self._bar.update(steps * self.examples_per_step)

    def close(self, plot: bool = True) -> None:
        """Flushes everything and saves the curve plot (``curves.png``; process 0 only)."""
        if self._bar is not None:
            self._bar.close()
        if self._file is None:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if plot:
            plot_curves(self.path, storage.join(self.workdir, "curves.png"))


def _summary_writer(logdir: str):
    """A tensorboardX ``SummaryWriter``, imported without pulling in torch (tensorboardX imports it when present,
    which costs seconds and is not needed to write scalars)."""
    import sys

    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # makes tensorboardX's optional `import torch` fail fast
        try:
            import tensorboardX
        finally:
            del sys.modules["torch"]
    import tensorboardX
    from tensorboardX import record_writer

    if storage.is_uri(logdir) and logdir.split("://")[0] not in record_writer.REGISTERED_FACTORIES:
        raise UserError(
            f"config.tensorboard=True: tensorboardX cannot write event files to {logdir!r} (it writes local paths, "
            "gs:// and s3://); set --config.tensorboard=False (metrics.jsonl and curves.png are written anyway)"
        )
    try:
        return tensorboardX.SummaryWriter(logdir)
    except ImportError as e:  # gs:// needs google-cloud-storage, s3:// boto3
        raise UserError(
            f"config.tensorboard=True with event files in {logdir!r}: {e}; install it, or set "
            "--config.tensorboard=False (metrics.jsonl and curves.png are written anyway)"
        ) from e


class _RewrittenFile:
    """``metrics.jsonl`` on an object store (``gs://``...), which cannot append: the records written so far (those
    of earlier runs in the same workdir included) are kept and the whole file is rewritten atomically at each
    ``flush``."""

    def __init__(self, path: str):
        self.path = path
        self._chunks = [storage.read_text(path)] if storage.exists(path) else []

    def write(self, text: str) -> None:
        self._chunks.append(text)

    def flush(self) -> None:
        storage.write_text(self.path, "".join(self._chunks))

    def close(self) -> None:
        self.flush()


def _open_for_append(path: str):
    """A local file opened for appending, or a :class:`_RewrittenFile` for a URI."""
    if storage.is_uri(path):
        return _RewrittenFile(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "a")


def _to_float(v):
    try:
        return float(np.asarray(v))
    except (TypeError, ValueError):
        return v


def read_metrics(path: str) -> list[dict]:
    """All records of a ``metrics.jsonl`` file (skipping a torn last line).

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
    >>> with open(path, "w") as f:
    ...     _ = f.write('{"step": 1, "split": "train", "loss": 2.0}\\n{"step": 2, "spl')  # killed mid-line
    >>> read_metrics(path)
    [{'step': 1, 'split': 'train', 'loss': 2.0}]
    """
    out = []
    if not storage.exists(path):
        return out
    for line in storage.read_text(path).split("\n"):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_curves(jsonl_path: str, png_path: str) -> str:
    """Plots every metric of ``metrics.jsonl`` against the step (one panel per name, train and eval) to a PNG.

    Records of a resumed run that repeat a step replace the earlier ones. Returns ``png_path``.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    ...     for step, loss in [(1, 2.0), (2, 1.5), (3, 1.0)]:
    ...         _ = f.write(json.dumps({"step": step, "split": "train", "loss": loss}) + "\\n")
    >>> png = plot_curves(os.path.join(d, "metrics.jsonl"), os.path.join(d, "curves.png"))
    >>> os.path.basename(png), os.path.getsize(png) > 0
    ('curves.png', True)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, dict[int, float]]] = {}
    for r in read_metrics(jsonl_path):
        for k, v in r.items():
            if k in ("step", "split", "count") or not isinstance(v, (int, float)):
                continue
            series.setdefault(k, {}).setdefault(r.get("split", "train"), {})[int(r["step"])] = float(v)
    names = sorted(series) or ["(no metrics)"]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for split, points in sorted(series.get(name, {}).items()):
            steps = sorted(points)
            ax.plot(
                steps, [points[s] for s in steps], marker="o" if split == "eval" else None, markersize=3, label=split
            )
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    storage.write_bytes(png_path, buffer.getvalue())  # atomic, local or remote
    return png_path


class Stopwatch:
    """Wall-clock seconds since construction; ``lap()`` returns seconds since the last lap.

    >>> sw = Stopwatch(); sw.lap() >= 0.0
    True
    """

    def __init__(self):
        self.start = self._last = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since construction."""
        return time.perf_counter() - self.start

    def lap(self) -> float:
        """Seconds since the previous lap (or construction)."""
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        return dt
