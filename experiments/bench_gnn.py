"""Benchmark: one GCN layer, mmjax vs torch_geometric GCNConv, forward and forward+backward, in one run.

Command (CPU; both libraries use every core the machine gives them):

    .venv/bin/python experiments/bench_gnn.py --graphs cora,large --json /tmp/bench_gnn.json

Graphs (random directed edges drawn uniformly, no self loops, no duplicates):

* ``cora``:  2,708 nodes, 10,556 edges (+ 2,708 self loops), 1,433 -> 16 features (Cora-sized).
* ``large``: 100,000 nodes, 1,000,000 edges (+ self loops), 64 -> 64 features.

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

Timings: median of ``--repeats`` calls after warm-up (compilation excluded for JAX), the paths called
round-robin so that load from other processes affects them alike. fwd+bwd = gradient of
``sum(out * c)`` w.r.t. the node features and the layer weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch_geometric
from torch_geometric.nn import GCNConv as PygGCN
from torch_geometric.utils import to_torch_csr_tensor

from mmjax import gnn
from mmjax.graph import Graph

GRAPHS = {"cora": (2_708, 10_556, 1_433, 16), "large": (100_000, 1_000_000, 64, 64)}


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


def timeit_interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median ms per function; calls go round-robin (one of each per round) so load changes hit all paths alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in ts.items()}


def bench_graph(name, repeats):
    n, e, f_in, f_out = GRAPHS[name]
    s, r, x = make_graph(n, e, f_in)
    cot = np.random.default_rng(1).standard_normal((n, f_out)).astype(np.float32)
    res = {"graph": name, "nodes": n, "edges": e, "self_loops_added": n, "f_in": f_in, "f_out": f_out}

    # ---------------- mmjax
    g = Graph(
        nodes=jnp.asarray(x),
        senders=jnp.asarray(s),
        receivers=jnp.asarray(r),
        n_node=jnp.array([n]),
        n_edge=jnp.array([e]),
    )
    layer = gnn.GCNConv(features=f_out)
    params = layer.init(jax.random.key(0), g)["params"]
    cot_j = jnp.asarray(cot)

    def loss(p, xx, graph, adj):
        return jnp.sum(layer.apply({"params": p}, graph._replace(nodes=xx), adjacency=adj) * cot_j)

    fwd = jax.jit(lambda p, graph, adj: layer.apply({"params": p}, graph, adjacency=adj))
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    t0 = time.perf_counter()
    adj = jax.block_until_ready(jax.jit(gnn.gcn_adjacency)(g))
    res["mmjax_cached_preprocess_ms"] = (time.perf_counter() - t0) * 1e3  # includes its compilation
    fns = {}
    for tag, a in (("mmjax default", None), ("mmjax cached", adj)):
        fns[f"{tag} fwd"] = lambda a=a: jax.block_until_ready(fwd(params, g, a))
        fns[f"{tag} fwd+bwd"] = lambda a=a: jax.block_until_ready(bwd(params, g.nodes, g, a))
    out_mm = np.asarray(fwd(params, g, adj))

    # ---------------- PyG
    torch.manual_seed(0)
    xt = torch.tensor(x)
    ei = torch.tensor(np.stack([s, r]), dtype=torch.long)
    cot_t = torch.tensor(cot)
    kernel = torch.tensor(np.asarray(params["kernel"]).T.copy())
    ref = PygGCN(f_in, f_out)
    ref_c = PygGCN(f_in, f_out, cached=True)
    with torch.no_grad():
        for m in (ref, ref_c):
            m.lin.weight.copy_(kernel)
    adj_t = to_torch_csr_tensor(ei.flip(0), size=(n, n))  # rows = targets: PyG's adj_t convention

    def run(model, index, backward):
        xx = xt.clone().requires_grad_(backward)
        if backward:
            model.zero_grad(set_to_none=True)
            (model(xx, index) * cot_t).sum().backward()
        else:
            with torch.no_grad():
                return model(xx, index)

    for tag, model, index in (("pyg edge_index", ref, ei), ("pyg csr cached", ref_c, adj_t)):
        fns[f"{tag} fwd"] = lambda model=model, index=index: run(model, index, False)
        fns[f"{tag} fwd+bwd"] = lambda model=model, index=index: run(model, index, True)
    res.update(timeit_interleaved(fns, repeats))
    out_ref = run(ref, ei, False).numpy()
    out_csr = run(ref_c, adj_t, False).numpy()
    res["max_abs_diff_mmjax_vs_pyg"] = float(np.abs(out_mm - out_ref).max())
    res["max_abs_diff_pyg_csr_vs_pyg"] = float(np.abs(out_csr - out_ref).max())
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--graphs", default="cora,large")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    names = [x for x in args.graphs.split(",") if x]
    for name in names:
        if name not in GRAPHS:
            raise ValueError(f"--graphs must name graphs from {sorted(GRAPHS)}, got {name!r}.")
    print(
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), torch_geometric {torch_geometric.__version__}"
    )
    results = []
    for name in names:
        res = bench_graph(name, args.repeats)
        results.append(res)
        print(
            f"\n== {name}: {res['nodes']:,} nodes, {res['edges']:,} edges + {res['nodes']:,} self loops, "
            f"{res['f_in']} -> {res['f_out']} features"
        )
        best_pyg = {k: min(res[f"pyg edge_index {k}"], res[f"pyg csr cached {k}"]) for k in ("fwd", "fwd+bwd")}
        print(f"{'path':<18}{'fwd ms':>10}{'fwd+bwd ms':>13}{'  best PyG / this (fwd, fwd+bwd)':>34}")
        for tag in ("mmjax default", "mmjax cached", "pyg edge_index", "pyg csr cached"):
            f, fb = res[f"{tag} fwd"], res[f"{tag} fwd+bwd"]
            print(f"{tag:<18}{f:>10.2f}{fb:>13.2f}{best_pyg['fwd'] / f:>17.2f}x{best_pyg['fwd+bwd'] / fb:>15.2f}x")
        print(f"mmjax cached preprocessing (once per graph, incl. compile): {res['mmjax_cached_preprocess_ms']:.1f} ms")
        print(
            f"max |mmjax - pyg| = {res['max_abs_diff_mmjax_vs_pyg']:.2e}, "
            f"max |pyg csr - pyg| = {res['max_abs_diff_pyg_csr_vs_pyg']:.2e}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
