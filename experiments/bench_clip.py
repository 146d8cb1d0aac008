"""Training-step throughput of a small CLIP in mmjax vs PyTorch (transformers' ``CLIPModel(return_loss=True)``).

One training step = forward of both towers + symmetric contrastive loss + backward + AdamW update, on a fixed random
batch of image-text pairs, float32, on the CPU. Both models have the same sizes (the Fashion-MNIST captions job,
:mod:`experiments.clip_fashion_mnist`): 64 px images, patch 8, vision width 128 / depth 4 / 4 heads / MLP 512, text
width 128 / depth 2 / 4 heads / MLP 512 / 16 positions, a 64-word vocabulary, embeddings of 128, quick_gelu, batch
256. The Hugging Face model is built from ``mmjax.clip.CLIPConfig.to_hf_dict()``, so the sizes cannot drift apart.

Command::

    .venv/bin/python experiments/bench_clip.py --steps 10 --json /tmp/bench_clip.json

Each side runs in a process of its own, the two interleaved (``experiments/benchmarking.py``: ``--rounds``
processes per side, each ``--warmup`` untimed and ``--steps`` timed steps). Prints pairs/s of both (median and
min-max over all timed steps), torch's median step time / mmjax's (above 1 when mmjax is faster), the machine and
whether other processes loaded it meanwhile.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmarking  # noqa: E402

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
    """Side ``mmjax``: an mmjax CLIP training step (jit, optax AdamW)."""
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

    n_params = sum(x.size for x in jax.tree.leaves(params))
    return {**benchmarking.time_calls(run, steps=steps, warmup=warmup), "params": int(n_params)}


def bench_torch(batch: int, steps: int, warmup: int) -> dict:
    """Side ``torch``: a transformers ``CLIPModel`` training step (``return_loss=True``, ``torch.optim.AdamW``)."""
    import torch
    import transformers

    threads = benchmarking.torch_threads()

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

    n_params = sum(p.numel() for p in model.parameters())
    timed = benchmarking.time_calls(run, steps=steps, warmup=warmup)
    return {**timed, "params": int(n_params), "torch": torch.__version__, "threads": threads}


SIDES = {"mmjax": bench_mmjax, "torch": bench_torch}


def main(argv=None) -> dict:
    """Runs both sides, interleaved, each in its own process; prints (and optionally writes) the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per process after the first")
    parser.add_argument("--rounds", type=int, default=3, help="processes per side, interleaved")
    parser.add_argument("--batch", type=int, default=256, help="pairs per step")
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.batch < 2:
        parser.error(
            f"need --steps >= 1, --warmup >= 0, --rounds >= 1, --batch >= 2; got {args.steps}, {args.warmup}, "
            f"{args.rounds}, {args.batch}"
        )
    info = benchmarking.machine()
    print(benchmarking.describe_machine(info), flush=True)
    options = {"batch": args.batch, "steps": args.steps, "warmup": args.warmup}
    res = benchmarking.compare(__file__, ["mmjax", "torch"], options, rounds=args.rounds)
    for side in ("mmjax", "torch"):
        s = res["sides"][side]
        if "error" in s:
            print(f"{side:6}: error: {s['error']}")
            continue
        w, run = s["wall_s"], s["runs"][0]
        extra = f", torch {run['torch']}, {run['threads']} threads" if side == "torch" else ""
        print(
            f"{side:6}: {args.batch / w['median']:8.1f} pairs/s ({args.batch / w['max']:.0f}-{args.batch / w['min']:.0f}"
            f"; {w['median'] * 1e3:.0f} ms/step, {run['params']} params{extra})",
            flush=True,
        )
    speed = benchmarking.ratio(res, "mmjax", "torch")
    result = {"machine": info, "sizes": SIZES, **res, "ratio_torch_time_over_mmjax": speed}
    if speed:
        print(f"torch / mmjax step time: {speed:.2f} ({'mmjax faster' if speed > 1 else 'mmjax slower'})")
    print(benchmarking.describe_load(res["load"]))
    if args.json:
        benchmarking.write_json(args.json, result)
    return result


if __name__ == "__main__":
    benchmarking.main_or_side(SIDES, main)
