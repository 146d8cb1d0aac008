"""DiT training step and DDIM sampling, images/s: mmjax vs diffusers' DiTTransformer2DModel + DDIMScheduler.

Two workloads, both sides at the same sizes, batch and weights, float32:

* ``train``: one training step = draw ``t`` uniform in ``[0, 1000)`` and Gaussian noise, ``x_t = q_sample(x0, noise,
  t)`` (diffusers: ``scheduler.add_noise``), the DiT's epsilon prediction (labels dropped to the null class with
  probability 0.1, as both models do when training), mean squared error to the noise, backward, AdamW update; on a
  fixed random batch ``x0`` with random labels. mmjax: one ``jax.jit`` of all that (optax AdamW, donated state);
  PyTorch: the same with ``torch.optim.AdamW``. images/s = batch / step time.
* ``sample``: one whole DDIM run (eta 0, linear betas, no clipping, diffusers' other defaults) of ``--sample-steps``
  model calls from fixed noise, class-conditional, no guidance. mmjax: one ``jax.jit`` of
  :func:`mmjax.diffusion.sample` with the DiT as ``denoise_fn`` (one compiled ``lax.scan``); PyTorch:
  ``for t in scheduler.timesteps: x = scheduler.step(model(x, t, labels).sample, t, x).prev_sample`` under
  ``torch.inference_mode()``. images/s = sample batch / run time.

The model sizes are a diffusers ``DiTTransformer2DModel`` config; the mmjax DiT is built from it with
:func:`mmjax.convert.diffusers_dit.dit_options` (out_channels = in_channels on both sides, no learned sigma), so the
sizes cannot drift apart. The weights are drawn once in NumPy by diffusers' parameter names (every one, so no
adaLN-Zero zeros; one set of embedder weights repeated in every block) and loaded by each side (mmjax through
:func:`~mmjax.convert.diffusers_dit.from_diffusers_state_dict`): both compute the same function, and each side
reports a checksum of its final samples. (diffusers' parameter count is higher: it keeps a copy of the timestep and
label embedders in every block, each computed, and trained apart; mmjax's DiT has one.)

Command (a real measurement, on an idle machine)::

    .venv/bin/python experiments/bench_diffusion.py --json /tmp/bench_diffusion.json
    .venv/bin/python experiments/bench_diffusion.py --config s2 --json /tmp/bench_diffusion_s2.json   # GPU/TPU

mmjax runs on jax's default backend; PyTorch on CUDA when its build has it (with TF32 matmuls allowed, which XLA's
default float32 precision uses on a GPU too), else on the CPU with one thread per core (a TPU: mmjax on the TPU
against PyTorch on the host CPU). Each side prints the device it ran on.

Configs:
  small  32x32x4 latents, patch 4, width 128, depth 4, 4 heads, 10 classes; train batch 32, sample batch 16,
         50 DDIM steps (sized for the 2-core CPU; the default)
  s2     DiT-S/2 on 32x32x4 latents (width 384, depth 12, 6 heads), 1000 classes; train batch 256, sample batch 64,
         50 DDIM steps (for a GPU or TPU)
  tiny   8x8x4, patch 2, width 32, depth 1, 2 heads; batch 4, sample batch 2, 5 steps (for the tests)

``--batch``, ``--sample-batch``, ``--sample-steps``, ``--width``, ... override a config's value. Each side runs in a
process of its own, the two interleaved (``experiments/benchmarking.py``: ``--rounds`` processes per side and
workload, each ``--warmup`` untimed and ``--steps`` timed calls, a call being a training step or a whole sampling
run; median and min-max over all timed calls). The ratio is torch's median time / mmjax's, i.e. mmjax's images/s
over PyTorch's: above 1 when mmjax is faster.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmarking  # noqa: E402

SIZE_KEYS = ("image", "channels", "patch", "width", "depth", "heads", "classes")
CONFIGS = {
    "small": dict(
        image=32, channels=4, patch=4, width=128, depth=4, heads=4, classes=10, batch=32, sample_batch=16,
        sample_steps=50,
    ),
    "s2": dict(
        image=32, channels=4, patch=2, width=384, depth=12, heads=6, classes=1000, batch=256, sample_batch=64,
        sample_steps=50,
    ),
    "tiny": dict(
        image=8, channels=4, patch=2, width=32, depth=1, heads=2, classes=10, batch=4, sample_batch=2, sample_steps=5
    ),
}  # fmt: skip
WORKLOADS = ("train", "sample")
NUM_TRAIN_TIMESTEPS = 1000
DDIM = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False, eta=0.0)  # both sides
WEIGHT_STD = 0.02


def diffusers_config(cfg: dict) -> dict:
    """The ``DiTTransformer2DModel`` config of a benchmark config (diffusers' defaults otherwise)."""
    return dict(
        sample_size=cfg["image"],
        patch_size=cfg["patch"],
        in_channels=cfg["channels"],
        out_channels=cfg["channels"],
        num_layers=cfg["depth"],
        num_attention_heads=cfg["heads"],
        attention_head_dim=cfg["width"] // cfg["heads"],
        num_embeds_ada_norm=cfg["classes"],
    )


def make_weights(cfg: dict, seed: int = 0) -> dict:
    """``{diffusers name: float32 array}``, every weight N(0, 0.02^2); block 0's embedder copied to every block."""
    import numpy as np

    from mmjax.convert.diffusers_dit import expected_shapes

    rng = np.random.default_rng(seed)
    shapes = expected_shapes(diffusers_config(cfg))
    weights = {}
    for name in sorted(shapes):
        if ".norm1.emb." in name and not name.startswith("transformer_blocks.0."):
            continue  # a copy of block 0's embedder (below)
        weights[name] = (WEIGHT_STD * rng.standard_normal(shapes[name])).astype(np.float32)
    for name in shapes:
        if name not in weights:
            weights[name] = weights["transformer_blocks.0." + name.split(".", 2)[2]]
    return weights


def make_inputs(cfg: dict, workload: str, seed: int = 0):
    """``x [B, C, S, S]`` float32 (NCHW: data for ``train``, the starting noise for ``sample``) and ``labels [B]``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    batch = cfg["batch"] if workload == "train" else cfg["sample_batch"]
    x = rng.standard_normal((batch, cfg["channels"], cfg["image"], cfg["image"])).astype(np.float32)
    return x, rng.integers(0, cfg["classes"], batch).astype(np.int32)


def _check_workload(workload: str) -> None:
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")


def bench_mmjax(cfg: dict, workload: str, steps: int, warmup: int) -> dict:
    """Side ``mmjax``: a jitted DiT training step (optax AdamW) or a jitted DDIM run (``mmjax.diffusion.sample``)."""
    _check_workload(workload)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from mmjax import diffusion
    from mmjax.convert.diffusers_dit import from_diffusers_state_dict

    model, params = from_diffusers_state_dict(make_weights(cfg), diffusers_config(cfg))
    x, labels = make_inputs(cfg, workload)
    x, labels = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(labels)  # NHWC
    info = {"params": int(sum(p.size for p in jax.tree.leaves(params))), "device": jax.default_backend()}

    if workload == "sample":

        def run(p, noise, y):
            def denoise(x_t, t):
                return model.apply({"params": p}, x_t, t, labels=y)[0]

            return diffusion.sample(
                denoise,
                noise,
                sampler="ddim",
                num_steps=cfg["sample_steps"],
                num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                **DDIM,
            )

        compiled = jax.jit(run).lower(params, x, labels).compile()
        out = {}

        def one():
            out["x"] = compiled(params, x, labels).block_until_ready()

        timed = benchmarking.time_calls(one, steps=steps, warmup=warmup)
        checksum = float(np.asarray(out["x"], np.float64).sum())
        return {**timed, **info, "checksum": checksum}

    schedule = diffusion.make_schedule(DDIM["beta_schedule"], NUM_TRAIN_TIMESTEPS, DDIM["beta_start"], DDIM["beta_end"])
    tx = optax.adamw(1e-4, weight_decay=0.01)
    batch = x.shape[0]

    def loss_fn(p, x0, y, key):
        k_t, k_noise, k_drop = jax.random.split(key, 3)
        t = jax.random.randint(k_t, (batch,), 0, NUM_TRAIN_TIMESTEPS)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        x_t = diffusion.q_sample(schedule, x0, noise, t)
        pred, _ = model.apply({"params": p}, x_t, t, labels=y, deterministic=False, rngs={"cond_dropout": k_drop})
        return diffusion.diffusion_loss(schedule, pred, x0, noise, t).mean()

    def train_step(p, s, key, x0, y):
        key, sub = jax.random.split(key)
        loss, grads = jax.value_and_grad(loss_fn)(p, x0, y, sub)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, key, loss

    state = {"p": params, "s": tx.init(params), "key": jax.random.key(0)}
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(state["p"], state["s"], state["key"], x, labels)
    compiled = compiled.compile()

    def one():
        state["p"], state["s"], state["key"], loss = compiled(state["p"], state["s"], state["key"], x, labels)
        loss.block_until_ready()

    timed = benchmarking.time_calls(one, steps=steps, warmup=warmup)
    return {**timed, **info}


def bench_torch(cfg: dict, workload: str, steps: int, warmup: int) -> dict:
    """Side ``torch``: diffusers' ``DiTTransformer2DModel``, a training step (``torch.optim.AdamW``) or a
    ``DDIMScheduler`` sampling loop (on CUDA when torch has it, else the CPU with one thread per core)."""
    _check_workload(workload)
    import diffusers
    import torch

    threads = benchmarking.torch_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, as XLA's default precision uses on a GPU
    model = diffusers.DiTTransformer2DModel(**diffusers_config(cfg))
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in make_weights(cfg).items()}, strict=True)
    model.to(device)
    x, labels = make_inputs(cfg, workload)
    x, labels = torch.from_numpy(x).to(device), torch.from_numpy(labels).long().to(device)
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, **{k: v for k, v in DDIM.items() if k != "eta"}
    )
    n_params = sum(p.numel() for p in model.parameters())
    info = {"params": int(n_params), "device": device.type, "threads": threads}
    info |= {"torch": torch.__version__, "diffusers": diffusers.__version__}

    if workload == "sample":
        model.eval()
        out = {}

        def one():
            with torch.inference_mode():
                scheduler.set_timesteps(cfg["sample_steps"])
                sample = x
                for t in scheduler.timesteps:
                    timestep = t.to(device).expand(sample.shape[0])
                    pred = model(sample, timestep=timestep, class_labels=labels).sample
                    sample = scheduler.step(pred, t, sample, eta=DDIM["eta"]).prev_sample
                sync()
            out["x"] = sample

        timed = benchmarking.time_calls(one, steps=steps, warmup=warmup)
        return {**timed, **info, "checksum": float(out["x"].double().sum().cpu())}

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    batch = x.shape[0]

    def one():
        opt.zero_grad(set_to_none=True)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), device=device)
        noise = torch.randn_like(x)
        x_t = scheduler.add_noise(x, noise, t)
        pred = model(x_t, timestep=t, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        sync()

    return {**benchmarking.time_calls(one, steps=steps, warmup=warmup), **info}


SIDES = {"mmjax": bench_mmjax, "torch": bench_torch}


def main(argv: list[str] | None = None) -> dict:
    """Runs both sides of each workload, interleaved, each in its own process; prints (and optionally writes) the
    results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="small", help="model sizes and batches")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {WORKLOADS}")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per process (train steps or sampling runs)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per process after compilation")
    parser.add_argument("--rounds", type=int, default=3, help="processes per side and workload, interleaved")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: the config's)")
    parser.add_argument("--sample-batch", type=int, default=None, help="images per sampling run (the config's)")
    parser.add_argument("--sample-steps", type=int, default=None, help="DDIM steps per sampling run (the config's)")
    for key in SIZE_KEYS:
        parser.add_argument(f"--{key}", type=int, default=None, help=f"override the config's {key}")
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    cfg = dict(CONFIGS[args.config])
    for key in (*SIZE_KEYS, "batch", "sample_batch", "sample_steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    workloads = [w for w in args.workloads.split(",") if w]
    if not workloads or any(w not in WORKLOADS for w in workloads):
        parser.error(f"--workloads must name workloads from {WORKLOADS}, got {args.workloads!r}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or min(cfg.values()) < 1:
        parser.error(
            f"need --steps >= 1, --warmup >= 0, --rounds >= 1 and positive sizes; got {args.steps}, {args.warmup}, "
            f"{args.rounds}, {cfg}"
        )
    if cfg["width"] % cfg["heads"] or cfg["image"] % cfg["patch"]:
        parser.error(f"need width divisible by heads and image by patch; got {cfg}")
    info = benchmarking.machine()
    print(benchmarking.describe_machine(info), flush=True)
    print(f"config {args.config}: {cfg}; DDIM {DDIM}", flush=True)
    results = {"machine": info, "config": args.config, "sizes": cfg, "ddim": DDIM, "workloads": {}}
    for workload in workloads:
        batch = cfg["batch"] if workload == "train" else cfg["sample_batch"]
        what = "train step" if workload == "train" else f"DDIM sampling, {cfg['sample_steps']} steps"
        print(f"\n{what}, batch {batch}", flush=True)
        options = {"cfg": cfg, "workload": workload, "steps": args.steps, "warmup": args.warmup}
        res = benchmarking.compare(__file__, ["mmjax", "torch"], options, rounds=args.rounds)
        for side in ("mmjax", "torch"):
            s = res["sides"][side]
            if "error" in s:
                print(f"  {side:6}: error: {s['error']}", flush=True)
                continue
            w, run = s["wall_s"], s["runs"][0]
            extra = f", {run['device']}"
            if side == "torch":
                extra += f", torch {run['torch']}, diffusers {run['diffusers']}, {run['threads']} threads"
            check = f", checksum {run['checksum']:.6g}" if "checksum" in run else ""
            print(
                f"  {side:6}: {batch / w['median']:9.2f} images/s ({batch / w['max']:.2f}-{batch / w['min']:.2f}; "
                f"{w['median'] * 1e3:.1f} ms per {'step' if workload == 'train' else 'run'}, {run['params']} "
                f"params{check}{extra})",
                flush=True,
            )
        speed = benchmarking.ratio(res, "mmjax", "torch")
        res["ratio_torch_time_over_mmjax"] = speed
        if speed:
            print(f"  mmjax / torch images/s: {speed:.2f} ({'mmjax faster' if speed > 1 else 'mmjax slower'})")
        print(f"  {benchmarking.describe_load(res['load'])}", flush=True)
        results["workloads"][workload] = res
    if args.json:
        benchmarking.write_json(args.json, results)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    benchmarking.main_or_side(SIDES, main)
