"""The graph_matching task (mmjax.train.graph_matching) through the engine: batches hold the documented hard
negatives, the losses are what the docstring says (BCE of the scores; NegCLIP, also across devices: float64 proof,
float32 bound), eval accuracy is the pairwise accuracy of the scores, a CLIP run re-ranks for a graph run (report,
attention PNG), and bad settings are refused with the value."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data.captions import caption, parse_caption
from mmjax.data.matching import heldout_table
from mmjax.errors import ConfigError
from mmjax.evaluate import pairwise_accuracy
from mmjax.keypath import set_path
from mmjax.train import make_task, prepare_config, train_and_evaluate
from mmjax.train.graph_matching import _negclip_loss
from tests.tolerances import assert_float32_close, assert_float64_equal, float64

GRAPH = dict(name="graph_fusion", context_length=12, stem_features=(8, 8, 8), width=16, depth=1, heads=2, mlp_dim=16)
GRAPH.update(knn=2, embed_dim=8)
CLIP_MODEL = dict(
    name="clip",
    context_length=12,
    embed_dim=8,
    patch_size=6,
    vision_width=16,
    vision_depth=1,
    vision_heads=2,
    vision_mlp_dim=16,
    text_width=16,
    text_depth=1,
    text_heads=2,
    text_mlp_dim=16,
)


def _config(model=GRAPH, **overrides) -> dict:
    config = {
        "task": "graph_matching",
        "seed": 0,
        "model": dict(model),
        "data": {"num_train": 64, "num_test": 40, "num_heldout": 20},
        "graph_matching": {"attention_examples": 2},
        "batch_size": 8,
        "eval_batch_size": 16,
        "num_steps": 2,
        "optimizer": {"lr": 1e-3, "warmup_steps": 0},
        "log_every": 1,
        "checkpoint_every": 2,
        "progress": False,
        "tensorboard": False,
        "plot": False,
    }
    for key, value in overrides.items():
        set_path(config, key, value)
    return config


@pytest.fixture(scope="module")
def task():
    return make_task(prepare_config(_config()))


def _attrs(task, ids_row):
    return parse_caption(task.tokenizer.decode(ids_row))


def test_batches_hold_the_true_caption_then_one_negative_of_each_drawn_kind(task):
    a, b = next(task.train_batches(3)), next(task.train_batches(3))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])  # a function of (seed, step)
    assert a["ids"].shape == (8, 4, 12) and a["kind"].shape == (8, 3)
    avoid = heldout_table()
    data = task.train_data
    for row in range(8):
        i = a["index"][row]
        truth = caption(data.item[i], data.colour[i], data.size[i], data.position[i])
        assert task.tokenizer.decode(a["ids"][row, 0]) == " ".join(task.tokenizer.split(truth))
        assert len(set(a["kind"][row].tolist())) == 3  # distinct kinds
        true_attrs = _attrs(task, a["ids"][row, 0])
        for col, kind_id in enumerate(a["kind"][row]):
            neg = _attrs(task, a["ids"][row, 1 + col])
            differ = {k for k in neg if neg[k] != true_attrs[k]}
            kind = task.kinds[kind_id]
            assert differ == {kind} if kind != "random" else differ
            assert not avoid[neg["item"], neg["colour"]]


def test_fusion_loss_is_bce_of_the_scores_plus_the_contrastive_term(task):
    batch = next(task.train_batches(0))
    params = task.init_params(jax.random.key(0), batch)
    s = np.asarray(jax.jit(task.scores)(params, batch["image"], batch["ids"]), np.float64)
    labels = np.zeros_like(s)
    labels[:, 0] = 1
    bce = np.mean(np.maximum(s, 0) - s * labels + np.log1p(np.exp(-np.abs(s))))
    task.opts.itc_weight = 0.0
    try:  # compiled (one program, not op by op); the weight is read when the loss is traced
        loss, metrics = jax.jit(lambda p, b: task.loss(p, b, jax.random.key(1)))(params, batch)
    finally:
        task.opts.itc_weight = 1.0
    assert_float32_close(loss, bce, terms=s.size)
    assert float(metrics["pair_accuracy"]) == pytest.approx(np.mean(s[:, :1] > s[:, 1:]))
    with_itc, _ = jax.jit(lambda p, b: task.loss(p, b, jax.random.key(1)))(params, batch)
    assert float(with_itc) > float(loss)


def _negclip_numpy(img, txt, scale):
    b, c, _ = txt.shape
    cols = txt.reshape(b * c, -1)
    i2t = scale * img @ cols.T
    t2i = scale * txt[:, 0] @ img.T
    ce = lambda z, y: np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y])  # noqa: E731
    return 0.5 * (ce(i2t, np.arange(b) * c) + ce(t2i, np.arange(b)))


def test_negclip_loss_matches_numpy_and_is_the_same_across_devices():
    rng = np.random.default_rng(0)
    b, c, d, devices = 8, 3, 5, 4
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    img, txt = unit(rng.standard_normal((b, d))), unit(rng.standard_normal((b, c, d)))
    want = _negclip_numpy(img, txt, 7.0)

    def per_device(i, t):
        return jax.pmap(lambda i, t: _negclip_loss(i, t, 7.0, "batch"), axis_name="batch")(
            i.reshape(devices, b // devices, d), t.reshape(devices, b // devices, c, d)
        )

    with float64():
        single = _negclip_loss(jnp.asarray(img), jnp.asarray(txt), 7.0)
        sharded = per_device(jnp.asarray(img), jnp.asarray(txt))
        assert_float64_equal(single, np.float64(want))
        # the engine averages the devices' losses: each device's rows against the gathered global batch
        assert_float64_equal(jnp.mean(sharded), single)
    single32 = _negclip_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), 7.0)
    sharded32 = per_device(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32))
    assert_float32_close(jnp.mean(sharded32), single32, terms=b * c * d, scale=7.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gm")
    clip_dir, graph_dir = str(root / "clip"), str(root / "graph")
    clip = train_and_evaluate(_config(CLIP_MODEL), clip_dir)
    graph = train_and_evaluate(_config(**{"graph_matching.retriever": clip_dir}), graph_dir)
    return clip_dir, graph_dir, clip, graph


def test_clip_run_retrieves_and_graph_run_reranks_its_top_k(runs):
    """One test for the two trained runs (a module fixture would be trained once per xdist worker)."""
    clip_dir, graph_dir, clip, graph = runs
    with open(os.path.join(clip_dir, "report.json")) as f:
        clip_report = json.load(f)
    with open(os.path.join(graph_dir, "report.json")) as f:
        graph_report = json.load(f)
    for key in ("image_to_text_R@1", "image_to_text_R@10", "text_to_image_R@5"):
        assert 0 <= clip_report[f"clip_{key}"] <= 1
        assert graph_report[f"clip_{key}"] == clip_report[f"clip_{key}"]  # the same first stage
        assert 0 <= graph_report[f"rerank_{key}"] <= 1
    assert graph_report["pairs_per_s"] > 0 and clip_report["pairs_per_s"] > 0 and graph_report["rerank_pairs_per_s"] > 0
    assert "rerank_image_to_text_R@1" not in clip_report
    assert os.path.getsize(graph_report["attention_png"]) > 1000
    for kind in ("colour", "item", "size", "position", "random"):
        assert 0 <= graph_report[f"heldout_{kind}_accuracy"] <= 1

    # the engine's eval accuracy is the pairwise accuracy of the scores
    from mmjax.train import restore_run

    _, task, params, _ = restore_run(graph_dir)
    s = np.concatenate([np.asarray(task.scores(params, b["image"], b["ids"]))[b["mask"]] for b in task.eval_batches()])
    for i, kind in enumerate(task.kinds):
        assert graph[f"eval_{kind}_accuracy"] == pytest.approx(pairwise_accuracy(s[:, 0], s[:, 1 + i]), abs=1e-6)
    # a retriever that is not a CLIP run is refused
    task = make_task(prepare_config(_config(**{"graph_matching.retriever": graph_dir})))
    params = task.init_params(jax.random.key(0), next(task.train_batches(0)))
    with pytest.raises(ConfigError, match=r"is not a graph_matching run of model 'clip'"):
        task.retrieval(params)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"graph_matching.negatives_per_image": 6}, r"negatives_per_image=6 must be an int in \[1, 5\]"),
        ({"graph_matching.negative_kinds": ("colour", "shape")}, r"negative_kinds='shape' is not valid"),
        ({"model.context_length": 6}, r"caption 'a small red t-shirt in the top left' has 10 words"),
        ({"model.knn": 40}, r"knn=40 is larger than the 35 other patches"),
        ({"data.image_size": 40, "model.image_size": 48}, r"config.model.image_size=48 differs"),
    ],
)
def test_bad_settings_are_refused_with_the_value(overrides, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        make_task(prepare_config(_config(**overrides)))


def test_unknown_model_is_refused():
    with pytest.raises(ConfigError, match=r"config.model.name='gcn' is not valid for graph_matching"):
        make_task(prepare_config(_config({"name": "gcn"})))


def test_scores_are_the_logit_or_the_scaled_cosine():
    task = make_task(prepare_config(_config(CLIP_MODEL)))
    batch = next(task.train_batches(0))
    params = task.init_params(jax.random.key(0), batch)
    b, c, L = batch["ids"].shape
    img, txt = task.clip_embeddings(params, batch["image"], batch["ids"].reshape(b * c, L))
    want = np.exp(min(float(params["logit_scale"]), np.log(100))) * np.einsum(
        "bd,bcd->bc", np.asarray(img), np.asarray(txt).reshape(b, c, -1)
    )
    assert_float32_close(task.scores(params, batch["image"], batch["ids"]), want, terms=8, scale=100)
    loss, _ = task.loss(params, batch, jax.random.key(0))
    scale = float(np.exp(min(float(params["logit_scale"]), np.log(100))))
    want_loss = _negclip_numpy(np.asarray(img, np.float64), np.asarray(txt, np.float64).reshape(b, c, -1), scale)
    assert_float32_close(loss, want_loss, terms=b * c * 8, scale=scale)


def test_comparison_table_of_the_job_gives_mean_and_range_and_reranked_recall():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "graph_fusion_fashion_mnist.py")
    spec = importlib.util.spec_from_file_location("graph_fusion_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    reports = [
        {"colour_accuracy": 0.9, "clip_image_to_text_R@1": 0.5, "rerank_image_to_text_R@1": 0.7, "pairs_per_s": 10.0},
        {"colour_accuracy": 1.0, "clip_image_to_text_R@1": 0.5, "rerank_image_to_text_R@1": 0.8, "pairs_per_s": 30.0},
    ]
    table = job.comparison_table({"graph_fusion": reports, "clip": [{"clip_image_to_text_R@1": 0.5}]})
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table.splitlines()[2:]}
    assert table.splitlines()[0] == "| measure | graph_fusion | clip |"
    assert rows["colour negatives, test"][0] == "0.9500 (0.9000-1.0000)"
    assert rows["image->text R@1"] == ["0.7500 (0.7000-0.8000)", "0.5000 |"]  # re-ranked; CLIP's own
    assert rows["pairs/s (scoring)"][0] == "20"
    for model in job.ORDER:  # every model's config is a valid graph_matching config
        assert prepare_config(job.get_config(model)).model.name == job.VARIANTS[model]["name"]
