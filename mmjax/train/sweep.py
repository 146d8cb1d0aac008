"""Seed sweeps: one training run per seed, then the mean and min-max of every final metric over the seeds.

``mmjax train --config FILE --workdir DIR --config.seed=0,1,2`` runs :func:`run_seed_sweep`: seed ``N`` trains in
``DIR/seed_N`` (a run directory like any other: rerunning the command resumes an unfinished seed from its latest
checkpoint, and a finished seed whose saved config is unchanged is not trained again: its ``result.json`` is
read back), then ``DIR/seeds.json`` gets, for every final metric (the ``eval_*`` and ``train_*`` numbers of the
result), the mean, min and max over the seeds and the value of each, plus each run's wall time.

>>> summary = summarize_seeds({0: {"eval_accuracy": 0.75, "wall_time_s": 10.0, "step": 5},
...                            1: {"eval_accuracy": 0.875, "wall_time_s": 12.0, "step": 5}})
>>> summary["metrics"]["eval_accuracy"]["mean"], summary["metrics"]["eval_accuracy"]["min"]
(0.8125, 0.75)
>>> summary["wall_time_s"]
{'0': 10.0, '1': 12.0}
"""

from __future__ import annotations

import copy
import json
import math
import numbers
from collections.abc import Callable
from typing import Any

from mmjax.errors import ConfigError
from mmjax.train import storage

__all__ = ["parse_seed_list", "run_seed_sweep", "summarize_seeds", "format_summary", "SUMMARY_FILE", "RESULT_FILE"]

#: The sweep's summary, in the sweep's directory.
SUMMARY_FILE = "seeds.json"
#: One seed's result (as ``train_and_evaluate`` returns it), in that seed's run directory.
RESULT_FILE = "result.json"


def parse_seed_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: distinct ints separated by commas.

    Raises:
      ConfigError: for anything else, naming the text.

    >>> parse_seed_list("0, 1,2")
    [0, 1, 2]
    >>> parse_seed_list("0,x")
    Traceback (most recent call last):
    ...
    mmjax.errors.ConfigError: --config.seed='0,x' is not valid; expected one int or distinct ints separated by commas, e.g. --config.seed=0,1,2
    """
    expected = "one int or distinct ints separated by commas, e.g. --config.seed=0,1,2"
    try:
        seeds = [int(part.strip()) for part in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--config.seed={text!r} is not valid; expected {expected}") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--config.seed={text!r} repeats a seed; expected {expected}")
    return seeds


def _is_metric(key: str, value) -> bool:
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return key.startswith(("eval_", "train_")) and number and math.isfinite(float(value))


def summarize_seeds(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``{seed: result}`` -> ``{"seeds", "metrics": {name: {"mean", "min", "max", "values"}}, "wall_time_s",
    "workdirs"}``; a metric is summarised over the seeds whose result has it (see the module docstring).

    >>> summarize_seeds({3: {"eval_loss": 1.0, "wall_time_s": 2.0}})["metrics"]
    {'eval_loss': {'mean': 1.0, 'min': 1.0, 'max': 1.0, 'values': {'3': 1.0}}}
    """
    names = sorted({k for r in results.values() for k, v in r.items() if _is_metric(k, v)})
    metrics = {}
    for name in names:
        values = {str(s): float(r[name]) for s, r in results.items() if _is_metric(name, r.get(name))}
        vs = list(values.values())
        metrics[name] = {"mean": sum(vs) / len(vs), "min": min(vs), "max": max(vs), "values": values}
    return {
        "seeds": list(results),
        "metrics": metrics,
        "wall_time_s": {str(s): r.get("wall_time_s") for s, r in results.items()},
        "workdirs": {str(s): r.get("workdir") for s, r in results.items() if "workdir" in r},
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as lines of text: ``name: mean M (min A, max B) over N seeds`` and the wall times.

    >>> print(format_summary(summarize_seeds({0: {"eval_accuracy": 0.5, "wall_time_s": 1.0}})))
    eval_accuracy: mean 0.5000 (min 0.5000, max 0.5000) over 1 seeds
    wall time (s): seed 0: 1.0
    """
    lines = [
        f"{name}: mean {m['mean']:.4f} (min {m['min']:.4f}, max {m['max']:.4f}) over {len(m['values'])} seeds"
        for name, m in summary["metrics"].items()
    ]
    times = ", ".join(
        f"seed {s}: {t:.1f}" if isinstance(t, numbers.Real) else f"seed {s}: ?"
        for s, t in summary["wall_time_s"].items()
    )
    lines.append(f"wall time (s): {times}")
    return "\n".join(lines)


def _read_json(path: str):
    try:
        return json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return None


def _write_json(path: str, data) -> None:
    storage.write_text(path, json.dumps(data, indent=2, default=str))


def _finished_result(config, run_dir: str):
    """The saved result of a finished run in ``run_dir`` whose saved config equals ``config`` merged, else None."""
    from mmjax.train.config import prepare_config, to_json

    result = _read_json(storage.join(run_dir, RESULT_FILE))
    saved = _read_json(storage.join(run_dir, "config.json"))
    if not result or result.get("preempted", True) or saved is None:
        return None
    return result if saved == json.loads(to_json(prepare_config(config))) else None


def run_seed_sweep(config, workdir: str, seeds: list[int], train: Callable | None = None) -> dict[str, Any]:
    """Trains ``config`` once per seed in ``workdir/seed_N`` and writes ``workdir/seeds.json`` (see the module
    docstring); returns the summary, or ``{"preempted": True, ...}`` without a summary if a run was stopped by
    SIGTERM (rerun the same command to continue). ``train(config, workdir)`` defaults to
    :func:`mmjax.train.train_and_evaluate`.

    >>> fake = lambda c, w: {"eval_accuracy": 0.5 + c.seed / 10, "wall_time_s": 1.0, "workdir": w, "preempted": False}
    >>> import ml_collections, tempfile
    >>> summary = run_seed_sweep(ml_collections.ConfigDict({"seed": 0}), tempfile.mkdtemp(), [0, 2], train=fake)
    >>> summary["metrics"]["eval_accuracy"]["max"], sorted(summary["wall_time_s"])
    (0.7, ['0', '2'])
    """
    if train is None:
        from mmjax.train import train_and_evaluate as train
    workdir = storage.resolve(workdir)  # a local path made absolute; a URI (gs://...) kept, as the engine does
    results: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        run_config = copy.deepcopy(config)
        run_config.seed = seed
        run_dir = storage.join(workdir, f"seed_{seed}")
        result = _finished_result(run_config, run_dir) if storage.exists(run_dir) else None
        if result is None:
            result = train(run_config, run_dir)
            if result.get("preempted"):
                return {"preempted": True, "seed": seed, "workdir": run_dir, "result": result}
            _write_json(storage.join(run_dir, RESULT_FILE), result)
        results[seed] = result
    summary = summarize_seeds(results)
    _write_json(storage.join(workdir, SUMMARY_FILE), summary)
    return summary
