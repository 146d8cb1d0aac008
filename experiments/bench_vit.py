"""Training-step throughput of a ViT in mmjax vs PyTorch (transformers' ViTForImageClassification), in one run.

A training step is forward + backward + AdamW update on a fixed random batch, float32, on the CPU. Also reported:
mmjax's achieved FLOP/s (XLA's cost analysis of the compiled step) against a matmul peak measured in the same run
(a large float32 ``jnp.dot``).

Command::

    .venv/bin/python experiments/bench_vit.py --config all --steps 10 --json /tmp/bench_vit.json

Configs:
  fmnist  28 px, 1 channel, patch 4, width 192, depth 6, 3 heads, MLP 768, 10 classes, batch 128
          (the Fashion-MNIST ViT; PyTorch runs about 110-130 images/s on the 2-core CPU)
  ti16    ViT-Ti/16 at 224 px, 3 channels, 1000 classes, batch 16

Expected: mmjax at least as fast as PyTorch on both (ratio ours / torch >= 1). Timings taken while other
processes share the cores are pessimistic for both sides; the images per CPU-second columns (process CPU time,
all threads) are the less contention-sensitive comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

CONFIGS = {
    "fmnist": dict(image=28, channels=1, patch=4, width=192, depth=6, heads=3, mlp=768, classes=10, batch=128),
    "ti16": dict(image=224, channels=3, patch=16, width=192, depth=12, heads=3, mlp=768, classes=1000, batch=16),
}


def _timeit(step, steps: int, warmup: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds (all threads) per call of ``step()``, which must block
    until done, over ``steps`` calls after ``warmup``. CPU seconds are less sensitive to other processes sharing
    the cores than wall time."""
    for _ in range(warmup):
        step()
    walls, cpus = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]


def matmul_peak(n: int = 2048, steps: int = 5) -> float:
    """FLOP/s of an ``n x n`` float32 matmul with jax (2 n^3 FLOPs per product)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    seconds, _ = _timeit(lambda: f(a, b).block_until_ready(), steps, warmup=2)
    return 2 * n**3 / seconds


def bench_mmjax(cfg: dict, steps: int) -> dict:
    """images/s and FLOP/s of an mmjax ViT training step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from mmjax.vit import ViT

    model = ViT(
        variant=None,
        width=cfg["width"],
        depth=cfg["depth"],
        num_heads=cfg["heads"],
        mlp_dim=cfg["mlp"],
        patch_size=cfg["patch"],
        num_classes=cfg["classes"],
        head_zero_init=False,
    )
    rng = np.random.RandomState(0)
    images = jnp.asarray(rng.randn(cfg["batch"], cfg["image"], cfg["image"], cfg["channels"]).astype(np.float32))
    labels = jnp.asarray(rng.randint(0, cfg["classes"], cfg["batch"]))
    params = jax.jit(model.init)(jax.random.key(0), images)["params"]
    tx = optax.adamw(1e-3, weight_decay=0.05)
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        logits, _ = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(0)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(p, s, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))
    compiled = step.lower(params, opt_state, images, labels).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    state = {"p": params, "s": opt_state}

    def one():
        state["p"], state["s"], loss = compiled(state["p"], state["s"], images, labels)
        loss.block_until_ready()

    seconds, cpu = _timeit(one, steps, warmup=2)
    return dict(
        images_per_s=cfg["batch"] / seconds,
        images_per_cpu_s=cfg["batch"] / cpu,
        step_s=seconds,
        flops_per_step=flops,
        flops_per_s=flops / seconds,
    )


def bench_torch(cfg: dict, steps: int) -> dict:
    """images/s of the same ViT in PyTorch (transformers, CPU, all threads)."""
    import torch
    import transformers

    config = transformers.ViTConfig(
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
    model = transformers.ViTForImageClassification(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(cfg["batch"], cfg["channels"], cfg["image"], cfg["image"])
    y = torch.randint(0, cfg["classes"], (cfg["batch"],))
    loss_fn = torch.nn.CrossEntropyLoss()

    def one():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(pixel_values=x).logits, y)
        loss.backward()
        opt.step()

    seconds, cpu = _timeit(one, steps, warmup=2)
    return dict(
        images_per_s=cfg["batch"] / seconds,
        images_per_cpu_s=cfg["batch"] / cpu,
        step_s=seconds,
        threads=torch.get_num_threads(),
        attn=config._attn_implementation,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per framework (median reported)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    names = list(CONFIGS) if args.config == "all" else [args.config]

    import jax

    peak = matmul_peak()
    results = {"device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "matmul_peak_flops": peak, "configs": {}}
    print(
        f"matmul peak (2048^2 f32 jnp.dot): {peak / 1e9:.1f} GFLOP/s on {os.cpu_count()} CPU cores; "
        f"load average {os.getloadavg()[0]:.1f} (timings shared with other processes are pessimistic)"
    )
    results["load_average"] = os.getloadavg()[0]
    header = (
        f"{'config':8} {'batch':>5} {'mmjax img/s':>12} {'torch img/s':>12} {'ours/torch':>10} "
        f"{'img/cpu-s ours':>14} {'torch':>6} {'ratio':>6} {'GFLOP/step':>10} {'GFLOP/s':>8} {'% peak':>7}"
    )
    rows = []
    for name in names:
        cfg = CONFIGS[name]
        ours = bench_mmjax(cfg, args.steps)
        theirs = bench_torch(cfg, args.steps)
        ratio = ours["images_per_s"] / theirs["images_per_s"]
        cpu_ratio = ours["images_per_cpu_s"] / theirs["images_per_cpu_s"]
        results["configs"][name] = dict(config=cfg, mmjax=ours, torch=theirs, ratio=ratio, cpu_ratio=cpu_ratio)
        rows.append(
            f"{name:8} {cfg['batch']:5d} {ours['images_per_s']:12.1f} {theirs['images_per_s']:12.1f} "
            f"{ratio:10.2f} {ours['images_per_cpu_s']:14.1f} {theirs['images_per_cpu_s']:6.1f} "
            f"{cpu_ratio:6.2f} {ours['flops_per_step'] / 1e9:10.1f} {ours['flops_per_s'] / 1e9:8.1f} "
            f"{100 * ours['flops_per_s'] / peak:6.1f}%"
        )
        print(rows[-1] if len(rows) > 1 else header + "\n" + rows[-1], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
