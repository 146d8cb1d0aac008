"""Parity of mmjax.gnn.GCNConv / GATConv with torch_geometric 2.8 (same weights; outputs and gradients to 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_geometric.nn as pyg_nn

from mmjax import gnn
from mmjax.graph import Graph
from tests.tolerances import assert_matches_reference

pytestmark = pytest.mark.parity


def _random_graph(seed, n=14, e=48, f_in=6):
    """Directed graph with duplicate edges, self loops (one node with two), two isolated nodes, edge weights."""
    rng = np.random.default_rng(seed)
    core = n - 2  # nodes n-2, n-1 are isolated
    s = rng.integers(0, core, e)
    r = rng.integers(0, core, e)
    s[:4], r[:4] = [0, 0, 3, 5], [1, 1, 3, 5]  # duplicate edge 0->1; self loops on 3 and 5
    s[4], r[4] = 5, 5  # node 5 has two self loops (the last one's weight counts)
    x = rng.standard_normal((n, f_in)).astype(np.float32)
    w = rng.uniform(0.2, 2.0, e).astype(np.float32)
    g = Graph(
        nodes=x, senders=s.astype(np.int32), receivers=r.astype(np.int32), n_node=np.array([n]), n_edge=np.array([e])
    )
    return g, w


def _torch_run(layer, x, edge_index, extra, cot):
    xt = torch.tensor(x, requires_grad=True)
    out = layer(xt, edge_index, *extra)
    (out * torch.tensor(cot)).sum().backward()
    return out.detach().numpy(), xt.grad.numpy()


def _jax_run(fn, params, x, cot):
    out, vjp = jax.vjp(fn, params, jnp.asarray(x))
    dp, dx = vjp(jnp.asarray(cot))
    return np.asarray(out), np.asarray(dx), dp


GCN_CASES = [
    # (improved, add_self_loops, normalize, use_edge_weight)
    (False, True, True, False),
    (False, True, True, True),
    (True, True, True, True),
    (False, False, True, True),
    (False, False, True, False),
    (False, None, False, True),
    (False, None, False, False),
]


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("improved,add_loops,normalize,use_w", GCN_CASES)
def test_gcn_matches_pyg(improved, add_loops, normalize, use_w, cached):
    _check_gcn(improved, add_loops, normalize, use_w, cached, _random_graph(0), f_out=5)


@pytest.mark.parametrize("cached", [False, True])
def test_gcn_matches_pyg_on_blocked_path(cached):
    """E + N = 5300 edges at 256 features is more than one block (2048 edges): the lax.scan aggregation runs."""
    assert gnn._block_edges(256) < 5300
    _check_gcn(False, True, True, True, cached, _random_graph(4, n=300, e=5000, f_in=8), f_out=256)


def _check_gcn(improved, add_loops, normalize, use_w, cached, graph_and_weights, f_out):
    g, w = graph_and_weights
    torch.manual_seed(0)
    ref = pyg_nn.GCNConv(g.nodes.shape[1], f_out, improved=improved, add_self_loops=add_loops, normalize=normalize)
    with torch.no_grad():
        ref.bias.normal_()
    ei = torch.tensor(np.stack([g.senders, g.receivers]), dtype=torch.long)
    extra = (torch.tensor(w),) if use_w else ()
    cot = np.random.default_rng(1).standard_normal((g.nodes.shape[0], f_out)).astype(np.float32)
    out_ref, dx_ref = _torch_run(ref, g.nodes, ei, extra, cot)

    layer = gnn.GCNConv(features=f_out, improved=improved, add_self_loops=bool(add_loops), normalize=normalize)
    params = {"kernel": jnp.asarray(ref.lin.weight.detach().numpy().T), "bias": jnp.asarray(ref.bias.detach().numpy())}
    ew = jnp.asarray(w) if use_w else None
    if cached:
        adj = gnn.gcn_adjacency(g, ew, add_self_loops=bool(add_loops), improved=improved, normalize=normalize)
        fn = lambda p, x: layer.apply({"params": p}, g._replace(nodes=x), adjacency=adj)
    else:
        fn = lambda p, x: layer.apply({"params": p}, g._replace(nodes=x), edge_weight=ew)
    out, dx, dp = _jax_run(jax.jit(fn), params, g.nodes, cot)
    assert_matches_reference(out, out_ref)
    assert_matches_reference(dx, dx_ref)
    assert_matches_reference(np.asarray(dp["kernel"]), ref.lin.weight.grad.numpy().T)
    assert_matches_reference(np.asarray(dp["bias"]), ref.bias.grad.numpy())


def test_gcn_improved_without_weights_equals_pyg_with_unit_weights():
    """PyG 2.8 drops `improved` when edge_weight is None; mmjax treats None as ones (documented difference)."""
    g, _ = _random_graph(2)
    torch.manual_seed(0)
    ref = pyg_nn.GCNConv(g.nodes.shape[1], 3, improved=True)
    ei = torch.tensor(np.stack([g.senders, g.receivers]), dtype=torch.long)
    out_ref = ref(torch.tensor(g.nodes), ei, torch.ones(ei.shape[1])).detach().numpy()
    layer = gnn.GCNConv(features=3, improved=True)
    params = {"kernel": jnp.asarray(ref.lin.weight.detach().numpy().T), "bias": jnp.asarray(ref.bias.detach().numpy())}
    out = layer.apply({"params": params}, g)
    assert_matches_reference(np.asarray(out), out_ref)
    # and PyG without weights really differs (so this test would notice if PyG changed).
    out_pyg_none = ref(torch.tensor(g.nodes), ei).detach().numpy()
    assert np.abs(out_pyg_none - out_ref).max() > 1e-3


@pytest.mark.parametrize(
    "heads,concat,add_loops", [(1, True, True), (3, True, True), (3, False, True), (2, True, False)]
)
def test_gat_matches_pyg(heads, concat, add_loops):
    g, _ = _random_graph(3)
    c = 4
    torch.manual_seed(0)
    ref = pyg_nn.GATConv(g.nodes.shape[1], c, heads=heads, concat=concat, add_self_loops=add_loops)
    with torch.no_grad():
        ref.bias.normal_()
    ei = torch.tensor(np.stack([g.senders, g.receivers]), dtype=torch.long)
    out_dim = heads * c if concat else c
    cot = np.random.default_rng(1).standard_normal((g.nodes.shape[0], out_dim)).astype(np.float32)
    out_ref, dx_ref = _torch_run(ref, g.nodes, ei, (), cot)

    layer = gnn.GATConv(features=c, heads=heads, concat=concat, add_self_loops=add_loops)
    params = {
        "kernel": jnp.asarray(ref.lin.weight.detach().numpy().T),
        "att_src": jnp.asarray(ref.att_src.detach().numpy()[0]),
        "att_dst": jnp.asarray(ref.att_dst.detach().numpy()[0]),
        "bias": jnp.asarray(ref.bias.detach().numpy()),
    }
    fn = jax.jit(lambda p, x: layer.apply({"params": p}, g._replace(nodes=x)))
    out, dx, dp = _jax_run(fn, params, g.nodes, cot)
    assert_matches_reference(out, out_ref)
    assert_matches_reference(dx, dx_ref)
    assert_matches_reference(np.asarray(dp["kernel"]), ref.lin.weight.grad.numpy().T)
    assert_matches_reference(np.asarray(dp["att_src"]), ref.att_src.grad.numpy()[0])
    assert_matches_reference(np.asarray(dp["att_dst"]), ref.att_dst.grad.numpy()[0])
    assert_matches_reference(np.asarray(dp["bias"]), ref.bias.grad.numpy())
