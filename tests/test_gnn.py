"""Tests for mmjax.gnn: dense-formula checks (NumPy float64), padding invariance, fast path, readouts, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import gnn
from mmjax import graph as gr
from tests.tolerances import assert_float32_close, assert_float64_equal, float64, to_float64


def _sym_graph(seed, n=10, p=0.3, f=4):
    """Symmetric graph without self loops (edges listed in both directions); node n-1 isolated."""
    rng = np.random.default_rng(seed)
    a = np.triu(rng.random((n, n)) < p, 1)
    a[n - 1] = a[:, n - 1] = False
    a = a | a.T
    s, r = np.nonzero(a)
    x = rng.standard_normal((n, f)).astype(np.float32)
    return gr.Graph(
        nodes=x,
        senders=s.astype(np.int32),
        receivers=r.astype(np.int32),
        n_node=np.array([n]),
        n_edge=np.array([len(s)]),
    ), a.astype(np.float64)


def _random_graph(seed, n=9, e=25, f=4):
    rng = np.random.default_rng(seed)
    return gr.Graph(
        nodes=rng.standard_normal((n, f)).astype(np.float32),
        senders=rng.integers(0, n, e).astype(np.int32),
        receivers=rng.integers(0, n, e).astype(np.int32),
        n_node=np.array([n]),
        n_edge=np.array([e]),
        edges=rng.standard_normal((e, 2)).astype(np.float32),
    )


@pytest.mark.parametrize("improved", [False, True])
@pytest.mark.parametrize("fast", [False, True])
def test_gcn_matches_dense_formula_float64(improved, fast):
    g, a = _sym_graph(0)
    layer = gnn.GCNConv(features=3, improved=improved)
    params = layer.init(jax.random.key(0), g)["params"]
    params["bias"] = jnp.arange(3, dtype=jnp.float32) / 3
    kw = dict(adjacency=gnn.gcn_adjacency(g, improved=improved)) if fast else {}
    out = jax.jit(lambda p: layer.apply({"params": p}, g, **kw))(params)
    a_hat = a + (2.0 if improved else 1.0) * np.eye(a.shape[0])
    d = a_hat.sum(0) ** -0.5
    want = (d[:, None] * a_hat * d[None, :]) @ g.nodes.astype(np.float64) @ np.asarray(params["kernel"], np.float64)
    want += np.asarray(params["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_gcn_fast_path_equals_default_path_with_gradients():
    g = _random_graph(1, n=30, e=120)
    w = np.random.default_rng(2).uniform(0.1, 2, 120).astype(np.float32)
    layer = gnn.GCNConv(features=5)
    params = layer.init(jax.random.key(0), g)["params"]
    adj = gnn.gcn_adjacency(g, jnp.asarray(w))
    assert np.all(np.diff(np.asarray(adj.receivers)) >= 0) and np.all(np.diff(np.asarray(adj.t_senders)) >= 0)
    loss = lambda p, x, **kw: jnp.sum(jnp.sin(layer.apply({"params": p}, g._replace(nodes=x), **kw)))
    ref = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, edge_weight=jnp.asarray(w)), argnums=(0, 1)))
    fast = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, adjacency=adj), argnums=(0, 1)))
    (v1, g1), (v2, g2) = ref(params, g.nodes), fast(params, g.nodes)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_propagate_gradient_matches_autodiff_of_plain_formula():
    g = _random_graph(3)
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.uniform(0.1, 1, 25).astype(np.float32))
    s, r = jnp.asarray(g.senders), jnp.asarray(g.receivers)
    plain = lambda x, w: jnp.sum(jnp.cos(jax.ops.segment_sum(w[:, None] * x[s], r, 9)))
    ours = lambda x, w: jnp.sum(jnp.cos(gnn.propagate(x, s, r, w, 9)))
    for a, b in zip(jax.grad(plain, (0, 1))(g.nodes, w), jax.grad(ours, (0, 1))(g.nodes, w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_graph_conv_exact_formula():
    g = _random_graph(4)
    ew = np.random.default_rng(4).uniform(0.1, 2, 25).astype(np.float32)
    layer = gnn.GraphConv(features=3, self_term=True, activation=jnp.tanh)
    p = layer.init(jax.random.key(1), g)["params"]
    p["bias"] = jnp.ones(3)
    out = layer.apply({"params": p}, g, edge_weight=ew)
    x, k, ks = g.nodes.astype(np.float64), np.asarray(p["kernel"], np.float64), np.asarray(p["self_kernel"], np.float64)
    want = np.zeros((9, 3)) + 1.0 + x @ ks
    for e in range(25):
        want[g.receivers[e]] += ew[e] * (x[g.senders[e]] @ k)
    np.testing.assert_allclose(np.asarray(out), np.tanh(want), rtol=1e-5, atol=1e-5)


class _EdgeMessage(nn.Module):
    @nn.compact
    def __call__(self, h_i, h_j, e):
        return nn.Dense(5, name="msg")(jnp.concatenate([h_i, h_j, e], -1))


@pytest.mark.parametrize("aggregation,fn", [("sum", np.sum), ("mean", np.mean), ("max", np.max)])
def test_message_passing_matches_loop(aggregation, fn):
    g = _random_graph(5)
    mp = gnn.MessagePassing(message_fn=_EdgeMessage(), update_fn=lambda h, m: m * 2.0, aggregation=aggregation)
    params = mp.init(jax.random.key(0), g)
    dense = params["params"]["message_fn"]["msg"]  # the message module's parameters live under this module
    out = np.asarray(jax.jit(mp.apply)(params, g))
    k, b = dense["kernel"], dense["bias"]
    msgs = np.concatenate([g.nodes[g.receivers], g.nodes[g.senders], g.edges], -1) @ np.asarray(k) + np.asarray(b)
    want = np.zeros((9, 5))
    for i in range(9):
        sel = g.receivers == i
        if sel.any():
            want[i] = fn(msgs[sel], axis=0)
    np.testing.assert_allclose(out, 2.0 * want, rtol=1e-5, atol=1e-5)


def _layers():
    return [
        (gnn.GCNConv(features=3), {}),
        (gnn.GCNConv(features=3, improved=True, add_self_loops=False), {}),
        (gnn.GraphConv(features=3, self_term=True), {}),
        (gnn.GATConv(features=2, heads=2), {}),
        (gnn.MessagePassing(aggregation="max"), {}),
    ]


@pytest.mark.parametrize("idx", range(5))
def test_padding_does_not_change_real_nodes(idx):
    layer, _ = _layers()[idx]
    b = gr.batch([_random_graph(6, n=5, e=9), _random_graph(7, n=4, e=6)])
    p = gr.pad(b, n_node=16, n_edge=32, n_graph=4)
    # make padding loud: padding node features are large
    p = p._replace(nodes=np.where(np.asarray(gr.node_mask(p))[:, None], p.nodes, 1e3).astype(np.float32))
    params = layer.init(jax.random.key(0), b)
    apply = jax.jit(layer.apply)
    out, out_p = apply(params, b), apply(params, p)
    np.testing.assert_allclose(np.asarray(out_p)[:9], np.asarray(out), rtol=1e-5, atol=1e-5)
    if jax.tree.leaves(params):
        loss = lambda pr, g: jnp.sum(layer.apply(pr, g) * gr.node_mask(g)[:, None])
        grad = jax.jit(jax.grad(loss))
        g1, g2 = grad(params, b), grad(params, p)
        for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_gcn_vmaps_over_node_features():
    g = _random_graph(8)
    layer = gnn.GCNConv(features=3)
    params = layer.init(jax.random.key(0), g)
    xs = np.random.default_rng(8).standard_normal((4, 9, 4)).astype(np.float32)

    def both(params, xs):
        out = jax.vmap(lambda x: layer.apply(params, g._replace(nodes=x)))(xs)
        return out[2], layer.apply(params, g._replace(nodes=xs[2]))

    with float64():
        assert_float64_equal(*both(to_float64(params), to_float64(xs)), err_msg="vmap")
    # float32: an output sums its <= 25 in-edges' messages (x @ W, 4 features each); vmap may reorder the sums
    assert_float32_close(*both(params, xs), terms=25 + 4, err_msg="vmap")


@pytest.mark.parametrize("kind,fn", [("sum", np.sum), ("mean", np.mean), ("max", np.max)])
def test_readouts_per_graph_ignore_padding(kind, fn):
    b = gr.batch([_random_graph(9, n=3, e=2), _random_graph(10, n=5, e=4)])
    p = gr.pad(b, 16, 8, 4)
    p = p._replace(nodes=np.where(np.asarray(gr.node_mask(p))[:, None], p.nodes, 1e3).astype(np.float32))
    out = np.asarray(jax.jit(lambda g: gnn.readout(g, kind))(p))
    want = np.stack([fn(b.nodes[:3], 0), fn(b.nodes[3:], 0)])
    np.testing.assert_allclose(out[:2], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[3], 0)  # empty padding graph


def test_attention_readout_is_convex_combination_per_graph():
    b = gr.batch([_random_graph(11, n=3, e=2), _random_graph(12, n=5, e=4)])
    p = gr.pad(b, 16, 8, 4)
    m = gnn.AttentionReadout()
    params = m.init(jax.random.key(0), p)
    apply = jax.jit(m.apply)
    out = np.asarray(apply(params, p))
    for gi, sl in enumerate([slice(0, 3), slice(3, 8)]):
        x = b.nodes[sl]
        assert np.all(out[gi] <= x.max(0) + 1e-5) and np.all(out[gi] >= x.min(0) - 1e-5)
    np.testing.assert_allclose(out[:2], np.asarray(apply(params, b)), rtol=1e-5, atol=1e-6)
    const = apply(params, b, node_features=jnp.full((8, 4), 3.0))
    np.testing.assert_allclose(np.asarray(const), 3.0, rtol=1e-5)


@pytest.mark.parametrize("layer", [gnn.GCNConv(3), gnn.GATConv(3), gnn.GraphConv(3), gnn.MessagePassing()])
def test_layers_reject_wrong_node_rank(layer):
    g = _random_graph(13)
    with pytest.raises(ValueError, match="nodes"):
        layer.init(jax.random.key(0), g._replace(nodes=g.nodes[..., None]))


def test_layer_errors_name_the_argument():
    g = _random_graph(14)
    m = gnn.GCNConv(3)
    p = m.init(jax.random.key(0), g)
    with pytest.raises(ValueError, match="edge_weight"):
        m.apply(p, g, edge_weight=jnp.ones(3))
    with pytest.raises(ValueError, match="receivers"):
        m.apply(p, g._replace(receivers=g.receivers + 100))
    with pytest.raises(ValueError, match="aggregation"):
        gnn.MessagePassing(aggregation="min").init(jax.random.key(0), g)
    with pytest.raises(ValueError, match="kind"):
        gnn.readout(g, "median")


def test_propagate_blocked_path_matches_plain_formula():
    """Edge lists longer than one block (here 1024 edges at 512 features) take the lax.scan path."""
    rng = np.random.default_rng(15)
    n, e, f = 200, 3000, 512
    assert gnn._block_edges(f) < e
    x = jnp.asarray(rng.standard_normal((n, f)).astype(np.float32))
    s, r = jnp.asarray(rng.integers(0, n, e)), jnp.asarray(rng.integers(0, n, e))
    w = jnp.asarray(rng.uniform(0.1, 1, e).astype(np.float32))
    cot = jnp.asarray(rng.standard_normal((n, f)).astype(np.float32))
    plain = lambda x, w: jnp.sum(cot * jax.ops.segment_sum(w[:, None] * x[s], r, n))
    ours = lambda x, w: jnp.sum(cot * gnn.propagate(x, s, r, w, n))
    np.testing.assert_allclose(jax.jit(ours)(x, w), plain(x, w), rtol=1e-4)
    for a, b in zip(jax.grad(plain, (0, 1))(x, w), jax.jit(jax.grad(ours, (0, 1)))(x, w)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)
    adj = gnn.gcn_adjacency(gr.Graph(nodes=x, senders=s, receivers=r, n_node=jnp.array([n]), n_edge=jnp.array([e])))
    layer = gnn.GCNConv(features=f, use_bias=False)
    g = gr.Graph(nodes=x, senders=s, receivers=r, n_node=jnp.array([n]), n_edge=jnp.array([e]))
    p = {"params": {"kernel": jnp.eye(f)}}
    fast = jax.jit(jax.grad(lambda x: jnp.sum(cot * layer.apply(p, g._replace(nodes=x), adjacency=adj))))(x)
    ref = jax.jit(jax.grad(lambda x: jnp.sum(cot * layer.apply(p, g._replace(nodes=x)))))(x)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), rtol=1e-4, atol=1e-4)
