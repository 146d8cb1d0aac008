"""LiT (``contrastive.freeze_image_tower=True``) trained by the engine as a user runs it: ``mmjax train`` with the
engine's AdamW (per-path weight decay, clipping, schedule) wrapped by the task's ``wrap_optimizer`` hook; and the
unfrozen optimizer computes bit for bit what it did before the masked-update fix."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmjax.cli import main
from mmjax.train import Checkpointer, make_optimizer, make_task, prepare_config
from mmjax.train.optimizer import DEFAULT_DECAY_RULES, decay_multipliers, make_schedule, param_path
from tests.jobs.contrastive_job import tiny_config

FROZEN = ("vision", "visual_projection")


def _write_config_file(path, config: dict) -> str:
    path.write_text(
        "import json\nimport ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict(json.loads({json.dumps(json.dumps(config))}))\n"
    )
    return str(path)


def _leaves(tree):
    return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_freeze_image_tower_through_mmjax_train(tmp_path):
    steps = 3
    overrides = {"task": "contrastive", "num_steps": steps, "optimizer.weight_decay": 0.1}
    base = tiny_config(**overrides)
    config_file = _write_config_file(tmp_path / "tiny_clip.py", base)
    workdir = str(tmp_path / "run")
    argv = ["train", "--config", config_file, "--workdir", workdir, "--config.contrastive.freeze_image_tower=True"]
    assert main(argv) == 0  # failed at the first update with optax's MaskedNode in the weight-decay step

    frozen_cfg = prepare_config(tiny_config(**overrides, **{"contrastive.freeze_image_tower": True}))
    task = make_task(frozen_cfg)
    initial = task.init_params(jax.random.fold_in(jax.random.key(frozen_cfg.seed), 0), next(task.train_batches(0)))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == steps
    final = ckpt._manager.restore(steps)["params"]
    ckpt.close()
    assert sorted(final) == sorted(initial)
    for name in initial:
        before, after = _leaves(initial[name]), _leaves(final[name])
        assert sorted(before) == sorted(after), name
        if name in FROZEN:  # the locked tower: bit-identical after every step
            for path in before:
                np.testing.assert_array_equal(after[path], before[path], err_msg=f"{name}/{path}")
        else:  # the trained rest: every tensor moved
            for path in before:
                assert not np.array_equal(after[path], before[path]), f"{name}/{path} did not change"


def _reference_adamw(opt, params, total_steps):
    """The engine's optimizer as it was written before the masked-update fix (the published jobs ran it)."""
    mults = decay_multipliers(params, opt.decay_rules)

    def init(p):
        del p
        return optax.EmptyState()

    def update(updates, state, p):
        return jax.tree.map(lambda u, q, m: u + (opt.weight_decay * m) * q if m else u, updates, p, mults), state

    schedule = make_schedule(opt.lr, opt.warmup_steps, total_steps, opt.end_lr_ratio)
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip),
        optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps),
        optax.GradientTransformation(init, update),
        optax.scale_by_learning_rate(schedule),
    )


def test_unfrozen_optimizer_is_bit_identical_to_before():
    opt = ml_collections.ConfigDict(
        dict(
            lr=3e-3,
            weight_decay=0.2,
            b1=0.9,
            b2=0.98,
            eps=1e-6,
            warmup_steps=2,
            end_lr_ratio=0.0,
            grad_clip=1.0,
            decay_rules=DEFAULT_DECAY_RULES,
        )
    )
    keys = iter(jax.random.split(jax.random.key(0), 64))
    params = {
        "dense": {"kernel": jax.random.normal(next(keys), (5, 3)), "bias": jax.random.normal(next(keys), (3,))},
        "pos_embedding": jax.random.normal(next(keys), (1, 4, 3)),
        "logit_scale": jnp.float32(2.6),
    }
    tx, _ = make_optimizer(opt, params, total_steps=6)
    ref = _reference_adamw(opt, params, total_steps=6)
    p_new, p_ref, s_new, s_ref = params, params, tx.init(params), ref.init(params)
    for _ in range(5):
        grads = jax.tree.map(lambda x: 3.0 * jax.random.normal(next(keys), jnp.shape(x)), params)
        u_new, s_new = jax.jit(tx.update)(grads, s_new, p_new)
        u_ref, s_ref = jax.jit(ref.update)(grads, s_ref, p_ref)
        p_new, p_ref = optax.apply_updates(p_new, u_new), optax.apply_updates(p_ref, u_ref)
    for path, a in _leaves(p_new).items():
        np.testing.assert_array_equal(a, _leaves(p_ref)[path], err_msg=path)
    assert not np.array_equal(_leaves(p_new)["dense/kernel"], np.asarray(params["dense"]["kernel"]))
