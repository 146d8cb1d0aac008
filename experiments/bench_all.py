"""Every benchmark, one after the other, and the summary: ``docs/results/benchmarks.json`` and ``benchmarks.png``.

Command (``make bench`` runs it; about 40 minutes on the 2-core CPU, on an idle machine)::

    .venv/bin/python experiments/bench_all.py

``--only vit,clip`` runs a subset (``vit``, ``clip``, ``gnn``, ``attention``, ``diffusion``, ``generate``);
``--out DIR`` writes elsewhere. Each benchmark runs its sides each in a process of its own, interleaved
(``experiments/benchmarking.py``). The summary holds one ratio per workload, the reference's median time / mmjax's
(above 1: mmjax is faster), with the machine and whether other processes loaded it during that workload; the plot
draws the ratios with 1.0 marked, loaded workloads hatched.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmarking  # noqa: E402

BENCHMARKS = ("vit", "clip", "gnn", "attention", "diffusion", "generate")
ATTENTION_LENGTHS = "2048,4096,8192"


def _vit(rounds: int):
    import bench_vit

    res = bench_vit.main(["--config", "all", "--rounds", str(rounds)])
    rows = [
        _row(f"ViT train step ({name})", "PyTorch (transformers)", r, "mmjax", "torch")
        for name, r in res["configs"].items()
    ]
    return rows, res


def _clip(rounds: int):
    import bench_clip

    res = bench_clip.main(["--rounds", str(rounds)])
    return [_row("CLIP train step (small)", "PyTorch (transformers)", res, "mmjax", "torch")], res


def _gnn(rounds: int):
    import bench_gnn

    res = bench_gnn.main(["--graphs", "large", "--rounds", str(rounds)])["graphs"]["large"]
    rows = [
        _row(f"GCN fwd+bwd, 1M edges ({path})", "PyG cached CSR", res, path, "pyg csr cached", key="fwdbwd_wall_s")
        for path in ("mmjax default", "mmjax cached")
    ]
    return rows, res


def _attention(rounds: int):
    import json
    import tempfile

    import bench_attention

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "attention.json")
        argv = ["--lengths", ATTENTION_LENGTHS, "--modes", "fwdbwd", "--impls", "mmjax,torch", "--rounds", str(rounds)]
        bench_attention.main(argv + ["--json", path])
        with open(path) as f:
            saved = json.load(f)
    by = {(r["impl"], r["T"], r["causal"]): r for r in saved["records"]}
    rows = []
    for (impl, T, causal), rec in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        if impl != "mmjax":
            continue
        ref = by.get(("torch", T, causal))
        ok = "error" not in rec and ref is not None and "error" not in ref
        load = rec["load"] if ref is None else max(rec["load"], ref["load"], key=lambda x: x["others_cpu_share"] or 0)
        name = f"attention fwd+bwd T={T}{' causal' if causal else ''}"
        times = (rec["wall_s"], ref["wall_s"]) if ok else (None, None)
        rows.append(_record_row(name, "torch SDPA", *times, load))
    return rows, saved


def _diffusion(rounds: int):
    import bench_diffusion

    res = bench_diffusion.main(["--rounds", str(rounds)])
    steps = res["sizes"]["sample_steps"]
    names = {"train": "DiT train step (small)", "sample": f"DiT DDIM sampling, {steps} steps (small)"}
    rows = [_row(names[w], "PyTorch (diffusers)", r, "mmjax", "torch") for w, r in res["workloads"].items()]
    return rows, res


def _generate(rounds: int):
    import bench_generate

    res = bench_generate.main(["--rounds", str(rounds)])
    cfg, rows = res["sizes"], []
    for workload, what in (("greedy", "greedy"), ("beam", f"beam {cfg['beams']}")):
        name = f"generate {what}, batch {cfg['batch']}, {cfg['new_tokens']} tokens"
        rows.append(_row(name, "transformers generate()", res["workloads"][workload], "mmjax", "torch"))
    for p in cfg["prefixes"]:
        name = f"generate, time per token after {p} tokens (cached)"
        result = res["workloads"][f"prefix{p}"]
        rows.append(_row(name, "transformers generate()", result, "mmjax", "torch", key="cached_step_s"))
    for row in rows:  # a per-token time is a difference of two calls' times: noise can make it <= 0
        if row["ratio"] is not None and not (row["mmjax_s"] > 0 and row["reference_s"] > 0):
            row["ratio"] = None
    return rows, res


def _record_row(workload: str, reference: str, ours_s, reference_s, load: dict) -> dict:
    ratio = reference_s / ours_s if ours_s and reference_s else None
    return {
        "workload": workload,
        "reference": reference,
        "mmjax_s": ours_s,
        "reference_s": reference_s,
        "ratio": ratio,
        "loaded": load["loaded"],
        "load": load,
    }


def _row(workload: str, reference: str, result: dict, ours: str, theirs: str, key: str = "wall_s") -> dict:
    """One summary row from a :func:`benchmarking.compare` result: median times of two sides and their ratio."""
    sides = result["sides"]
    times = [sides[s][key]["median"] if key in sides[s] else None for s in (ours, theirs)]
    return _record_row(workload, reference, *times, result["load"])


def plot(rows: list[dict], path: str, title: str = "") -> None:
    """Horizontal bars of the ratios, 1.0 marked; loaded workloads hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["ratio"]]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4))
    ys = range(len(rows))
    colours = ["tab:green" if r["ratio"] >= 1 else "tab:red" for r in rows]
    bars = ax.barh(list(ys), [r["ratio"] for r in rows], color=colours)
    for bar, r in zip(bars, rows, strict=True):
        if r["loaded"]:
            bar.set_hatch("//")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(list(ys), [f"{r['workload']} vs {r['reference']}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("reference time / mmjax time (> 1: mmjax faster)")
    if title:
        ax.set_title(title, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    ap.add_argument("--rounds", type=int, default=3, help="processes per side, interleaved")
    ap.add_argument("--out", default=os.path.join(benchmarking.REPO, "docs", "results"))
    args = ap.parse_args(argv)
    names = [x for x in args.only.split(",") if x]
    for name in names:
        if name not in BENCHMARKS:
            raise SystemExit(f"--only must name benchmarks from {BENCHMARKS}, got {name!r}")
    runners = {
        "vit": _vit,
        "clip": _clip,
        "gnn": _gnn,
        "attention": _attention,
        "diffusion": _diffusion,
        "generate": _generate,
    }
    info = benchmarking.machine()
    rows, details = [], {}
    for name in names:
        print(f"\n=== {name}", flush=True)
        new_rows, details[name] = runners[name](args.rounds)
        rows += new_rows
    os.makedirs(args.out, exist_ok=True)
    command = " ".join(["python experiments/bench_all.py", *(sys.argv[1:] if argv is None else argv)])
    summary = {"machine": info, "command": command, "rows": rows, "details": details}
    benchmarking.write_json(os.path.join(args.out, "benchmarks.json"), summary)
    v = info["versions"]
    title = f"{info['cpu']}, {info['cores']} cores; jax {v.get('jax')}, torch {v.get('torch')}; {command}"
    plot(rows, os.path.join(args.out, "benchmarks.png"), title)
    print(f"\n{'workload':<46} {'reference':<24} {'ref / mmjax':>11}")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "error"
        print(f"{r['workload']:<46} {r['reference']:<24} {ratio:>11}{'  LOADED' if r['loaded'] else ''}")
    print(f"wrote {os.path.join(args.out, 'benchmarks.json')} and benchmarks.png")
    return summary


if __name__ == "__main__":
    main()
