"""Tests for the typed-edge layers of mmjax.gnn: RGCNConv and GATConv with edge features, against float64 NumPy
oracles (dense per-relation formulas and an edge loop), plus padding invariance, jit/grad/vmap and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import gnn
from mmjax import graph as gr
from tests.tolerances import assert_float32_close, assert_float64_equal, float64, to_float64


def _typed_graph(seed, n=9, e=30, f=4, num_relations=3):
    """Random directed multigraph with self loops, a duplicate edge and an isolated node (n-1); relations in
    [0, num_relations)."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, n - 1, e)
    r = rng.integers(0, n - 1, e)
    s[:3], r[:3] = [0, 0, 2], [1, 1, 2]
    t = rng.integers(0, num_relations, e)
    t[:2] = 0
    g = gr.Graph(
        nodes=rng.standard_normal((n, f)).astype(np.float32),
        senders=s.astype(np.int32),
        receivers=r.astype(np.int32),
        n_node=np.array([n]),
        n_edge=np.array([e]),
    )
    return g, t.astype(np.int32)


def _rgcn_oracle(params, g, t, num_relations, aggr, root_weight, use_bias):
    """Dense float64 formula: out = x root + sum_r AGG_r(x) W_r + b, AGG_r from the count matrix of relation r."""
    x = np.asarray(g.nodes, np.float64)
    n = x.shape[0]
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    W = np.einsum("rb,bio->rio", p["comp"], p["weight"]) if "comp" in p else p["weight"]
    out = np.zeros((n, W.shape[-1]))
    for rel in range(num_relations):
        a = np.zeros((n, n))  # a[i, j] = number of edges j -> i of relation rel
        np.add.at(a, (g.receivers[t == rel], g.senders[t == rel]), 1.0)
        if aggr == "max":
            agg = np.zeros_like(x)
            for i in range(n):
                if a[i].any():
                    agg[i] = x[a[i] > 0].max(0)
        elif aggr == "mean":
            agg = (a / np.maximum(a.sum(1, keepdims=True), 1)) @ x
        else:
            agg = a @ x
        out += agg @ W[rel]
    if root_weight:
        out += x @ p["root"]
    if use_bias:
        out += p["bias"]
    return out


def _randomise(params, seed):
    """Non-zero bias (zeros at init) so the bias term is checked too."""
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [jnp.asarray(rng.standard_normal(v.shape), v.dtype) for v in leaves])


RGCN_CASES = [
    (aggr, bases, root, bias, f_out)
    for aggr in ("mean", "sum", "add", "max")
    for bases in (None, 2)
    for root, bias in ((True, True), (False, False), (True, False))
    for f_out in (3, 6)  # F <= F_in (transform first) and F > F_in (aggregate first)
]


@pytest.mark.parametrize("aggr,num_bases,root_weight,use_bias,f_out", RGCN_CASES)
def test_rgcn_matches_dense_float64_oracle(aggr, num_bases, root_weight, use_bias, f_out):
    g, t = _typed_graph(0)
    layer = gnn.RGCNConv(f_out, 3, num_bases=num_bases, aggr=aggr, root_weight=root_weight, use_bias=use_bias)
    params = _randomise(layer.init(jax.random.key(0), g, t)["params"], 1)
    assert (
        ("root" in params) == root_weight and ("bias" in params) == use_bias and ("comp" in params) == bool(num_bases)
    )
    want = _rgcn_oracle(params, g, t, 3, aggr, root_weight, use_bias)
    with float64():
        out64 = jax.jit(lambda p, g: layer.apply({"params": p}, g, t))(to_float64(params), to_float64(g))
        assert_float64_equal(np.asarray(out64), want, err_msg=aggr)
    out32 = jax.jit(lambda p: layer.apply({"params": p}, g, t))(params)
    # float32: each output sums <= 30 messages of F_in = 4 products each, plus the root term
    assert_float32_close(out32, want, terms=3 * (30 + 4), err_msg=aggr)


@pytest.mark.parametrize("aggr", ["mean", "sum", "max"])
@pytest.mark.parametrize("f_out", [3, 6])
def test_rgcn_gradients_equal_autodiff_of_the_dense_formula(aggr, f_out):
    """The custom backward (propagate) and the max path against jax.grad of the plain dense formula, in float64."""
    g, t = _typed_graph(1, num_relations=4)
    layer = gnn.RGCNConv(f_out, 4, num_bases=2, aggr=aggr)
    n = g.nodes.shape[0]
    onehot = np.zeros((4, n, n))
    np.add.at(onehot, (t, g.receivers, g.senders), 1.0)
    cot = np.random.default_rng(2).standard_normal((n, f_out))

    def dense(p, x):
        W = jnp.einsum("rb,bio->rio", p["comp"], p["weight"])
        if aggr == "max":  # distinct random features: no ties, so the max's gradient is unambiguous
            cand = jnp.where(onehot[..., None] > 0, x[None, None], -jnp.inf)  # [R, N, N, F_in]
            agg = jnp.where(onehot.any(-1)[..., None], cand.max(2), 0.0)
        else:
            a = onehot / np.maximum(onehot.sum(-1, keepdims=True), 1) if aggr == "mean" else onehot
            agg = jnp.einsum("rij,jf->rif", a, x)
        return jnp.einsum("rif,rfo->io", agg, W) + x @ p["root"] + p["bias"]

    with float64():
        p = to_float64(_randomise(layer.init(jax.random.key(0), g, t)["params"], 3))
        x = jnp.asarray(g.nodes, jnp.float64)
        ours = jax.jit(jax.grad(lambda p, x: jnp.sum(cot * layer.apply({"params": p}, g._replace(nodes=x), t)), (0, 1)))
        ref = jax.grad(lambda p, x: jnp.sum(cot * dense(p, x)), (0, 1))
        (dp, dx), (dp_ref, dx_ref) = ours(p, x), ref(p, x)
        assert_float64_equal(np.asarray(dx), np.asarray(dx_ref), err_msg="d nodes")
        for k in dp_ref:
            assert_float64_equal(np.asarray(dp[k]), np.asarray(dp_ref[k]), err_msg=k)


@pytest.mark.parametrize("aggr", ["mean", "sum", "max"])
@pytest.mark.parametrize("from_edges", [False, True])
def test_rgcn_padding_does_not_change_real_nodes(aggr, from_edges):
    (g1, t1), (g2, t2) = _typed_graph(4, n=5, e=9), _typed_graph(5, n=4, e=6)
    b = gr.batch([g1._replace(edges=t1), g2._replace(edges=t2)])
    p = gr.pad(b, n_node=16, n_edge=32, n_graph=4)  # pads graph.edges (the types) with 0
    p = p._replace(nodes=np.where(np.asarray(gr.node_mask(p))[:, None], p.nodes, 1e3).astype(np.float32))
    layer = gnn.RGCNConv(3, 3, aggr=aggr)
    if from_edges:  # types read from graph.edges
        call = lambda pr, g: layer.apply(pr, g)
    else:  # types passed explicitly; padding edges given type 2 (any valid type)
        call = lambda pr, g: layer.apply(
            pr, g, jnp.pad(b.edges, (0, g.senders.shape[0] - b.edges.shape[0]), constant_values=2)
        )
    params = _randomise(layer.init(jax.random.key(0), b, b.edges), 6)
    out, out_p = jax.jit(call)(params, b), jax.jit(call)(params, p)
    np.testing.assert_allclose(np.asarray(out_p)[:9], np.asarray(out), rtol=1e-5, atol=1e-5)
    loss = lambda pr, g: jnp.sum(call(pr, g) * gr.node_mask(g)[:, None])
    grad = jax.jit(jax.grad(loss))
    for x, y in zip(jax.tree.leaves(grad(params, b)), jax.tree.leaves(grad(params, p))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_rgcn_vmaps_over_node_features_and_ignores_bad_types_under_jit():
    g, t = _typed_graph(7)
    layer = gnn.RGCNConv(3, 3)
    params = layer.init(jax.random.key(0), g, t)
    xs = np.random.default_rng(7).standard_normal((4, 9, 4)).astype(np.float32)
    out = jax.vmap(lambda x: layer.apply(params, g._replace(nodes=x), t))(xs)
    np.testing.assert_allclose(
        np.asarray(out[2]), np.asarray(layer.apply(params, g._replace(nodes=xs[2]), t)), atol=1e-5
    )
    # under jit the range check cannot run: an edge with an out-of-range type is dropped, like a padding edge
    bad = t.copy()
    bad[5] = 7
    keep = np.arange(len(t)) != 5
    g_wo = g._replace(senders=g.senders[keep], receivers=g.receivers[keep], n_edge=np.array([keep.sum()]))
    got = jax.jit(lambda tt: layer.apply(params, g, tt))(bad)
    np.testing.assert_allclose(np.asarray(got), np.asarray(layer.apply(params, g_wo, t[keep])), rtol=1e-5, atol=1e-6)


def test_rgcn_handles_a_graph_without_edges():
    g, t = _typed_graph(8)
    g0 = g._replace(senders=np.zeros(0, np.int32), receivers=np.zeros(0, np.int32), n_edge=np.array([0]))
    for aggr in ("mean", "max"):
        layer = gnn.RGCNConv(2, 3, aggr=aggr)
        p = _randomise(layer.init(jax.random.key(0), g0, np.zeros(0, np.int32))["params"], 8)
        out = layer.apply({"params": p}, g0, np.zeros(0, np.int32))
        np.testing.assert_allclose(np.asarray(out), g.nodes @ np.asarray(p["root"]) + np.asarray(p["bias"]), atol=1e-5)


def test_rgcn_errors_name_the_value():
    g, t = _typed_graph(9)
    init = lambda m, tt=t, gg=g: m.init(jax.random.key(0), gg, tt)
    with pytest.raises(ValueError, match=r"edge_type must have shape \[E=30\].*\(29,\)"):
        init(gnn.RGCNConv(3, 3), t[:-1])
    with pytest.raises(ValueError, match=r"out of range \[0, num_relations=3\): min 0, max 3"):
        init(gnn.RGCNConv(3, 3), np.where(np.arange(30) == 4, 3, t))
    with pytest.raises(ValueError, match=r"out of range.*min -1"):
        init(gnn.RGCNConv(3, 3), np.where(np.arange(30) == 4, -1, t))
    with pytest.raises(ValueError, match="integer relation ids, got dtype float32"):
        init(gnn.RGCNConv(3, 3), t.astype(np.float32))
    with pytest.raises(ValueError, match="aggr must be one of .* got 'min'"):
        init(gnn.RGCNConv(3, 3, aggr="min"))
    with pytest.raises(ValueError, match="num_bases must be None or an int >= 1, got 0"):
        init(gnn.RGCNConv(3, 3, num_bases=0))
    with pytest.raises(ValueError, match="features must be an int >= 1, got 0"):
        init(gnn.RGCNConv(0, 3))
    with pytest.raises(ValueError, match="num_relations must be an int >= 1, got 0"):
        init(gnn.RGCNConv(3, 0))
    with pytest.raises(ValueError, match="edge_type must be given"):
        init(gnn.RGCNConv(3, 3), None)
    with pytest.raises(ValueError, match=r"graph.edges \(used as edge_type\) must have shape \[E=30\]"):
        init(gnn.RGCNConv(3, 3), None, g._replace(edges=np.ones((30, 2), np.float32)))
    with pytest.raises(ValueError, match="nodes must have rank 2"):
        init(gnn.RGCNConv(3, 3), t, g._replace(nodes=g.nodes[..., None]))


# ----------------------------------------------------------------------------------------------------------------
# GATConv with edge features
# ----------------------------------------------------------------------------------------------------------------


def _gat_oracle(p, g, ea, heads, c, concat, add_loops, slope=0.2):
    """Edge-loop float64 GAT with edge features; added self loops get the mean of the incoming edges' features."""
    x = np.asarray(g.nodes, np.float64)
    n = x.shape[0]
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    s, r, ea = list(g.senders), list(g.receivers), [np.asarray(a, np.float64) for a in ea]
    if add_loops:
        keep = [k for k in range(len(s)) if s[k] != r[k]]
        s, r, ea = [s[k] for k in keep], [r[k] for k in keep], [ea[k] for k in keep]
        for i in range(n):
            inc = [ea[k] for k in range(len(s)) if r[k] == i]
            s, r, ea = s + [i], r + [i], ea + [np.mean(inc, 0) if inc else np.zeros_like(p["lin_edge"][:, 0])]
    h = (x @ p["kernel"]).reshape(n, heads, c)
    out = np.zeros((n, heads, c))
    for i in range(n):
        ks = [k for k in range(len(s)) if r[k] == i]
        if not ks:
            continue
        e_proj = [(ea[k] @ p["lin_edge"]).reshape(heads, c) for k in ks]
        logit = np.stack(
            [
                (h[s[k]] * p["att_src"]).sum(-1) + (h[i] * p["att_dst"]).sum(-1) + (ep * p["att_edge"]).sum(-1)
                for k, ep in zip(ks, e_proj)
            ]
        )  # [deg, H]
        logit = np.where(logit > 0, logit, slope * logit)
        a = np.exp(logit - logit.max(0))
        a /= a.sum(0)
        out[i] = np.einsum("kh,khc->hc", a, h[[s[k] for k in ks]])
    out = out.reshape(n, heads * c) if concat else out.mean(1)
    return out + p["bias"]


@pytest.mark.parametrize(
    "heads,concat,add_loops", [(1, True, True), (2, True, True), (2, False, True), (2, True, False)]
)
def test_gat_with_edge_features_matches_float64_oracle(heads, concat, add_loops):
    g, t = _typed_graph(10)
    ea = np.random.default_rng(10).standard_normal((30, 3)).astype(np.float32)
    layer = gnn.GATConv(4, heads=heads, concat=concat, add_self_loops=add_loops, edge_dim=3)
    p = _randomise(layer.init(jax.random.key(0), g, ea)["params"], 11)
    want = _gat_oracle(p, g, ea, heads, 4, concat, add_loops)
    with float64():
        out = jax.jit(lambda p, g, ea: layer.apply({"params": p}, g, ea))(
            to_float64(p), to_float64(g), jnp.asarray(ea, jnp.float64)
        )
        assert_float64_equal(np.asarray(out), want)
    out32 = jax.jit(lambda p: layer.apply({"params": p}, g, ea))(p)
    assert_float32_close(out32, want, terms=3 * (30 + 8), err_msg="float32")


def test_gat_without_edge_dim_is_unchanged_and_edge_dim_without_attr_drops_the_edge_term():
    g, _ = _typed_graph(12)
    plain = gnn.GATConv(4, heads=2)
    p = plain.init(jax.random.key(0), g)["params"]
    assert sorted(p) == ["att_dst", "att_src", "bias", "kernel"]
    typed = gnn.GATConv(4, heads=2, edge_dim=3)
    pt = typed.init(jax.random.key(0), g)["params"]  # params exist without edge_attr (PyG: the term is left out)
    assert pt["lin_edge"].shape == (3, 8) and pt["att_edge"].shape == (2, 4)
    pt = {**pt, **{k: p[k] for k in p}}
    np.testing.assert_allclose(
        np.asarray(typed.apply({"params": pt}, g)), np.asarray(plain.apply({"params": p}, g)), atol=1e-6
    )


def test_gat_padding_with_edge_features_does_not_change_real_nodes():
    (g1, _), (g2, _) = _typed_graph(13, n=5, e=9), _typed_graph(14, n=4, e=6)
    rng = np.random.default_rng(13)
    b = gr.batch(
        [
            g1._replace(edges=rng.standard_normal((9, 3)).astype(np.float32)),
            g2._replace(edges=rng.standard_normal((6, 3)).astype(np.float32)),
        ]
    )
    p = gr.pad(b, n_node=16, n_edge=32, n_graph=4)
    p = p._replace(
        nodes=np.where(np.asarray(gr.node_mask(p))[:, None], p.nodes, 1e3).astype(np.float32),
        edges=np.where(np.asarray(gr.edge_mask(p))[:, None], p.edges, 1e3).astype(np.float32),
    )
    layer = gnn.GATConv(2, heads=2, edge_dim=3)
    params = layer.init(jax.random.key(0), b, b.edges)
    call = jax.jit(lambda pr, g: layer.apply(pr, g, g.edges))
    np.testing.assert_allclose(np.asarray(call(params, p))[:9], np.asarray(call(params, b)), rtol=1e-5, atol=1e-5)


def test_gat_over_edge_types_with_a_learned_embedding():
    """The typed-graph recipe: an nn.Embed of the edge type as edge features; gradients reach the embedding."""

    class TypedGAT(nn.Module):
        @nn.compact
        def __call__(self, graph, edge_type):
            return gnn.GATConv(4, heads=2, edge_dim=5)(graph, nn.Embed(3, 5)(edge_type))

    g, t = _typed_graph(15)
    m = TypedGAT()
    params = m.init(jax.random.key(0), g, t)
    grads = jax.grad(lambda p: jnp.sum(m.apply(p, g, t) ** 2))(params)
    emb = np.asarray(grads["params"]["Embed_0"]["embedding"])
    assert emb.shape == (3, 5) and np.all(np.abs(emb).sum(1) > 0)  # every type used gets a gradient


def test_gat_edge_attr_errors_name_the_value():
    g, _ = _typed_graph(16)
    ea = np.ones((30, 3), np.float32)
    with pytest.raises(ValueError, match=r"edge_attr was given \(shape \(30, 3\)\) but edge_dim is None"):
        gnn.GATConv(4).init(jax.random.key(0), g, ea)
    with pytest.raises(ValueError, match=r"edge_attr must have shape \[E=30, edge_dim=2\].*\(30, 3\)"):
        gnn.GATConv(4, edge_dim=2).init(jax.random.key(0), g, ea)
    with pytest.raises(ValueError, match="edge_attr must be floating point, got dtype int32"):
        gnn.GATConv(4, edge_dim=1).init(jax.random.key(0), g, np.zeros(30, np.int32))
    with pytest.raises(ValueError, match="edge_dim must be None or an int >= 1, got 0"):
        gnn.GATConv(4, edge_dim=0).init(jax.random.key(0), g, ea)
