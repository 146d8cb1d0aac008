"""Parity of mmjax.gnn.TransformerConv with torch_geometric's TransformerConv (same weights; outputs, attention
weights and gradients w.r.t. every parameter, the node features and the edge features, to 1e-5) on a directed
multigraph with self loops, duplicate edges and isolated nodes.

torch_geometric is imported at the top on purpose: a missing reference fails this file instead of skipping it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_geometric.nn as pyg_nn

from mmjax import gnn
from tests.parity.test_gnn_relational_pyg import _edge_attr, _multigraph
from tests.tolerances import assert_matches_reference

pytestmark = pytest.mark.parity
LINEARS = ("lin_query", "lin_key", "lin_value", "lin_skip", "lin_edge")


def _params(ref, names):
    out = {}
    for name in names:
        lin = getattr(ref, name)
        out[name] = {"kernel": lin.weight.T}
        if lin.bias is not None:
            out[name]["bias"] = lin.bias
    return out


@pytest.mark.parametrize("edge_dim", [None, 3])
@pytest.mark.parametrize(
    "heads,concat,root_weight", [(1, True, True), (2, True, True), (2, False, True), (2, True, False)]
)
def test_transformer_conv_matches_pyg(heads, concat, root_weight, edge_dim):
    g, _ = _multigraph(5)
    n, f_in, c = g.nodes.shape[0], g.nodes.shape[1], 4
    ea = _edge_attr(6, g.senders.shape[0], edge_dim) if edge_dim else None
    torch.manual_seed(0)
    ref = pyg_nn.TransformerConv(f_in, c, heads=heads, concat=concat, root_weight=root_weight, edge_dim=edge_dim)
    with torch.no_grad():  # non-zero biases, so that a bias mix-up shows
        for p in ref.parameters():
            if p.ndim == 1:
                p.normal_()
    ei = torch.tensor(np.stack([g.senders, g.receivers]), dtype=torch.long)
    out_dim = heads * c if concat else c
    cot = np.random.default_rng(1).standard_normal((n, out_dim)).astype(np.float32)
    xt = torch.tensor(g.nodes, requires_grad=True)
    eat = torch.tensor(ea, requires_grad=True) if edge_dim else None
    out_ref, (_, alpha_ref) = ref(xt, ei, eat, return_attention_weights=True)
    (out_ref * torch.tensor(cot)).sum().backward()

    names = [k for k in LINEARS if getattr(ref, k, None) is not None and (root_weight or k != "lin_skip")]
    params = jax.tree.map(lambda t: jnp.asarray(t.detach().numpy()), _params(ref, names))
    layer = gnn.TransformerConv(features=c, heads=heads, concat=concat, root_weight=root_weight, edge_dim=edge_dim)
    init = layer.init(jax.random.key(0), g, ea)["params"]
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)

    def fn(p, x, e):
        return layer.apply({"params": p}, g._replace(nodes=x), e, return_attention=True)

    (out, alpha), vjp = jax.vjp(fn, params, jnp.asarray(g.nodes), None if ea is None else jnp.asarray(ea))
    dp, dx, de = vjp((jnp.asarray(cot), jnp.zeros_like(alpha)))
    assert_matches_reference(np.asarray(out), out_ref.detach().numpy())
    assert_matches_reference(np.asarray(alpha), alpha_ref.detach().numpy())
    assert_matches_reference(np.asarray(dx), xt.grad.numpy())
    if edge_dim:
        assert_matches_reference(np.asarray(de), eat.grad.numpy())
    for name in names:
        lin = getattr(ref, name)
        assert_matches_reference(np.asarray(dp[name]["kernel"]), lin.weight.grad.numpy().T, err_msg=name)
        if lin.bias is not None:
            assert_matches_reference(np.asarray(dp[name]["bias"]), lin.bias.grad.numpy(), err_msg=name)


def test_isolated_node_gets_only_the_skip_term():
    g, _ = _multigraph(5)
    layer = gnn.TransformerConv(features=3, heads=2)
    params = layer.init(jax.random.key(0), g)["params"]
    out = layer.apply({"params": params}, g)
    x = g.nodes[-1]  # isolated
    want = x @ np.asarray(params["lin_skip"]["kernel"]) + np.asarray(params["lin_skip"]["bias"])
    assert_matches_reference(np.asarray(out[-1]), want)
