"""Tests for mmjax.graph (Graph pytree, batching, padding, masks) and mmjax.segment (segment reductions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import graph as gr
from mmjax import segment


def _graph(rng, n, e, f=3, fe=2, fg=4):
    return gr.Graph(
        nodes=rng.standard_normal((n, f)).astype(np.float32),
        senders=rng.integers(0, n, e).astype(np.int32),
        receivers=rng.integers(0, n, e).astype(np.int32),
        n_node=np.array([n], np.int32),
        n_edge=np.array([e], np.int32),
        edges=rng.standard_normal((e, fe)).astype(np.float32),
        globals=rng.standard_normal((1, fg)).astype(np.float32),
    )


# ---------------------------------------------------------------------------------------------- batching


def test_batch_offsets_and_unbatch_roundtrip():
    rng = np.random.default_rng(0)
    gs = [_graph(rng, n, e) for n, e in [(3, 4), (1, 0), (5, 7)]]
    b = gr.batch(gs)
    assert b.nodes.shape == (9, 3) and b.senders.shape == (11,)
    np.testing.assert_array_equal(b.n_node, [3, 1, 5])
    np.testing.assert_array_equal(b.senders[4:], gs[2].senders + 4)
    np.testing.assert_array_equal(b.receivers[:4], gs[0].receivers)
    back = gr.unbatch(b)
    assert len(back) == 3
    for g, h in zip(gs, back):
        for name in ("nodes", "senders", "receivers", "n_node", "n_edge", "edges", "globals"):
            np.testing.assert_array_equal(getattr(g, name), getattr(h, name))


def test_batch_rejects_mixed_optional_fields():
    rng = np.random.default_rng(0)
    a, c = _graph(rng, 3, 2), _graph(rng, 2, 1)._replace(edges=None)
    with pytest.raises(ValueError, match="edges"):
        gr.batch([a, c])


def test_batch_works_under_jit():
    rng = np.random.default_rng(1)
    a, c = _graph(rng, 3, 2), _graph(rng, 4, 5)
    out = jax.jit(lambda x, y: gr.batch([x, y]))(a, c)
    np.testing.assert_array_equal(out.receivers, gr.batch([a, c]).receivers)


# ---------------------------------------------------------------------------------------------- padding


def test_pad_shapes_masks_and_padding_edges():
    rng = np.random.default_rng(2)
    b = gr.batch([_graph(rng, 3, 4), _graph(rng, 2, 1)])
    p = gr.pad(b, n_node=8, n_edge=8, n_graph=4)
    assert p.nodes.shape == (8, 3) and p.senders.shape == (8,) and p.edges.shape == (8, 2)
    assert p.globals.shape == (4, 4)
    np.testing.assert_array_equal(p.n_node, [3, 2, 3, 0])
    np.testing.assert_array_equal(p.n_edge, [4, 1, 3, 0])
    np.testing.assert_array_equal(gr.graph_mask(p), [1, 1, 0, 0])
    np.testing.assert_array_equal(gr.node_mask(p), [1] * 5 + [0] * 3)
    np.testing.assert_array_equal(gr.edge_mask(p), [1] * 5 + [0] * 3)
    # padding edges touch only padding nodes
    assert (p.senders[5:] == 5).all() and (p.receivers[5:] == 5).all()
    gr.validate(p)
    back = gr.unpad(p)
    np.testing.assert_array_equal(back.nodes, b.nodes)
    np.testing.assert_array_equal(back.senders, b.senders)


def test_jit_pad_equals_host_pad():
    rng = np.random.default_rng(3)
    b = gr.batch([_graph(rng, 3, 4), _graph(rng, 2, 1)])
    host = gr.pad(b, 8, 8, 4)
    dev = jax.jit(lambda g: gr.pad(g, 8, 8, 4))(jax.tree.map(jnp.asarray, b))
    for x, y in zip(jax.tree.leaves(host), jax.tree.leaves(dev)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "kw,field", [(dict(n_node=5), "n_node"), (dict(n_edge=4), "n_edge"), (dict(n_graph=2), "n_graph")]
)
def test_pad_budget_too_small_raises(kw, field):
    rng = np.random.default_rng(4)
    b = gr.batch([_graph(rng, 3, 4), _graph(rng, 2, 1)])
    args = dict(n_node=8, n_edge=8, n_graph=4) | kw
    with pytest.raises(ValueError, match=field):
        gr.pad(b, **args)


def test_budget_is_power_of_two_bucket():
    rng = np.random.default_rng(5)
    assert gr.budget(_graph(rng, 7, 9)) == (8, 16, 2)
    assert gr.budget(_graph(rng, 8, 8)) == (16, 8, 2)
    assert gr.budget(_graph(rng, 2, 1), minimum=(32, 32, 4)) == (32, 32, 4)


def test_one_compilation_per_bucket():
    rng = np.random.default_rng(6)
    traces = []

    @jax.jit
    def f(g):
        traces.append(1)
        return jnp.sum(g.nodes * gr.node_mask(g)[:, None])

    sizes = [(4, 9), (5, 16), (7, 10), (6, 12)]  # all in the bucket (8 nodes, 16 edges, 2 graphs)
    for n, e in sizes:
        g = _graph(rng, n, e)
        assert gr.budget(g) == (8, 16, 2)
        p = gr.pad(g, *gr.budget(g))
        np.testing.assert_allclose(f(p), g.nodes.sum(), rtol=1e-5, atol=1e-5)
    assert len(traces) == 1
    assert f._cache_size() == 1
    f(gr.pad(_graph(rng, 9, 3), *gr.budget(_graph(rng, 9, 3))))  # another bucket compiles again
    assert len(traces) == 2


def test_dynamically_batch_packs_everything_under_budget():
    rng = np.random.default_rng(7)
    gs = [_graph(rng, int(rng.integers(1, 6)), int(rng.integers(0, 8))) for _ in range(20)]
    batches = list(gr.dynamically_batch(iter(gs), n_node=16, n_edge=24, n_graph=5))
    assert len(batches) > 1
    for b in batches:
        assert b.nodes.shape == (16, 3) and b.senders.shape == (24,) and b.n_node.shape == (5,)
        gr.validate(b)
    real = [g for b in batches for g in gr.unbatch(b)]
    assert len(real) == len(gs)
    for g, h in zip(gs, real):
        np.testing.assert_array_equal(g.nodes, h.nodes)
        np.testing.assert_array_equal(g.senders, h.senders)


def test_dynamically_batch_rejects_graph_too_large():
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match="does not fit the budget"):
        list(gr.dynamically_batch([_graph(rng, 10, 2)], n_node=8, n_edge=8, n_graph=2))


# ---------------------------------------------------------------------------------------------- validation


def _ok():
    return gr.Graph(
        nodes=np.ones((3, 2), np.float32),
        senders=np.array([0, 1]),
        receivers=np.array([1, 2]),
        n_node=np.array([3]),
        n_edge=np.array([2]),
    )


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(senders=np.array([0, 3])), "senders"),
        (dict(receivers=np.array([-1, 2])), "receivers"),
        (dict(receivers=np.array([1, 2, 0])), "receivers"),
        (dict(senders=np.array([0.0, 1.0])), "senders"),
        (dict(n_node=np.array([4])), "n_node"),
        (dict(n_edge=np.array([1])), "n_edge"),
        (dict(n_edge=np.array([1, 1])), "n_edge"),
        (dict(edges=np.ones((3, 1))), "edges"),
        (dict(globals=np.ones((2, 1))), "globals"),
        (dict(nodes=np.float32(1.0)), "nodes"),
    ],
)
def test_validate_names_the_bad_field(change, field):
    with pytest.raises(ValueError, match=field):
        gr.validate(_ok()._replace(**change))


def test_validate_node_rank():
    with pytest.raises(ValueError, match="nodes must have rank 2"):
        gr.validate(_ok()._replace(nodes=np.ones((3, 2, 2))), node_rank=2)
    gr.validate(_ok(), node_rank=2)


def test_validate_skips_value_checks_under_jit():
    bad = _ok()._replace(senders=np.array([0, 7]))
    jax.jit(lambda g: gr.validate(g).nodes.sum())(bad)  # out-of-range values are not visible to a tracer


# ---------------------------------------------------------------------------------------------- segment ops


def _np_segment(data, ids, n, fn, mask=None):
    out = np.zeros((n,) + data.shape[1:], np.float64)
    for s in range(n):
        sel = ids == s
        if mask is not None:
            sel &= mask
        if sel.any():
            out[s] = fn(data[sel], axis=0)
    return out


@pytest.mark.parametrize("name,fn", [("sum", np.sum), ("mean", np.mean), ("max", np.max)])
def test_segment_reductions_match_numpy_with_mask_and_empty_segments(name, fn):
    rng = np.random.default_rng(9)
    data = rng.standard_normal((30, 4)).astype(np.float32) - 3.0  # all negative-ish: max must not be clipped at 0
    ids = rng.integers(0, 6, 30)
    ids[ids == 4] = 0  # segment 4 empty
    mask = rng.random(30) > 0.3
    ids[:3], mask[:3] = 5, False  # rows into segment 5 ... all masked below
    mask[ids == 5] = False
    got = jax.jit(lambda d, i, m: segment.segment_aggregate(name, d, i, 7, m))(data, ids, mask)
    want = _np_segment(data, ids, 7, fn, mask)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[4:] == 0)  # empty (4, 6) and fully masked (5) segments give 0


def test_segment_max_and_softmax_gradients_finite_on_empty_segments():
    data = jnp.array([1.0, 2.0, -1.0])
    ids = jnp.array([0, 0, 2])
    g = jax.grad(lambda d: segment.segment_max(d, ids, 4).sum() + segment.segment_softmax(d, ids, 4).sum())(data)
    assert np.isfinite(np.asarray(g)).all()


def test_segment_softmax_normalises_per_segment_and_ignores_masked():
    rng = np.random.default_rng(10)
    logits = rng.standard_normal((20, 3)).astype(np.float32) * 10
    ids = rng.integers(0, 5, 20)
    mask = rng.random(20) > 0.4
    w = np.asarray(segment.segment_softmax(logits, ids, 5, mask=mask))
    assert np.all(w[~mask] == 0)
    for s in range(5):
        sel = (ids == s) & mask
        if sel.any():
            np.testing.assert_allclose(w[sel].sum(0), 1.0, rtol=1e-5)
            e = np.exp(logits[sel] - logits[sel].max(0))
            np.testing.assert_allclose(w[sel], e / e.sum(0), rtol=1e-5)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(num_segments=2.0), "num_segments"),
        (dict(segment_ids=jnp.array([0.0, 1.0])), "segment_ids"),
        (dict(segment_ids=jnp.array([0, 1, 1])), "segment_ids"),
        (dict(mask=jnp.array([True])), "mask"),
    ],
)
def test_segment_bad_input_raises(kw, field):
    args = dict(data=jnp.ones((2, 3)), segment_ids=jnp.array([0, 1]), num_segments=2) | kw
    with pytest.raises(ValueError, match=field):
        segment.segment_sum(**args)
