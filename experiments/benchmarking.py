"""The benchmark harness of every ``experiments/bench_*.py``: each side in a process of its own, interleaved.

Two frameworks in one process fight over the cores (both keep spinning thread pools), so a comparison here runs
every *side* (mmjax, PyTorch, PyG, ...) of a *workload* in a fresh process, and the processes of the sides take
turns, A B A B (``rounds`` times), so a change of the machine's state hits all sides alike. Inside its process a
side builds its inputs, runs ``warmup`` untimed calls (compilation, caches, thread pools) and then ``steps`` timed
calls; what is reported per side is the median and the min-max of all its timed calls (wall seconds, and process CPU
seconds of all threads).

Load: the machine's load averages are printed, but they also count this benchmark's own earlier processes, so the
verdict comes from ``/proc/stat``: the CPU time the whole machine used during the comparison minus the CPU time of
this process and its children is what *other* processes took. Above :data:`LOADED_SHARE` of the machine the run is
marked ``LOADED`` (printed, and ``"loaded": true`` in the JSON): such a figure is not quoted.

Threads: PyTorch gets ``torch.set_num_threads(cores)`` (:func:`torch_threads`), XLA its defaults; both sides get
the same environment, including ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (huge pages for large mallocs, as
``make`` sets it) unless the caller set it otherwise.

A script uses it so::

    SIDES = {"mmjax": bench_mmjax, "torch": bench_torch}      # each: (**options) -> dict with "wall_s" [...]

    if __name__ == "__main__":
        benchmarking.main_or_side(SIDES, main)                # "--side NAME --options JSON" runs one side

and in ``main`` ``benchmarking.compare(__file__, ["mmjax", "torch"], options, rounds=3)`` for each workload.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

RESULT_PREFIX = "BENCHMARK_SIDE_RESULT "
LOADED_SHARE = 0.10  # other processes using more than this share of all cores' time: the figures are not quoted
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "torch_geometric")


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def time_calls(fn, *, steps: int, warmup: int, prefix: str = "") -> dict:
    """``warmup`` untimed calls of ``fn()`` (which must block until its work is done), then ``steps`` timed ones.

    Returns ``{prefix + "wall_s": [...], prefix + "cpu_s": [...]}``, one entry per timed call (CPU: this process,
    all threads).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(steps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {prefix + "wall_s": walls, prefix + "cpu_s": cpus}


def torch_threads() -> int:
    """Sets PyTorch's intra-op threads to the cores (its default can differ in containers); returns the count."""
    import torch

    torch.set_num_threads(cores())
    return torch.get_num_threads()


def peak_rss_mib() -> float:
    """The peak resident memory of this process so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU model, cores, load averages, package versions and the environment the sides run with (threads,
    allocation)."""
    sides = side_env()
    env = {k: sides.get(k, "") for k in ("XLA_FLAGS", "GLIBC_TUNABLES", "OMP_NUM_THREADS", "JAX_PLATFORMS")}
    return {
        "cpu": _cpu_model(),
        "cores": cores(),
        "load_average": list(os.getloadavg()),
        "versions": _versions(),
        "environment": env,
    }


def _busy_cpu_s():
    """Seconds of CPU time the whole machine has used since boot (all cores), or None without ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def side_env() -> dict:
    """The environment every side's process gets (the same for all sides)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    return env


def run_side(script: str, side: str, options: dict, timeout: float = 1800) -> dict:
    """Runs ``side`` of ``script`` with ``options`` in a fresh process; its result dict (or ``{"error": ...}``)."""
    cmd = [sys.executable, script, "--side", side, "--options", json.dumps(options)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=side_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"error": tail[0]}
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def summary(samples: list[float]) -> dict:
    """Median, min and max of a list of seconds.

    >>> summary([3.0, 1.0, 2.0])
    {'median': 2.0, 'min': 1.0, 'max': 3.0, 'n': 3}
    """
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def load_verdict(busy_s, own_s: float, wall_s: float, n_cores: int) -> dict:
    """The share of the machine's CPU time that other processes used during ``wall_s`` seconds, and whether that
    makes the run ``loaded``.

    >>> load_verdict(busy_s=2.5, own_s=2.0, wall_s=10.0, n_cores=2)
    {'others_cpu_share': 0.025, 'loaded': False}
    >>> load_verdict(busy_s=None, own_s=2.0, wall_s=10.0, n_cores=2)
    {'others_cpu_share': None, 'loaded': None}
    """
    if busy_s is None or wall_s <= 0:
        return {"others_cpu_share": None, "loaded": None}
    share = max(0.0, busy_s - own_s) / (wall_s * n_cores)
    return {"others_cpu_share": share, "loaded": share > LOADED_SHARE}


def compare(script: str, sides: list[str], options: dict, *, rounds: int = 3) -> dict:
    """Runs every side of one workload ``rounds`` times, interleaved (A B A B ...), each in a process of its own.

    Returns ``{"options", "rounds", "sides": {name: {"wall_s": summary, "cpu_s": summary, "runs": [...]}}, "load"}``;
    a side whose process failed has ``"error"``. Every list-valued ``*_s`` key of a side's result is summarised over
    all its runs (``wall_s`` and ``cpu_s`` from :func:`time_calls`; a side may time several things, e.g.
    ``fwd_wall_s``); other fields (e.g. ``peak_mib``) are kept per run in ``runs``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    runs = {side: [] for side in sides}
    busy0, own0, t0 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    for _ in range(rounds):
        for side in sides:
            runs[side].append(run_side(script, side, options))
    busy1, own1, wall = _busy_cpu_s(), _own_cpu_s(), time.perf_counter() - t0
    busy = None if busy0 is None or busy1 is None else busy1 - busy0
    out = {"options": options, "rounds": rounds, "sides": {}, "load": load_verdict(busy, own1 - own0, wall, cores())}
    for side, results in runs.items():
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            out["sides"][side] = {"error": errors[0], "runs": results}
            continue
        timed = [k for k, v in results[0].items() if k.endswith("_s") and isinstance(v, list) and v]
        out["sides"][side] = {k: summary([x for r in results for x in r[k]]) for k in timed} | {"runs": results}
    return out


def ratio(result: dict, ours: str, reference: str, key: str = "wall_s"):
    """``reference``'s median ``key`` time / ``ours``: above 1 when ours is faster (None when a side failed)."""
    a, b = result["sides"].get(ours, {}), result["sides"].get(reference, {})
    if key not in a or key not in b:
        return None
    return b[key]["median"] / a[key]["median"]


def describe_machine(info: dict) -> str:
    """One line: CPU, cores, load averages, versions, the thread and allocation settings."""
    v = info["versions"]
    versions = ", ".join(f"{k} {v[k]}" for k in PACKAGES if k in v)
    env = ", ".join(f"{k}={val!r}" for k, val in info["environment"].items() if val)
    load = "/".join(f"{x:.2f}" for x in info["load_average"])
    return f"{info['cpu']}, {info['cores']} cores, load average {load} (1/5/15 min); {versions}; {env or 'no env'}"


def describe_load(load: dict) -> str:
    """What the run's load verdict means for its figures."""
    share = load["others_cpu_share"]
    if share is None:
        return "load of other processes: unknown (no /proc/stat); check the machine is idle before quoting"
    if load["loaded"]:
        return f"LOADED: other processes used {share:.0%} of the cores meanwhile; these figures are not to be quoted"
    return f"idle: other processes used {share:.1%} of the cores meanwhile"


def write_json(path: str, record: dict) -> None:
    """Writes ``record`` to ``path`` atomically (a temporary file, then a rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def emit(result: dict) -> None:
    """Prints a side's result for :func:`run_side` to read."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def main_or_side(sides: dict, main, argv=None):
    """With ``--side NAME --options JSON`` runs ``sides[NAME](**options)`` in this process and emits its result;
    otherwise calls ``main(argv)`` (the script's comparison)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--side"]:
        if len(argv) != 4 or argv[2] != "--options" or argv[1] not in sides:
            raise SystemExit(f"usage: --side {{{','.join(sides)}}} --options JSON, got {argv}")
        emit(sides[argv[1]](**json.loads(argv[3])))
        return None
    return main(argv)
