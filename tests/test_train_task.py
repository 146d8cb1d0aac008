"""The Task interface carries a loss that needs the whole global batch (contrastive, all_gather under pmap) and a
batch that is not a plain array dict (stacked padded sub-batches): all parallel modes agree without engine changes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.train import TrainState, make_optimizer, make_plan, make_train_step
from mmjax.train.config import prepare_config
from tests.tolerances import assert_trees_float64_equal, float64, to_float64
from tests.tracing import recorded_traces


class ToyContrastiveTask:
    """Two views (x, x + noise) embedded by one Dense; InfoNCE over the *global* batch.

    Under pmap each device scores its rows against the all-gathered global batch; elsewhere the batch is global.
    """

    num_train_examples = 64

    def __init__(self, batch_size=16, seed=0):
        self.model = nn.Dense(4)
        self.batch_size, self.seed = batch_size, seed

    def train_batches(self, start_step):
        step = start_step
        while True:
            rng = np.random.default_rng([self.seed, step])
            x = rng.normal(size=(self.batch_size, 6)).astype(np.float32)
            yield {"a": x, "b": (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32)}
            step += 1

    def eval_batches(self):
        return iter([])

    def example_count(self, batch):
        return batch["a"].shape[0]

    def init_params(self, rng, batch):
        return self.model.init(rng, batch["a"])["params"]

    def loss(self, params, batch, rng, *, train, axis_name):
        za = self.model.apply({"params": params}, batch["a"])
        zb = self.model.apply({"params": params}, batch["b"])
        offset = 0
        if axis_name is not None:
            offset = jax.lax.axis_index(axis_name) * za.shape[0]
            zb = jax.lax.all_gather(zb, axis_name, tiled=True)  # the global batch of the other view
        logits = za @ zb.T  # [local rows, global batch]
        labels = offset + jnp.arange(za.shape[0])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, {}

    def eval_metrics(self, params, batch, *, axis_name):
        return {"count": jnp.float32(0)}


class ToyStackedTask(ToyContrastiveTask):
    """Batches of S stacked sub-batches with different node counts padded to 5 ("graphs"): leaves [S, 5, 6] and a
    node mask [S, 5]; the loss vmaps over sub-batches and masks padding (the pattern graph tasks use)."""

    def train_batches(self, start_step):
        step = start_step
        while True:
            rng = np.random.default_rng([self.seed, step])
            nodes = rng.normal(size=(8, 5, 6)).astype(np.float32)
            mask = (np.arange(5)[None, :] < rng.integers(1, 6, size=(8, 1))).astype(np.float32)
            yield {"nodes": nodes, "mask": mask, "target": rng.normal(size=(8, 4)).astype(np.float32)}
            step += 1

    def init_params(self, rng, batch):
        return self.model.init(rng, batch["nodes"][0])["params"]

    def loss(self, params, batch, rng, *, train, axis_name):
        def one(nodes, mask, target):
            h = self.model.apply({"params": params}, nodes)
            pooled = (h * mask[:, None]).sum(0) / mask.sum()
            return jnp.sum((pooled - target) ** 2)

        return jax.vmap(one)(batch["nodes"], batch["mask"], batch["target"]).mean(), {}


RUN_LR = 0.05  # run()'s learning rate


def run(task, mode, steps=3, accum=1, **optimizer):
    config = prepare_config({"optimizer": {"lr": RUN_LR, "warmup_steps": 0, "grad_accum_steps": accum, **optimizer}})
    plan = make_plan(mode)
    first = next(task.train_batches(0))
    plan.check_batch_size(jax.tree.leaves(first)[0].shape[0], accum)
    params = task.init_params(jax.random.key(0), first)
    tx, schedule = make_optimizer(config.optimizer, params, steps)
    state = TrainState.create(params, tx)
    step_fn = plan.compile_train_step(
        make_train_step(task, tx, schedule, plan, accum, 0), jax.eval_shape(lambda s: s, state)
    )
    placed = plan.from_canonical(state)
    batches = task.train_batches(0)
    for _ in range(steps):
        placed, _ = step_fn(placed, plan.place_batch(next(batches)))
    return jax.device_get(plan.to_canonical(placed).params)


@pytest.mark.parametrize("task_cls", [ToyContrastiveTask, ToyStackedTask])
def test_global_batch_and_stacked_tasks_agree_across_modes(task_cls):
    reference = run(task_cls(), "single")
    initial = task_cls().init_params(jax.random.key(0), next(task_cls().train_batches(0)))
    assert not np.allclose(reference["kernel"], initial["kernel"])  # it trained
    for mode in ("pmap", "sharded"):
        got = run(task_cls(), mode)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=mode), got, reference)

    def in_float64(task):  # the same task on float64 batches and params (an instance attribute shadows the method)
        batches, init = task.train_batches, task.init_params
        task.train_batches = lambda start: (to_float64(b) for b in batches(start))
        task.init_params = lambda rng, batch: to_float64(init(rng, batch))
        return task

    # the equality of the modes, in float64 (the float32 check above bounds round-off only)
    with float64():
        reference64 = run(in_float64(task_cls()), "single")
        assert all(x.dtype == np.float64 for x in jax.tree.leaves(reference64))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3), reference64, reference)  # same run
        for mode in ("pmap", "sharded"):
            got = run(in_float64(task_cls()), mode)
            assert_trees_float64_equal(got, reference64, scale="tree", err_msg=mode)


def test_compiled_init_gives_the_eager_params_bit_for_bit_and_compiles_once():
    """init_model_params (every built-in task's init_params) equals the eager model.init bit for bit: XLA's
    algebraic simplifier, which would fold an initialiser's two constant multiplications into one, is off for it.
    A CLIP has normal, truncated-normal, lecun and constant initialisers. The second call reuses the executable."""
    from mmjax.clip import CLIP, CLIPConfig
    from mmjax.train.task import init_model_params

    config = CLIPConfig(
        embed_dim=8, image_size=16, patch_size=4, vision_width=16, vision_depth=1, vision_heads=2, vision_mlp_dim=32,
        vocab_size=20, context_length=5, text_width=16, text_depth=1, text_heads=2, text_mlp_dim=32, eot_id=19,
    )  # fmt: skip
    model, images, ids = CLIP(config), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 5), jnp.int32)
    rngs = {"params": jax.random.key(3), "dropout": jax.random.key(3)}
    eager = model.init(rngs, images, ids)["params"]
    with recorded_traces() as traces:
        compiled = init_model_params(CLIP(config), rngs, images, ids)
        first = len(traces)
        again = init_model_params(CLIP(config), rngs, images, ids)  # an equal model: the cached executable
        assert len(traces) == first >= 1, traces
    for (path, want), got, got2 in zip(
        jax.tree_util.tree_flatten_with_path(eager)[0], jax.tree.leaves(compiled), jax.tree.leaves(again)
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
        np.testing.assert_array_equal(np.asarray(got2), np.asarray(want))
