"""Benchmark: mmjax attention against jax.nn.dot_product_attention and torch SDPA, forward and forward+backward.

Command (the full table; the jax.nn run at T=8192 alone needs ~11.5 GiB and ~20 s per call):

    .venv/bin/python experiments/bench_attention.py --json /tmp/bench_attention.json

Subsets: ``--lengths 512,2048 --causal 0 --impls mmjax,chunked,torch``. Long sequence, mmjax alone
(target: forward+backward at T=32768 under 4 GiB): ``--long`` (adds T=32768 fwd+bwd for mmjax default).

Setup: batch 1, 8 heads, head_dim 64, float32, self-attention (T = S), non-causal and causal. Each
(implementation, T, causal, mode) runs in a fresh subprocess so that its peak memory is its own:
``peak = ru_maxrss at the end - ru_maxrss after imports`` (the same measure for jax and torch; it includes the inputs,
jax's compilation and the outputs). Time: median wall-clock of up to 5 runs (stopping after ~10 s) after a warm-up
(jax: an ahead-of-time compile, so the slow references execute as few times as possible; torch: one call);
CPU seconds (both cores together) are recorded too, as they are less sensitive to other processes on the machine.

Implementations: ``mmjax`` = ``dot_product_attention(implementation=None)``, ``chunked`` = ``implementation="chunked"``,
``jaxnn`` = ``jax.nn.dot_product_attention``, ``torch`` = ``torch.nn.functional.scaled_dot_product_attention``.

Expected on the 2-core CPU machine (targets of the issue): mmjax fwd+bwd at T=4096/8192 at most 0.6x jax.nn's time,
peak at T=8192 under 1.5 GiB (jax.nn: ~11.5 GiB), T=32768 fwd+bwd under 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

B, N, D = 1, 8, 64
IMPLS = ("mmjax", "chunked", "jaxnn", "torch")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _time(fn, warmup) -> tuple[float, float, int]:
    warmup()
    walls, cpus = [], []
    start = time.perf_counter()
    while len(walls) < 5 and (not walls or time.perf_counter() - start < 10.0):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), len(walls)


def _worker_jax(impl: str, T: int, causal: bool, mode: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mmjax.attention import dot_product_attention, select_implementation

    base = _rss_mib()
    r = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(r.standard_normal((B, T, N, D), np.float32)) for _ in range(4))
    if impl == "jaxnn":
        attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
        chosen = "jax.nn"
    else:
        implementation = None if impl == "mmjax" else "chunked"
        attn = lambda q, k, v: dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
        chosen = implementation or select_implementation(q, k, v)
    if mode == "fwd":
        f = jax.jit(attn)
    else:
        f = jax.jit(jax.grad(lambda q, k, v: jnp.vdot(attn(q, k, v), ct), argnums=(0, 1, 2)))
    compiled = f.lower(q, k, v).compile()
    wall, cpu, runs = _time(lambda: jax.block_until_ready(compiled(q, k, v)), lambda: None)
    return dict(wall_s=wall, cpu_s=cpu, runs=runs, peak_mib=_rss_mib() - base, chosen=chosen)


def _worker_torch(T: int, causal: bool, mode: str) -> dict:
    import torch
    import torch.nn.functional as F

    base = _rss_mib()
    g = torch.Generator().manual_seed(0)
    q, k, v, ct = (torch.randn(B, N, T, D, generator=g) for _ in range(4))
    if mode == "fwd":

        def run():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        for x in (q, k, v):
            x.requires_grad_(True)

        def run():
            for x in (q, k, v):
                x.grad = None
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(ct)

    wall, cpu, runs = _time(run, run)
    return dict(
        wall_s=wall,
        cpu_s=cpu,
        runs=runs,
        peak_mib=_rss_mib() - base,
        chosen=f"torch {torch.__version__}",
        threads=torch.get_num_threads(),
    )


def _run_one(impl: str, T: int, causal: bool, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(T), str(int(causal)), mode]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rec = dict(impl=impl, T=T, causal=causal, mode=mode)
    if proc.returncode != 0:
        rec["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    else:
        rec.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rec


def _fmt_table(records: list[dict]) -> str:
    by = {(r["impl"], r["T"], r["causal"], r["mode"]): r for r in records}
    impls = [i for i in IMPLS if any(r["impl"] == i for r in records)]
    keys = sorted({(r["T"], r["causal"], r["mode"]) for r in records}, key=lambda x: (x[1], x[2] != "fwd", x[0]))
    cell = lambda r, f: "-" if r is None or "error" in r else f(r)
    head = ["T", "causal", "mode"] + [f"{i} s" for i in impls] + [f"{i} MiB" for i in impls]
    refs = [i for i in ("jaxnn", "torch") if i in impls]
    head += [f"mmjax/{ref} {what}" for what in ("time", "cpu", "mem") for ref in refs]
    rows = [head]
    for T, causal, mode in keys:
        rs = {i: by.get((i, T, causal, mode)) for i in impls}
        row = [str(T), "yes" if causal else "no", mode]
        row += [cell(rs[i], lambda r: f"{r['wall_s']:.3f}") for i in impls]
        row += [cell(rs[i], lambda r: f"{r['peak_mib']:.0f}") for i in impls]
        m = rs.get("mmjax")
        for key in ("wall_s", "cpu_s", "peak_mib"):
            for ref in refs:
                ok = m and rs[ref] and "error" not in m and "error" not in rs[ref] and rs[ref][key] > 0
                row.append(f"{m[key] / rs[ref][key]:.2f}" if ok else "-")
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="512,2048,4096,8192", help="comma-separated sequence lengths")
    ap.add_argument("--causal", default="0,1", help="comma-separated 0/1")
    ap.add_argument("--modes", default="fwd,fwdbwd", help="comma-separated fwd/fwdbwd")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    ap.add_argument("--long", action="store_true", help="also T=32768 fwd+bwd (non-causal) for mmjax alone")
    ap.add_argument("--json", default=None, help="write all records to this path")
    ap.add_argument("--worker", nargs=4, metavar=("IMPL", "T", "CAUSAL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        impl, T, causal, mode = args.worker
        fn = _worker_torch if impl == "torch" else (lambda *a: _worker_jax(impl, *a))
        print(json.dumps(fn(int(T), bool(int(causal)), mode)))
        return
    jobs = [
        (impl, int(T), bool(int(c)), mode)
        for c in args.causal.split(",")
        for mode in args.modes.split(",")
        for T in args.lengths.split(",")
        for impl in args.impls.split(",")
    ]
    if args.long:
        jobs.append(("mmjax", 32768, False, "fwdbwd"))
    records = []
    for job in jobs:
        rec = _run_one(*job)
        records.append(rec)
        print(json.dumps(rec), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)
    print()
    print(
        f"B={B}, heads={N}, head_dim={D}, float32, CPU x{os.cpu_count()}; time = median wall s, cpu = median "
        f"process CPU s (all threads), mem = peak RSS MiB above the post-import baseline"
    )
    print(_fmt_table(records))


if __name__ == "__main__":
    main()
