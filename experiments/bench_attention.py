"""Benchmark: mmjax attention against jax.nn.dot_product_attention and torch SDPA, forward and forward+backward.

Command (the full table; the jax.nn run at T=8192 alone needs ~11.5 GiB and ~20 s per call):

    .venv/bin/python experiments/bench_attention.py --json /tmp/bench_attention.json

Subsets: ``--lengths 512,2048 --causal 0 --impls mmjax,chunked,torch``. Long sequence, mmjax alone
(target: forward+backward at T=32768 under 4 GiB): ``--long`` (adds T=32768 fwd+bwd for mmjax default).

Setup: batch 1, 8 heads, head_dim 64, float32, self-attention (T = S), non-causal and causal. Each
(implementation, T, causal, mode) runs in a process of its own, the implementations of one (T, causal, mode)
interleaved, ``--rounds`` processes each (``experiments/benchmarking.py``), so its peak memory is its own:
``peak = ru_maxrss at the end - ru_maxrss after imports`` (the same measure for jax and torch; it includes the inputs,
jax's compilation and the outputs). Time: per process up to 5 calls (stopping after ~10 s) after a warm-up (jax: an
ahead-of-time compile, so the slow references execute as few times as possible; torch: one call); median and
min-max over all processes' calls. The machine and the load of other processes meanwhile are printed.

Implementations: ``mmjax`` = ``dot_product_attention(implementation=None)``, ``chunked`` = ``implementation="chunked"``,
``jaxnn`` = ``jax.nn.dot_product_attention``, ``torch`` = ``torch.nn.functional.scaled_dot_product_attention``.

Expected on the 2-core CPU machine (targets of the issue): mmjax fwd+bwd at T=4096/8192 at most 0.6x jax.nn's time,
peak at T=8192 under 1.5 GiB (jax.nn: ~11.5 GiB), T=32768 fwd+bwd under 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmarking  # noqa: E402

B, N, D = 1, 8, 64
IMPLS = ("mmjax", "chunked", "jaxnn", "torch")


def _time(fn, warmup) -> dict:
    """``wall_s`` / ``cpu_s`` of up to 5 calls of ``fn``, stopping after ~10 s, after ``warmup()``."""
    warmup()
    timed = {"wall_s": [], "cpu_s": []}
    start = time.perf_counter()
    while len(timed["wall_s"]) < 5 and (not timed["wall_s"] or time.perf_counter() - start < 10.0):
        for key, values in benchmarking.time_calls(fn, steps=1, warmup=0).items():
            timed[key] += values
    return timed


def _worker_jax(impl: str, T: int, causal: bool, mode: str) -> dict:
    """Sides ``mmjax``, ``chunked``, ``jaxnn``: one attention call (forward, or forward + backward) at ``T``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mmjax.attention import dot_product_attention, select_implementation

    base = benchmarking.peak_rss_mib()
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
    timed = _time(lambda: jax.block_until_ready(compiled(q, k, v)), lambda: None)
    return dict(**timed, peak_mib=benchmarking.peak_rss_mib() - base, chosen=chosen)


def _worker_torch(T: int, causal: bool, mode: str) -> dict:
    """Side ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` (one thread per core)."""
    import torch
    import torch.nn.functional as F

    threads = benchmarking.torch_threads()
    base = benchmarking.peak_rss_mib()
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

    timed = _time(run, run)
    return dict(
        **timed, peak_mib=benchmarking.peak_rss_mib() - base, chosen=f"torch {torch.__version__}", threads=threads
    )


SIDES = {
    "mmjax": lambda **o: _worker_jax("mmjax", **o),
    "chunked": lambda **o: _worker_jax("chunked", **o),
    "jaxnn": lambda **o: _worker_jax("jaxnn", **o),
    "torch": _worker_torch,
}


def _records(result: dict, T: int, causal: bool, mode: str) -> list[dict]:
    """One flat record per implementation of a comparison: median times and the largest peak memory."""
    records = []
    for impl, side in result["sides"].items():
        rec = dict(impl=impl, T=T, causal=causal, mode=mode)
        if "error" in side:
            rec["error"] = side["error"]
        else:
            runs = side["runs"]
            rec.update(
                wall_s=side["wall_s"]["median"],
                wall_min_s=side["wall_s"]["min"],
                wall_max_s=side["wall_s"]["max"],
                cpu_s=side["cpu_s"]["median"],
                runs=side["wall_s"]["n"],
                peak_mib=max(r["peak_mib"] for r in runs),
                chosen=runs[0]["chosen"],
            )
        records.append(rec)
    return records


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
    ap.add_argument("--rounds", type=int, default=2, help="processes per implementation and size, interleaved")
    ap.add_argument("--long", action="store_true", help="also T=32768 fwd+bwd (non-causal) for mmjax alone")
    ap.add_argument("--json", default=None, help="write all records to this path")
    args = ap.parse_args(argv)
    impls = args.impls.split(",")
    for impl in impls:
        if impl not in IMPLS:
            raise SystemExit(f"--impls must name implementations from {IMPLS}, got {impl!r}")
    workloads = [
        (int(T), bool(int(c)), mode, impls)
        for c in args.causal.split(",")
        for mode in args.modes.split(",")
        for T in args.lengths.split(",")
    ]
    if args.long:
        workloads.append((32768, False, "fwdbwd", ["mmjax"]))
    info = benchmarking.machine()
    print(benchmarking.describe_machine(info), flush=True)
    records, loads = [], []
    for T, causal, mode, sides in workloads:
        result = benchmarking.compare(__file__, sides, {"T": T, "causal": causal, "mode": mode}, rounds=args.rounds)
        loads.append(result["load"])
        for rec in _records(result, T, causal, mode):
            rec["load"] = result["load"]
            records.append(rec)
            print(json.dumps(rec), flush=True)
        if args.json:
            benchmarking.write_json(args.json, {"machine": info, "records": records, "loads": loads})
    print()
    print(
        f"B={B}, heads={N}, head_dim={D}, float32, CPU x{info['cores']}; time = median wall s, cpu = median "
        f"process CPU s (all threads), mem = peak RSS MiB above the post-import baseline"
    )
    print(_fmt_table(records))
    worst = max(loads, key=lambda x: x["others_cpu_share"] or 0.0)
    print(benchmarking.describe_load(worst))


if __name__ == "__main__":
    benchmarking.main_or_side(SIDES, main)
