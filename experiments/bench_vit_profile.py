"""Where the CPU time of a ViT training step goes, and what each candidate speed-up measures.

Two parts (``--part breakdown|variants|all``), for a config of ``bench_vit.py`` (``fmnist``: batch 128 of 28 px,
patch 4, width 192, depth 6, 3 heads; ``ti16``: ViT-Ti/16 at 224 px, batch 16):

* ``breakdown`` (one process; per-op timing): the step's parts jitted and timed alone - the whole step (forward +
  backward + AdamW), forward + backward, forward, the AdamW update, one encoder block forward + backward (times the
  depth), inside a block the attention and MLP sublayers, the query/key/value projections (three ``DenseGeneral``
  or one fused matmul), the attention core per implementation (``chunked``, ``reference``, ``xla``) and a bare
  ``softmax(q k^T / sqrt(d)) v`` on heads-major (``BNTH``) operands without the guards for masks and empty rows,
  the LayerNorm and the GELU; the share of the step
  each takes, and XLA's FLOP/s for each. Then the census of the compiled step's optimised HLO (how many fusions,
  dots, copies, transposes, custom calls).
* ``variants`` (the harness, ``experiments/benchmarking.py``): the whole step under each variant, every variant a
  process of its own, interleaved with ``base`` (what ``mmjax`` users get) round after round; median step time and
  ``base / variant`` (above 1: the variant is faster). Variants: no buffer donation, remat, each attention
  implementation, the tanh GELU, AdamW on one flat vector (``optax.flatten``), XLA:CPU options (XNNPACK and oneDNN
  dots and fusions, the XNNPACK graph fusion, the concurrency-optimised scheduler, the thunk runtime off) and malloc
  without huge pages.

Command (idle machine; 6 min 38 s for ``fmnist`` with every variant and ``--rounds 2`` here)::

    .venv/bin/python experiments/bench_vit_profile.py --config fmnist --json /tmp/profile_fmnist.json

What it measured on the 2-core AMD EPYC (2026-12-07) is in the README ("Where a ViT training step's time goes"): the
attention core is where the time above the matmul floor goes (17.5% / 33% of the step for the Fashion-MNIST ViT /
ViT-Ti/16, at 17.5% / 30% of the matmul peak), and no variant beats the default beyond the process-to-process spread.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_vit  # noqa: E402
import benchmarking  # noqa: E402

# name: (bench_vit.bench_mmjax keywords, environment of the side's process or None for the harness's)
VARIANTS = {
    "base": ({}, None),
    "no_donate": ({"donate": False}, None),
    "remat": ({"remat": True}, None),
    "attn_reference": ({"attention": "reference"}, None),
    "attn_xla": ({"attention": "xla"}, None),
    "gelu_tanh": ({"activation": "gelu_tanh"}, None),
    "adamw_flat": ({"optimizer": "adamw_flat"}, None),
    "xnnpack": ({}, {"XLA_FLAGS": "--xla_cpu_use_xnnpack=true"}),
    "xnn_fusion": ({}, {"XLA_FLAGS": "--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type=dot,eltwise"}),
    "xnn_graph": ({}, {"XLA_FLAGS": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"}),
    "onednn": ({}, {"XLA_FLAGS": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise"}),
    "ynn_fusion": ({}, {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"}),
    "concurrency_scheduler": ({}, {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"}),
    "no_thunk_runtime": ({}, {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false"}),
    "no_hugepages": ({}, {"GLIBC_TUNABLES": ""}),
}
_MARK = "MMJAX_PROFILE_VARIANT"


def run_variant(name: str, config: str, steps: int, warmup: int) -> dict:
    """Side ``name``: the step of ``config`` under that variant (re-executes this process with the variant's
    environment first when it has one: ``GLIBC_TUNABLES`` is read at start-up, ``XLA_FLAGS`` when jax starts)."""
    kwargs, env = VARIANTS[name]
    if env and os.environ.get(_MARK) != name:
        new = dict(os.environ, **env)
        new[_MARK] = name
        os.execve(sys.executable, [sys.executable, *sys.argv], new)
    out = bench_vit.bench_mmjax(config, steps, warmup, **kwargs)
    return {**out, "xla_flags": os.environ.get("XLA_FLAGS", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}


SIDES = {name: (lambda n: lambda **o: run_variant(n, **o))(name) for name in VARIANTS}


def _timed(fn, args, steps: int, warmup: int):
    """Median wall seconds of the jitted ``fn(*args)`` and XLA's FLOPs per call; and the compiled function."""
    import jax

    compiled = jax.jit(fn).lower(*args).compile()
    t = benchmarking.time_calls(lambda: jax.block_until_ready(compiled(*args)), steps=steps, warmup=warmup)
    return {"median_s": benchmarking.summary(t["wall_s"])["median"], "flops": bench_vit.xla_flops(compiled)}, compiled


def hlo_census(hlo_text: str) -> dict:
    """Counts of the instructions of an optimised HLO module by opcode (fusions also by kind).

    >>> hlo_census("  %a = f32[2]{0} fusion(f32[2]{0} %x), kind=kLoop, calls=%f\\n  %d = f32[2,2]{1,0} dot(%a, %b)")
    {'dot': 1, 'fusion': 1, 'fusion:kLoop': 1}
    """
    counts: dict[str, int] = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][a-z\-]*)\(", line)
        if not m:
            continue
        op = m.group(1)
        counts[op] = counts.get(op, 0) + 1
        if op == "fusion":
            kind = re.search(r"kind=(\w+)", line)
            key = f"fusion:{kind.group(1) if kind else '?'}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def breakdown(config: str, steps: int = 10, warmup: int = 3) -> dict:
    """Per-part timings of ``config``'s step in this process (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from mmjax.attention import dot_product_attention
    from mmjax.layer_norm import LayerNorm
    from mmjax.layers import EncoderBlock, EncoderConfig, get_activation

    cfg = bench_vit.CONFIGS[config]
    B, W, N, M, D = cfg["batch"], cfg["width"], cfg["heads"], cfg["mlp"], cfg["depth"]
    T = (cfg["image"] // cfg["patch"]) ** 2 + 1
    H = W // N
    rng = np.random.RandomState(0)

    def normal(*shape):
        return jnp.asarray(rng.randn(*shape).astype(np.float32))

    vit = bench_vit.build_step(config)
    params, opt_state, images, labels = (vit[k] for k in ("params", "opt_state", "images", "labels"))
    step, loss_fn, update = vit["step"], vit["loss_fn"], vit["update"]

    def part(module, *xs):
        """Forward + backward of ``module`` on ``xs`` (gradients of its variables and inputs), and its arguments."""

        def f(v, *a):
            y = module.apply(v, *a)
            return jnp.sum(y * y)  # a cotangent that is not all ones

        variables = jax.jit(module.init)(jax.random.key(1), *xs)
        return jax.value_and_grad(f, argnums=tuple(range(len(xs) + 1))), (variables, *xs)

    x = normal(B, T, W)
    enc = EncoderConfig(num_heads=N, mlp_dim=M, width=W)
    parts = {}
    parts["step (fwd + bwd + AdamW)"] = (step, (params, opt_state, images, labels), 1)
    parts["fwd + bwd"] = (jax.value_and_grad(loss_fn), (params, images, labels), 1)
    parts["fwd"] = (loss_fn, (params, images, labels), 1)
    parts["AdamW update"] = (update, (jax.tree.map(jnp.ones_like, params), opt_state, params), 1)
    fn, args = part(EncoderBlock(config=enc), x)
    parts["encoder block fwd + bwd"] = (fn, args, D)

    class AttentionSublayer(nn.Module):
        @nn.compact
        def __call__(self, h):
            from mmjax.attention import MultiHeadAttention

            return MultiHeadAttention(num_heads=N)(LayerNorm(epsilon=1e-6)(h))

    class MlpSublayer(nn.Module):
        @nn.compact
        def __call__(self, h):
            h = nn.Dense(M)(LayerNorm(epsilon=1e-6)(h))
            return nn.Dense(W)(get_activation("gelu")(h))

    class Qkv(nn.Module):
        fused: bool

        @nn.compact
        def __call__(self, h):
            if self.fused:
                y = nn.Dense(3 * W)(h)
                return y.reshape(B, T, 3, N, H).sum(axis=2)
            dense = [nn.DenseGeneral((N, H), name=n) for n in ("query", "key", "value")]
            return sum(d(h) for d in dense)

    fn, args = part(AttentionSublayer(), x)
    parts["  attention sublayer (LN, QKV, core, out)"] = (fn, args, D)
    fn, args = part(Qkv(fused=False), x)
    parts["    QKV as three DenseGeneral"] = (fn, args, D)
    fn, args = part(Qkv(fused=True), x)
    parts["    QKV as one fused Dense"] = (fn, args, D)
    q, k, v = normal(B, T, N, H), normal(B, T, N, H), normal(B, T, N, H)

    def core(impl):
        def f(q, k, v):
            return jnp.sum(dot_product_attention(q, k, v, implementation=impl) ** 2)

        return jax.value_and_grad(f, argnums=(0, 1, 2))

    def core_bnth(q, k, v):
        qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
        w = jax.nn.softmax(jnp.einsum("bnth,bnsh->bnts", qt, kt) / jnp.sqrt(H), axis=-1)
        return jnp.sum(jnp.swapaxes(jnp.einsum("bnts,bnsh->bnth", w, vt), 1, 2) ** 2)

    for impl in ("chunked", "reference", "xla"):
        parts[f"    attention core {impl}"] = (core(impl), (q, k, v), D)
    parts["    attention core, bare softmax in BNTH (no mask guards)"] = (
        jax.value_and_grad(core_bnth, argnums=(0, 1, 2)),
        (q, k, v),
        D,
    )
    fn, args = part(MlpSublayer(), x)
    parts["  MLP sublayer (LN, dense, GELU, dense)"] = (fn, args, D)
    fn, args = part(LayerNorm(epsilon=1e-6), x)
    parts["    LayerNorm"] = (fn, args, 2 * D)
    g = normal(B, T, M)
    parts["    GELU (exact)"] = (jax.value_and_grad(lambda a: jnp.sum(get_activation("gelu")(a) ** 2)), (g,), D)
    parts["    GELU (tanh)"] = (jax.value_and_grad(lambda a: jnp.sum(get_activation("gelu_tanh")(a) ** 2)), (g,), D)

    results = {}
    step_s = step_hlo = None
    for name, (fn, args, count) in parts.items():
        r, compiled = _timed(fn, args, steps, warmup)
        if step_s is None:  # the first part is the whole step
            step_s, step_hlo = r["median_s"], compiled.as_text()
        results[name] = {**r, "count": count, "share_of_step": r["median_s"] * count / step_s}
    return {"config": config, "parts": results, "hlo_census": hlo_census(step_hlo)}


def print_breakdown(res: dict, peak: float) -> None:
    print(f"\nbreakdown of the {res['config']} step (one process; x n = times per step)")
    print(f"{'part':58} {'ms':>8} {'x n':>4} {'% of step':>9} {'GFLOP/s':>8} {'% peak':>6}")
    for name, r in res["parts"].items():
        rate = r["flops"] / r["median_s"]
        print(
            f"{name:58} {1e3 * r['median_s']:8.2f} {r['count']:4d} {100 * r['share_of_step']:8.1f}%"
            f" {rate / 1e9:8.1f} {100 * rate / peak:5.1f}%"
        )
    census = res["hlo_census"]
    keys = ("fusion", "dot", "convolution", "custom-call", "copy", "transpose", "reduce", "while")
    print("optimised HLO of the step: " + ", ".join(f"{k} {census.get(k, 0)}" for k in keys))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(bench_vit.CONFIGS), default="fmnist")
    parser.add_argument("--part", choices=("breakdown", "variants", "all"), default="all")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="processes per variant, interleaved")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if "base" not in names:
        names.insert(0, "base")
    info = benchmarking.machine()
    print(benchmarking.describe_machine(info), flush=True)
    peak_run = benchmarking.compare(bench_vit.__file__, ["peak"], {"steps": 5, "warmup": 2}, rounds=1)
    peak = 2 * 2048**3 / peak_run["sides"]["peak"]["wall_s"]["median"]
    print(f"matmul peak (2048^3 float32 jnp.dot, own process): {peak / 1e9:.1f} GFLOP/s", flush=True)
    out = {"machine": info, "matmul_peak_flops": peak, "config": args.config}
    if args.part in ("breakdown", "all"):
        res = benchmarking.compare(__file__, ["breakdown"], {"config": args.config}, rounds=1)
        side = res["sides"]["breakdown"]
        if "error" in side:
            raise SystemExit(f"breakdown failed: {side['error']}")
        out["breakdown"] = side["runs"][0] | {"load": res["load"]}
        print_breakdown(out["breakdown"], peak)
        print(f"({benchmarking.describe_load(res['load'])})", flush=True)
    if args.part in ("variants", "all"):
        options = {"config": args.config, "steps": args.steps, "warmup": args.warmup}
        res = benchmarking.compare(__file__, names, options, rounds=args.rounds)
        out["variants"] = res
        batch = bench_vit.CONFIGS[args.config]["batch"]
        print(f"\nvariants of the {args.config} step ({args.rounds} interleaved processes each, {args.steps} steps)")
        print(f"{'variant':24} {'ms/step (min-max)':>24} {'img/s':>7} {'base/variant':>12}")
        for name in names:
            s = res["sides"][name]
            if "error" in s:
                print(f"{name:24} error: {s['error'][:90]}")
                continue
            w = s["wall_s"]
            r = benchmarking.ratio(res, name, "base")
            print(
                f"{name:24} {1e3 * w['median']:9.1f} ({1e3 * w['min']:.1f}-{1e3 * w['max']:.1f})"
                f" {batch / w['median']:7.1f} {r:12.3f}"
            )
        print(f"({benchmarking.describe_load(res['load'])})", flush=True)
    if args.json:
        benchmarking.write_json(args.json, out)
        print(f"wrote {args.json}")
    return out


SIDES["breakdown"] = lambda config: breakdown(config)

if __name__ == "__main__":
    benchmarking.main_or_side(SIDES, main)
