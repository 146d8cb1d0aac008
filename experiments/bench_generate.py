"""Captioning speed: mmjax ``generate`` vs transformers ``generate()`` on the same ViT-GPT2 (tokens/s, ms per token).

One model, built once with transformers (``VisionEncoderDecoderModel``: a ``ViTModel`` encoder and a GPT-2 decoder
with cross-attention, random weights from a fixed seed, float32) and saved with ``save_pretrained`` to a temporary
directory by a process of its own (side ``build``). The torch side loads it with ``from_pretrained``; the mmjax side
with :func:`mmjax.convert.from_hf` (``model.safetensors`` read with ``safetensors.numpy``: the mmjax process never
imports torch, and reports that it did not). Both sides compute the same function, so they also produce the same
sequences; the script counts the identical rows.

Every weight gets N(0, 0.05^2) noise on top of transformers' initialisation (logits of order 1, so greedy and beam
choices are not near ties), and the end-of-text token can never be chosen: ``ln_f`` makes hidden unit 0 the constant
1 (scale 0, bias 1) and the end-of-text row of the (tied) output embedding is ``-1e4`` at unit 0 and zero elsewhere,
so its logit is ``-1e4`` at every step on both sides. Every sequence therefore runs to ``max_new_tokens``, and beam
search ends when the length limit does, on both sides.

Workloads (each side in a process of its own, the two interleaved; ``experiments/benchmarking.py``):

* ``greedy`` and ``beam``: one ``generate`` call on ``batch`` images (32) for ``new_tokens`` (32) new tokens, greedy
  and beam search (``beams`` = 4, ``length_penalty`` 1, ``early_stopping`` False). mmjax:
  :func:`mmjax.generate.generate` (encode, prefill and one jitted ``while_loop`` over a KV cache); transformers:
  ``model.generate(pixel_values, ...)`` with its cache (``use_cache=True``, the default) under
  ``torch.inference_mode()``. tokens/s = batch * new_tokens / call time (beam search: output tokens, not beams).
* ``prefix``: milliseconds per new token after a decoder prompt of ``P`` tokens (16, 64, 256; start token
  included; random ids), batch ``prefix_batch`` (8). *Cached*: ``(time(P, N new) - time(P, 1 new)) / (N - 1)``
  with ``N = prefix_new`` (16), the two calls timed back to back, one sample per pair (the encoder, the prefill and
  the first token cancel out). *Uncached* (what a decoder without a KV cache pays per token), printed beside it:
  transformers: the same difference with ``use_cache=False`` and ``N = uncached_new`` (4); mmjax: one jitted
  teacher-forced decoder forward (``decode`` without a cache, encoder tokens precomputed) over ``P +
  uncached_new // 2`` tokens and the argmax of its last logits: the mean sequence length of the steps that
  transformers' difference covers. With a cache the cost per token should stay flat as ``P`` grows.

Compilation (mmjax: the first call of each program) and ``--warmup`` untimed calls are excluded; each process then
makes ``--steps`` timed calls (pairs for ``prefix``); median and min-max over all ``--rounds`` processes. Ratios are
mmjax's throughput / transformers' (= transformers' median time / mmjax's): above 1 when mmjax is faster.

Command (a real measurement, on an idle machine: several minutes on the 2-core CPU, mostly transformers' side)::

    .venv/bin/python experiments/bench_generate.py --json /tmp/bench_generate.json
    .venv/bin/python experiments/bench_generate.py --quick        # tiny sizes, one round: checks that it runs

Configs:
  small  ViT 64 px, patch 8, width 192, depth 4, 3 heads, MLP 768; GPT-2 n_embd 256, 4 layers, 4 heads, vocab 8000,
         320 positions; batch 32, 32 new tokens, beam 4; prefixes 16, 64, 256 at batch 8 (the default)
  tiny   16 px, patch 8, ViT width 32, depth 1; GPT-2 width 48, 1 layer, vocab 64 (for the tests and --quick)

mmjax runs on jax's default backend, transformers on the CPU with one thread per core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmarking  # noqa: E402

BOS, EOS, PAD = 1, 2, 3  # decoder start, end of text (never generated here, see above), padding
FIRST_WORD = 4  # random prompt ids are drawn from [FIRST_WORD, vocab)
WEIGHT_NOISE = 0.05
EOS_LOGIT = -1.0e4
CONFIGS = {
    "small": dict(
        image=64, patch=8, vit_width=192, vit_depth=4, vit_heads=3, vit_mlp=768,
        width=256, depth=4, heads=4, vocab=8000, positions=320,
        batch=32, new_tokens=32, beams=4, prefixes=[16, 64, 256], prefix_batch=8, prefix_new=16, uncached_new=4,
    ),
    "tiny": dict(
        image=16, patch=8, vit_width=32, vit_depth=1, vit_heads=2, vit_mlp=64,
        width=48, depth=1, heads=2, vocab=64, positions=40,
        batch=3, new_tokens=5, beams=2, prefixes=[4, 16], prefix_batch=2, prefix_new=4, uncached_new=3,
    ),
}  # fmt: skip
WORKLOADS = ("greedy", "beam", "prefix")
OVERRIDES = ("batch", "new_tokens", "beams", "prefix_batch", "prefix_new", "uncached_new")


def hf_config(cfg: dict):
    """The transformers ``VisionEncoderDecoderConfig`` of a benchmark config (special ids set at the top level)."""
    import transformers

    enc = transformers.ViTConfig(
        hidden_size=cfg["vit_width"],
        num_hidden_layers=cfg["vit_depth"],
        num_attention_heads=cfg["vit_heads"],
        intermediate_size=cfg["vit_mlp"],
        image_size=cfg["image"],
        patch_size=cfg["patch"],
    )
    dec = transformers.GPT2Config(
        vocab_size=cfg["vocab"],
        n_positions=cfg["positions"],
        n_embd=cfg["width"],
        n_layer=cfg["depth"],
        n_head=cfg["heads"],
        add_cross_attention=True,
        is_decoder=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = BOS, EOS, PAD
    return config


def build_weights(cfg: dict, directory: str, seed: int = 0) -> dict:
    """Side ``build``: the random transformers model (end of text never chosen) saved with ``save_pretrained``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.VisionEncoderDecoderModel(hf_config(cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * WEIGHT_NOISE)
        ln_f = model.decoder.transformer.ln_f
        ln_f.weight[0], ln_f.bias[0] = 0.0, 1.0  # hidden unit 0 of every position is the constant 1
        head = model.decoder.lm_head.weight  # tied: the token embedding too (end of text is never an input here)
        head[EOS] = 0.0
        head[EOS, 0] = EOS_LOGIT
    model.save_pretrained(directory)
    return {"params": int(sum(p.numel() for p in model.parameters())), "directory": directory}


def make_images(cfg: dict, batch: int, seed: int = 0):
    """``[batch, image, image, 3]`` float32 NHWC (torch gets them transposed to NCHW)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, cfg["image"], cfg["image"], 3)).astype(np.float32)


def make_prompt(cfg: dict, batch: int, length: int, seed: int = 1):
    """``[batch, length]`` int32 decoder prompt: the start token, then random word ids."""
    import numpy as np

    ids = np.random.default_rng(seed).integers(FIRST_WORD, cfg["vocab"], (batch, length)).astype(np.int32)
    ids[:, 0] = BOS
    return ids


def _check(workload: str, prefix) -> None:
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    if workload == "prefix" and (not isinstance(prefix, int) or prefix < 1):
        raise ValueError(f"workload 'prefix' needs prefix=<int >= 1>, got {prefix!r}")


def _paired(full, one, *, steps: int, warmup: int, new_steps: int) -> dict:
    """Per-token seconds ``(time(full()) - time(one())) / new_steps``, one sample per back-to-back pair."""
    for _ in range(warmup):
        full()
        one()
    per, fulls, ones = [], [], []
    for _ in range(steps):
        t = time.perf_counter()
        full()
        a = time.perf_counter() - t
        t = time.perf_counter()
        one()
        b = time.perf_counter() - t
        per.append((a - b) / new_steps)
        fulls.append(a)
        ones.append(b)
    return {"step_s": per, "full_s": fulls, "one_s": ones}


def _rows(x) -> list:
    import numpy as np

    return np.asarray(x).astype(int).tolist()


def bench_mmjax(cfg: dict, workload: str, directory: str, steps: int, warmup: int, prefix: int | None = None) -> dict:
    """Side ``mmjax``: :func:`mmjax.generate.generate` of the model converted from ``directory`` (no torch)."""
    _check(workload, prefix)
    import jax
    import jax.numpy as jnp

    from mmjax.convert import from_hf
    from mmjax.generate import generate

    model, params = from_hf(directory)
    info = {"params": int(sum(p.size for p in jax.tree.leaves(params))), "device": jax.default_backend()}

    if workload in ("greedy", "beam"):
        images = jnp.asarray(make_images(cfg, cfg["batch"]))
        beams = cfg["beams"] if workload == "beam" else 1
        out = {}

        def one():
            out["o"] = generate(model, params, images, max_new_tokens=cfg["new_tokens"], num_beams=beams)

        one()  # compiles
        timed = benchmarking.time_calls(one, steps=steps, warmup=warmup)
        seqs = out["o"].sequences
        return {**timed, **info, "sequences": _rows(seqs), "torch_imported": "torch" in sys.modules}

    images = jnp.asarray(make_images(cfg, cfg["prefix_batch"]))
    n, n_unc = cfg["prefix_new"], cfg["uncached_new"]
    prompt = make_prompt(cfg, cfg["prefix_batch"], prefix)
    out = {}

    def full():
        out["o"] = generate(model, params, images, max_new_tokens=n, prompt=prompt)

    def first():
        generate(model, params, images, max_new_tokens=1, prompt=prompt)

    full()  # compiles both programs
    first()
    cached = _paired(full, first, steps=steps, warmup=warmup, new_steps=n - 1)

    # Uncached: what one new token costs a decoder without a cache, a teacher-forced forward over the sequence.
    length = prefix + n_unc // 2
    ids = jnp.asarray(make_prompt(cfg, cfg["prefix_batch"], length))
    encoded = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(params, images)

    @jax.jit
    def uncached_step(p, ids, encoded):
        logits, _ = model.apply({"params": p}, ids, encoded=encoded, method="decode")
        return jnp.argmax(logits[:, -1], axis=-1)

    uncached_step(params, ids, encoded).block_until_ready()  # compiles
    uncached = benchmarking.time_calls(
        lambda: uncached_step(params, ids, encoded).block_until_ready(), steps=steps, warmup=warmup
    )
    generated = out["o"].sequences[:, prefix:]
    return {
        **{f"cached_{k}": v for k, v in cached.items()},
        "uncached_step_s": uncached["wall_s"],
        "uncached_length": length,
        **info,
        "sequences": _rows(generated),
        "torch_imported": "torch" in sys.modules,
    }


def bench_torch(cfg: dict, workload: str, directory: str, steps: int, warmup: int, prefix: int | None = None) -> dict:
    """Side ``torch``: transformers ``VisionEncoderDecoderModel.generate`` (CPU, one thread per core)."""
    _check(workload, prefix)
    import torch
    import transformers

    threads = benchmarking.torch_threads()
    model = transformers.VisionEncoderDecoderModel.from_pretrained(directory).eval()
    n_params = sum(p.numel() for p in model.parameters())
    info = {"params": int(n_params), "device": "cpu", "threads": threads}
    info |= {"torch": torch.__version__, "transformers": transformers.__version__}
    options = dict(
        do_sample=False,
        decoder_start_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        length_penalty=1.0,
        early_stopping=False,
    )

    def gen(pixels, new_tokens, **kw):
        with torch.inference_mode():
            return model.generate(pixels, max_new_tokens=new_tokens, **options, **kw)

    if workload in ("greedy", "beam"):
        pixels = torch.from_numpy(make_images(cfg, cfg["batch"]).transpose(0, 3, 1, 2).copy())
        beams = cfg["beams"] if workload == "beam" else 1
        out = {}

        def one():
            out["o"] = gen(pixels, cfg["new_tokens"], num_beams=beams)

        timed = benchmarking.time_calls(one, steps=steps, warmup=warmup)
        return {**timed, **info, "sequences": _rows(out["o"])}

    pixels = torch.from_numpy(make_images(cfg, cfg["prefix_batch"]).transpose(0, 3, 1, 2).copy())
    prompt = torch.from_numpy(make_prompt(cfg, cfg["prefix_batch"], prefix)).long()
    n, n_unc = cfg["prefix_new"], cfg["uncached_new"]
    out = {}

    def full():
        out["o"] = gen(pixels, n, decoder_input_ids=prompt)

    cached = _paired(
        full, lambda: gen(pixels, 1, decoder_input_ids=prompt), steps=steps, warmup=warmup, new_steps=n - 1
    )
    uncached = _paired(
        lambda: gen(pixels, n_unc, decoder_input_ids=prompt, use_cache=False),
        lambda: gen(pixels, 1, decoder_input_ids=prompt, use_cache=False),
        steps=steps,
        warmup=warmup,
        new_steps=n_unc - 1,
    )
    return {
        **{f"cached_{k}": v for k, v in cached.items()},
        **{f"uncached_{k}": v for k, v in uncached.items()},
        **info,
        "sequences": _rows(out["o"][:, prefix:]),
    }


SIDES = {"mmjax": bench_mmjax, "torch": bench_torch, "build": build_weights}


def same_rows(result: dict) -> tuple[int, int] | None:
    """How many rows of the first run's sequences agree between the sides: ``(equal, rows)`` (None: a side failed)."""
    a, b = (result["sides"][s] for s in ("mmjax", "torch"))
    if "error" in a or "error" in b:
        return None
    x, y = a["runs"][0]["sequences"], b["runs"][0]["sequences"]
    return sum(r == s for r, s in zip(x, y, strict=False)), max(len(x), len(y))


def _ms(summary: dict) -> str:
    return f"{summary['median'] * 1e3:8.2f} ms/token ({summary['min'] * 1e3:.2f}-{summary['max'] * 1e3:.2f})"


def _faster(x) -> str:
    if x is None:
        return "-"
    if not x > 0:  # a per-token difference at or below zero: the timer's noise exceeds the cost
        return "n/a (a median per-token time <= 0: below the noise; raise --steps or prefix_new)"
    return f"{x:.2f} ({'mmjax faster' if x > 1 else 'mmjax slower'})"


def _report_tokens(res: dict, cfg: dict, workload: str) -> None:
    tokens = cfg["batch"] * cfg["new_tokens"]
    for side in ("mmjax", "torch"):
        s = res["sides"][side]
        if "error" in s:
            print(f"  {side:6}: error: {s['error']}", flush=True)
            continue
        w, run = s["wall_s"], s["runs"][0]
        extra = f"{run['params']} params, {run['device']}"
        if side == "torch":
            extra += f", torch {run['torch']}, transformers {run['transformers']}, {run['threads']} threads"
        else:
            extra += f", torch imported: {'yes' if any(r['torch_imported'] for r in s['runs']) else 'no'}"
        print(
            f"  {side:6}: {tokens / w['median']:9.1f} tokens/s ({tokens / w['max']:.1f}-{tokens / w['min']:.1f}; "
            f"{w['median'] * 1e3:.1f} ms per generate call; {extra})",
            flush=True,
        )
    speed = benchmarking.ratio(res, "mmjax", "torch")
    res["ratio_torch_time_over_mmjax"] = speed
    print(f"  mmjax / transformers tokens/s: {_faster(speed)}")
    rows = same_rows(res)
    if rows:
        print(f"  identical sequences: {rows[0]}/{rows[1]} rows")
    print(f"  {benchmarking.describe_load(res['load'])}", flush=True)


def _report_prefix(res: dict, cfg: dict) -> None:
    for side in ("mmjax", "torch"):
        s = res["sides"][side]
        if "error" in s:
            print(f"  {side:6}: error: {s['error']}", flush=True)
            continue
        run = s["runs"][0]
        how = (
            f"one decoder forward over {run['uncached_length']} tokens"
            if side == "mmjax"
            else f"use_cache=False, {cfg['uncached_new']} new tokens"
        )
        print(
            f"  {side:6}: cached {_ms(s['cached_step_s'])}   uncached {_ms(s['uncached_step_s'])} [{how}]",
            flush=True,
        )
    cached = benchmarking.ratio(res, "mmjax", "torch", key="cached_step_s")
    uncached = benchmarking.ratio(res, "mmjax", "torch", key="uncached_step_s")
    res["ratio_torch_time_over_mmjax"] = cached
    res["ratio_uncached_torch_time_over_mmjax"] = uncached
    print(f"  mmjax / transformers tokens/s, cached: {_faster(cached)}; uncached: {_faster(uncached)}")
    rows = same_rows(res)
    if rows:
        print(f"  identical generated tokens: {rows[0]}/{rows[1]} rows")
    print(f"  {benchmarking.describe_load(res['load'])}", flush=True)


def _median(res: dict, side: str, key: str):
    s = res["sides"][side]
    return s[key]["median"] if key in s else None


def _summary_table(results: dict, prefixes: list[int]) -> None:
    cols = [("mmjax", "cached_step_s"), ("torch", "cached_step_s"), ("mmjax", "uncached_step_s")]
    cols.append(("torch", "uncached_step_s"))
    names = ["mmjax cached", "transformers cached", "mmjax uncached", "transformers uncached"]
    print("\nms per new token (median):")
    print(f"  {'prefix':>6} " + " ".join(f"{n:>22}" for n in names))
    table = {}
    for p in prefixes:
        res = results["workloads"][f"prefix{p}"]
        table[p] = [_median(res, side, key) for side, key in cols]
        cells = " ".join(f"{v * 1e3:22.2f}" if v is not None else f"{'error':>22}" for v in table[p])
        print(f"  {p:6d} {cells}{'  LOADED' if res['load']['loaded'] else ''}")
    lo, hi = min(prefixes), max(prefixes)
    growth = []
    for i, name in enumerate(names):
        a, b = table[lo][i], table[hi][i]
        growth.append(f"{name} {b / a:.2f}" if a and b and a > 0 and b > 0 else f"{name} -")
    print(f"  prefix {hi} / prefix {lo} (1 = flat): " + ", ".join(growth))
    results["ms_per_token"] = {str(p): dict(zip(names, v, strict=True)) for p, v in table.items()}


def main(argv: list[str] | None = None) -> dict:
    """Builds the weights (a process of its own), then runs both sides of each workload, interleaved, each in its
    own process; prints (and optionally writes) the results."""
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="small", help="model sizes and batches")
    parser.add_argument("--quick", action="store_true", help="--config tiny --rounds 1 --steps 1 --warmup 1")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {WORKLOADS}")
    parser.add_argument("--prefixes", default=None, help="comma-separated prompt lengths (default: the config's)")
    parser.add_argument("--steps", type=int, default=3, help="timed calls (pairs for prefix) per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per process after compilation")
    parser.add_argument("--rounds", type=int, default=3, help="processes per side and workload, interleaved")
    for key in OVERRIDES:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"the config's {key}")
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.rounds, args.steps, args.warmup = "tiny", 1, 1, 1
    cfg = dict(CONFIGS[args.config])
    for key in OVERRIDES:
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.prefixes:
        try:
            cfg["prefixes"] = [int(x) for x in args.prefixes.split(",") if x]
        except ValueError:
            parser.error(f"--prefixes must be comma-separated ints, got {args.prefixes!r}")
    workloads = [w for w in args.workloads.split(",") if w]
    if not workloads or any(w not in WORKLOADS for w in workloads):
        parser.error(f"--workloads must name workloads from {WORKLOADS}, got {args.workloads!r}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or min(cfg[k] for k in OVERRIDES) < 1:
        parser.error(f"need --steps >= 1, --warmup >= 0, --rounds >= 1 and positive sizes; got {args}, {cfg}")
    if min(cfg["prefix_new"], cfg["uncached_new"]) < 2 or not cfg["prefixes"] or min(cfg["prefixes"]) < 1:
        parser.error(f"need prefix_new, uncached_new >= 2 and prefixes >= 1; got {cfg}")
    longest = max(1 + cfg["new_tokens"], max(cfg["prefixes"]) + max(cfg["prefix_new"], cfg["uncached_new"]))
    if longest > cfg["positions"]:
        parser.error(f"sequences of {longest} tokens exceed the decoder's {cfg['positions']} positions: {cfg}")

    info = benchmarking.machine()
    print(benchmarking.describe_machine(info), flush=True)
    print(f"config {args.config}: {cfg}", flush=True)
    results = {"machine": info, "config": args.config, "sizes": cfg, "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        built = benchmarking.run_side(__file__, "build", {"cfg": cfg, "directory": tmp})
        if "error" in built:
            raise SystemExit(f"building the transformers model failed: {built['error']}")
        print(f"transformers VisionEncoderDecoderModel (ViT + GPT-2), {built['params']} parameters", flush=True)
        base = {"cfg": cfg, "directory": tmp, "steps": args.steps, "warmup": args.warmup}
        for workload in workloads:
            if workload in ("greedy", "beam"):
                what = "greedy" if workload == "greedy" else f"beam search, {cfg['beams']} beams"
                print(f"\n{what}: batch {cfg['batch']}, {cfg['new_tokens']} new tokens", flush=True)
                res = benchmarking.compare(
                    __file__, ["mmjax", "torch"], {**base, "workload": workload}, rounds=args.rounds
                )
                _report_tokens(res, cfg, workload)
                results["workloads"][workload] = res
                continue
            for p in cfg["prefixes"]:
                print(
                    f"\nms per new token after a prompt of {p} tokens, batch {cfg['prefix_batch']} (cached: "
                    f"{cfg['prefix_new']} new tokens minus 1; transformers uncached: {cfg['uncached_new']} minus 1)",
                    flush=True,
                )
                options = {**base, "workload": "prefix", "prefix": p}
                res = benchmarking.compare(__file__, ["mmjax", "torch"], options, rounds=args.rounds)
                _report_prefix(res, cfg)
                results["workloads"][f"prefix{p}"] = res
    if "prefix" in workloads:
        _summary_table(results, cfg["prefixes"])
    if args.json:
        benchmarking.write_json(args.json, results)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    benchmarking.main_or_side(SIDES, main)
