"""Training-step throughput of a small CLIP in mmjax vs PyTorch (transformers' ``CLIPModel(return_loss=True)``).

One training step = forward of both towers + symmetric contrastive loss + backward + AdamW update, on a fixed random
batch of image-text pairs, float32, on the CPU. Both models have the same sizes (the Fashion-MNIST captions job,
:mod:`experiments.clip_fashion_mnist`): 64 px images, patch 8, vision width 128 / depth 4 / 4 heads / MLP 512, text
width 128 / depth 2 / 4 heads / MLP 512 / 16 positions, a 64-word vocabulary, embeddings of 128, quick_gelu, batch
256. The Hugging Face model is built from ``mmjax.clip.CLIPConfig.to_hf_dict()``, so the sizes cannot drift apart.

Command::

    .venv/bin/python experiments/bench_clip.py --steps 10 --json /tmp/bench_clip.json

Prints pairs/s for both (median step wall time), the ratio ours / torch (target >= 1.0) and the same ratio in
pairs per process-CPU-second (all threads), which is less sensitive to other processes sharing the cores. Timings
taken while other jobs run on the machine are pessimistic for both sides.
"""

from __future__ import annotations

import argparse
import json
import time

SIZES = dict(
    embed_dim=128,
    image_size=64,
    patch_size=8,
    vision_width=128,
    vision_depth=4,
    vision_heads=4,
    vision_mlp_dim=512,
    vocab_size=64,
    context_length=16,
    text_width=128,
    text_depth=2,
    text_heads=4,
    text_mlp_dim=512,
    eot_id=3,
)


def _timeit(step, steps: int, warmup: int) -> tuple[float, float]:
    """Median wall seconds and median process-CPU seconds per call of ``step()`` (which blocks until done)."""
    for _ in range(warmup):
        step()
    walls, cpus = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]


def make_batch(batch: int, seed: int = 0):
    """Random ``images float32 [B, 64, 64, 3]`` and ``ids int32 [B, 16]`` (start 2, words, end-of-text 3, pad 0)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, SIZES["image_size"], SIZES["image_size"], 3)).astype(np.float32)
    ids = np.zeros((batch, SIZES["context_length"]), np.int32)
    lengths = rng.integers(6, SIZES["context_length"] - 1, batch)
    for i, n in enumerate(lengths):
        ids[i, 0] = 2
        ids[i, 1:n] = rng.integers(4, SIZES["vocab_size"], n - 1)
        ids[i, n] = SIZES["eot_id"]
    return images, ids


def bench_mmjax(batch: int, steps: int, warmup: int) -> dict:
    """pairs/s of an mmjax CLIP training step (jit, donated state, optax AdamW)."""
    import jax
    import jax.numpy as jnp
    import optax

    from mmjax.clip import CLIP, CLIPConfig
    from mmjax.losses import softmax_contrastive_loss

    cfg = CLIPConfig(**SIZES)
    model = CLIP(cfg)
    images, ids = (jnp.asarray(a) for a in make_batch(batch))
    params = jax.jit(model.init)(jax.random.key(0), images[:2], ids[:2])["params"]
    tx = optax.adamw(1e-3, weight_decay=0.05)
    opt_state = tx.init(params)

    def loss_fn(p, x, t):
        out = model.apply({"params": p}, x, t)
        return softmax_contrastive_loss(out.image_embeds, out.text_embeds, jnp.log(out.logit_scale))

    @jax.jit
    def step(p, o, x, t):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, t)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    state = {"p": params, "o": opt_state}

    def run():
        state["p"], state["o"], loss = step(state["p"], state["o"], images, ids)
        loss.block_until_ready()

    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    wall, cpu = _timeit(run, steps, warmup)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return {
        "pairs_per_s": batch / wall,
        "pairs_per_cpu_s": batch / cpu,
        "step_s": wall,
        "first_step_s": compile_s,
        "params": int(n_params),
    }


def bench_torch(batch: int, steps: int, warmup: int) -> dict:
    """pairs/s of a transformers ``CLIPModel`` training step with ``return_loss=True`` and ``torch.optim.AdamW``."""
    import torch
    import transformers

    from mmjax.clip import CLIPConfig

    hf_config = transformers.CLIPConfig.from_dict(CLIPConfig(**SIZES).to_hf_dict())
    torch.manual_seed(0)
    model = transformers.CLIPModel(hf_config).train()
    images, ids = make_batch(batch)
    pixel_values = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    input_ids = torch.from_numpy(ids).long()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    def run():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
        out.loss.backward()
        opt.step()

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    wall, cpu = _timeit(run, steps, warmup)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "pairs_per_s": batch / wall,
        "pairs_per_cpu_s": batch / cpu,
        "step_s": wall,
        "first_step_s": first,
        "params": int(n_params),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> dict:
    """Runs both benchmarks and prints (and optionally writes) the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per framework (median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compile) step")
    parser.add_argument("--batch", type=int, default=256, help="pairs per step")
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 2:
        parser.error(f"--steps must be >= 1 and --batch >= 2, got {args.steps} and {args.batch}")
    ours = bench_mmjax(args.batch, args.steps, args.warmup)
    print(
        f"mmjax : {ours['pairs_per_s']:8.1f} pairs/s  ({ours['step_s'] * 1e3:.0f} ms/step, "
        f"{ours['pairs_per_cpu_s']:.1f} pairs/CPU-s, {ours['params']} params)",
        flush=True,
    )
    ref = bench_torch(args.batch, args.steps, args.warmup)
    print(
        f"torch : {ref['pairs_per_s']:8.1f} pairs/s  ({ref['step_s'] * 1e3:.0f} ms/step, "
        f"{ref['pairs_per_cpu_s']:.1f} pairs/CPU-s, {ref['params']} params, torch {ref['torch']}, "
        f"{ref['threads']} threads)",
        flush=True,
    )
    result = {
        "sizes": SIZES,
        "batch": args.batch,
        "steps": args.steps,
        "mmjax": ours,
        "torch": ref,
        "ratio_ours_over_torch": ours["pairs_per_s"] / ref["pairs_per_s"],
        "ratio_per_cpu_second": ours["pairs_per_cpu_s"] / ref["pairs_per_cpu_s"],
    }
    print(
        f"ratio ours/torch: {result['ratio_ours_over_torch']:.2f} (wall), "
        f"{result['ratio_per_cpu_second']:.2f} (per CPU-second)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
