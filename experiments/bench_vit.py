"""Training-step throughput of a ViT in mmjax vs PyTorch (transformers' ViTForImageClassification).

A training step is forward + backward + AdamW update on a fixed random batch, float32, on the CPU. Each side runs in
a process of its own, the two interleaved (``experiments/benchmarking.py``: ``--rounds`` processes per side, each
``--warmup`` untimed and ``--steps`` timed steps; median and min-max over all timed steps). Also reported: mmjax's
achieved FLOP/s (XLA's cost analysis of the compiled step) against a matmul peak measured in a process of its own
(a 2048^3 float32 ``jnp.dot``).

Command::

    .venv/bin/python experiments/bench_vit.py --config all --json /tmp/bench_vit.json

Configs:
  fmnist  28 px, 1 channel, patch 4, width 192, depth 6, 3 heads, MLP 768, 10 classes, batch 128
  ti16    ViT-Ti/16 at 224 px, 3 channels, 1000 classes, batch 16
  tiny    16 px, width 32, depth 1, batch 4 (for the tests; not in ``all``)

The ratio is torch's median step time / mmjax's: above 1 when mmjax is faster.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmarking  # noqa: E402

CONFIGS = {
    "fmnist": dict(image=28, channels=1, patch=4, width=192, depth=6, heads=3, mlp=768, classes=10, batch=128),
    "ti16": dict(image=224, channels=3, patch=16, width=192, depth=12, heads=3, mlp=768, classes=1000, batch=16),
    "tiny": dict(image=16, channels=1, patch=4, width=32, depth=1, heads=2, mlp=64, classes=10, batch=4),  # tests
}
MAIN_CONFIGS = ("fmnist", "ti16")  # what --config all runs


def matmul_peak(n: int = 2048, steps: int = 5, warmup: int = 2) -> dict:
    """Side ``peak``: wall seconds of an ``n x n`` float32 matmul with jax (``2 n^3`` FLOPs per product)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    timed = benchmarking.time_calls(lambda: f(a, b).block_until_ready(), steps=steps, warmup=warmup)
    return {**timed, "flops_per_call": 2 * n**3}


def build_step(
    config: str,
    *,
    remat: bool = False,
    attention: str | None = None,
    activation: str = "gelu",
    optimizer: str = "adamw",
) -> dict:
    """The mmjax ViT training step of ``config`` (forward + backward + AdamW, not jitted) and its inputs.

    Returns ``{"step": (params, opt_state, images, labels) -> (params, opt_state, loss), "loss_fn", "update":
    (grads, opt_state, params) -> (params, opt_state), "params", "opt_state", "images", "labels"}``. The
    keywords are the variants ``experiments/bench_vit_profile.py`` measures (the defaults are what ``mmjax`` users
    get): ``remat`` the blocks, the ``attention`` implementation (``None``:
    :func:`mmjax.attention.select_implementation`), the MLP ``activation``, and ``optimizer`` ``"adamw"``
    (``optax.adamw`` on the parameter tree) or ``"adamw_flat"`` (the same update on one flat vector,
    ``optax.flatten``).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from mmjax.vit import ViT

    if optimizer not in ("adamw", "adamw_flat"):
        raise ValueError(f"optimizer must be 'adamw' or 'adamw_flat', got {optimizer!r}")
    cfg = CONFIGS[config]
    model = ViT(
        variant=None,
        width=cfg["width"],
        depth=cfg["depth"],
        num_heads=cfg["heads"],
        mlp_dim=cfg["mlp"],
        patch_size=cfg["patch"],
        num_classes=cfg["classes"],
        head_zero_init=False,
        remat=remat,
        attention_implementation=attention,
        activation=activation,
    )
    rng = np.random.RandomState(0)
    images = jnp.asarray(rng.randn(cfg["batch"], cfg["image"], cfg["image"], cfg["channels"]).astype(np.float32))
    labels = jnp.asarray(rng.randint(0, cfg["classes"], cfg["batch"]))
    params = jax.jit(model.init)(jax.random.key(0), images)["params"]
    tx = optax.adamw(1e-3, weight_decay=0.05)
    if optimizer == "adamw_flat":
        tx = optax.flatten(tx)

    def loss_fn(p, x, y):
        logits, _ = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(0)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def update(grads, s, p):
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    def step(p, s, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        return (*update(grads, s, p), loss)

    return dict(
        step=step,
        loss_fn=loss_fn,
        update=update,
        params=params,
        opt_state=tx.init(params),
        images=images,
        labels=labels,
    )


def xla_flops(compiled) -> float:
    """FLOPs of one call of a compiled jax function by XLA's cost analysis (NaN when it has none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def bench_mmjax(config: str, steps: int, warmup: int, *, donate: bool = True, **variant) -> dict:
    """Side ``mmjax``: an mmjax ViT training step (jit, donated state unless ``donate=False``, optax AdamW); also
    XLA's FLOPs per step. ``variant``: the keywords of :func:`build_step`."""
    import jax

    s = build_step(config, **variant)
    step = jax.jit(s["step"], donate_argnums=(0, 1) if donate else ())
    images, labels = s["images"], s["labels"]
    compiled = step.lower(s["params"], s["opt_state"], images, labels).compile()
    state = {"p": s["params"], "s": s["opt_state"]}

    def one():
        state["p"], state["s"], loss = compiled(state["p"], state["s"], images, labels)
        loss.block_until_ready()

    return {**benchmarking.time_calls(one, steps=steps, warmup=warmup), "flops_per_step": xla_flops(compiled)}


def bench_torch(config: str, steps: int, warmup: int) -> dict:
    """Side ``torch``: the same ViT in PyTorch (transformers, CPU, one thread per core)."""
    import torch
    import transformers

    threads = benchmarking.torch_threads()
    cfg = CONFIGS[config]
    hf_config = transformers.ViTConfig(
        hidden_size=cfg["width"],
        num_hidden_layers=cfg["depth"],
        num_attention_heads=cfg["heads"],
        intermediate_size=cfg["mlp"],
        image_size=cfg["image"],
        patch_size=cfg["patch"],
        num_channels=cfg["channels"],
        num_labels=cfg["classes"],
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(hf_config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(cfg["batch"], cfg["channels"], cfg["image"], cfg["image"])
    y = torch.randint(0, cfg["classes"], (cfg["batch"],))
    loss_fn = torch.nn.CrossEntropyLoss()

    def one():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(pixel_values=x).logits, y)
        loss.backward()
        opt.step()

    timed = benchmarking.time_calls(one, steps=steps, warmup=warmup)
    return {**timed, "threads": threads, "attn": hf_config._attn_implementation, "torch": torch.__version__}


SIDES = {"mmjax": bench_mmjax, "torch": bench_torch, "peak": matmul_peak}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per process after the first")
    parser.add_argument("--rounds", type=int, default=3, help="processes per side, interleaved")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error(f"need --steps >= 1, --warmup >= 0, --rounds >= 1; got {args.steps}, {args.warmup}, {args.rounds}")
    names = list(MAIN_CONFIGS) if args.config == "all" else [args.config]
    info = benchmarking.machine()
    print(benchmarking.describe_machine(info), flush=True)
    peak_run = benchmarking.compare(__file__, ["peak"], {"steps": 5, "warmup": 2}, rounds=1)["sides"]["peak"]
    peak = 2 * 2048**3 / peak_run["wall_s"]["median"] if "wall_s" in peak_run else float("nan")
    print(f"matmul peak (2048^3 float32 jnp.dot, own process): {peak / 1e9:.1f} GFLOP/s")
    results = {"machine": info, "matmul_peak_flops": peak, "configs": {}}
    print(
        f"{'config':7} {'batch':>5} {'mmjax img/s (min-max)':>24} {'torch img/s (min-max)':>24} {'torch/mmjax time':>16}"
        f" {'GFLOP/step':>10} {'% peak':>7}"
    )
    for name in names:
        cfg = CONFIGS[name]
        options = {"config": name, "steps": args.steps, "warmup": args.warmup}
        res = benchmarking.compare(__file__, ["mmjax", "torch"], options, rounds=args.rounds)
        res["ratio_torch_time_over_mmjax"] = speed = benchmarking.ratio(res, "mmjax", "torch")
        results["configs"][name] = res

        def rate(side):
            s = res["sides"][side]
            if "error" in s:
                return f"error: {s['error']}"[:24]
            w = s["wall_s"]
            b = cfg["batch"]
            return f"{b / w['median']:.1f} ({b / w['max']:.0f}-{b / w['min']:.0f})"

        mm = res["sides"]["mmjax"]
        flops = mm["runs"][0]["flops_per_step"] if "runs" in mm and "error" not in mm else float("nan")
        pct = 100 * flops / mm["wall_s"]["median"] / peak if "wall_s" in mm else float("nan")
        ratio = f"{speed:.2f}" if speed else "-"
        print(
            f"{name:7} {cfg['batch']:5d} {rate('mmjax'):>24} {rate('torch'):>24} {ratio:>16} "
            f"{flops / 1e9:10.1f} {pct:6.1f}%  ({benchmarking.describe_load(res['load'])})",
            flush=True,
        )
    if args.json:
        benchmarking.write_json(args.json, results)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    benchmarking.main_or_side(SIDES, main)
