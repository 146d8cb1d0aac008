"""Parity of mmjax.gnn.RGCNConv and GATConv(edge_dim=...) with torch_geometric 2.8 (same weights; outputs and
gradients w.r.t. every parameter and the inputs, to 1e-5 of their magnitude in float32,
:func:`tests.tolerances.assert_matches_reference`; RGCNConv also in float64, to 1e-10, where the two frameworks'
orders of summation no longer hide a difference in the formula).

torch_geometric is imported at the top on purpose: a missing reference fails this file instead of skipping it.
"""

import contextlib
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_geometric.nn as pyg_nn

from mmjax import gnn
from mmjax.graph import Graph
from tests.tolerances import assert_float64_equal, assert_matches_reference, float64

pytestmark = pytest.mark.parity


def _multigraph(seed, n=14, e=60, f_in=6, num_relations=4):
    """Directed multigraph: duplicate edges (same and different relation), self loops (node 5 has two, of two
    relations), two isolated nodes (n-2, n-1), and relation ``num_relations - 1`` unused (an empty relation)."""
    rng = np.random.default_rng(seed)
    core = n - 2
    s = rng.integers(0, core, e)
    r = rng.integers(0, core, e)
    t = rng.integers(0, num_relations - 1, e)
    s[:7], r[:7], t[:7] = [0, 0, 0, 3, 5, 5, 2], [1, 1, 1, 3, 5, 5, 4], [0, 0, 1, 2, 0, 1, 1]
    x = rng.standard_normal((n, f_in)).astype(np.float32)
    g = Graph(
        nodes=x, senders=s.astype(np.int32), receivers=r.astype(np.int32), n_node=np.array([n]), n_edge=np.array([e])
    )
    return g, t.astype(np.int32)


def _torch_grads(module, xt, cot, *extra_inputs):
    out = module(xt, *extra_inputs)
    (out * torch.tensor(cot)).sum().backward()
    return out.detach().numpy()


RGCN_CASES = [(aggr, bases, root) for aggr in ("mean", "add", "max") for bases in (None, 2) for root in (True, False)]


@pytest.mark.parametrize("aggr,num_bases,root_weight", RGCN_CASES)
@pytest.mark.parametrize("f_out", [5, 9])  # F <= F_in: transform first; F > F_in: aggregate first
def test_rgcn_matches_pyg(aggr, num_bases, root_weight, f_out):
    _check_rgcn(_multigraph(0), f_out, aggr, num_bases, root_weight)


@pytest.mark.parametrize("f_out", [128, 160])
def test_rgcn_matches_pyg_on_blocked_path(f_out):
    """5000 edges at 128 features is more than one block (4096 edges): the lax.scan aggregation runs."""
    assert gnn._block_edges(128) < 5000
    _check_rgcn(_multigraph(1, n=300, e=5000, f_in=128), f_out, "mean", None, True)


def _check_rgcn(graph_and_types, f_out, aggr, num_bases, root_weight):
    g, t = graph_and_types
    f_in, R = g.nodes.shape[1], 4
    torch.manual_seed(0)
    ref = pyg_nn.RGCNConv(f_in, f_out, R, num_bases=num_bases, aggr=aggr, root_weight=root_weight)
    with torch.no_grad():
        ref.bias.normal_()
    _compare_rgcn(g, t, copy.deepcopy(ref).double(), np.float64)
    _compare_rgcn(g, t, ref, np.float32)


def _compare_rgcn(g, t, ref, dtype):
    """Outputs and gradients of ``ref`` (a PyG RGCNConv in ``dtype``) and of mmjax's layer with its weights."""
    n, f_out, R = g.nodes.shape[0], ref.out_channels, ref.num_relations
    g = g._replace(nodes=g.nodes.astype(dtype))
    ei = torch.tensor(np.stack([g.senders, g.receivers]), dtype=torch.long)
    cot = np.random.default_rng(1).standard_normal((n, f_out)).astype(dtype)
    xt = torch.tensor(g.nodes, requires_grad=True)
    out_ref = _torch_grads(ref, xt, cot, ei, torch.tensor(t, dtype=torch.long))

    layer = gnn.RGCNConv(f_out, R, num_bases=ref.num_bases, aggr=ref.aggr, root_weight=ref.root is not None)
    names = ["weight"] + (["comp"] if ref.num_bases else []) + (["root"] if ref.root is not None else []) + ["bias"]
    refs = {k: getattr(ref, k).grad.numpy() for k in names} | {"out": out_ref, "x": xt.grad.numpy()}
    with float64() if dtype == np.float64 else contextlib.nullcontext():
        params = {k: jnp.asarray(getattr(ref, k).detach().numpy()) for k in names}
        init = layer.init(jax.random.key(0), g, t)["params"]
        assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
        fn = jax.jit(lambda p, x: layer.apply({"params": p}, g._replace(nodes=x), t))
        out, vjp = jax.vjp(fn, params, jnp.asarray(g.nodes))
        dp, dx = vjp(jnp.asarray(cot))
        ours = {k: np.asarray(v) for k, v in dp.items()} | {"out": np.asarray(out), "x": np.asarray(dx)}
    for k, want in refs.items():
        if dtype == np.float64:
            assert_float64_equal(ours[k], want, err_msg=k)
        else:
            assert_matches_reference(ours[k], want, err_msg=k)


def test_rgcn_initialisation_matches_pyg_distribution():
    """Same shapes and the same Glorot bounds as PyG (over the last two axes of the stacked weights), bias 0."""
    g, t = _multigraph(2, f_in=40)
    for bases in (None, 3):
        p = gnn.RGCNConv(30, 4, num_bases=bases).init(jax.random.key(0), g, t)["params"]
        ref = pyg_nn.RGCNConv(40, 30, 4, num_bases=bases)
        for k, v in p.items():
            w = getattr(ref, k).detach().numpy()
            assert v.shape == w.shape, k
            if k == "bias":
                np.testing.assert_array_equal(np.asarray(v), 0)
                continue
            bound = np.sqrt(6.0 / (w.shape[-2] + w.shape[-1]))
            for a in (np.asarray(v), w):
                assert np.abs(a).max() <= bound and np.abs(a).max() > 0.7 * bound, (k, np.abs(a).max(), bound)


def _edge_attr(seed, e, d):
    return np.random.default_rng(seed).standard_normal((e, d)).astype(np.float32)


@pytest.mark.parametrize("add_loops", [True, False])
@pytest.mark.parametrize("heads,concat", [(1, True), (2, True), (2, False), (1, False)])
def test_gat_with_edge_features_matches_pyg(heads, concat, add_loops):
    g, t = _multigraph(3)
    n, f_in, c, d = g.nodes.shape[0], g.nodes.shape[1], 4, 3
    ea = _edge_attr(4, g.senders.shape[0], d)
    torch.manual_seed(0)
    ref = pyg_nn.GATConv(f_in, c, heads=heads, concat=concat, add_self_loops=add_loops, edge_dim=d)
    with torch.no_grad():
        ref.bias.normal_()
    ei = torch.tensor(np.stack([g.senders, g.receivers]), dtype=torch.long)
    out_dim = heads * c if concat else c
    cot = np.random.default_rng(1).standard_normal((n, out_dim)).astype(np.float32)
    xt = torch.tensor(g.nodes, requires_grad=True)
    eat = torch.tensor(ea, requires_grad=True)
    out_ref = _torch_grads(ref, xt, cot, ei, eat)

    layer = gnn.GATConv(features=c, heads=heads, concat=concat, add_self_loops=add_loops, edge_dim=d)
    params = {
        "kernel": ref.lin.weight.T,
        "att_src": ref.att_src[0],
        "att_dst": ref.att_dst[0],
        "lin_edge": ref.lin_edge.weight.T,
        "att_edge": ref.att_edge[0],
        "bias": ref.bias,
    }
    params = {k: jnp.asarray(v.detach().numpy()) for k, v in params.items()}
    init = layer.init(jax.random.key(0), g, ea)["params"]
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
    fn = jax.jit(lambda p, x, e: layer.apply({"params": p}, g._replace(nodes=x), e))
    out, vjp = jax.vjp(fn, params, jnp.asarray(g.nodes), jnp.asarray(ea))
    dp, dx, de = vjp(jnp.asarray(cot))
    assert_matches_reference(np.asarray(out), out_ref)
    assert_matches_reference(np.asarray(dx), xt.grad.numpy())
    assert_matches_reference(np.asarray(de), eat.grad.numpy())
    grads = {
        "kernel": ref.lin.weight.grad.T,
        "att_src": ref.att_src.grad[0],
        "att_dst": ref.att_dst.grad[0],
        "lin_edge": ref.lin_edge.weight.grad.T,
        "att_edge": ref.att_edge.grad[0],
        "bias": ref.bias.grad,
    }
    for k, v in grads.items():
        assert_matches_reference(np.asarray(dp[k]), v.numpy(), err_msg=k)


def test_gat_with_one_hot_edge_types_and_scalar_edge_features_match_pyg():
    """Edge types as one-hot features (the typed-graph recipe), and ``edge_dim=1`` with ``[E]`` features."""
    g, t = _multigraph(5)
    ei = torch.tensor(np.stack([g.senders, g.receivers]), dtype=torch.long)
    for ea, d in ((np.eye(4, dtype=np.float32)[t], 4), (_edge_attr(6, len(t), 1)[:, 0], 1)):
        torch.manual_seed(0)
        ref = pyg_nn.GATConv(g.nodes.shape[1], 3, heads=2, edge_dim=d)
        out_ref = ref(torch.tensor(g.nodes), ei, torch.tensor(ea)).detach().numpy()
        params = {
            "kernel": ref.lin.weight.T,
            "att_src": ref.att_src[0],
            "att_dst": ref.att_dst[0],
            "lin_edge": ref.lin_edge.weight.T,
            "att_edge": ref.att_edge[0],
            "bias": ref.bias,
        }
        params = {k: jnp.asarray(v.detach().numpy()) for k, v in params.items()}
        out = gnn.GATConv(3, heads=2, edge_dim=d).apply({"params": params}, g, ea)
        assert_matches_reference(np.asarray(out), out_ref)
