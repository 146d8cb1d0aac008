"""mmjax.graph_fusion: what the edges allow and forbid (late fusion keeps the words blind to the image, padding
words never reach the score), the attention read-out, every conv and readout, the cross-attention baseline's
masking and parameter count, and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.graph_fusion import CrossAttentionMatcher, GraphFusion, check_inputs

SMALL = dict(vocab_size=12, context_length=5, image_size=16, stem_features=(8, 8), width=16, heads=2, mlp_dim=16)


def _inputs(b=2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((b, 16, 16, 3)).astype(np.float32)
    ids = np.array([[2, 5, 7, 3, 0], [2, 9, 3, 0, 0]])[:b]
    return images, ids


def _apply(model, params, images, ids):
    return model.apply({"params": params}, images, ids)


@pytest.mark.parametrize("conv", ["transformer", "gat", "rgcn"])
def test_late_fusion_words_do_not_see_the_image_and_full_fusion_words_do(conv):
    images, ids = _inputs()
    other = images[::-1].copy()
    L, p = 5, 16
    for patch_word, blind in (("none", True), ("all", False)):
        model = GraphFusion(**SMALL, depth=2, knn=2, conv=conv, patch_word=patch_word)
        params = model.init(jax.random.key(0), images, ids)["params"]
        n = model.layout().num_nodes
        words = lambda x: np.asarray(_apply(model, params, x, ids)[1]["nodes"]).reshape(2, n, -1)[:, p : p + L]  # noqa: E731
        same = np.array_equal(words(images), words(other))
        assert same == blind, (conv, patch_word)


def test_padding_words_never_reach_the_score():
    images, ids = _inputs()
    model = GraphFusion(**SMALL, depth=2, knn=2, patch_word=3)
    params = model.init(jax.random.key(0), images, ids)["params"]
    logits = _apply(model, params, images, ids)[0]
    # change what a padding position starts from (position 4 is padding in both captions)
    changed = jax.tree.map(lambda x: x, params)
    changed["words"]["pos_embedding"] = params["words"]["pos_embedding"].at[4].add(3.0)
    np.testing.assert_array_equal(np.asarray(_apply(model, changed, images, ids)[0]), np.asarray(logits))
    # ...while a real position does change the score
    changed["words"]["pos_embedding"] = params["words"]["pos_embedding"].at[1].add(3.0)
    assert not np.array_equal(np.asarray(_apply(model, changed, images, ids)[0]), np.asarray(logits))


def test_cross_attention_masks_padding_words():
    images, ids = _inputs()
    model = CrossAttentionMatcher(**SMALL, depth=2)
    params = model.init(jax.random.key(0), images, ids)["params"]
    logits = _apply(model, params, images, ids)[0]
    changed = dict(params, words=dict(params["words"], pos_embedding=params["words"]["pos_embedding"].at[4].add(3.0)))
    np.testing.assert_allclose(np.asarray(_apply(model, changed, images, ids)[0]), np.asarray(logits), atol=1e-6)


def test_patch_word_attention_rows_are_the_words_attention_over_the_patches():
    images, ids = _inputs()
    model = GraphFusion(**SMALL, depth=2, knn=0, grid_neighbours=4)
    params = model.init(jax.random.key(0), images, ids)["params"]
    _, aux = _apply(model, params, images, ids)
    att = np.asarray(aux["patch_word_attention"])  # [depth, B, L, P]
    assert att.shape == (2, 2, 5, 16)
    assert np.all(att >= 0)
    # a real word receives from all 16 patches and its 1 or 2 neighbouring words: the patches hold most of its
    # attention but not all of it; padding words (self loops only) get none
    real = ids != 0
    sums = att.sum(-1)
    assert np.all(sums[:, real] < 1) and np.all(sums[:, real] > 0.5)
    assert np.all(sums[:, ~real] == 0)


@pytest.mark.parametrize("conv,readout", [("transformer", "attention"), ("gat", "global"), ("rgcn", "attention")])
def test_every_conv_and_readout_trains(conv, readout):
    images, ids = _inputs()
    model = GraphFusion(**SMALL, depth=1, knn=2, conv=conv, readout=readout, embed_dim=8)
    params = model.init(jax.random.key(0), images, ids)["params"]
    labels = jnp.array([1.0, 0.0])

    def loss(p):
        logits, aux = _apply(model, p, images, ids)
        return jnp.mean((jax.nn.sigmoid(logits) - labels) ** 2) + jnp.sum(aux["image_embed"] * aux["text_embed"])

    grads = jax.grad(loss)(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads))) > 0


def test_graph_and_cross_attention_models_have_nearly_the_same_parameters():
    images, ids = _inputs()
    count = lambda m: sum(x.size for x in jax.tree.leaves(m.init(jax.random.key(0), images, ids)))  # noqa: E731
    graph, cross = count(GraphFusion(**SMALL, depth=2)), count(CrossAttentionMatcher(**SMALL, depth=2))
    assert abs(graph - cross) / cross < 0.15, (graph, cross)


def test_bad_inputs_name_the_value():
    images, ids = _inputs()
    model = GraphFusion(**SMALL, depth=1)
    params = model.init(jax.random.key(0), images, ids)["params"]
    with pytest.raises(ValueError, match=r"images must be \[B, 16, 16, C\].*got shape \(2, 20, 20, 3\)"):
        _apply(model, params, np.zeros((2, 20, 20, 3), np.float32), ids)
    with pytest.raises(ValueError, match=r"ids must be int \[B=2, context_length=5\], got shape \(2, 7\)"):
        _apply(model, params, images, np.zeros((2, 7), int))
    with pytest.raises(ValueError, match=r"images must be floating point"):
        check_inputs(np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 2), int), 4, 2)
    with pytest.raises(ValueError, match=r"knn=16 is larger than the 15 other patches"):
        GraphFusion(**SMALL, knn=16).init(jax.random.key(0), images, ids)
    with pytest.raises(ValueError, match=r"conv must be one of .* got 'gcn'"):
        GraphFusion(**SMALL, conv="gcn").init(jax.random.key(0), images, ids)
    with pytest.raises(ValueError, match=r"width=16 must be divisible by heads=3"):
        GraphFusion(**{**SMALL, "heads": 3}).init(jax.random.key(0), images, ids)
