"""Benchmark: GCN and RGCN layers, mmjax vs torch_geometric GCNConv / RGCNConv, forward and forward+backward.

Command (CPU; XLA with its defaults, PyTorch with one thread per core):

    .venv/bin/python experiments/bench_gnn.py --graphs cora,large --json /tmp/bench_gnn.json

``--layers gcn`` or ``--layers rgcn`` runs one of the two layers only (default both).

Graphs (random directed edges drawn uniformly, no self loops, no duplicates):

* ``cora``:  2,708 nodes, 10,556 edges (+ 2,708 self loops), 1,433 -> 16 features (Cora-sized).
* ``large``: 100,000 nodes, 1,000,000 edges (+ self loops), 64 -> 64 features.
* ``tiny``: 50 nodes, 200 edges, 8 -> 4 features (for the tests).

Paths measured (the name in the output says which is which):

* ``mmjax default``: ``GCNConv.apply(params, graph)``: normalisation (remaining self loops, in-degree) recomputed
  inside every jitted call; edges in the given order; aggregation in blocks of edges (``lax.scan``, each block's
  ``[B, F]`` messages gathered and scatter-added while in cache); custom backward ``A^T g`` aggregated the same way.
* ``mmjax cached``: ``gcn_adjacency(graph)`` once (normalised; edges sorted by sender and by receiver), then
  ``GCNConv.apply(params, graph, adjacency=adj)``: the forward walks the edges in sender order, the backward in
  receiver order, so every row gather reads memory in order. Analogue of PyG's ``cached=True``; the one-off
  preprocessing time (including its compilation) is printed separately.
* ``pyg edge_index``: ``torch_geometric.nn.GCNConv`` with an ``edge_index`` tensor (``gcn_norm`` every call,
  gather + scatter).
* ``pyg csr cached``: ``GCNConv(cached=True)`` fed the transposed adjacency as a ``torch.sparse_csr`` tensor
  (``torch_geometric.utils.to_torch_csr_tensor``; torch_sparse is not installed, and PyG 2.8 routes a torch CSR
  ``adj_t`` to ``torch.sparse.mm``). PyG's fastest CPU path here.

Each path runs in a process of its own, the paths interleaved (``experiments/benchmarking.py``: ``--rounds``
processes per path, each timing ``--steps`` calls of fwd and of fwd+bwd after ``--warmup`` untimed ones, which
include JAX's compilation); median and min-max over all timed calls. fwd+bwd = gradient of ``sum(out * c)`` w.r.t.
the node features and the layer weights. The outputs of all paths are checked against PyG's ``edge_index`` path.

RGCN (``--layers rgcn``): the same graphs, every edge given one of ``RELATIONS = 4`` relations (uniform random),
``aggr="mean"``, root weight and bias, no bases; the same ``F_in -> F`` features as the GCN case.

* ``mmjax rgcn``: ``RGCNConv(F, 4).apply(params, graph, edge_type)`` under ``jit`` with the graph and the types
  as arguments (the per-(receiver, relation) counts are recomputed in every call, as in PyG): ``x`` transformed by
  all relations at once (``[N, 4 F]``, one matmul), one ``F``-row gathered per edge and summed at the receivers
  with weight ``1 / |N_r(i)|`` (the blocked aggregation and custom backward of the GCN default path).
* ``pyg rgcn``: ``torch_geometric.nn.RGCNConv(F_in, F, 4)`` with ``edge_index`` and ``edge_type`` (PyG 2.8 on CPU
  without pyg-lib: a loop over the relations, each masking its edges, aggregating ``x_j`` and multiplying by
  ``W_r``).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmarking  # noqa: E402

PATHS = ("mmjax default", "mmjax cached", "pyg edge_index", "pyg csr cached")
RGCN_PATHS = ("mmjax rgcn", "pyg rgcn")
LAYERS = {"gcn": (PATHS, "pyg edge_index"), "rgcn": (RGCN_PATHS, "pyg rgcn")}  # paths, reference for the checksum
RELATIONS = 4
GRAPHS = {"cora": (2_708, 10_556, 1_433, 16), "large": (100_000, 1_000_000, 64, 64), "tiny": (50, 200, 8, 4)}


def make_graph(n, e, f_in, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, n, 2 * e)
    r = rng.integers(0, n - 1, 2 * e)
    r = r + (r >= s)  # no self loops
    _, first = np.unique(s.astype(np.int64) * n + r, return_index=True)  # no duplicate edges (PyG's CSR merges them)
    keep = np.sort(rng.permutation(first)[:e])
    s, r = s[keep], r[keep]
    x = rng.standard_normal((n, f_in)).astype(np.float32)
    return s.astype(np.int32), r.astype(np.int32), x


def _inputs(graph: str):
    n, e, f_in, f_out = GRAPHS[graph]
    s, r, x = make_graph(n, e, f_in)
    cot = np.random.default_rng(1).standard_normal((n, f_out)).astype(np.float32)
    kernel = np.random.default_rng(2).standard_normal((f_in, f_out)).astype(np.float32) / np.sqrt(f_in)
    return n, e, f_in, f_out, s, r, x, cot, kernel


def _rgcn_inputs(graph: str):
    n, e, f_in, f_out, s, r, x, cot, _ = _inputs(graph)
    edge_type = np.random.default_rng(3).integers(0, RELATIONS, len(s)).astype(np.int32)
    rng = np.random.default_rng(4)
    weight = (rng.standard_normal((RELATIONS, f_in, f_out)) / np.sqrt(f_in)).astype(np.float32)
    root = (rng.standard_normal((f_in, f_out)) / np.sqrt(f_in)).astype(np.float32)
    return n, e, f_in, f_out, s, r, x, cot, edge_type, weight, root


def _checksum(out) -> list[float]:
    """A few numbers that identify the forward output (compared across paths: same graph, same weights)."""
    out = np.asarray(out, np.float64)
    return [float(np.abs(out).sum()), float(np.square(out).sum()), float(np.square(out[:7]).sum())]


def bench_mmjax(graph: str, cached: bool, steps: int, warmup: int) -> dict:
    """Sides ``mmjax default`` / ``mmjax cached``: ``GCNConv`` fwd and fwd+bwd (cached: ``gcn_adjacency`` once)."""
    import time

    import jax
    import jax.numpy as jnp

    from mmjax import gnn
    from mmjax.graph import Graph

    n, e, f_in, f_out, s, r, x, cot, kernel = _inputs(graph)
    g = Graph(
        nodes=jnp.asarray(x),
        senders=jnp.asarray(s),
        receivers=jnp.asarray(r),
        n_node=jnp.array([n]),
        n_edge=jnp.array([e]),
    )
    layer = gnn.GCNConv(features=f_out)
    params = layer.init(jax.random.key(0), g)["params"]
    params = {**params, "kernel": jnp.asarray(kernel), "bias": jnp.zeros_like(params["bias"])}
    cot_j = jnp.asarray(cot)
    out = {}
    adj = None
    if cached:
        t0 = time.perf_counter()
        adj = jax.block_until_ready(jax.jit(gnn.gcn_adjacency)(g))
        out["preprocess_ms"] = (time.perf_counter() - t0) * 1e3  # once per graph, including its compilation

    def loss(p, xx):
        return jnp.sum(layer.apply({"params": p}, g._replace(nodes=xx), adjacency=adj) * cot_j)

    fwd = jax.jit(lambda p: layer.apply({"params": p}, g, adjacency=adj))
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    out |= benchmarking.time_calls(
        lambda: jax.block_until_ready(fwd(params)), steps=steps, warmup=warmup, prefix="fwd_"
    )
    out |= benchmarking.time_calls(
        lambda: jax.block_until_ready(bwd(params, g.nodes)), steps=steps, warmup=warmup, prefix="fwdbwd_"
    )
    return out | {"checksum": _checksum(fwd(params))}


def bench_pyg(graph: str, cached: bool, steps: int, warmup: int) -> dict:
    """Sides ``pyg edge_index`` / ``pyg csr cached``: ``torch_geometric.nn.GCNConv`` fwd and fwd+bwd."""
    import torch
    import torch_geometric
    from torch_geometric.nn import GCNConv as PygGCN
    from torch_geometric.utils import to_torch_csr_tensor

    threads = benchmarking.torch_threads()
    n, e, f_in, f_out, s, r, x, cot, kernel = _inputs(graph)
    torch.manual_seed(0)
    xt = torch.tensor(x)
    ei = torch.tensor(np.stack([s, r]), dtype=torch.long)
    cot_t = torch.tensor(cot)
    model = PygGCN(f_in, f_out, cached=cached)
    with torch.no_grad():
        model.lin.weight.copy_(torch.tensor(kernel.T.copy()))
        model.bias.zero_()
    index = to_torch_csr_tensor(ei.flip(0), size=(n, n)) if cached else ei  # rows = targets: PyG's adj_t

    def fwd():
        with torch.no_grad():
            return model(xt, index)

    def fwdbwd():
        xx = xt.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        (model(xx, index) * cot_t).sum().backward()

    out = benchmarking.time_calls(fwd, steps=steps, warmup=warmup, prefix="fwd_")
    out |= benchmarking.time_calls(fwdbwd, steps=steps, warmup=warmup, prefix="fwdbwd_")
    versions = {"torch": torch.__version__, "torch_geometric": torch_geometric.__version__}
    return out | {"checksum": _checksum(fwd().numpy()), "threads": threads, **versions}


def bench_mmjax_rgcn(graph: str, steps: int, warmup: int) -> dict:
    """Side ``mmjax rgcn``: ``RGCNConv`` (mean) fwd and fwd+bwd, graph and edge types passed to the jitted calls."""
    import jax
    import jax.numpy as jnp

    from mmjax import gnn
    from mmjax.graph import Graph

    n, e, f_in, f_out, s, r, x, cot, edge_type, weight, root = _rgcn_inputs(graph)
    g = Graph(
        nodes=jnp.asarray(x),
        senders=jnp.asarray(s),
        receivers=jnp.asarray(r),
        n_node=jnp.array([n]),
        n_edge=jnp.array([len(s)]),
    )
    et = jnp.asarray(edge_type)
    layer = gnn.RGCNConv(f_out, RELATIONS)
    params = {"weight": jnp.asarray(weight), "root": jnp.asarray(root), "bias": jnp.zeros((f_out,), jnp.float32)}
    cot_j = jnp.asarray(cot)

    def loss(p, xx, gg, t):
        return jnp.sum(layer.apply({"params": p}, gg._replace(nodes=xx), t) * cot_j)

    fwd = jax.jit(lambda p, gg, t: layer.apply({"params": p}, gg, t))
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))  # d params, d node features
    out = benchmarking.time_calls(
        lambda: jax.block_until_ready(fwd(params, g, et)), steps=steps, warmup=warmup, prefix="fwd_"
    )
    out |= benchmarking.time_calls(
        lambda: jax.block_until_ready(bwd(params, g.nodes, g, et)), steps=steps, warmup=warmup, prefix="fwdbwd_"
    )
    return out | {"checksum": _checksum(fwd(params, g, et))}


def bench_pyg_rgcn(graph: str, steps: int, warmup: int) -> dict:
    """Side ``pyg rgcn``: ``torch_geometric.nn.RGCNConv`` (mean) fwd and fwd+bwd with ``edge_index, edge_type``."""
    import torch
    import torch_geometric
    from torch_geometric.nn import RGCNConv as PygRGCN

    threads = benchmarking.torch_threads()
    n, e, f_in, f_out, s, r, x, cot, edge_type, weight, root = _rgcn_inputs(graph)
    xt = torch.tensor(x)
    ei = torch.tensor(np.stack([s, r]), dtype=torch.long)
    et = torch.tensor(edge_type, dtype=torch.long)
    cot_t = torch.tensor(cot)
    model = PygRGCN(f_in, f_out, RELATIONS)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weight))
        model.root.copy_(torch.tensor(root))
        model.bias.zero_()

    def fwd():
        with torch.no_grad():
            return model(xt, ei, et)

    def fwdbwd():
        xx = xt.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        (model(xx, ei, et) * cot_t).sum().backward()

    out = benchmarking.time_calls(fwd, steps=steps, warmup=warmup, prefix="fwd_")
    out |= benchmarking.time_calls(fwdbwd, steps=steps, warmup=warmup, prefix="fwdbwd_")
    versions = {"torch": torch.__version__, "torch_geometric": torch_geometric.__version__}
    return out | {"checksum": _checksum(fwd().numpy()), "threads": threads, **versions}


SIDES = {
    "mmjax default": lambda **o: bench_mmjax(cached=False, **o),
    "mmjax cached": lambda **o: bench_mmjax(cached=True, **o),
    "pyg edge_index": lambda **o: bench_pyg(cached=False, **o),
    "pyg csr cached": lambda **o: bench_pyg(cached=True, **o),
    "mmjax rgcn": bench_mmjax_rgcn,
    "pyg rgcn": bench_pyg_rgcn,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--graphs", default="cora,large")
    ap.add_argument("--layers", default="gcn,rgcn", help=f"comma-separated subset of {tuple(LAYERS)}")
    ap.add_argument("--steps", type=int, default=5, help="timed calls of each mode per process")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each mode per process")
    ap.add_argument("--rounds", type=int, default=3, help="processes per path, interleaved")
    ap.add_argument(
        "--paths", default=None, help=f"comma-separated subset of {PATHS + RGCN_PATHS} (default: all of the layers)"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    names = [x for x in args.graphs.split(",") if x]
    layers = [x for x in args.layers.split(",") if x]
    for name in names:
        if name not in GRAPHS:
            raise SystemExit(f"--graphs must name graphs from {sorted(GRAPHS)}, got {name!r}.")
    for layer in layers:
        if layer not in LAYERS:
            raise SystemExit(f"--layers must name layers from {tuple(LAYERS)}, got {layer!r}.")
    paths = [p for layer in layers for p in LAYERS[layer][0]]
    if args.paths is not None:
        wanted = [x for x in args.paths.split(",") if x]
        for path in wanted:
            if path not in paths:
                raise SystemExit(f"--paths must name paths of the layers {layers}: {tuple(paths)}, got {path!r}.")
        paths = [p for p in paths if p in wanted]
    info = benchmarking.machine()
    print(benchmarking.describe_machine(info), flush=True)
    results = {"machine": info, "graphs": {}, "rgcn_graphs": {}}
    for layer in layers:
        layer_paths = [p for p in LAYERS[layer][0] if p in paths]
        if not layer_paths:
            continue
        for name in names:
            n, e, f_in, f_out = GRAPHS[name]
            options = {"graph": name, "steps": args.steps, "warmup": args.warmup}
            res = benchmarking.compare(__file__, layer_paths, options, rounds=args.rounds)
            results["graphs" if layer == "gcn" else "rgcn_graphs"][name] = res
            if layer == "gcn":
                print(f"\n== {name}: {n:,} nodes, {e:,} edges + {n:,} self loops, {f_in} -> {f_out} features")
            else:
                print(
                    f"\n== RGCN {name}: {n:,} nodes, {e:,} edges of {RELATIONS} relations, {f_in} -> {f_out} "
                    "features, aggr mean"
                )
            _report(res, layer_paths, LAYERS[layer][1])
    if args.json:
        benchmarking.write_json(args.json, results)
    return results


def _report(res: dict, paths: list[str], reference: str) -> None:
    ok = [p for p in paths if "error" not in res["sides"][p]]
    best = {}
    for mode in ("fwd", "fwdbwd"):
        pyg = [res["sides"][p][f"{mode}_wall_s"]["median"] for p in ok if p.startswith("pyg")]
        best[mode] = min(pyg) if pyg else None
    print(
        f"{'path':<16}{'fwd ms (min-max)':>22}{'fwd+bwd ms (min-max)':>24}{'  best PyG time / this: fwd, fwd+bwd':>38}"
    )
    for path in paths:
        side = res["sides"][path]
        if "error" in side:
            print(f"{path:<16} error: {side['error']}")
            continue
        cells, ratios = [], []
        for mode in ("fwd", "fwdbwd"):
            w = side[f"{mode}_wall_s"]
            cells.append(f"{w['median'] * 1e3:.2f} ({w['min'] * 1e3:.1f}-{w['max'] * 1e3:.1f})")
            ratios.append(f"{best[mode] / w['median']:.2f}x" if best[mode] else "-")
        print(f"{path:<16}{cells[0]:>22}{cells[1]:>24}{ratios[0]:>19}{ratios[1]:>10}")
    for path in ok:
        if path.startswith("mmjax cached"):
            ms = side_runs(res, path)[0]["preprocess_ms"]
            print(f"mmjax cached preprocessing (once per graph, incl. compile): {ms:.1f} ms")
    sums = {p: side_runs(res, p)[0]["checksum"] for p in ok}
    if reference in sums:
        ref = np.array(sums[reference])
        for p, c in sums.items():
            rel = float(np.max(np.abs(np.array(c) - ref) / ref))
            print(f"output checksum of {p!r} vs {reference}: largest relative difference {rel:.1e}")
    print(benchmarking.describe_load(res["load"]))


def side_runs(result: dict, path: str) -> list[dict]:
    """The per-process results of ``path`` in one comparison."""
    return result["sides"][path]["runs"]


if __name__ == "__main__":
    benchmarking.main_or_side(SIDES, main)
