"""The contrastive task: the three parallel modes agree, GradCache accumulation is exact, LiT freezing, the clamp,
bf16/remat, evaluation (engine sums == full-set mmjax.evaluate), and exact resume after kill -9."""

import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.losses import sigmoid_contrastive_loss, softmax_contrastive_loss
from mmjax.train import (
    Checkpointer,
    TrainState,
    make_optimizer,
    make_plan,
    make_task,
    make_train_step,
    prepare_config,
    train_and_evaluate,
)
from mmjax.train.contrastive import freeze, frozen_labels, grad_cache
from mmjax.train.optimizer import param_path
from tests.jobs.contrastive_job import tiny_config
from tests.tolerances import (
    adam_params_atol,
    assert_float32_close,
    assert_float64_equal,
    assert_trees_float32_close,
    assert_trees_float64_equal,
    float32_atol,
    float64,
    to_float64,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**overrides):
    return prepare_config(tiny_config(**{"task": "contrastive", **overrides}))


@pytest.fixture(scope="module")
def task():
    return make_task(config())


@pytest.fixture(scope="module")
def params_and_batch(task):
    batch = next(task.train_batches(0))
    return task.init_params(jax.random.key(0), batch), batch


def run_steps(cfg, steps=3):
    """Canonical params after ``steps`` optimizer steps of ``cfg`` (engine step function, no checkpoints)."""
    mode = cfg.parallel.mode
    plan = make_plan(mode)
    task = make_task(cfg)
    batches = task.train_batches(0)
    params = task.init_params(jax.random.fold_in(jax.random.key(cfg.seed), 0), next(task.train_batches(0)))
    tx, schedule = make_optimizer(cfg.optimizer, params, steps)
    tx = task.wrap_optimizer(tx, params)  # as the engine does (freeze_image_tower)
    state = TrainState.create(params, tx)
    step_fn = plan.compile_train_step(
        make_train_step(task, tx, schedule, plan, 1, cfg.seed), jax.eval_shape(lambda s: s, state)
    )
    placed = plan.from_canonical(state)
    losses = []
    for _ in range(steps):
        placed, metrics = step_fn(placed, plan.place_batch(next(batches)))
        losses.append(float(np.asarray(metrics["loss"]).reshape(-1)[0]))
    return jax.device_get(plan.to_canonical(placed)).params, losses


def assert_trees_close(a, b, atol=2e-5, what=""):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4, err_msg=f"{what} {param_path(path)}"
        )


def test_modes_agree_with_and_without_grad_cache():
    # The layouts sum the gradient in other orders (the equality is proven in float64 for GradCache in
    # test_grad_cache_gradient_equals_full_batch_gradient, for the modes in tests/test_train_task.py). After
    # clipping to global norm c every gradient entry is <= c, so its round-off is <= dg = float32_atol(c, terms)
    # (terms as there). Adam's step lr * m / (sqrt(v) + eps) moves by <= lr * dg / eps for it (the attention key
    # biases have an identically zero gradient, pure round-off), so after n steps the params differ by
    # <= n * lr * dg / eps (to first order, tests.tolerances.adam_params_atol). Adam eps 1e-2 keeps that far below
    # the steps' own size lr (eps 1e-6 would allow 30 lr); the updates of entries with |g| >> eps are unchanged.
    adam = {"optimizer.eps": 1e-2}
    reference, losses = run_steps(config(**adam))
    assert np.all(np.isfinite(losses)) and len(set(losses)) == len(losses)
    opt, steps = config(**adam).optimizer, len(losses)
    b, length = next(make_task(config()).train_batches(0))["ids"].shape
    dg = float32_atol(opt.grad_clip, terms=4 * np.sqrt(b * length))
    for name, overrides in {
        "pmap+gradcache2": {"parallel.mode": "pmap", "contrastive.micro_batches": 2},
        "sharded+gradcache2": {"parallel.mode": "sharded", "contrastive.micro_batches": 2},
    }.items():
        params, run_losses = run_steps(config(**adam, **overrides))
        np.testing.assert_allclose(run_losses, losses, rtol=1e-4, err_msg=name)
        for path, got in jax.tree_util.tree_flatten_with_path(params)[0]:
            want = np.asarray(functools.reduce(lambda t, k: t[k.key], path, reference))
            scale = np.abs(want).max()
            atol = adam_params_atol(steps=steps, lr=opt.lr, adam_eps=opt.eps, grad_atol=dg, param_scale=scale)
            np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"{name} {param_path(path)}")


def test_grad_cache_gradient_equals_full_batch_gradient(task, params_and_batch):
    params, batch = params_and_batch
    rng = jax.random.key(3)
    # The equality, in float64: two towers (a token embedding, as in the text tower, whose gradient rows are sums
    # over positions) under the library's GradCache and both contrastive losses; split into devices' groups too.
    with float64():
        rngs = np.random.default_rng(0)
        toy = to_float64(
            {
                "image": rngs.normal(size=(48, 8)),
                "token": rngs.normal(size=(int(batch["ids"].max()) + 1, 6)),
                "text": rngs.normal(size=(6, 8)),
                "logit_scale": 2.0,
                "logit_bias": -1.0,
            }
        )
        inputs = {"image": to_float64(rngs.normal(size=(16, 48))), "ids": jnp.asarray(batch["ids"])}

        def towers(p, x, r):
            img = jnp.tanh(x["image"] @ p["image"])
            txt = jnp.tanh(p["token"][x["ids"]].mean(1) @ p["text"])
            return tuple(e / jnp.linalg.norm(e, axis=-1, keepdims=True) for e in (img, txt))

        losses = {
            "softmax": lambda p, e: softmax_contrastive_loss(*e, p["logit_scale"]),
            "sigmoid": lambda p, e: sigmoid_contrastive_loss(*e, p["logit_scale"], p["logit_bias"]),
        }
        for name, loss in losses.items():
            want = jax.grad(lambda p: loss(p, towers(p, inputs, rng)))(toy)
            for k, groups in ((2, 1), (4, 1), (4, 2)):
                f = grad_cache(towers, k, groups)
                got = jax.jit(jax.grad(lambda p: loss(p, f(p, inputs, rng))))(toy)
                assert_trees_float64_equal(got, want, scale="tree", err_msg=f"{name} k={k} groups={groups}")
    # float32, the task's CLIP: the two orders differ by round-off. All gradients are sums of terms no larger than
    # the largest gradient entry (scale="tree"; the attention key biases are identically zero, their gradients pure
    # round-off of those terms); the longest chain is the sum over the batch's B * L token positions (round-off
    # grows like its sqrt) times 4 for depth (an attention and an MLP branch in each tower's block).
    full = jax.jit(jax.grad(lambda p: task.loss(p, batch, rng)[0]))(params)
    cached_task = make_task(config(**{"contrastive.micro_batches": 4}))
    cached = jax.jit(jax.grad(lambda p: cached_task.loss(p, batch, rng)[0]))(params)
    b, length = batch["ids"].shape
    assert_trees_float32_close(cached, full, terms=4 * np.sqrt(b * length), scale="tree", err_msg="gradcache")
    # the naive alternative - averaging the losses of 4 micro-batches - is a different gradient
    quarter = jax.tree.map(lambda x: x[:4], batch)
    naive = jax.jit(jax.grad(lambda p: task.loss(p, quarter, rng)[0]))(params)
    assert not np.allclose(naive["logit_scale"], full["logit_scale"], atol=1e-4)


def test_grad_cache_on_a_toy_function_matches_autodiff():
    w = jax.random.normal(jax.random.key(0), (5, 3))
    x = jax.random.normal(jax.random.key(1), (12, 5))

    def embed(p, inputs, rng):
        return jnp.tanh(inputs["x"] @ p) * (1 + 0.1 * jax.random.normal(rng, (inputs["x"].shape[0], 1)))

    def loss(fn):
        return lambda p: jnp.sum(jax.nn.logsumexp(fn(p, {"x": x}, jax.random.key(2)) @ p.T, axis=0))

    for k, groups in ((3, 1), (2, 2)):
        f = grad_cache(lambda p, i, r: jnp.tanh(i["x"] @ p), k, groups)

        def both(w, x):
            g_ref = jax.grad(lambda p: jnp.sum(jnp.sort(jnp.tanh(x @ p), axis=0) ** 2))(w)
            g = jax.grad(lambda p: jnp.sum(jnp.sort(f(p, {"x": x}, jax.random.key(2)), axis=0) ** 2))(w)
            return g, g_ref

        with float64():
            assert_float64_equal(*both(*to_float64((w, x))), err_msg=f"k={k} groups={groups}")
        # float32: an entry sums 12 rows of x * 2 tanh (1 - tanh^2) (each <= max|x|) after 5-term dot products
        assert_float32_close(*both(w, x), terms=12 + 5, scale=float(jnp.abs(x).max()), err_msg=f"k={k}")
    assert grad_cache(embed, 1) is embed
    with pytest.raises(ValueError, match="micro_batches"):
        grad_cache(embed, 0)
    with pytest.raises(ValueError, match="not divisible"):
        grad_cache(embed, 5)(w, {"x": x}, jax.random.key(0))
    assert np.isfinite(loss(embed)(w))


def test_frozen_image_tower_gets_zero_updates():
    cfg = config(**{"contrastive.freeze_image_tower": True, "optimizer.weight_decay": 0.1})
    task = make_task(cfg)
    assert cfg.optimizer.decay_rules == config().optimizer.decay_rules  # the task leaves the config as given
    params0 = task.init_params(jax.random.fold_in(jax.random.key(cfg.seed), 0), next(task.train_batches(0)))
    params, _ = run_steps(cfg, steps=2)
    for name in params:
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(params0[name])))
        assert same == (name in ("vision", "visual_projection")), name
    labels = frozen_labels(params)
    assert labels["vision"]["embedding"]["kernel"] == "frozen" and labels["text_projection"]["kernel"] == "trained"
    tx = task.wrap_optimizer(optax.adamw(1.0), params)  # the optax path: multi_transform + set_to_zero
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["vision"]))
    assert float(jnp.abs(updates["text_projection"]["kernel"]).max()) > 0
    assert make_task(config()).wrap_optimizer(tx, params) is tx
    plain = freeze(optax.sgd(1.0), params, pattern="nothing")
    assert float(jnp.abs(plain.update(grads, plain.init(params), params)[0]["vision"]["cls"]).max()) > 0


def test_logit_scale_is_clamped_at_log_100(task, params_and_batch):
    params, batch = params_and_batch
    big = dict(params, logit_scale=jnp.float32(7.0))  # e^7 > 100
    (loss, metrics), grads = jax.jit(
        jax.value_and_grad(lambda p: task.loss(p, batch, jax.random.key(0)), has_aux=True)
    )(big)
    np.testing.assert_allclose(metrics["logit_scale"], 100.0, rtol=1e-5)
    assert float(grads["logit_scale"]) == 0.0
    small_grad = jax.jit(jax.grad(lambda p: task.loss(p, batch, jax.random.key(0))[0]))(params)["logit_scale"]
    assert float(small_grad) != 0.0


def test_bf16_and_remat(task, params_and_batch):
    params, batch = params_and_batch
    rng = jax.random.key(0)
    loss32, grads32 = jax.jit(jax.value_and_grad(lambda p: task.loss(p, batch, rng)[0]))(params)
    bf16 = make_task(config(**{"model.dtype": "bfloat16"}))
    loss16 = jax.jit(lambda p: bf16.loss(p, batch, rng)[0])(params)
    assert loss16.dtype == jnp.float32
    np.testing.assert_allclose(loss16, loss32, rtol=3e-2)
    remat = make_task(config(**{"model.remat": True}))
    grads_remat = jax.jit(jax.grad(lambda p: remat.loss(p, batch, rng)[0]))(params)
    assert_trees_close(grads_remat, grads32, atol=1e-6, what="remat")


def test_word_tokenizer_keeps_the_configured_text_pooling(task):
    assert task.clip_config.text_pooling == "eot"  # the default: pool at the word tokenizer's end-of-text id
    mean = make_task(config(**{"model.text_pooling": "mean"}))
    assert mean.clip_config.text_pooling == "mean" and mean.clip_config.eot_id == task.clip_config.eot_id


def test_sigmoid_loss_and_bad_configs(params_and_batch):
    _, batch = params_and_batch
    siglip = make_task(
        config(
            **{
                "contrastive.loss": "sigmoid",
                "model.logit_bias_init": -10.0,
                "model.logit_scale_init": float(np.log(10.0)),
                "contrastive.sigmoid_chunk_size": 4,
            }
        )
    )
    params = siglip.init_params(jax.random.key(0), batch)
    loss, _ = jax.jit(lambda p: siglip.loss(p, batch, jax.random.key(0)))(params)
    assert np.isfinite(loss) and float(loss) > 0
    no_bias = make_task(config(**{"contrastive.loss": "sigmoid"}))
    with pytest.raises(ValueError, match="logit_bias_init"):
        no_bias.loss(no_bias.init_params(jax.random.key(0), batch), batch, jax.random.key(0))
    with pytest.raises(ValueError, match=r"grad_accum_steps=2.*micro_batches=2"):
        make_task(config(**{"optimizer.grad_accum_steps": 2}))
    with pytest.raises(ValueError, match=r"contrastive.loss='cosine'.*softmax"):
        make_task(config(**{"contrastive.loss": "cosine"}))
    with pytest.raises(ValueError, match=r"data.name='imagenet'"):
        make_task(config(**{"data.name": "imagenet"}))
    with pytest.raises(ValueError, match=r"model.dtype='float16'"):
        make_task(config(**{"model.dtype": "float16"}))
    with pytest.raises(ValueError, match=r"model.image_size=32 differs"):
        make_task(config(**{"model.image_size": 32}))


def test_hsv_colour_space_and_grouped_caption_batches(params_and_batch):
    import colorsys

    _, batch = params_and_batch
    hsv = make_task(config(**{"data.colour_space": "hsv", "data.groups_per_batch": 2}))
    images = batch["image"][:2]
    ref = np.array([colorsys.rgb_to_hsv(*px) for px in (images.reshape(-1, 3) / 255.0)]).reshape(images.shape)
    expected = (ref - hsv.mean) / hsv.std
    np.testing.assert_allclose(np.asarray(hsv._images(jnp.asarray(images))), expected, atol=1e-5)
    # grouped by (colour, size, position), the default: 2 cells of captions that differ only in the item word
    grouped = next(hsv.train_batches(0))
    words = [hsv.tokenizer.decode(ids).replace("t - shirt", "t-shirt") for ids in grouped["ids"]]
    contexts = [
        " ".join(
            w
            for w in text.split()
            if w
            not in {
                "t-shirt",
                "trouser",
                "pullover",
                "dress",
                "coat",
                "sandal",
                "shirt",
                "sneaker",
                "bag",
                "ankle",
                "boot",
            }
        )
        for text in words
    ]
    half = len(contexts) // 2
    assert len(set(contexts[:half])) == 1 and len(set(contexts[half:])) == 1 and contexts[0] != contexts[-1]
    by_place = make_task(config(**{"data.groups_per_batch": 2, "data.group_by": ("size", "position")}))
    places = [
        (w[1], w[-2], w[-1])
        for w in (hsv.tokenizer.decode(ids).split() for ids in next(by_place.train_batches(0))["ids"])
    ]
    assert len(set(places[:half])) == 1 and len(set(places[half:])) == 1
    with pytest.raises(ValueError, match=r"data.group_by=\('shape',\) must be distinct attribute names"):
        make_task(config(**{"data.groups_per_batch": 2, "data.group_by": ("shape",)}))  # checked at construction
    with pytest.raises(ValueError, match=r"data.colour_space='lab'.*\['rgb', 'hsv'\]"):
        make_task(config(**{"data.colour_space": "lab"}))


def test_engine_eval_matches_full_set_evaluation(tmp_path):
    cfg = config(**{"num_steps": 2, "eval_batch_size": 8, "parallel.mode": "pmap"})
    result = train_and_evaluate(cfg, str(tmp_path))
    assert result["eval_count"] == 32.0
    for key in ("eval_item_accuracy", "eval_heldout_combo_accuracy", "eval_batch_i2t_top1"):
        assert 0.0 <= result[key] <= 1.0, key
    ckpt = Checkpointer(os.path.join(str(tmp_path), "checkpoints"))
    params = ckpt._manager.restore(ckpt.latest_step())["params"]
    ckpt.close()
    task = make_task(cfg)
    assert task.final_report(params, str(tmp_path / "off")) == {}  # tiny_config turns the engine hook off
    task.opts.final_report = True
    report = task.final_report(params, str(tmp_path / "report"))
    # engine sums over padded pmap batches with group weights == mmjax.evaluate on the whole set
    for attr in ("item", "colour", "combo"):
        assert result[f"eval_{attr}_accuracy"] == pytest.approx(report[f"zero_shot_{attr}_accuracy"], abs=1e-6)
        assert result[f"eval_heldout_{attr}_accuracy"] == pytest.approx(
            report[f"zero_shot_heldout_{attr}_accuracy"], abs=1e-6
        )
    assert 0.0 <= report["retrieval_text_to_image_R@10"] <= 1.0 and 0.0 <= report["linear_probe_item_accuracy"] <= 1
    for png in ("confusion_matrix_png", "retrieval_grid_png"):
        assert open(report[png], "rb").read(4) == b"\x89PNG"
    assert json.load(open(tmp_path / "report" / "report.json"))["checkpoint_dir"].endswith("checkpoints")


def _final_params(workdir):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    params = ckpt._manager.restore(step)["params"]
    ckpt.close()
    return step, params


def test_resume_after_kill_is_exact(tmp_path):
    steps = 5
    cfg = tiny_config(num_steps=steps)
    reference = str(tmp_path / "reference")
    train_and_evaluate(cfg, reference)
    workdir = str(tmp_path / "killed")
    env = dict(os.environ, PYTHONPATH=REPO, MMJAX_TEST_STEP_DELAY="1.0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.jobs.contrastive_job", json.dumps(cfg), workdir, str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpt_dir = os.path.join(workdir, "checkpoints")
    t0 = time.time()
    while True:
        done = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
        if done and max(done) >= 2:
            break
        assert proc.poll() is None, f"the job ended early: {proc.communicate()}"
        assert time.time() - t0 < 240, "no checkpoint appeared"
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=60)
    killed_at = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    assert killed_at < steps
    result = train_and_evaluate(cfg, workdir)  # resumes from the last complete checkpoint
    assert result["step"] == steps
    step_ref, params_ref = _final_params(reference)
    step_res, params_res = _final_params(workdir)
    assert step_ref == step_res == steps
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params_ref)[0], jax.tree.leaves(params_res)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=param_path(path))


def test_job_configs_are_valid():
    from mmjax.cli import load_config_file

    job = prepare_config(load_config_file(os.path.join(REPO, "experiments", "clip_fashion_mnist.py")))
    assert job.task == "contrastive" and job.model.image_size == job.data.image_size == 48
    assert job.data.colour_space == "hsv" and job.batch_size % job.data.groups_per_batch == 0
    big = prepare_config(load_config_file(os.path.join(REPO, "experiments", "clip_b16_tpu.py")))
    assert big.parallel.mode == "sharded" and big.parallel.fsdp and big.model.dtype == "bfloat16"
    from mmjax.clip import get_config

    fields = {
        k: v for k, v in big.model.to_dict().items() if k not in ("name", "preset", "dtype", "tokenizer", "bpe_path")
    }
    b16 = get_config(big.model.preset).replace(**fields)
    assert (b16.patch_size, b16.vision_width, b16.remat, b16.scan) == (16, 768, True, True)
